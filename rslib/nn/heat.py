"""Deterministic Gaussian averaging ("HeatSmoothing"): the objective of one implicit heat step.

The Gaussian average ``u(x) = E[u0(x + sigma z)]``, ``z ~ N(0, I)``, is the solution at time
``sigma**2`` of the heat equation ``u_t = (1/2) Laplacian u`` started from the base model ``u0``.
Discretized in ``T`` backward-Euler steps (``h = 1 / T``), each step trains a *student* ``v`` against
the frozen previous model (the *teacher* ``u_prev``; the base model at step 1) by minimizing, over
the training inputs,

    (1/2) ||v(x) - u_prev(x)||^2  +  gamma * (h * sigma^2 / 2) * ||J_v(x)||_F^2 .

Why ``gamma``: for inputs spread uniformly, the minimizer of the continuum version of this objective
satisfies ``v - u_prev = gamma * h * sigma^2 * Laplacian v``, so ``gamma = 1/2`` is exactly one
backward-Euler step of ``u_t = (1/2) Laplacian u`` over a time ``h * sigma^2``. The reference uses
``gamma = 5`` as a practical rescaling ("gamma absorbs the time-scale constant").

This module holds only the objective and the step logic (no data loading, no training loop):

* :class:`HeatConfig` -- validated hyper-parameters (reference CIFAR-10 defaults).
* :func:`finite_difference_draws` / :func:`jacobian_penalty` -- the Jacobian penalty, estimated
  without full Jacobians (see "Penalty normalization" below).
* :func:`teacher_outputs` / :func:`heat_step_loss` -- one step's objective and its logged parts.
* :func:`frozen_copy` / :func:`next_student` -- teacher freezing and student re-init / warm start.

The Gaussian average the averaged model approximates is estimated by ``rslib.core.certify.soft_average``.

Penalty normalization
---------------------
For each input and each of ``R`` draws: ``w ~ N(0, I/K)`` (``K`` = number of outputs), the direction
``d = g / ||g||`` with ``g = grad_x (w . v(x))`` **held constant** (detached), and the forward
difference ``q = (w . v(x + eps d) - w . v(x)) / eps``, which tends to ``w . J_v(x) d =
||J_v(x)^T w||`` as ``eps -> 0`` (exactly, for a model affine in ``x``). Since
``E_w ||J^T w||^2 = ||J||_F^2 / K``, we use

    penalty(x) = K * mean_over_R_draws(q^2)     (an unbiased estimate of ||J_v(x)||_F^2 when v is
                                                  affine; consistent as eps -> 0 otherwise),

so that the loss uses exactly the ``||J_v||_F^2`` of the design. The reference code instead *summed*
``q^2`` over its draws, which estimates ``(R / K) ||J_v||_F^2``: identical to ours for the CIFAR-10
defaults (``R = K = 10``), but a factor ``R / K`` smaller for ImageNet (``R = 6``, ``K = 1000``: its
``gamma = 1`` there corresponds to ``gamma = 0.006`` here).

Batch normalization and modes
-----------------------------
The penalty and the fidelity share **one combined forward pass** over ``B * (R + 1)`` rows (the
``B`` clean inputs, then the ``R * B`` perturbed ones), so in train mode every one of them is
normalized with the statistics of that combined batch, and the running statistics are updated once
per call, from it. The direction pass (a forward at ``x`` plus ``R`` input-gradient backward passes)
runs in the model's current mode but restores every buffer afterwards, so it never moves running
statistics. In train mode, batch statistics couple the examples, so ``g`` contains small ``O(1/B)``
cross-example terms: harmless, since ``d`` is only a direction held constant. Stochastic layers
(dropout) make ``q`` noisy because each row gets its own mask; the reference trains without dropout.
:func:`teacher_outputs` runs the teacher in eval mode and restores each submodule's mode afterwards.

Random numbers come from ``generator`` when given (a ``torch.Generator`` on the inputs' device),
from torch's global generator otherwise.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from rslib.core.modules import eval_mode

__all__ = ["FIDELITIES", "HeatConfig", "JacobianDraws", "finite_difference_draws", "frozen_copy", "heat_step_loss",
           "jacobian_penalty", "next_student", "teacher_outputs"]

FIDELITIES = ("logits", "softmax")
Output = Literal["logits", "softmax"]


# --------------------------------------------------------------------------- configuration


def _is_real(value: object) -> bool:
    """A finite real number (Python or numpy scalar; not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _is_int(value: object) -> bool:
    """An integer (Python or numpy scalar; not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_penalty_args(draws: object, eps: object) -> None:
    if not _is_int(draws) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
    if not _is_real(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def _check_output(output: str, name: str = "output") -> None:
    if output not in FIDELITIES:
        raise ValueError(f"{name} must be one of {FIDELITIES}, got {output!r}")


@dataclass(frozen=True)
class HeatConfig:
    """Hyper-parameters of deterministic Gaussian averaging (defaults: the reference CIFAR-10 run).

    Attributes:
        steps: number ``T`` of implicit (backward-Euler) time steps; ``h = 1 / T``. Integer >= 1.
        gamma: weight rescaling of the Jacobian penalty (see the module docstring; ``1/2`` is the
            continuum-exact value, the reference uses 5). Finite, >= 0.
        sigma: standard deviation of the Gaussian being averaged over (in the model's input space,
            i.e. [0, 1] pixels). Finite, > 0.
        draws: number ``R`` of random projections ``w`` per input for the penalty. Integer >= 1.
        eps: finite-difference step (in input-space l2 norm). Finite, > 0.
        fidelity: ``"logits"`` -- fit and penalize the raw outputs; ``"softmax"`` -- fit and penalize
            the softmax probabilities (the function being averaged is then ``softmax o model``).
        reinit: ``True`` -- each step starts from a freshly initialized student (the reference);
            ``False`` -- warm start from a copy of the teacher.
        student_noise: std ``sigma_in`` of Gaussian noise added to the student's inputs during
            training (the later ImageNet variant; 0 disables it). Finite, >= 0.
    """

    steps: int = 5
    gamma: float = 5.0
    sigma: float = 0.1
    draws: int = 10
    eps: float = 0.1
    fidelity: Output = "logits"
    reinit: bool = True
    student_noise: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not _is_real(self.gamma) or self.gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma!r}")
        if not _is_real(self.sigma) or self.sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        _check_penalty_args(self.draws, self.eps)
        _check_output(self.fidelity, "fidelity")
        if not isinstance(self.reinit, bool):
            raise ValueError(f"reinit must be a bool (True or False), got {self.reinit!r}")
        if not _is_real(self.student_noise) or self.student_noise < 0:
            raise ValueError(f"student_noise must be a finite number >= 0, got {self.student_noise!r}")
        # Normalize numpy scalars and ints-for-floats to plain Python types (clean repr / YAML).
        for name in ("steps", "draws"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("gamma", "sigma", "eps", "student_noise"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], sigma: float) -> HeatConfig:
        """The config of a ``train`` section's ``heat_*`` values at the experiment's ``sigma``."""
        return cls(steps=settings["heat_steps"], gamma=settings["heat_gamma"], sigma=sigma,
                   draws=settings["heat_draws"], eps=settings["heat_eps"], fidelity=settings["heat_fidelity"],
                   reinit=settings["heat_reinit"], student_noise=settings["heat_student_noise"])

    @property
    def h(self) -> float:
        """Time-step fraction ``1 / steps``."""
        return 1.0 / self.steps

    @property
    def penalty_weight(self) -> float:
        """The coefficient ``gamma * h * sigma^2 / 2`` of ``||J_v||_F^2`` in the step objective."""
        return self.gamma * self.h * self.sigma**2 / 2.0


# --------------------------------------------------------------------------- small helpers


def _as_output(logits: Tensor, output: str) -> Tensor:
    if logits.dim() != 2:
        raise ValueError(f"model outputs must have shape (batch, num_outputs), got {tuple(logits.shape)}")
    return logits if output == "logits" else logits.softmax(dim=-1)


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


@contextmanager
def _buffers_preserved(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (e.g. BatchNorm running statistics) of ``model`` on exit."""
    saved = [(b, b.detach().clone()) for b in model.buffers()] if model.training else []
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


# --------------------------------------------------------------------------- Jacobian penalty


class JacobianDraws(NamedTuple):
    """What :func:`finite_difference_draws` computed, for the loss and for inspection.

    Attributes:
        outputs: ``v(x)``, shape ``(B, K)`` (logits or softmax), from the combined forward pass;
            differentiable with respect to the model parameters.
        w: the random projections, shape ``(R, B, K)``, entries ``N(0, 1/K)``.
        directions: the unit directions ``d``, shape ``(R, B, *x.shape[1:])``; detached (a zero
            input gradient gives ``d = 0`` and hence ``q = 0``).
        quotients: the forward differences ``q = (w . v(x + eps d) - w . v(x)) / eps``, shape
            ``(R, B)``; differentiable with respect to the parameters through both terms.
    """

    outputs: Tensor
    w: Tensor
    directions: Tensor
    quotients: Tensor

    @property
    def num_outputs(self) -> int:
        return self.outputs.shape[-1]

    def per_example(self) -> Tensor:
        """``K * mean_r q^2`` per input, shape ``(B,)``: the estimate of ``||J_v(x)||_F^2``."""
        return self.num_outputs * self.quotients.pow(2).mean(dim=0)

    def penalty(self) -> Tensor:
        """The batch mean of :meth:`per_example` (a scalar)."""
        return self.per_example().mean()


def finite_difference_draws(model: nn.Module, x: Tensor, *, draws: int, eps: float,
                            generator: torch.Generator | None = None, output: Output = "logits") -> JacobianDraws:
    """Draw ``w``, compute the detached directions ``d`` and the finite differences ``q``.

    Two passes: (1) a forward at ``x`` and ``R`` backward passes to the input only (one per draw)
    give ``g_r = grad_x (w_r . v(x))`` and ``d_r = g_r / ||g_r||`` (no parameter gradient is
    formed and no buffer moves); (2) one forward pass over ``cat([x, x + eps d_1, ..., x + eps d_R])``
    (``B * (R + 1)`` rows) gives ``v(x)`` and the ``R`` perturbed outputs, through which gradients
    reach the parameters. ``output`` selects the function ``v``: the model's logits or their softmax.
    """
    _check_penalty_args(draws, eps)
    _check_output(output)
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    batch = x.shape[0]
    x = x.detach()

    # (1) directions, held constant.
    with torch.enable_grad(), _buffers_preserved(model):
        xg = x.clone().requires_grad_(True)
        out = _as_output(model(xg), output)
        k = out.shape[-1]
        w = _randn((draws, batch, k), out, generator) / math.sqrt(k)
        grads = []
        for r in range(draws):
            (g,) = torch.autograd.grad(out, xg, grad_outputs=w[r], retain_graph=r < draws - 1, allow_unused=True)
            grads.append(torch.zeros_like(xg) if g is None else g)
        del out, xg
    g = torch.stack(grads).detach()  # (R, B, *shape)
    norms = g.flatten(start_dim=2).norm(dim=-1).view(draws, batch, *([1] * (x.dim() - 1)))
    directions = g / norms.clamp_min(torch.finfo(g.dtype).tiny)

    # (2) one combined forward: clean rows first, then draw-major perturbed rows.
    perturbed = (x.unsqueeze(0) + eps * directions).reshape(draws * batch, *x.shape[1:])
    combined = _as_output(model(torch.cat([x, perturbed])), output)
    outputs = combined[:batch]
    shifted = combined[batch:].view(draws, batch, -1)
    quotients = ((shifted - outputs.unsqueeze(0)) * w).sum(dim=-1) / eps
    return JacobianDraws(outputs=outputs, w=w, directions=directions, quotients=quotients)


def jacobian_penalty(model: nn.Module, x: Tensor, *, draws: int, eps: float, generator: torch.Generator | None = None,
                     output: Output = "logits") -> Tensor:
    """Batch mean of the estimate ``K * mean_r q_r^2`` of ``||J_v(x)||_F^2`` (a scalar tensor).

    Exact in expectation over ``w`` for a model affine in ``x`` (where the finite difference is
    exact); see the module docstring for the normalization and :func:`finite_difference_draws` for
    how it is computed. Differentiable with respect to the model parameters.
    """
    return finite_difference_draws(model, x, draws=draws, eps=eps, generator=generator, output=output).penalty()


# --------------------------------------------------------------------------- one heat step


def teacher_outputs(teacher: nn.Module, x: Tensor, fidelity: Output = "logits") -> Tensor:
    """The frozen teacher's targets at ``x``: logits, or softmax probabilities; detached.

    Evaluated under ``torch.no_grad()`` in eval mode (each submodule's mode is restored after).
    """
    _check_output(fidelity, "fidelity")
    with torch.no_grad(), eval_mode(teacher):
        return _as_output(teacher(x), fidelity).detach()


def heat_step_loss(student: nn.Module, teacher_outputs: Tensor, x: Tensor, config: HeatConfig, *,
                   generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    """The objective of one implicit heat step on a batch, and its parts as floats for logging.

    ``loss = (1/2) mean_b ||v(x_b) - u_prev(x_b)||^2 + penalty_weight * mean_b penalty(x_b)``, with
    ``penalty_weight = gamma * h * sigma^2 / 2`` and ``penalty`` the estimate of ``||J_v||_F^2`` from
    :func:`finite_difference_draws`; ``v`` and the penalty are on logits or on softmax outputs
    according to ``config.fidelity``. ``teacher_outputs`` (shape ``(B, K)``) must be in the same
    space (see :func:`teacher_outputs`). When ``config.student_noise > 0`` every student forward
    pass sees ``x + student_noise * z`` (one ``z`` per input, shared by the fidelity and penalty)
    while the targets stay those of the clean ``x``. The student is used in its current mode.

    Returns ``(loss, parts)``: ``parts`` has ``fidelity``, ``penalty`` (the raw ``||J||_F^2``
    estimate), ``weighted_penalty`` and ``total``.
    """
    if not isinstance(config, HeatConfig):
        raise TypeError(f"config must be a HeatConfig, got {type(config).__name__}")
    target = teacher_outputs.detach()
    if target.dim() != 2 or target.shape[0] != x.shape[0]:
        raise ValueError(f"teacher_outputs must have shape (batch={x.shape[0]}, num_outputs), "
                         f"got {tuple(target.shape)}")
    if config.fidelity == "softmax":
        sums = target.sum(dim=-1)
        if bool(((sums - 1).abs() > 1e-3).any()) or bool((target < 0).any()):
            raise ValueError("fidelity='softmax' needs teacher_outputs that are probabilities (rows summing to "
                             "1); compute them with teacher_outputs(teacher, x, 'softmax')")

    x_student = x.detach()
    if config.student_noise > 0:
        x_student = x_student + config.student_noise * _randn(tuple(x.shape), x, generator)

    weight = config.penalty_weight
    if weight > 0:
        fd = finite_difference_draws(student, x_student, draws=config.draws, eps=config.eps, generator=generator,
                                     output=config.fidelity)
        outputs, penalty = fd.outputs, fd.penalty()
    else:  # gamma == 0: no penalty passes at all
        outputs = _as_output(student(x_student), config.fidelity)
        penalty = outputs.new_zeros(())
    if outputs.shape != target.shape:
        raise ValueError(f"student outputs {tuple(outputs.shape)} and teacher_outputs {tuple(target.shape)} "
                         "differ in shape")
    fidelity = 0.5 * (outputs - target).pow(2).sum(dim=-1).mean()
    weighted = weight * penalty
    loss = fidelity + weighted
    parts = {"fidelity": fidelity, "penalty": penalty, "weighted_penalty": weighted, "total": loss}
    return loss, {name: float(value.detach()) for name, value in parts.items()}


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with ``requires_grad=False``: the next teacher.

    Copying the module (rather than saving and reloading a state dict) keeps every weight and
    buffer; there is no ``strict=False`` reload that could leave the teacher partly random.
    """
    return copy.deepcopy(model).eval().requires_grad_(False)


def next_student(teacher: nn.Module, config: HeatConfig, factory: Callable[[], nn.Module] | None = None) -> nn.Module:
    """The student to train at the next step, in train mode with trainable parameters.

    ``config.reinit``: a fresh model from ``factory()`` (moved to the teacher's device); otherwise a
    deep copy of ``teacher`` (warm start; ``factory`` is not used).
    """
    if config.reinit:
        if factory is None:
            raise ValueError("factory is required when config.reinit is True")
        student = factory()
        param = next(iter(teacher.parameters()), None)
        if param is not None:
            student = student.to(param.device)
    else:
        student = copy.deepcopy(teacher)
    return student.requires_grad_(True).train()


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
