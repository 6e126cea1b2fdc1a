"""The attack stage: DDN and minimal-distance PGD on an experiment's test subset, resumable, sharded.

``attack_experiment(experiment)`` attacks the chosen test subset (every ``attack.skip``-th test image,
at most ``attack.max``) with each attack of ``attack.attacks`` and writes, under ``results/``:

- ``attack_<name>.csv``: one row per image, ``idx, label, attack, success, l0, l1, l2, linf``
  (``rslib.core.attacks.FRAME_COLUMNS``); a failed attack has every distance ``inf`` (never 0, never the
  budget); an image the target already misclassifies is a success at distance 0;
- ``attack_<name>.json``: its parameters, seed, settings, judge, timing (seconds per image) and
  provenance, and the digest that makes a finished file reusable;
- ``lbound.csv`` / ``lbound.json``: HeatSmoothing's per-image test statistics
  (``rslib.core.lbound.test_statistics``: margins, margin-gradient norms, the APPROXIMATE L-bound), on the
  averaged softmax over ``R`` noise draws for smoothed targets;
- ``attack.json``: everything together (parameters, checkpoint, selection, per-attack summaries and
  timing, provenance).

Targets (``attack.target``):

- ``base``: the model as a plain classifier. A heat-averaged (HeatSmoothing) model is a base target:
  it is a deterministic classifier, and success is judged by its argmax.
- ``smoothed``: randomized smoothing. The attack follows the gradient of the smoothed soft
  classifier ``rslib.core.attacks.smoothed(model, noise, m = attack.draws)`` (expectation over noise), and
  every success is re-checked by the smoothed HARD classifier: ``Smooth.predict`` with
  ``attack.judge_n`` draws and its abstain test at ``attack.judge_alpha`` (``judge: predict``; an
  abstention is not a success), or a majority vote over ``judge_n`` draws (``judge: vote``).

PGD runs in minimal-distance mode (``rslib.core.attacks.pgd_minimal``: bisection over the budget in
``[0, attack.eps_max]``), so like DDN it reports the smallest successful perturbation it found.

Resume and sharding as in ``rslib.pipeline.resumable.compute_rows``, in chunks of ``attack.images_per_batch``
images: an interrupted attack resumes at its first unfinished chunk. The noise of a chunk comes from generators
seeded by (seed, attack, first index of the chunk), so rows do not depend on interruptions or on the number of
ranks (a chunk is therefore always computed whole). A finished attack whose digest and checkpoint match is
skipped, so adding an attack to ``attack.attacks`` or changing ``ddn_steps`` re-runs only what changed. The
L-bound statistics are computed by rank 0.

Under ``torchrun`` every rank runs it: ``torchrun --nproc_per_node N -m rslib stage attack PARAMS``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from rslib.core.attacks import ATTACKS, FRAME_COLUMNS, AttackResult
from rslib.core.attacks.base import LBOUND_STREAM, majority_vote_judge, smooth_predict_judge
from rslib.core.certify import Smooth, smoothed
from rslib.core.lbound import test_statistics
from rslib.core.metrics import BEST, attack_summary, best_over_attacks
from rslib.core.noises import Noise
from rslib.nn import checkpoints, distributed
from rslib.nn.data import DATASETS, batch_of
from rslib.pipeline import inputs, layout, resumable
from rslib.pipeline.params import Experiment, section_digest
from rslib.pipeline.resumable import RowSchema, ShardedTable, compute_rows, finished_table
from rslib.pipeline.stage import STAGES, CheckpointField, Stage
from rslib.util.digest import digest
from rslib.util.files import atomic_write_json, json_safe, read_json_dict
from rslib.util.provenance import provenance
from rslib.util.tables import csv_text, write_csv

#: Columns of ``results/attack_<name>.csv``.
ROW_COLUMNS = list(FRAME_COLUMNS)
#: Columns of the partial row files: the rows plus the attack's seconds per image of their chunk.
PARTIAL_COLUMNS = [*ROW_COLUMNS, "seconds"]
DISTANCES = ("l0", "l1", "l2", "linf")
#: The shared attack settings that only matter to smoothed targets, and those only the L-bound task reads.
_SMOOTHED_ONLY = ("draws", "fresh_draws", "judge", "judge_n", "judge_alpha", "batch_size", "lbound_draws")
_LBOUND_ONLY = ("lbound_topk", "lbound_draws")
#: The L-bound statistics are a task of the stage beside the attacks.
LBOUND = "lbound"


def result_path(results: Path, name: str) -> Path:
    """``results/attack_<name>.csv``."""
    return layout.table_paths(results, layout.attack_table(name))[0]


def task_digest(experiment: Experiment, task: str) -> str:
    """sha256 of the parameters that can change the results of ``task`` (a registered attack, or 'lbound').

    Covered: the seed, the dataset, the noise (for smoothed targets and the L-bound), the shared attack
    settings the task reads (by their declarations: speed-only ones count as fixed) and the task's
    own options; other attacks' options are left out. The trained weights are covered separately by
    the checkpoint's sha256."""
    if task != LBOUND and task not in ATTACKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join([*ATTACKS, LBOUND])}")
    attack = section_digest("attack", dataclasses.asdict(experiment.attack), neutral=False)
    drop = {"attacks"} | {option.key for name, spec in ATTACKS.items() if name != task for option in spec.options}
    if experiment.attack.target == "base":
        drop |= set(_SMOOTHED_ONLY)
    drop |= {"fresh_draws", "judge", "judge_n", "judge_alpha", "batch_size"} if task == LBOUND else set(_LBOUND_ONLY)
    data = {"seed": experiment.seed, "dataset": experiment.data.dataset, "task": task,
            "attack": {k: v for k, v in attack.items() if k not in drop}}
    if experiment.attack.target == "smoothed" or task == LBOUND:
        data["noise"] = dataclasses.asdict(experiment.noise)
    return digest(data)


