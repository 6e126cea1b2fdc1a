"""ALMA: the augmented-Lagrangian minimal-norm l2 attack (Rony et al., CVPR 2021).

:func:`alma` solves ``min ||delta||_2`` subject to ``c(x + delta) <= 0``, where ``c`` is a
normalized margin, negative exactly when the attack succeeds: the difference of logits ratio of
Croce & Hein (2020), or with too few classes for it the margin over its size at the start. It
descends the augmented Lagrangian ``||delta||_2 + P2(c; rho, mu)`` with the penalty-Lagrangian
function P2 of Birgin et al. (2005), the paper's choice. Per run: the multiplier ``mu`` follows a
moving average of ``dP2/dc`` (the multiplier update of the augmented Lagrangian method); the
penalty ``rho`` grows every ``check_every`` steps unless the run is already adversarial or its
constraint improved enough; the step is RMSProp with heavy-ball momentum (as in the authors'
adv-lib), and its learning rate decays exponentially from the first success to the last step. The
smallest successful iterate is kept.

``restarts`` runs per input are batched together, the first from ``x``, the others from random
points around it, and each input keeps its smallest success. The problem is not convex (the
complement of a class region is a union of half-spaces), and a run can settle on the boundary of a
farther class; independent runs make that rarer.

Against a smoothed soft classifier with fresh draws (:func:`rslib.core.attacks.smoothed`) the per-step
success check is noisy, so the smallest candidate is often spurious and the judge's rescue scales
do the work; DDN, whose norm moves by a few percent per step, is the steadier attack there (run
both and keep the per-input minimum), and fixed draws (``fresh=False``) give ALMA a deterministic
surrogate. Conventions (box, top-k, targeted, judge, rescue, failures as ``inf``) are those of
:mod:`rslib.core.attacks`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rslib.core.attacks import base
from rslib.core.attacks.base import DEFAULT_RESCUE_SCALES, AttackResult, AttackSpec, Judge
from rslib.core.modules import eval_mode
from rslib.util.options import Option

MARGIN_TOLERANCE = 1e-4  # added to the margin, so a success is never a tie between two classes


def _margin(logits: Tensor, y: Tensor, topk: int, targeted: bool) -> Tensor:
    """Signed margin, negative when ``y`` leaves the top-k (untargeted) or enters it (targeted)."""
    others = logits.scatter(1, y[:, None], -math.inf)
    k = min(topk, logits.shape[1] - 1)
    rival = others.topk(k, dim=1).values[:, -1]
    own = logits.gather(1, y[:, None]).squeeze(1)
    return rival - own if targeted else own - rival


def _dlr_scale(logits: Tensor, topk: int, targeted: bool) -> Tensor | None:
    """The difference-of-logits-ratio denominator (Croce & Hein 2020), generalized to top-k.

    Untargeted: ``z_(1) - z_(k+2)``; targeted: ``z_(1) - (z_(k+2) + z_(k+3)) / 2`` of the sorted
    outputs. ``None`` when there are too few classes for it. Invariant to shifts and scales of the
    outputs, so log-probabilities (smoothed targets) and logits behave alike.
    """
    if logits.shape[1] < topk + (3 if targeted else 2):
        return None
    ordered = logits.sort(dim=1, descending=True).values
    low = ordered[:, topk + 1]
    if targeted:
        low = (low + ordered[:, topk + 2]) / 2
    return ordered[:, 0] - low


def _p2(c: Tensor, rho: Tensor, mu: Tensor) -> Tensor:
    """Penalty-Lagrangian P2: ``mu c + mu rho c^2 + rho^2 c^3 / 6`` for ``c >= 0``, else
    ``mu c / (1 - rho c)``."""
    above = mu * c + mu * rho * c**2 + rho**2 * c**3 / 6
    below = mu * c / (1 - rho * c.clamp(max=0))
    return torch.where(c >= 0, above, below)


def _p2_slope(c: Tensor, rho: Tensor, mu: Tensor) -> Tensor:
    """``dP2/dc``: the multiplier estimate of the augmented Lagrangian method."""
    above = mu + 2 * mu * rho * c + rho**2 * c**2 / 2
    below = mu / (1 - rho * c.clamp(max=0)) ** 2
    return torch.where(c >= 0, above, below)


@dataclass(frozen=True)
class _AlmaSettings:
    """ALMA's hyperparameters (see :func:`alma`)."""

    steps: int
    lr: float
    lr_decay: float
    ema: float
    check_every: int
    improvement: float
    rho_growth: float
    topk: int
    targeted: bool


