"""The training loop's parts, shared by every objective: the optimizer and schedule of a ``train``
section, one epoch (stopping on a non-finite loss), and test accuracy (clean or under noise).

``rslib.pipeline.stages.train`` drives them: phases, seeding, resume, checkpoints and metrics files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rslib.core.noises import Noise
from rslib.nn import distributed
from rslib.util.progress import progress_bar


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def make_optimizer(model: nn.Module, settings: Mapping[str, Any]) -> tuple[torch.optim.Optimizer, Any]:
    """SGD and the learning-rate schedule of a ``train`` section's values (``lr``, ``momentum``, ``nesterov``,
    ``weight_decay``, ``schedule`` cosine / step / constant, ``step_size``, ``lr_decay``, ``epochs``)."""
    s = settings
    optimizer = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"],
                                nesterov=s["nesterov"] and s["momentum"] > 0, weight_decay=s["weight_decay"])
    if s["schedule"] == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s["epochs"])
    elif s["schedule"] == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=s["step_size"], gamma=s["lr_decay"])
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, scheduler


def all_finite(ctx: distributed.Context, loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).float()
    if ctx.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def train_epoch(model: nn.Module, objective: Callable, optimizer: torch.optim.Optimizer, loader, epoch: int, *,
                ctx: distributed.Context, label: str, keep_note: str, max_batches: int | None = None,
                progress: bool = False) -> dict[str, float]:
    """One epoch of ``objective`` (at most ``max_batches`` batches): mean loss and running accuracy.

    A non-finite loss on any rank raises :class:`TrainingDiverged` with ``keep_note`` (where the last
    good checkpoint is) before the optimizer steps, so no update is made from it.
    """
    model.train()
    total_loss, correct, seen, batches = 0.0, 0, 0, 0
    bar = progress_bar(loader, desc=label, leave=False, disable=not (progress and ctx.is_main),
               total=min(len(loader), max_batches) if max_batches else len(loader))
    for x, y in bar:
        if max_batches and batches >= max_batches:
            break
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        loss, logits, targets = objective(model, x, y, epoch)
        if not all_finite(ctx, loss):
            raise TrainingDiverged(f"{label}: the loss became {loss.item()} at batch {batches}; training stopped. "
                                   f"{keep_note} Lower train.lr or check the data and noise settings.")
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
