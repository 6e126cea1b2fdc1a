"""The certify stage: Monte-Carlo certification of an experiment's test subset, sharded and resumable.

``certify_experiment(experiment)`` certifies the chosen test subset (every ``certify.skip``-th test
image, at most ``certify.max``) with ``rslib.core.certify.Smooth`` and returns ``results/certify.csv``
(columns of ``Certificate.to_frame()``) with ``results/certify.json`` (parameters, noise, checkpoint,
timing, summary, provenance). Rows are computed by ``rslib.pipeline.resumable.compute_rows``: ``images_per_batch``
images per call, appended per rank, resumed after an interruption, merged by rank 0; ``Smooth`` draws
the noise of input ``i`` from its own stream seeded by ``(seed, i)``, so rows do not depend on
batching, interruptions or the number of ranks. A finished table with the same parameter digest and
checkpoint is reused.

With ``certify.deterministic`` (a Gaussian-averaged model), rank 0 also writes HeatSmoothing's
APPROXIMATE L-bound (``rslib.core.lbound.lbound_rows``) into ``results/lbound_certify.csv`` and times
one-pass classification against Monte-Carlo prediction with ``n0`` draws.

Under ``torchrun`` every rank runs it: ``torchrun --nproc_per_node N -m rslib stage certify PARAMS``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from rslib.core.autotune import AUTO
from rslib.core.certify import SEQUENTIAL_COLUMNS, SOURCE_COLUMNS, Smooth, frame_columns, look_sizes
from rslib.core.lbound import LBOUND_COLUMNS, lbound_rows
from rslib.core.metrics import certified_accuracy, certify_summary, certify_timing, lbound_as_table
from rslib.core.noises import NORM_LABELS, Noise
from rslib.nn import checkpoints, distributed
from rslib.nn.data import DATASETS, batch_of
from rslib.pipeline import inputs, layout, resumable
from rslib.pipeline.params import Experiment
from rslib.pipeline.resumable import RowSchema, ShardedTable, compute_rows
from rslib.pipeline.stage import STAGES, CheckpointField, Stage
from rslib.util.files import read_json_dict
from rslib.util.provenance import provenance
from rslib.util.tables import csv_text, write_csv

#: Columns of ``results/certify.csv``: those of ``Certificate.to_frame()`` (sequential adds ``SEQUENTIAL_COLUMNS``).
ROW_COLUMNS = frame_columns(sequential=False)
_AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

_INT = ("idx", "prediction", "count_top", "count_second", "n0", "n", "selected", *SEQUENTIAL_COLUMNS)
_FLOAT = ("alpha", "prob_lb", "radius_l1", "radius_l2", "radius_linf", "seconds_predict", "seconds_certify")
#: Every column's dtype, which is also how ``RowSchema`` reads a partial row back.
_DTYPES = ({c: "int64" for c in _INT} | {c: "float64" for c in _FLOAT} | {c: "object" for c in SOURCE_COLUMNS}
           | {"label": "Int64", "correct": "boolean", "in_selection": "boolean"})
_SOURCES = {*NORM_LABELS, "none"}


def _check_sources(row: dict[str, Any]) -> None:
    for column in SOURCE_COLUMNS:
        if row[column] not in _SOURCES:
            raise ValueError(f"{column}: unknown source norm {row[column]!r}")


def rows_frame(rows: Iterable[Sequence[Any]] = (), columns: Sequence[str] = ROW_COLUMNS) -> pd.DataFrame:
    """Parsed rows as a frame with ``Certificate.to_frame()``'s columns and dtypes."""
    return RowSchema(_DTYPES).frame(rows, columns)


def certify_table(results: Path, sequential: bool = False) -> ShardedTable:
    """The sharded table ``results/certify.csv`` (with the sequential columns when ``sequential``)."""
    schema = RowSchema({c: _DTYPES[c] for c in frame_columns(sequential)}, _check_sources)
    return ShardedTable(results, layout.CERTIFY_TABLE, schema)


def _check(experiment: Experiment, num_classes: int) -> None:
    spec = experiment.certify
    if spec.topk >= num_classes:
        raise ValueError(f"certify.topk must be < the number of classes ({num_classes}); got {spec.topk}")
    if spec.deterministic and experiment.noise.name.lower() != "gaussian":
        raise ValueError("certify.deterministic (the L-bound of a Gaussian-averaged model) needs noise.name "
                         f"Gaussian; got {experiment.noise.name}")