@dataclass
class _AlmaState:
    """Per-row optimization state (a row is one (restart, input) pair)."""

    x_adv: Tensor
    square_avg: Tensor
    momentum: Tensor
    mu: Tensor
    rho: Tensor
    previous: Tensor
    seen: Tensor
    first_success: Tensor
    best: Tensor
    best_norm: Tensor
    scale: Tensor | None = None


def _alma_init(x: Tensor, start: Tensor, steps: int, mu_init: float, rho_init: float) -> _AlmaState:
    """Fresh state for the rows ``x`` starting at ``start``: ``mu``, ``rho`` at their initial values."""
    rows, device = x.shape[0], x.device

    def full(value: float, dtype: torch.dtype = x.dtype) -> Tensor:
        return torch.full((rows,), value, dtype=dtype, device=device)

    return _AlmaState(x_adv=start, square_avg=torch.ones_like(x), momentum=torch.zeros_like(x), mu=full(mu_init),
                      rho=full(rho_init), previous=full(math.inf), seen=full(False, torch.bool),
                      first_success=full(steps, torch.long), best=x.clone(), best_norm=full(math.inf, torch.float64))


def _alma_starts(x: Tensor, restarts: int, radius: float, clip: tuple[float, float] | None,
                 generator: torch.Generator | None) -> Tensor:
    """Starting points of the ``restarts`` copies of ``x``: ``x`` itself for the first copy, a point
    drawn uniformly in the l2 ball of ``radius`` around it (then clipped to the box) for the others."""
    batch, dim = x.shape[0], math.prod(x.shape[1:])
    rows = batch * (restarts - 1)
    kw = {"device": x.device, "dtype": torch.float64, "generator": generator}
    direction = torch.randn(rows, dim, **kw)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-300)
    random = direction * radius * torch.rand(rows, 1, **kw) ** (1.0 / dim)
    flat = torch.cat([random.new_zeros(batch, dim), random]).to(x.dtype)
    xr = x.repeat(restarts, *([1] * (x.dim() - 1)))
    return base.clamp_to_box(xr + flat.view_as(xr), clip)


def _alma_constraint(logits: Tensor, y: Tensor, state: _AlmaState, cfg: _AlmaSettings) -> Tensor:
    """``(margin + tolerance) / scale``: the DLR, or with too few classes for it the margin over its
    size at the first step."""
    margin = _margin(logits, y, cfg.topk, cfg.targeted) + MARGIN_TOLERANCE
    scale = _dlr_scale(logits, cfg.topk, cfg.targeted)
    if scale is None:
        if state.scale is None:
            state.scale = margin.detach().abs().clamp_min(1e-6)
        scale = state.scale
    return margin / (scale + 1e-8)


def _alma_multipliers(state: _AlmaState, c: Tensor, t: int, cfg: _AlmaSettings) -> None:
    """ALM updates: ``mu`` moves towards ``dP2/dc`` (moving average); every ``check_every`` steps,
    ``rho`` grows where no success was seen and the constraint did not improve enough."""
    if t == 0:
        state.previous = c
        return
    state.mu = torch.lerp(state.mu, _p2_slope(c, state.rho, state.mu), 1 - cfg.ema).clamp(1e-6, 1e12)
    if (t + 1) % cfg.check_every == 0:
        stalled = ~(state.seen | (c < cfg.improvement * state.previous))
        state.rho = torch.where(stalled, state.rho * cfg.rho_growth, state.rho)
        state.previous = c


