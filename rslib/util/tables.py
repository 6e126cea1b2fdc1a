"""The one CSV format of rslib's tables: no index, ``\\n`` line ends; written atomically or appended."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from rslib.util.files import atomic_write_text


def csv_text(frame: pd.DataFrame, index: bool = False) -> str:
    """A table as CSV text (``index``: with the frame's index as the first column)."""
    return frame.to_csv(index=index, lineterminator="\n")


def write_csv(path: str | os.PathLike[str], frame: pd.DataFrame, index: bool = False) -> Path:
    """Write a table atomically; return its path."""
    atomic_write_text(path, csv_text(frame, index))
    return Path(path)


def append_rows(path: Path, frame: pd.DataFrame, columns: Sequence[str]) -> None:
    """Append ``frame[columns]`` (with the header if the file is new or empty), flushed and fsynced."""
    header = not path.exists() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write(frame[list(columns)].to_csv(index=False, header=header, lineterminator="\n"))
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: Path, columns: Sequence[str],
              parse: Callable[[list[str]], list[Any]]) -> tuple[list[list[Any]], bool]:
    """Parsed rows of an append-only file and whether it was clean.

    Only newline-terminated lines count; a line that ``parse`` rejects (ValueError / KeyError) is
    dropped; a file whose header is not ``columns`` yields no rows. A missing file is empty and clean."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], True
    *lines, tail = text.split("\n")
    clean = tail == ""
    if not lines or lines[0] != ",".join(columns):
        return [], not lines and clean
    rows = []
    for fields in csv.reader(lines[1:]):
        try:
            rows.append(parse(fields))
        except (ValueError, KeyError):
            clean = False
    return rows, clean


def count_rows(paths: Sequence[Path]) -> int:
    """Data lines (all lines but the header) of the CSV files ``paths`` that can be read."""
    rows = 0
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                rows += max(sum(1 for _ in f) - 1, 0)
        except OSError:
            continue
    return rows
