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
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from rslib.core.noises import Noise
from rslib.nn import architectures, checkpoints, distributed, heat
from rslib.nn.data import DATASETS, load_dataset, make_loader
from rslib.nn.objectives import OBJECTIVES, ObjectiveSetup
from rslib.pipeline import inputs, layout
from rslib.pipeline.params import Experiment
from rslib.util.files import atomic_write_text, file_sha256
from rslib.util.provenance import provenance


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainingRun:
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
        train = self.experiment.train
        return train.heat_steps if train.mode == "heat" else 1


def train_digest(experiment: Experiment, output_dir: Path) -> str:
    """What a finished or resumable training must match: the training parameters and, for a heat
    model, the bytes of its base checkpoint (a retrained base makes the averaged model stale)."""
    salt = ""
    if experiment.train.mode == "heat":
        base = layout.resolve_checkpoint(experiment.train.heat_base, output_dir)
        salt = file_sha256(base) if base.is_file() else f"missing {base}"
    return experiment.stage_digest("train", salt)


def _objective(run: TrainingRun, model: nn.Module, teacher: nn.Module | None):
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    setup = ObjectiveSetup(dataclasses.asdict(run.experiment.train), run.noise, raw, teacher)
    return OBJECTIVES[run.experiment.train.mode].build(setup)


def heat_config(experiment: Experiment) -> heat.HeatConfig:
    """The heat-smoothing settings of an experiment in mode 'heat'."""
    return heat.HeatConfig.from_settings(dataclasses.asdict(experiment.train), experiment.noise.sigma)


def student_fit_warning(step: int, student_acc: float, teacher_acc: float, num_classes: int,
                        fidelity: str) -> str | None:
    """A message when a heat student ends its step closer to chance than to its teacher's test accuracy.

    Such a student did not learn its teacher (typically every ReLU died, or it barely moved), and the
    later steps would average a broken model. ``None`` when the student is within half the teacher's
    margin over chance.
    """
    chance = 1.0 / num_classes
    if student_acc >= teacher_acc - 0.5 * (teacher_acc - chance):
        return None
    if fidelity == "logits":
        hint = ("lower train.lr: the logits objective starts near half the summed variance of the teacher's "
                "logits, and large steps kill the student's ReLUs")
    else:
        hint = "raise train.lr or train.epochs: the softmax objective and its gradients are small"
    return (f"heat step {step}: the student reaches {student_acc:.3f} test accuracy, its teacher {teacher_acc:.3f} "
            f"(chance {chance:.3f}); it did not learn its teacher. {hint}.")


def _optimizer(run: TrainingRun, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    train = run.experiment.train
    optimizer = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                                nesterov=train.nesterov and train.momentum > 0, weight_decay=train.weight_decay)
    if train.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.epochs)
    elif train.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=train.step_size, gamma=train.lr_decay)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, scheduler


def _all_finite(ctx: distributed.Context, loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).float()
    if ctx.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _train_epoch(run: TrainingRun, model, objective, optimizer, loader, epoch: int, label: str) -> dict[str, float]:
    model.train()
    total_loss, correct, seen, batches = 0.0, 0, 0, 0
    limit = run.experiment.train.max_batches
    bar = tqdm(loader, desc=label, leave=False, disable=not (run.progress and run.ctx.is_main),
               total=min(len(loader), limit) if limit else len(loader))
    for x, y in bar:
        if limit and batches >= limit:
            break
        x, y = x.to(run.ctx.device, non_blocking=True), y.to(run.ctx.device, non_blocking=True)
        loss, logits, targets = objective(model, x, y, epoch)
        if not _all_finite(run.ctx, loss):
            raise TrainingDiverged(
                f"{label}: the loss became {loss.item()} at batch {batches}; training stopped. The last good "
                f"checkpoint is kept in {run.checkpoints}. Lower train.lr or check the data and noise settings.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batches += 1
        total_loss += loss.item()
        if logits is not None:
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(targets)
        bar.set_postfix(loss=f"{total_loss / batches:.4f}")
    return {"train_loss": total_loss / max(batches, 1), "train_acc": correct / seen if seen else math.nan}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, noise: Noise | None = None,
             generator: torch.Generator | None = None) -> float:
    """Top-1 accuracy on ``loader`` (on ``x + delta`` when a noise is given)."""
    model.eval()
    correct, seen = 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if noise is not None:
            x = noise.sample(x, generator=generator)
        correct += (model(x).argmax(1) == y).sum().item()
        seen += len(y)
    return correct / max(seen, 1)