def _chunk_seed(seed: int, task: str, first_index: int, stream: int) -> int:
    """Seed of one generator of one chunk: independent of batching history, interruptions and ranks."""
    task_stream = LBOUND_STREAM if task == LBOUND else ATTACKS[task].stream
    return (((seed * 1_000_003 + task_stream) * 1_000_033 + first_index) * 4 + stream) % (2**63 - 1)


#: Every partial column's dtype, which is also how ``RowSchema`` reads a partial row back.
_DTYPES = {"idx": "int64", "label": "Int64", "attack": "object", "success": "bool",
           **{c: "float64" for c in (*DISTANCES, "seconds")}}


def rows_frame(rows: Iterable[Sequence[Any]] = (), columns: Sequence[str] = PARTIAL_COLUMNS) -> pd.DataFrame:
    """Rows as a frame with the attack-table dtypes."""
    return RowSchema(_DTYPES).frame(rows, columns)


def _check_row(name: str, row: dict[str, Any]) -> None:
    """Refuse a row without a label, of another attack, or whose success disagrees with finite distances."""
    if row["label"] is pd.NA or row["attack"] != name:
        raise ValueError(f"row of attack {row['attack']!r} in the file of {name!r}, or without a label")
    if row["success"] != all(math.isfinite(row[c]) for c in DISTANCES):
        raise ValueError("success and finite distances disagree")


def attack_rows_table(results: Path, name: str) -> ShardedTable:
    """The sharded table ``results/attack_<name>.csv`` (a re-run chunk's latest rows win)."""
    schema = RowSchema(_DTYPES, lambda row: _check_row(name, row))
    return ShardedTable(results, layout.attack_table(name), schema, keep="last")


