"""Training objectives, one per ``train.mode``, registered in :data:`OBJECTIVES`; the loop in
``rslib.pipeline.stages.train`` is shared by all of them.

Each objective maps a batch to ``(loss, logits, targets)``; ``logits``/``targets`` give the running
training accuracy (on the inputs the loss saw: noisy ones for noise-based modes). A registered
:class:`ObjectiveSpec` builds the objective from the ``train`` section's values, the noise, the model
and (heat smoothing) the frozen teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rslib.core.certify import mean_softmax_log
from rslib.core.noises import Noise
from rslib.nn import heat
from rslib.util.registry import Registry

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Standard:
    """Cross-entropy on clean inputs (the baseline model)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> Batch:
        logits = model(x)
        return F.cross_entropy(logits, y), logits, y


@dataclass
class NoiseAugmentation:
    """Cross-entropy on ``x + delta`` (Cohen et al. for Gaussian noise, rs4a for the others)."""

    noise: Noise

    def __call__(self, model, x, y, epoch):
        logits = model(self.noise.sample(x))
        return F.cross_entropy(logits, y), logits, y


@dataclass
class Stability:
    """Stability training: CE(f(x)) + weight * D(p(x), p(x + delta)).

    ``divergence='kl'``: D = KL(p(x) || p(x + delta)) (Li et al. 2019, rs4a). ``'cross_entropy'``:
    D = H(p(x), p(x + delta)) = KL + H(p(x)), the published MNIST/CIFAR protocol of the consistency
    papers (its gradient also lowers the entropy of the clean prediction).
    """

    noise: Noise
    weight: float
    divergence: str = "kl"

    def __call__(self, model, x, y, epoch):
        logits = model(torch.cat([x, self.noise.sample(x)]))
        clean, noisy = logits.split(len(x))
        log_p, log_q = F.log_softmax(clean, dim=1), F.log_softmax(noisy, dim=1)
        if self.divergence == "kl":
            term = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
        else:
            term = -(log_p.exp() * log_q).sum(1).mean()
        return F.cross_entropy(clean, y) + self.weight * term, clean, y


@dataclass
class DirectLikelihood:
    """Maximize the smoothed likelihood: -log(mean over draws of softmax(f(x + delta))_y)."""

    noise: Noise
    draws: int

    def __call__(self, model, x, y, epoch):
        noisy = self.noise.sample(x.repeat_interleave(self.draws, dim=0))
        log_mean = mean_softmax_log(model(noisy), self.draws)
        return F.nll_loss(log_mean, y), log_mean, y


@dataclass
class SmoothAdv:
    """SmoothAdv (Salman et al. 2019): l2 PGD on the soft smoothed classifier, then train on the
    adversarial points with the same noise draws.

    ``eps`` ramps up linearly over ``warmup_epochs``; PGD takes ``steps`` normalized-gradient steps
    of size ``2 eps / steps`` and projects onto the l2 ball. The attack runs on ``attack_model``
    (the unwrapped network, in eval mode so batch-norm statistics are untouched).
    """

    noise: Noise
    draws: int
    eps: float
    steps: int
    warmup_epochs: int
    attack_model: nn.Module | None = None

    def epsilon(self, epoch: int) -> float:
        if self.warmup_epochs == 0:
            return self.eps
        return self.eps * min(1.0, (epoch + 1) / self.warmup_epochs)

    def attack(self, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
        net = self.attack_model
        was_training = net.training
        net.eval()
        adv = torch.zeros_like(x, requires_grad=True)
        step = 2 * eps / self.steps
        for _ in range(self.steps):
            inputs = x.repeat_interleave(self.draws, dim=0) + adv.repeat_interleave(self.draws, dim=0) + delta
            loss = F.nll_loss(mean_softmax_log(net(inputs), self.draws), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
            norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            with torch.no_grad():
                adv += step * grad / norms
                scale = (eps / adv.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                adv *= scale.view(-1, *[1] * (x.dim() - 1))
        net.train(was_training)
        return adv.detach()

    def __call__(self, model, x, y, epoch):
        repeated = x.repeat_interleave(self.draws, dim=0)
        delta = self.noise.sample(torch.zeros_like(repeated))
        eps = self.epsilon(epoch)
        adv = self.attack(x, y, delta, eps) if eps > 0 else torch.zeros_like(x)
        logits = model(repeated + adv.repeat_interleave(self.draws, dim=0) + delta)
        targets = y.repeat_interleave(self.draws)
        return F.cross_entropy(logits, targets), logits, targets


# --------------------------------------------------------------------------- registry

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], Batch]


@dataclass(frozen=True)
class ObjectiveSetup:
    """What an objective is built from: the ``train`` section's values, the experiment's noise, the
    network being trained (unwrapped from DDP) and, in heat smoothing, the frozen teacher."""

    settings: Mapping[str, Any]
    noise: Noise
    model: nn.Module
    teacher: nn.Module | None = None


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered training objective: how to build it, and whether test accuracy is also measured on
    noisy inputs (the objectives that train under noise)."""

    build: Callable[[ObjectiveSetup], Objective]
    description: str
    noisy_accuracy: bool = True


#: Every training objective by its ``train.mode``.
OBJECTIVES: Registry[ObjectiveSpec] = Registry("training objective")


def heat_objective(setup: ObjectiveSetup) -> Objective:
    """One implicit heat step towards the frozen teacher (``rslib.nn.heat``)."""
    config = heat.HeatConfig.from_settings(setup.settings, setup.noise.sigma)

    def step(student: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> Batch:
        target = heat.teacher_outputs(setup.teacher, x, config.fidelity)
        loss, _ = heat.heat_step_loss(student, target, x, config)
        return loss, None, y

    return step


OBJECTIVES.register("standard", ObjectiveSpec(lambda s: Standard(), "cross-entropy on clean inputs",
                                              noisy_accuracy=False))
OBJECTIVES.register("noise", ObjectiveSpec(lambda s: NoiseAugmentation(s.noise), "noise augmentation"))
OBJECTIVES.register("stability", ObjectiveSpec(
    lambda s: Stability(s.noise, s.settings["stability_weight"], s.settings["stability_divergence"]),
    "stability training"))
OBJECTIVES.register("smoothadv", ObjectiveSpec(
    lambda s: SmoothAdv(s.noise, s.settings["noise_draws"], s.settings["adv_eps"], s.settings["adv_steps"],
                        s.settings["adv_warmup_epochs"], attack_model=s.model), "SmoothAdv"))
OBJECTIVES.register("direct", ObjectiveSpec(lambda s: DirectLikelihood(s.noise, s.settings["noise_draws"]),
                                            "the smoothed likelihood"))
OBJECTIVES.register("heat", ObjectiveSpec(heat_objective, "heat smoothing (implicit Gaussian-averaging steps)",
                                          noisy_accuracy=False))