def _save(run: TrainingRun, path: Path, model, optimizer=None, scheduler=None, **extra: Any) -> None:
    if not run.ctx.is_main:
        return
    data = run.experiment.data
    num_classes = DATASETS[run.experiment.data.dataset].num_classes
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    checkpoints.save_checkpoint(path, raw, arch=run.experiment.model.arch, dataset=data.dataset,
                           num_classes=num_classes, optimizer=optimizer, scheduler=scheduler,
                           epoch=extra.get("epoch"), extra={"digest": run.digest, **extra})


def _resume_state(run: TrainingRun) -> dict[str, Any] | None:
    path = run.checkpoints / layout.LAST_CHECKPOINT
    if not path.exists():
        return None
    state = checkpoints.load_checkpoint(path)
    if state.get("extra", {}).get("digest") != run.digest:
        run.log(f"ignoring {path}: it was written for different parameters; training from scratch")
        return None
    return state


def _teacher(run: TrainingRun, phase: int) -> nn.Module | None:
    if run.experiment.train.mode != "heat":
        return None
    if phase == 0:
        path = layout.resolve_checkpoint(run.experiment.train.heat_base, run.output_dir)
    else:
        path = layout.heat_step_checkpoint(run.output_dir, phase)
    return checkpoints.load(path, device=run.ctx.device).requires_grad_(False)


def _new_model(run: TrainingRun, phase: int, teacher: nn.Module | None) -> nn.Module:
    """A seeded fresh model; in heat mode the student (fresh, or the teacher when warm-starting)."""
    torch.manual_seed(run.experiment.seed * 1000 + phase)

    def fresh() -> nn.Module:
        return architectures.build_model(run.experiment.model.arch, run.experiment.data.dataset).to(run.ctx.device)

    model = fresh() if teacher is None else heat.next_student(teacher, heat_config(run.experiment), fresh)
    if run.experiment.train.channels_last:  # NHWC convolutions: faster for small conv nets on CPU
        model = model.to(memory_format=torch.channels_last)
    return model


def _write_metrics(run: TrainingRun, rows: list[dict[str, Any]]) -> None:
    if run.ctx.is_main:
        atomic_write_text(layout.results_dir(run.output_dir) / layout.TRAIN_METRICS, pd.DataFrame(rows).to_csv(index=False))


def _loaders(run: TrainingRun):
    data = run.experiment.data
    kwargs = {"data_dir": data.data_dir, "download": data.download, "seed": run.experiment.seed}
    train_set = load_dataset(data.dataset, "train", **kwargs)
    test_set = load_dataset(data.dataset, "test", **kwargs)
    # A DistributedSampler even in one process: the same seed gives the same global order whatever
    # the number of ranks, so DDP training sees exactly the batches of single-process training.
    sampler = DistributedSampler(train_set, num_replicas=run.ctx.world_size, rank=run.ctx.rank, shuffle=True,
                                 seed=run.experiment.seed)
    train_loader = DataLoader(train_set, batch_size=data.batch_size // run.ctx.world_size, sampler=sampler,
                              num_workers=data.num_workers, pin_memory=run.ctx.device.type == "cuda")
    test_loader = make_loader(test_set, batch_size=data.eval_batch_size, shuffle=False,
                              seed=run.experiment.seed, num_workers=data.num_workers)
    return train_loader, test_loader