def _alma_gradient(model: nn.Module, y: Tensor, state: _AlmaState, t: int,
                   cfg: _AlmaSettings) -> tuple[Tensor, Tensor]:
    """Forward pass, multiplier updates, and the gradient of ``P2(c)`` w.r.t. the iterate."""
    with torch.enable_grad():
        x_adv = state.x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        c = _alma_constraint(logits, y, state, cfg)
        _alma_multipliers(state, c.detach(), t, cfg)
        (grad,) = torch.autograd.grad(_p2(c, state.rho, state.mu).sum(), x_adv)
    return logits.detach(), grad


def _alma_descend(state: _AlmaState, x: Tensor, grad: Tensor, t: int, cfg: _AlmaSettings,
                  clip: tuple[float, float] | None) -> None:
    """One RMSProp-with-momentum step on ``||delta|| + P2(c)``; the learning rate decays
    exponentially from the row's first success to the last step."""
    delta = state.x_adv - x
    size = delta.reshape(x.shape[0], -1).norm(dim=1)
    grad = grad + delta / base.per_input_view(size.clamp_min(1e-12), grad)  # zero delta: no distance gradient
    since = (t - state.first_success).clamp_min(0).to(grad.dtype)
    span = (cfg.steps - state.first_success).clamp_min(1).to(grad.dtype)
    rate = cfg.lr * cfg.lr_decay ** (since / span)
    state.square_avg = cfg.ema * state.square_avg + (1 - cfg.ema) * grad**2
    state.momentum = cfg.ema * state.momentum + grad / (state.square_avg.sqrt() + 1e-8)
    state.x_adv = base.clamp_to_box(state.x_adv - base.per_input_view(rate, grad) * state.momentum, clip)


def _alma_record(state: _AlmaState, x: Tensor, adv: Tensor, t: int) -> None:
    """Keep each row's smallest successful iterate; note the step of its first success."""
    x_adv = state.x_adv
    size = (x_adv.double() - x.double()).reshape(x.shape[0], -1).norm(dim=1)
    improved = adv & (size < state.best_norm)
    state.best_norm = torch.where(improved, size, state.best_norm)
    state.best[improved] = x_adv[improved]
    state.first_success = torch.where(adv & ~state.seen, t, state.first_success)
    state.seen |= adv