def certify_experiment(experiment: Experiment, output_dir: str | Path | None = None, *, progress: bool = True,
                       log: Callable[[str], None] = print) -> Path:
    """Certify the experiment's test subset (resuming, sharded under ``torchrun``); return certify.csv."""
    if experiment.certify is None:
        raise ValueError(f"experiment '{experiment.experiment}' has no certify section")
    spec = experiment.certify
    output_dir = layout.stage_output_dir(experiment.experiment, output_dir)
    results = layout.results_dir(output_dir)
    table = certify_table(results, sequential=spec.radii_of_interest is not None)
    ctx = distributed.setup(experiment.device)
    say = log if ctx.is_main else (lambda _: None)
    num_classes = DATASETS[experiment.data.dataset].num_classes
    _check(experiment, num_classes)
    checkpoint, info = inputs.stage_checkpoint(experiment, "certify", output_dir)
    guard = {"digest": experiment.stage_digest("certify"), "checkpoint_sha256": info["sha256"],
             "device_type": ctx.device.type}
    if table.finished(guard, lambda meta: not meta.get("lbound") or (results / layout.LBOUND_CERTIFY).exists()):
        say(f"certification already finished: {table.final}")
        return table.final
    started = time.perf_counter()
    model = checkpoints.load(checkpoint, device=ctx.device)
    noise = inputs.experiment_noise(experiment)
    smooth = Smooth(model, noise, num_classes, seed=experiment.seed, autocast=_AUTOCAST[spec.autocast],
                    channels_last=None if spec.channels_last == AUTO else spec.channels_last)
    dataset, selection = inputs.test_selection(experiment, spec.skip, spec.max)
    counter = {"images": 0, "samples": 0, "tic": time.perf_counter()}

    def certify_chunk(chunk: list[int]) -> tuple[pd.DataFrame, dict[str, str]]:
        x, y = batch_of(dataset, chunk, ctx.device)
        frame = smooth.certify(x, y, spec.n0, spec.n, spec.alpha, spec.batch_size, spec.topk, indices=chunk,
                               radii_of_interest=spec.radii_of_interest, looks=spec.looks).to_frame()
        counter["images"] += len(chunk)
        counter["samples"] += int(frame["n0"].sum() + frame["n"].sum())
        elapsed = max(time.perf_counter() - counter["tic"], 1e-9)
        return frame, {"images/s": f"{counter['images'] / elapsed:.3g}",
                       "samples/s": f"{counter['samples'] / elapsed:.3g}"}

    def describe(remaining: int) -> str:
        return (f"certifying {len(selection)} test images (skip {spec.skip}, max {spec.max}) on {ctx.world_size} "
                f"process(es), device {ctx.device}: {remaining} to do; n0={spec.n0}, n={spec.n}, "
                f"alpha={spec.alpha}, noise {noise!r}")

    rows, fresh = compute_rows(table, ctx, selection, spec.images_per_batch, guard, certify_chunk, whole_chunks=False,
                       progress=progress, log=log, describe=describe)
    if rows is not None:
        meta = _metadata(experiment, guard, noise, info, rows, selection, ctx,
                         wall=time.perf_counter() - started, fresh=fresh)
        meta["autotune"] = smooth.choice.metadata() if smooth.choice is not None else None
        if spec.deterministic:
            meta["lbound"] = _write_lbound(model, dataset, selection, noise.sigma, spec, ctx.device, results,
                                           meta["timing"]["seconds_predict_per_image"])
        table.publish(csv_text(rows), meta)
        say(f"certified {len(rows)} images in {meta['timing']['wall_seconds']:.1f} s -> {table.final}")
    ctx.barrier()
    return table.final


def _metadata(experiment: Experiment, guard: dict[str, str], noise: Noise, info: dict[str, Any], rows: pd.DataFrame,
              selection: Sequence[int], ctx: distributed.Context, wall: float, fresh: int) -> dict[str, Any]:
    spec = experiment.certify
    return {
        "experiment": experiment.experiment, "guard": guard, "params": experiment.to_dict(), "seed": experiment.seed,
        "noise": noise.spec(), "noise_description": repr(noise), "checkpoint": info, "columns": list(rows.columns),
        "selection": {"split": "test", "skip": spec.skip, "max": spec.max, "images": len(selection)},
        "world_size": ctx.world_size, "device": str(ctx.device),
        "timing": {**certify_timing(rows, spec.n0, float(rows["n"].mean()) if len(rows) else spec.n),
                   "wall_seconds": wall, "images_certified_in_last_call": fresh,
                   "wall_seconds_per_image": wall / fresh if fresh else None},
        "summary": certify_summary(rows).reset_index().to_dict(orient="records"),
        "accuracy_denominator": "all evaluated images (abstains count as failures)",
        "lbound": None, "provenance": provenance(), "sequential": _sequential_summary(spec, rows)}