def fit(experiment: Experiment, output_dir: str | Path | None = None, *, progress: bool = True,
        log: Callable[[str], None] = print) -> Path:
    """Train ``experiment`` (resuming if a matching ``last.pt`` exists); return the final checkpoint."""
    output_dir = layout.stage_output_dir(experiment.experiment, output_dir)
    ctx = distributed.setup(experiment.device)
    run = TrainingRun(experiment, output_dir, ctx, inputs.experiment_noise(experiment), log, progress,
                      train_digest(experiment, output_dir))
    final = run.checkpoints / layout.FINAL_CHECKPOINT
    state = _resume_state(run)
    rows: list[dict[str, Any]] = list(state["extra"]["metrics"]) if state else []
    start_phase, start_epoch = (state["extra"]["phase"], state["epoch"] + 1) if state else (0, 0)
    if state and state["extra"].get("finished") and final.exists():
        log(f"training already finished: {final}")
        return final
    train_loader, test_loader = _loaders(run)
    sampler = train_loader.sampler
    epochs = experiment.train.epochs
    started = time.perf_counter()
    model = None
    for phase in range(start_phase, run.num_phases):
        teacher = _teacher(run, phase)
        model = _new_model(run, phase, teacher)
        optimizer, scheduler = _optimizer(run, model)
        first_epoch = 0
        if state is not None and phase == start_phase:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            first_epoch = start_epoch
        if ctx.distributed:
            model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        objective = _objective(run, model, teacher)
        label = f"heat step {phase + 1}/{run.num_phases}" if teacher is not None else experiment.train.mode
        for epoch in range(first_epoch, epochs):
            torch.manual_seed(experiment.seed * 1_000_003 + phase * 10_007 + epoch)
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch + phase * epochs)
            tic = time.perf_counter()
            stats = _train_epoch(run, model, objective, optimizer, train_loader, epoch,
                                 f"{label} epoch {epoch + 1}/{epochs}")
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            row = {"phase": phase, "epoch": epoch, "lr": lr, **stats, "seconds": time.perf_counter() - tic}
            evaluated = (epoch + 1) % experiment.train.eval_every == 0 or epoch + 1 == epochs
            if ctx.is_main and evaluated:
                eval_model = model.module if isinstance(model, DistributedDataParallel) else model
                row["test_acc"] = evaluate(eval_model, test_loader, ctx.device)
                if OBJECTIVES[experiment.train.mode].noisy_accuracy:
                    generator = torch.Generator(device=ctx.device).manual_seed(experiment.seed)
                    row["test_noisy_acc"] = evaluate(eval_model, test_loader, ctx.device, run.noise, generator)
            if ctx.is_main:
                log(f"{label} epoch {epoch + 1}/{epochs}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
            rows.append(row)
            _save(run, run.checkpoints / layout.LAST_CHECKPOINT, model, optimizer, scheduler, epoch=epoch, phase=phase,
                  metrics=rows, finished=False)
            _write_metrics(run, rows)
            ctx.barrier()
        if teacher is not None:
            _save(run, layout.heat_step_checkpoint(run.output_dir, phase + 1), model, phase=phase)
            if ctx.is_main and "test_acc" in rows[-1]:
                # the teacher of step k > 1 is step k - 1's model, whose last row already holds its accuracy
                known = [r["test_acc"] for r in rows if r["phase"] == phase - 1 and "test_acc" in r]
                teacher_acc = known[-1] if known else evaluate(teacher, test_loader, ctx.device)
                message = student_fit_warning(phase + 1, rows[-1]["test_acc"], teacher_acc,
                                              DATASETS[experiment.data.dataset].num_classes, experiment.train.heat_fidelity)
                if message:
                    log(f"WARNING: {message}")
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
        ctx.barrier()
        state = None
    if model is None:
        raise RuntimeError(f"nothing to train: {run.checkpoints / layout.LAST_CHECKPOINT} says all epochs are done but {final} is missing")
    _save(run, final, model, phase=run.num_phases - 1, params=experiment.to_dict(), metrics=rows,
          provenance=provenance(), train_seconds=time.perf_counter() - started, finished=True)
    _save(run, run.checkpoints / layout.LAST_CHECKPOINT, model, optimizer, scheduler, epoch=epochs - 1, phase=run.num_phases - 1,
          metrics=rows, finished=True)
    ctx.barrier()
    return final