def make_judge(model: nn.Module, noise: Noise, num_classes: int, spec, seed: int,
               generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The smoothed hard classifier that judges successes against a smoothed target (``spec.judge``: see the
    module docstring); the majority vote draws from ``generator``."""
    if spec.judge == "predict":
        smooth = Smooth(model, noise, num_classes, seed=seed)
        return smooth_predict_judge(smooth, spec.judge_n, spec.judge_alpha, spec.batch_size)
    return majority_vote_judge(model, noise, spec.judge_n, generator, batch_size=spec.batch_size)


def attack_batch(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec, noise: Noise,
                 num_classes: int, seed: int) -> AttackResult:
    """Run the registered attack ``name`` with the options of ``spec`` (the ``attack`` section) on one batch.

    ``seed`` seeds this batch's generators (noise draws of the smoothed soft classifier, the judge's
    draws, and the attack's own randomness: DDN's random directions at zero gradients, ALMA's starts)."""
    generators = [torch.Generator(device=x.device).manual_seed((seed * 3 + s) % (2**63 - 1)) for s in range(3)]
    target, judge = model, None
    if spec.target == "smoothed":
        target = smoothed(model, noise, spec.draws, fresh=spec.fresh_draws, generator=generators[0])
        judge = make_judge(model, noise, num_classes, spec, seed % (2**31), generators[1])
    return ATTACKS[name].attack(target, x, y, spec.options(name), judge, generators[2])


def _check(experiment: Experiment, num_classes: int) -> None:
    spec = experiment.attack
    if spec.lbound_topk >= num_classes:
        raise ValueError(f"attack.lbound_topk must be < the number of classes ({num_classes}); got {spec.lbound_topk}")
    if spec.target == "smoothed" and spec.judge == "predict" and spec.judge_n < 2:
        raise ValueError("attack.judge_n must be >= 2 with judge 'predict' (the binomial test needs draws)")


def _target_info(spec, noise: Noise) -> dict[str, Any]:
    if spec.target == "base":
        return {"target": "base", "description": "the model as a plain classifier (argmax of its logits)",
                "judge": "argmax of the model's logits"}
    judge = (f"Smooth.predict with n = {spec.judge_n} draws, abstain test at alpha = {spec.judge_alpha} "
             "(an abstention is not a success)" if spec.judge == "predict"
             else f"majority vote over n = {spec.judge_n} draws")
    return {"target": "smoothed", "description": f"randomized smoothing with {noise!r}: loss on the mean softmax "
            f"over m = {spec.draws} {'fresh' if spec.fresh_draws else 'fixed'} noise draws",
            "judge": judge, "noise": noise.spec(), "draws": spec.draws, "fresh_draws": spec.fresh_draws}


class _AttackSetup:
    """What every task of one ``attack_experiment`` call shares: model, noise, data, selection, checkpoint."""

    def __init__(self, experiment: Experiment, output_dir: Path, ctx: distributed.Context, progress: bool,
                 log: Callable[[str], None]) -> None:
        self.experiment, self.spec, self.ctx, self.progress, self.log = experiment, experiment.attack, ctx, progress, log
        self.say = log if ctx.is_main else (lambda _: None)
        self.results = layout.results_dir(output_dir)
        self.num_classes = DATASETS[experiment.data.dataset].num_classes
        _check(experiment, self.num_classes)
        checkpoint, self.checkpoint = inputs.stage_checkpoint(experiment, "attack", output_dir)
        self.model = checkpoints.load(checkpoint, device=ctx.device).requires_grad_(False)
        self.noise = inputs.experiment_noise(experiment)
        self.dataset, self.selection = inputs.test_selection(experiment, self.spec.skip, self.spec.max)
        size = self.spec.images_per_batch
        self.chunks = [self.selection[i:i + size] for i in range(0, len(self.selection), size)]

    def guard(self, task: str) -> dict[str, str]:
        return {"digest": task_digest(self.experiment, task), "checkpoint_sha256": self.checkpoint["sha256"]}

    def common_meta(self) -> dict[str, Any]:
        spec = self.spec
        return {"experiment": self.experiment.experiment, "params": self.experiment.to_dict(),
                "seed": self.experiment.seed, "checkpoint": self.checkpoint, "target": _target_info(spec, self.noise),
                "selection": {"split": "test", "skip": spec.skip, "max": spec.max, "images": len(self.selection),
                              "images_per_batch": spec.images_per_batch},
                "world_size": self.ctx.world_size, "device": str(self.ctx.device), "provenance": provenance()}

    def attack(self, name: str) -> Path:
        ctx, spec = self.ctx, self.spec
        table = attack_rows_table(self.results, name)
        guard = self.guard(name)
        if table.finished(guard):
            self.say(f"{name}: already finished for these parameters: {table.final}")
            return table.final
        started = time.perf_counter()

        def attack_chunk(chunk: list[int]) -> tuple[pd.DataFrame, dict[str, str]]:
            x, y = batch_of(self.dataset, chunk, ctx.device)
            tic = time.perf_counter()
            result = attack_batch(name, self.model, x, y, spec, self.noise, self.num_classes,
                                  _chunk_seed(self.experiment.seed, name, chunk[0], 0))
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            frame = result.to_frame(indices=chunk, labels=y, attack_name=name)
            frame["seconds"] = (time.perf_counter() - tic) / len(chunk)
            return frame, {"success": f"{float(result.success.float().mean()):.2f}"}

        def describe(remaining: int) -> str:
            return (f"{name}: attacking {len(self.selection)} test images ({spec.target} target) on "
                    f"{ctx.world_size} process(es), device {ctx.device}: {remaining} to do")

        rows, fresh = compute_rows(table, ctx, self.selection, spec.images_per_batch,
                                  {**guard, "device_type": ctx.device.type}, attack_chunk, whole_chunks=True,
                                  progress=self.progress, log=self.log, describe=describe)
        if rows is not None:
            wall = time.perf_counter() - started
            per_image = float(rows["seconds"].mean()) if len(rows) else math.nan
            stats = attack_summary({name: rows}, DISTANCES[1:])
            meta = {**self.common_meta(), "attack": name, "guard": guard, "file": table.final.name,
                    "columns": ROW_COLUMNS, "settings": ATTACKS[name].settings(spec.options(name)),
                    "failure_distance": "inf (never 0, never the budget)",
                    "timing": {"seconds_per_image": per_image,
                               "images_per_second": 1.0 / per_image if per_image > 0 else math.inf,
                               "wall_seconds": wall, "images_attacked_in_last_call": fresh,
                               "wall_seconds_per_image": wall / fresh if fresh else None},
                    "summary": stats.reset_index().to_dict(orient="records")[0]}
            table.publish(csv_text(rows[ROW_COLUMNS]), meta)
            self.say(f"{name}: success rate {stats['success_rate'].iloc[0]:.3f}, median l2 "
                     f"{stats['median_l2'].iloc[0]:.4g} ({per_image * 1e3:.3g} ms per image) -> {table.final}")
        ctx.barrier()
        return table.final

    def best(self, finished: Mapping[str, Path]) -> Path:
        """Rank 0: ``attack_best.csv``, per input the smallest l2 distance any attack found (``found_by``)."""
        path = result_path(self.results, BEST)
        if self.ctx.is_main:
            table = best_over_attacks({name: read_table(finished[name]) for name in self.spec.attacks})
            write_csv(path, table[[*ROW_COLUMNS, "found_by"]])
        self.ctx.barrier()
        return path

    def lbound(self) -> Path:
        results, spec = self.results, self.spec
        final, meta_path = layout.table_paths(results, layout.LBOUND_TABLE)
        guard = self.guard(LBOUND)
        if not self.ctx.is_main or finished_table(results, layout.LBOUND_TABLE, guard):
            return final
        smoothed_target = spec.target == "smoothed"
        draws = (spec.lbound_draws or spec.draws) if smoothed_target else 0
        started, frames, seconds = time.perf_counter(), [], 0.0
        for chunk in self.chunks:
            x, y = batch_of(self.dataset, chunk, self.ctx.device)
            generator = torch.Generator(device=self.ctx.device).manual_seed(
                _chunk_seed(self.experiment.seed, LBOUND, chunk[0], 0))
            tic = time.perf_counter()
            frames.append(test_statistics(self.model, x, y, self.noise.sigma, topk=spec.lbound_topk,
                                          smoothed_noise=self.noise if smoothed_target else None, draws=draws,
                                          generator=generator, batch_size=spec.images_per_batch, indices=chunk))
            seconds += time.perf_counter() - tic
        table = pd.concat(frames, ignore_index=True)
        meta = {**self.common_meta(), "guard": guard, "file": final.name, "columns": list(table.columns),
                "approximate": True, "norm": "l2", "sigma": self.noise.sigma, "topk": spec.lbound_topk,
                "softmax": (f"mean softmax over R = {draws} noise draws (Monte-Carlo smoothed model)"
                            if smoothed_target else "softmax of the model (one clean forward)"),
                "formula": "lbound = sigma * sqrt(pi/2) * (p_top - p_runner_up)",
                "note": "APPROXIMATE: holds for an exact Gaussian average of the classifier; a trained averaged "
                        "network or a finite-R Monte-Carlo average only approximates one. For a plain (not "
                        "averaged) model it is no bound at all.",
                "timing": {"seconds_per_image": seconds / len(table) if len(table) else None,
                           "wall_seconds": time.perf_counter() - started}}
        write_csv(final, table)
        atomic_write_json(meta_path, json_safe(meta))
        return final

    def write_metadata(self, started: float) -> Path:
        path = self.results / layout.ATTACK_SUMMARY
        if not self.ctx.is_main:
            return path
        attacks = {}
        for name in self.spec.attacks:
            metadata = layout.table_paths(self.results, layout.attack_table(name))[1]
            meta = read_json_dict(metadata) or {}
            attacks[name] = {**{key: meta.get(key) for key in ("file", "guard", "settings", "timing", "summary")},
                             "metadata": metadata.name}
        lbound = read_json_dict(layout.table_paths(self.results, layout.LBOUND_TABLE)[1]) or {}
        meta = {**self.common_meta(), "attacks": attacks,
                "lbound": {key: lbound.get(key) for key in ("file", "guard", "approximate", "norm", "sigma", "topk",
                                                             "softmax", "formula", "note", "timing")},
                "columns": ROW_COLUMNS, "failure_distance": "inf (never 0, never the budget)",
                "timing": {"wall_seconds_last_call": time.perf_counter() - started}}
        atomic_write_json(path, json_safe(meta))
        return path


def attack_experiment(experiment: Experiment, output_dir: str | Path | None = None, *, progress: bool = True,
                      log: Callable[[str], None] = print) -> dict[str, Path]:
    """Attack the experiment's test subset with every attack of ``attack.attacks``; see the module docstring.

    Returns ``{name: results/attack_<name>.csv for each attack, 'lbound': results/lbound.csv,
    'metadata': results/attack.json}``."""
    if experiment.attack is None:
        raise ValueError(f"experiment '{experiment.experiment}' has no attack section")
    output_dir = layout.stage_output_dir(experiment.experiment, output_dir)
    started = time.perf_counter()
    ctx = distributed.setup(experiment.device)
    setup = _AttackSetup(experiment, output_dir, ctx, progress, log)
    setup.results.mkdir(parents=True, exist_ok=True)
    outputs = {name: setup.attack(name) for name in experiment.attack.attacks}
    if len(experiment.attack.attacks) > 1:
        outputs[BEST] = setup.best(outputs)
    outputs["lbound"] = setup.lbound()
    outputs["metadata"] = setup.write_metadata(started)
    ctx.barrier()
    return outputs


def read_table(path: str | Path) -> pd.DataFrame:
    """One ``attack_<name>.csv`` with its dtypes (failures read back as ``inf``)."""
    return pd.read_csv(path, dtype={c: _DTYPES[c] for c in ROW_COLUMNS})[ROW_COLUMNS]


def read_results(output_dir: str | Path) -> tuple[dict[str, pd.DataFrame], dict[str, Any], pd.DataFrame]:
    """({attack: its rows}, attack.json metadata, lbound.csv rows) of a finished run."""
    results = layout.results_dir(Path(output_dir))
    meta = read_json_dict(results / layout.ATTACK_SUMMARY) or {}
    names = list(meta.get("attacks", {})) or attack_names_present(results)
    if len(names) > 1 and result_path(results, BEST).exists():
        names.append(BEST)
    tables = {name: read_table(result_path(results, name)) for name in names}
    return tables, meta, pd.read_csv(layout.table_paths(results, layout.LBOUND_TABLE)[0])


def attack_names_present(results: Path) -> list[str]:
    """The attacks with a finished ``attack_<name>.csv`` in ``results``."""
    return [p.stem.removeprefix("attack_") for p in sorted(results.glob("attack_*.csv")) if p.name != layout.ATTACK_CDF]


STAGES.register("attack", Stage(
    "attack", notebook="attack", requires=("data", "model", "noise", "attack"), reads=("train",),
    checkpoint=CheckpointField("attack", "checkpoint"),
    writes=("results/attack_<name>.csv", "results/attack_best.csv", "results/lbound.csv", "results/attack.json"),
    progress=resumable.rows_on_disk(layout.attack_table("*")), compute=attack_experiment,
    description="minimal-norm attacks on the test subset, each attack's table resumable"))