def _sequential_summary(spec, rows: pd.DataFrame) -> dict[str, Any] | None:
    """How sequential certification went: looks, levels, radii of interest, draws used (None: fixed n)."""
    if spec.radii_of_interest is None:
        return None
    return {"radii_of_interest": spec.radii_of_interest, "looks": spec.looks,
            "look_sizes": look_sizes(spec.n, spec.looks), "alpha": spec.alpha, "alpha_per_look": spec.alpha / spec.looks,
            "mean_draws_per_image": float(rows["n"].mean()) if len(rows) else None,
            "mean_draws_over_n": float(rows["n"].mean()) / spec.n if len(rows) else None,
            "images_per_stop_look": {int(k): int(v) for k, v in rows["stop_look"].value_counts().sort_index().items()},
            "note": "certified accuracy is exact at the radii of interest only: between them an input that "
                    "stopped early reports a looser radius"}


def _write_lbound(model: torch.nn.Module, dataset, selection: Sequence[int], sigma: float, spec,
                  device: torch.device, results: Path, monte_carlo_seconds: float) -> dict[str, Any]:
    """``lbound_certify.csv`` (one clean forward per batch, after one warm-up pass) and its metadata."""
    frames = []
    for start in range(0, len(selection), spec.images_per_batch):
        chunk = list(selection[start:start + spec.images_per_batch])
        x, y = batch_of(dataset, chunk, device)
        frames.append(lbound_rows(model, x, y, chunk, sigma, spec.topk, warm_up=start == 0))
    lbound = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LBOUND_COLUMNS)
    write_csv(results / layout.LBOUND_CERTIFY, lbound)
    one_pass = float(lbound["seconds"].mean())
    return {
        "file": layout.LBOUND_CERTIFY, "approximate": True, "norm": "l2",
        "formula": "R = sigma * sqrt(pi/2) * (p_top - p_runner_up) of the softmax outputs",
        "note": "APPROXIMATE: holds for an exact Gaussian average; a trained averaged network only "
                "approximates one. certify.csv holds the rigorous Monte-Carlo certificate.",
        "certified_accuracy_r0": float(certified_accuracy(lbound_as_table(lbound), [0.0], "l2")[0]),
        "seconds_per_image_one_pass": one_pass, "seconds_per_image_monte_carlo_prediction": monte_carlo_seconds,
        "monte_carlo_n0": spec.n0,
        "speedup_one_pass_vs_monte_carlo": monte_carlo_seconds / one_pass if one_pass > 0 else math.inf,
        "images_per_forward": spec.images_per_batch}


def read_table(path: str | Path) -> pd.DataFrame:
    """One ``certify.csv`` with its dtypes (labels may be missing, correctness nullable)."""
    return pd.read_csv(path, dtype={"label": "Int64", "correct": "boolean", "in_selection": "boolean"})


def read_results(output_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame | None]:
    """(certify.csv rows, certify.json metadata, lbound_certify.csv rows or None) of a finished run."""
    results = layout.results_dir(Path(output_dir))
    final, metadata = layout.table_paths(results, layout.CERTIFY_TABLE)
    meta = read_json_dict(metadata) or {}
    lbound = pd.read_csv(results / layout.LBOUND_CERTIFY) if meta.get("lbound") else None
    return read_table(final), meta, lbound


STAGES.register("certify", Stage(
    "certify", notebook="certify", requires=("data", "model", "noise", "certify"), reads=("train",),
    checkpoint=CheckpointField("certify", "checkpoint"),
    writes=("results/certify.csv", "results/certify.json", "results/lbound_certify.csv"),
    progress=resumable.rows_on_disk(layout.CERTIFY_TABLE), compute=certify_experiment,
    description="Monte-Carlo certification of the test subset (sharded, resumable)"))
