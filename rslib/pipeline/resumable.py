"""One resumable, sharded dataset-level stage: the mechanism certification and attacks share.

A dataset-level stage computes one row per evaluated image into a table ``results/<table>.csv``
with metadata ``results/<table>.json``. :func:`compute_rows` does it in this order:

1. **guard**: a dict (parameter digest, checkpoint sha256, device type) that a finished table and
   the partial files must match; a finished table with the same guard is reused (nothing runs);
2. **partials**: rank 0 keeps the partial row files only if ``results/.<table>.partial.json``
   holds the same guard (else they are discarded with a message); then all ranks meet;
3. **rows**: the selection is cut into chunks of ``chunk_size`` images, rank ``r`` of ``w`` takes
   chunks ``r::w``; a chunk is skipped when its rows exist (``whole_chunks=True``: a chunk runs again
   unless all of its images have rows, for stages whose randomness is seeded per chunk); every
   finished chunk is APPENDED to ``results/.<table>.rank<r>.partial.csv``, flushed and fsynced, so
   an interruption loses at most the chunk in flight (a torn last line is dropped on resume);
4. **merge**: when every rank is done, rank 0 merges the rows (one per image, sorted by ``idx``),
   checks that none is missing, and the caller's ``publish`` writes the table and its metadata
   atomically; then the partial files are removed.

Appending and reading the partial files: ``rslib.util.tables`` (``append_rows``, ``read_rows``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from rslib.nn import distributed
from rslib.pipeline import layout
from rslib.util.files import atomic_write_json, atomic_write_text, json_safe, read_json_dict
from rslib.util.progress import progress_bar
from rslib.util.tables import append_rows, count_rows, csv_text, read_rows

Log = Callable[[str], None]


def finished_table(results: Path, table: str, guard: Mapping[str, str],
                   also: Callable[[dict[str, Any]], bool] = lambda _: True) -> bool:
    """Whether ``results/<table>.csv`` exists and ``<table>.json`` holds ``guard``'s digest and checkpoint
    (and satisfies ``also``): a finished result that may be reused."""
    final, metadata = layout.table_paths(results, table)
    meta = read_json_dict(metadata)
    if meta is None or not final.exists():
        return False
    done = meta.get("guard", {})
    return also(meta) and all(done.get(k) == guard[k] for k in ("digest", "checkpoint_sha256"))


def _float(text: str) -> float:
    value = float(text)
    if math.isnan(value):
        raise ValueError("NaN")
    return value


#: How a field of each dtype is read back (ValueError / KeyError for a bad field).
_PARSERS: dict[str, Callable[[str], Any]] = {
    "int64": int, "Int64": lambda t: pd.NA if t == "" else int(t), "float64": _float, "object": str,
    "bool": {"True": True, "False": False}.__getitem__, "boolean": {"True": True, "False": False, "": pd.NA}.__getitem__}


@dataclass(frozen=True)
class RowSchema:
    """The typed rows of a partial file. ``dtypes`` maps each column, in file order, to its pandas dtype,
    which also says how a field is read back: 'int64', 'float64' (NaN refused) and 'bool' strictly,
    'Int64' and 'boolean' also from an empty field (missing), 'object' as the text; ``check`` may
    refuse a parsed row (as ``{column: value}``) with a ValueError."""

    dtypes: Mapping[str, str]
    check: Callable[[dict[str, Any]], None] = lambda row: None

    @property
    def columns(self) -> list[str]:
        return list(self.dtypes)

    def parse(self, fields: list[str]) -> list[Any]:
        """One line's typed values; ValueError / KeyError for a bad line."""
        if len(fields) != len(self.dtypes):
            raise ValueError("wrong number of fields")
        row = [_PARSERS[dtype](text) for dtype, text in zip(self.dtypes.values(), fields, strict=True)]
        self.check(dict(zip(self.dtypes, row, strict=True)))
        return row

    def frame(self, rows: Iterable[Sequence[Any]] = (), columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Rows as a frame with ``columns`` (default: all), each of its dtype."""
        columns = list(self.dtypes if columns is None else columns)
        return pd.DataFrame(list(rows), columns=columns).astype({c: self.dtypes[c] for c in columns})


@dataclass(frozen=True)
class ShardedTable:
    """``results/<table>.csv`` computed row by row; ``keep`` says which row of an image wins when a
    chunk was computed twice ('first' or 'last')."""

    results: Path
    table: str
    schema: RowSchema
    keep: Literal["first", "last"] = "first"

    @property
    def final(self) -> Path:
        return layout.table_paths(self.results, self.table)[0]

    def finished(self, guard: Mapping[str, str], also: Callable[[dict[str, Any]], bool] = lambda _: True) -> bool:
        return finished_table(self.results, self.table, guard, also)

    def read_partial(self, path: Path) -> tuple[pd.DataFrame, bool]:
        """Rows of one partial file and whether it was clean (torn or unparsable lines are dropped)."""
        rows, clean = read_rows(path, self.schema.columns, self.schema.parse)
        return self.schema.frame(rows), clean

    def merge(self, selection: Sequence[int]) -> pd.DataFrame:
        """Every rank's rows for ``selection``, one per index, sorted by ``idx``."""
        paths = layout.partial_files(self.results, self.table)
        frames = [frame for path in paths if len(frame := self.read_partial(path)[0])]
        if not frames:
            return self.schema.frame([])
        frame = pd.concat(frames, ignore_index=True)
        frame = frame[frame["idx"].isin(set(selection))].drop_duplicates("idx", keep=self.keep)
        return frame.sort_values("idx", kind="stable").reset_index(drop=True)

    def prepare(self, guard: Mapping[str, str], log: Log) -> None:
        """Rank 0: keep the partial files only if they were written under ``guard``."""
        stale = layout.partial_files(self.results, self.table)
        sidecar = read_json_dict(layout.partial_guard_path(self.results, self.table))
        if stale and (sidecar is None or sidecar.get("guard") != dict(guard)):
            log(f"{self.table}: discarding {len(stale)} partial file(s) in {self.results}: they were written for "
                "different parameters, checkpoint or device; starting from scratch")
            for path in stale:
                path.unlink(missing_ok=True)
        elif stale:
            log(f"{self.table}: resuming from {len(stale)} partial file(s) in {self.results}")
        atomic_write_json(layout.partial_guard_path(self.results, self.table), {"guard": dict(guard)})

    def repair(self, rank: int, log: Log) -> Path:
        """Rewrite this rank's partial file without a torn or unreadable line; return its path."""
        own = layout.partial_path(self.results, self.table, rank)
        rows, clean = self.read_partial(own)
        if not clean:
            log(f"{own.name}: dropped a torn or unreadable line; those images are computed again")
            atomic_write_text(own, csv_text(rows))
        return own

    def complete(self, selection: Sequence[int]) -> pd.DataFrame:
        """The merged rows; RuntimeError naming the images without a row."""
        table = self.merge(selection)
        missing = sorted(set(selection) - set(table["idx"].tolist()))
        if missing:
            raise RuntimeError(f"{self.table}: incomplete: {len(missing)} image(s) have no row (first: "
                               f"{missing[:5]}); run again to compute them")
        return table

    def publish(self, text: str, meta: Mapping[str, Any]) -> None:
        """Write the table and its metadata atomically, then remove the partial files and their guard."""
        final, metadata = layout.table_paths(self.results, self.table)
        atomic_write_text(final, text)
        atomic_write_json(metadata, json_safe(dict(meta)))
        for path in layout.partial_files(self.results, self.table):
            path.unlink(missing_ok=True)
        layout.partial_guard_path(self.results, self.table).unlink(missing_ok=True)


def rows_on_disk(table: str) -> Callable[[Path], str]:
    """A stage's ``progress`` while it computes ``table`` (a glob pattern): the rows of its partial files."""
    def progress(exp_dir: Path) -> str:
        rows = count_rows(layout.partial_files(layout.results_dir(exp_dir), table))
        return f"{rows} row(s) on disk" if rows else ""
    return progress


ChunkResult = tuple[pd.DataFrame, Mapping[str, str]]


def compute_rows(table: ShardedTable, ctx: distributed.Context, selection: Sequence[int], chunk_size: int,
                guard: Mapping[str, str], compute: Callable[[list[int]], ChunkResult], *, whole_chunks: bool,
                progress: bool, log: Log, describe: Callable[[int], str]) -> tuple[pd.DataFrame | None, int]:
    """Compute the rows of ``selection`` (resuming, sharded over ranks); return them merged on rank 0
    (None on the other ranks) and the number of images that had no row when the call started.

    ``compute(chunk)`` returns the rows of a list of image indices and a progress-bar postfix;
    ``describe(remaining)`` the line announcing the work. Call only when ``table.finished(guard)`` is False."""
    say = log if ctx.is_main else (lambda _: None)
    table.results.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        table.prepare(guard, say)
    ctx.barrier()
    done = set(table.merge(selection)["idx"].tolist())
    chunks = [list(selection[i:i + chunk_size]) for i in range(0, len(selection), chunk_size)]
    mine = chunks[ctx.rank::ctx.world_size]
    todo = ([chunk for chunk in mine if not set(chunk) <= done] if whole_chunks
            else [left for chunk in mine if (left := [i for i in chunk if i not in done])])
    own = table.repair(ctx.rank, say)
    say(describe(len(selection) - len(done)))
    total = sum(len(chunk) for chunk in mine)
    bar = progress_bar(total=total, initial=total - sum(len(chunk) for chunk in todo), unit="img", desc=table.table,
               disable=not (progress and ctx.is_main))
    for chunk in todo:
        rows, postfix = compute(chunk)
        append_rows(own, rows, table.schema.columns)
        bar.update(len(chunk))
        bar.set_postfix(dict(postfix))
    bar.close()
    ctx.barrier()
    return (table.complete(selection) if ctx.is_main else None), len(selection) - len(done)
