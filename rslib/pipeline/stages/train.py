"""Training: one loop for every mode, resumable per epoch, single process or DDP under ``torchrun``.

``fit(experiment)`` trains the experiment's model and returns the path of the final checkpoint
``<output_dir>/checkpoints/model.pt``. Progress is checkpointed after every epoch in
``checkpoints/last.pt`` (model, optimizer and scheduler state, metrics so far, parameter digest);
running ``fit`` again resumes from there. Metrics go to ``results/train_metrics.csv``.

Heat smoothing (mode 'heat') is T phases: phase t trains a student towards the frozen previous
model (the base model for t = 1) with the implicit heat step objective of ``rslib.nn.heat``.
Every epoch reseeds torch from (seed, phase, epoch), so an interrupted run resumes with the same
noise draws and data order it would have used.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from rslib.core.noises import Noise
from rslib.nn import architectures, checkpoints, distributed, heat
from rslib.nn.data import DATASETS, load_dataset, make_loader
from rslib.nn.objectives import OBJECTIVES, ObjectiveSetup
from rslib.nn.training import evaluate, make_optimizer, train_epoch
from rslib.pipeline import inputs, layout
from rslib.pipeline.params import Experiment
from rslib.pipeline.stage import STAGES, CheckpointField, Stage
from rslib.util.files import file_sha256
from rslib.util.provenance import provenance
from rslib.util.tables import count_rows, write_csv


@dataclass
class TrainingSetup:
    """Everything one training run needs, resolved once."""

    experiment: Experiment
    output_dir: Path
    ctx: distributed.Context
    noise: Noise
    log: Callable[[str], None]
    progress: bool
    digest: str = ""

    @property
    def checkpoints(self) -> Path:
        return layout.checkpoints_dir(self.output_dir)

    @property
    def num_phases(self) -> int:
        return self.experiment.train.heat_steps if self.experiment.train.mode == "heat" else 1


def train_digest(experiment: Experiment, output_dir: Path) -> str:
    """What a finished or resumable training must match: the training parameters and, for a heat
    model, the bytes of its base checkpoint (a retrained base makes the averaged model stale)."""
    salt = ""
    if experiment.train.mode == "heat":
        base = layout.resolve_checkpoint(experiment.train.heat_base, output_dir)
        salt = file_sha256(base) if base.is_file() else f"missing {base}"
    return experiment.stage_digest("train", salt)


def _objective(setup: TrainingSetup, model: nn.Module, teacher: nn.Module | None):
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    objective = ObjectiveSetup(dataclasses.asdict(setup.experiment.train), setup.noise, raw, teacher)
    return OBJECTIVES[setup.experiment.train.mode].build(objective)


def heat_config(experiment: Experiment) -> heat.HeatConfig:
    """The heat-smoothing settings of an experiment in mode 'heat'."""
    return heat.HeatConfig.from_settings(dataclasses.asdict(experiment.train), experiment.noise.sigma)


def _save(setup: TrainingSetup, path: Path, model, optimizer=None, scheduler=None, **extra: Any) -> None:
    if not setup.ctx.is_main:
        return
    dataset = setup.experiment.data.dataset
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    checkpoints.save_checkpoint(path, raw, arch=setup.experiment.model.arch, dataset=dataset,
                                num_classes=DATASETS[dataset].num_classes, optimizer=optimizer, scheduler=scheduler,
                                epoch=extra.get("epoch"), extra={"digest": setup.digest, **extra})


def _resume_state(setup: TrainingSetup) -> dict[str, Any] | None:
    path = setup.checkpoints / layout.LAST_CHECKPOINT
    if not path.exists():
        return None
    state = checkpoints.load_checkpoint(path)
    if state.get("extra", {}).get("digest") != setup.digest:
        setup.log(f"ignoring {path}: it was written for different parameters; training from scratch")
        return None
    return state


def _teacher(setup: TrainingSetup, phase: int) -> nn.Module | None:
    if setup.experiment.train.mode != "heat":
        return None
    path = (layout.resolve_checkpoint(setup.experiment.train.heat_base, setup.output_dir) if phase == 0
            else layout.heat_step_checkpoint(setup.output_dir, phase))
    return checkpoints.load(path, device=setup.ctx.device).requires_grad_(False)


def _new_model(setup: TrainingSetup, phase: int, teacher: nn.Module | None) -> nn.Module:
    """A seeded fresh model; in heat mode the student (fresh, or the teacher when warm-starting)."""
    torch.manual_seed(setup.experiment.seed * 1000 + phase)

    def fresh() -> nn.Module:
        return architectures.build_model(setup.experiment.model.arch, setup.experiment.data.dataset).to(setup.ctx.device)

    model = fresh() if teacher is None else heat.next_student(teacher, heat_config(setup.experiment), fresh)
    if setup.experiment.train.channels_last:  # NHWC convolutions: faster for small conv nets on CPU
        model = model.to(memory_format=torch.channels_last)
    return model


def _loaders(setup: TrainingSetup):
    data = setup.experiment.data
    kwargs = {"data_dir": data.data_dir, "download": data.download, "seed": setup.experiment.seed}
    train_set = load_dataset(data.dataset, "train", **kwargs)
    test_set = load_dataset(data.dataset, "test", **kwargs)
    # A DistributedSampler even in one process: the same seed gives the same global order whatever
    # the number of ranks, so DDP training sees exactly the batches of single-process training.
    sampler = DistributedSampler(train_set, num_replicas=setup.ctx.world_size, rank=setup.ctx.rank, shuffle=True,
                                 seed=setup.experiment.seed)
    train_loader = DataLoader(train_set, batch_size=data.batch_size // setup.ctx.world_size, sampler=sampler,
                              num_workers=data.num_workers, pin_memory=setup.ctx.device.type == "cuda")
    test_loader = make_loader(test_set, batch_size=data.eval_batch_size, shuffle=False,
                              seed=setup.experiment.seed, num_workers=data.num_workers)
    return train_loader, test_loader


def fit(experiment: Experiment, output_dir: str | Path | None = None, *, progress: bool = True,
        log: Callable[[str], None] = print) -> Path:
    """Train ``experiment`` (resuming if a matching ``last.pt`` exists); return the final checkpoint."""
    output_dir = layout.stage_output_dir(experiment.experiment, output_dir)
    ctx = distributed.setup(experiment.device)
    setup = TrainingSetup(experiment, output_dir, ctx, inputs.experiment_noise(experiment), log, progress,
                      train_digest(experiment, output_dir))
    final, last = setup.checkpoints / layout.FINAL_CHECKPOINT, setup.checkpoints / layout.LAST_CHECKPOINT
    state = _resume_state(setup)
    rows: list[dict[str, Any]] = list(state["extra"]["metrics"]) if state else []
    start_phase, start_epoch = (state["extra"]["phase"], state["epoch"] + 1) if state else (0, 0)
    if state and state["extra"].get("finished") and final.exists():
        log(f"training already finished: {final}")
        return final
    train_loader, test_loader = _loaders(setup)
    epochs = experiment.train.epochs
    started = time.perf_counter()
    model = None
    for phase in range(start_phase, setup.num_phases):
        teacher = _teacher(setup, phase)
        model = _new_model(setup, phase, teacher)
        optimizer, scheduler = make_optimizer(model, dataclasses.asdict(experiment.train))
        first_epoch = 0
        if state is not None and phase == start_phase:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            first_epoch = start_epoch
        if ctx.distributed:
            model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        objective = _objective(setup, model, teacher)
        label = f"heat step {phase + 1}/{setup.num_phases}" if teacher is not None else experiment.train.mode
        for epoch in range(first_epoch, epochs):
            torch.manual_seed(experiment.seed * 1_000_003 + phase * 10_007 + epoch)
            train_loader.sampler.set_epoch(epoch + phase * epochs)
            tic = time.perf_counter()
            stats = train_epoch(model, objective, optimizer, train_loader, epoch, ctx=ctx,
                                label=f"{label} epoch {epoch + 1}/{epochs}", max_batches=experiment.train.max_batches,
                                keep_note=f"The last good checkpoint is kept in {setup.checkpoints}.", progress=progress)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            row = {"phase": phase, "epoch": epoch, "lr": lr, **stats, "seconds": time.perf_counter() - tic}
            evaluated = (epoch + 1) % experiment.train.eval_every == 0 or epoch + 1 == epochs
            if ctx.is_main and evaluated:
                eval_model = model.module if isinstance(model, DistributedDataParallel) else model
                row["test_acc"] = evaluate(eval_model, test_loader, ctx.device)
                if OBJECTIVES[experiment.train.mode].noisy_accuracy:
                    generator = torch.Generator(device=ctx.device).manual_seed(experiment.seed)
                    row["test_noisy_acc"] = evaluate(eval_model, test_loader, ctx.device, setup.noise, generator)
            if ctx.is_main:
                log(f"{label} epoch {epoch + 1}/{epochs}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
            rows.append(row)
            _save(setup, last, model, optimizer, scheduler, epoch=epoch, phase=phase, metrics=rows, finished=False)
            if ctx.is_main:
                write_csv(layout.results_dir(output_dir) / layout.TRAIN_METRICS, pd.DataFrame(rows))
            ctx.barrier()
        if teacher is not None:
            _save(setup, layout.heat_step_checkpoint(setup.output_dir, phase + 1), model, phase=phase)
            if ctx.is_main and "test_acc" in rows[-1]:
                # the teacher of step k > 1 is step k - 1's model, whose last row already holds its accuracy
                known = [r["test_acc"] for r in rows if r["phase"] == phase - 1 and "test_acc" in r]
                teacher_acc = known[-1] if known else evaluate(teacher, test_loader, ctx.device)
                message = heat.student_fit_warning(phase + 1, rows[-1]["test_acc"], teacher_acc,
                                              DATASETS[experiment.data.dataset].num_classes, experiment.train.heat_fidelity)
                if message:
                    log(f"WARNING: {message}")
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
        ctx.barrier()
        state = None
    if model is None:
        raise RuntimeError(f"nothing to train: {last} says all epochs are done but {final} is missing")
    _save(setup, final, model, phase=setup.num_phases - 1, params=experiment.to_dict(), metrics=rows,
          provenance=provenance(), train_seconds=time.perf_counter() - started, finished=True)
    _save(setup, last, model, optimizer, scheduler, epoch=epochs - 1, phase=setup.num_phases - 1, metrics=rows,
          finished=True)
    ctx.barrier()
    return final


def epochs_done(exp_dir: Path) -> str:
    """What an unfinished training has on disk: its finished epochs."""
    epochs = count_rows([layout.results_dir(exp_dir) / layout.TRAIN_METRICS])
    return f"{epochs} epoch(s) done" if epochs else ""


STAGES.register("train", Stage(
    "train", notebook="train", requires=("data", "model", "noise", "train"),
    checkpoint=CheckpointField("train", "heat_base", when=lambda train: train.mode == "heat"),
    writes=("checkpoints/model.pt", "checkpoints/last.pt", "results/train_metrics.csv"),
    progress=epochs_done, compute=fit,
    description="train the model with the objective of train.mode (resumable per epoch)"))