def _alma_best(state: _AlmaState, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per input: its smallest success over the runs (else the first run's last iterate) and its
    l2 size (``inf`` if none)."""
    batch = x.shape[0]
    norms = state.best_norm.view(-1, batch)
    smallest, run = norms.min(0)
    rows = run * batch + torch.arange(batch, device=x.device)
    found = torch.isfinite(smallest).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(found, state.best[rows], state.x_adv[:batch]), smallest


def alma(model: nn.Module, x: Tensor, y: Tensor, *, steps: int = 500, restarts: int = 2,
         init_radius: float = 1.0, lr: float = 0.1, lr_decay: float = 0.01, mu_init: float = 1.0,
         rho_init: float = 1.0, rho_growth: float = 1.2, check_every: int = 10, improvement: float = 0.95,
         ema: float = 0.9, clip: tuple[float, float] | None = (0.0, 1.0), topk: int = 1,
         targeted: bool = False, max_norm: float | None = None, generator: torch.Generator | None = None,
         judge: Judge | None = None, judge_every_step: bool = False, abstain_is_success: bool = False,
         rescue_scales: Sequence[float] = DEFAULT_RESCUE_SCALES) -> AttackResult:
    """Augmented Lagrangian minimal-norm l2 attack (ALMA with P2, Rony et al. 2021), batched.

    Args:
        model: returns logits or log-probabilities (e.g. :func:`rslib.core.attacks.smoothed`); eval mode.
        x: inputs (B, ...) inside ``clip``; ``y``: labels (untargeted) or targets (``targeted``).
        steps: forward/backward passes per run (one more forward checks the last iterate).
        restarts: runs per input, batched together (``restarts * B`` rows per pass); the first
            starts at ``x``, the others at points drawn uniformly in the l2 ball of ``init_radius``
            around it (from ``generator``, on ``x``'s device). Each input keeps its smallest
            success over its runs. The default, two runs of 500 steps, costs what the paper's
            single 1000-step run costs and beat it on every model of the digits benchmark.
        lr, lr_decay: initial learning rate, and its final fraction (exponential decay per run
            from its first success to the last step).
        mu_init, rho_init: initial multiplier and penalty. ``rho_growth``, ``check_every``,
            ``improvement``: ``rho *= rho_growth`` every ``check_every`` steps for runs not yet
            adversarial whose constraint did not fall below ``improvement`` times its last check.
        ema: weight of the past in the moving averages (multiplier, squared gradient, momentum).
            ``lr`` to ``ema``: the defaults of the paper and of adv-lib.
        topk, targeted, clip: success criterion and pixel box, as in :mod:`rslib.core.attacks`.
        max_norm: successes farther than this are failures; the result never exceeds it.
        judge, judge_every_step, abstain_is_success, rescue_scales: see :mod:`rslib.core.attacks`.

    Returns:
        :class:`~rslib.core.attacks.AttackResult`; every success re-checked by ``judge``.
    """
    y = base.check_inputs(x, y, clip)
    base.check_topk(topk)
    _check_alma_settings(steps, restarts, check_every, lr, lr_decay, ema, mu_init, rho_init, rho_growth,
                         improvement, init_radius)
    cfg = _AlmaSettings(steps, lr, lr_decay, ema, check_every, improvement, rho_growth, topk, targeted)
    x = x.detach()
    final_judge = judge if judge is not None else base.default_judge(model, topk)
    xr = x.repeat(restarts, *([1] * (x.dim() - 1)))
    yr = y.repeat(restarts)
    state = _alma_init(xr, _alma_starts(x, restarts, init_radius, clip, generator), steps, mu_init, rho_init)
    with eval_mode(model):
        for t in range(steps + 1):
            if t == steps:
                with torch.no_grad():
                    logits = model(state.x_adv)
            else:
                logits, grad = _alma_gradient(model, yr, state, t, cfg)
            predicted = judge(state.x_adv) if judge_every_step and judge is not None else base.topk_labels(logits, topk)
            adv = base.is_success(predicted, yr, targeted, abstain_is_success)
            _alma_record(state, xr, adv, t)
            if t < steps:
                _alma_descend(state, xr, grad, t, cfg, clip)
    x_out, best_norm = _alma_best(state, x)
    eps = None if max_norm is None else torch.full_like(best_norm, float(max_norm))
    found = torch.isfinite(best_norm) if eps is None else best_norm <= eps
    return base.finalize(x, y, x_out, found, judge=final_judge, targeted=targeted,
                         abstain_is_success=abstain_is_success, rescue_scales=rescue_scales, clip=clip,
                         norm=None if eps is None else 2.0, eps=eps)


def _check_alma_settings(steps: int, restarts: int, check_every: int, lr: float, lr_decay: float,
                         ema: float, mu_init: float, rho_init: float, rho_growth: float, improvement: float,
                         init_radius: float) -> None:
    for name, value in (("steps", steps), ("restarts", restarts), ("check_every", check_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if min(lr, mu_init, rho_init, init_radius) <= 0:
        raise ValueError("lr, mu_init, rho_init and init_radius must be > 0")
    if not (0 < lr_decay <= 1 and 0 <= ema < 1 and rho_growth >= 1 and 0 < improvement <= 1):
        raise ValueError("need 0 < lr_decay <= 1, 0 <= ema < 1, rho_growth >= 1 and 0 < improvement <= 1")


base.register_attack(AttackSpec(
    name="alma", stream=4,
    description="ALMA (Rony et al. 2021, augmented Lagrangian, P2 penalty), smallest success over restarts",
    options=(Option("alma_steps", int, 500, ge=1, help="iterations per run"),
             Option("alma_restarts", int, 2, ge=1, help="runs per input: the first from the input, the others "
                                                         "from random points around it")),
    attack=lambda model, x, y, options, judge, generator: alma(
        model, x, y, steps=options["alma_steps"], restarts=options["alma_restarts"], judge=judge,
        generator=generator)))
