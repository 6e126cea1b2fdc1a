"""DDN: Decoupled Direction and Norm, the minimal-norm l2 attack of Rony et al. (2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rslib.core.attacks import base
from rslib.core.attacks.base import DEFAULT_RESCUE_SCALES, AttackResult, AttackSpec, Judge
from rslib.core.modules import eval_mode
from rslib.util.options import Option


def ddn(model: nn.Module, x: Tensor, y: Tensor, *, steps: int = 100, gamma: float = 0.05,
        init_norm: float = 1.0, alpha: float = 1.0, alpha_min: float = 0.01, quantize: bool = False,
        levels: int = 256, clip: tuple[float, float] | None = (0.0, 1.0), topk: int = 1,
        targeted: bool = False, max_norm: float | None = None, generator: torch.Generator | None = None,
        judge: Judge | None = None, judge_every_step: bool = False, abstain_is_success: bool = False,
        rescue_scales: Sequence[float] = DEFAULT_RESCUE_SCALES) -> AttackResult:
    """Decoupled Direction and Norm l2 attack (Rony et al. 2019), keeping the smallest success.

    Each of ``steps`` iterations: evaluate ``x + delta`` (recording it if it is adversarial and
    smaller than the best so far), take a step of length ``alpha_t`` along the normalized loss
    gradient (``alpha_t`` cosine-annealed from ``alpha`` to ``alpha_min``; a zero gradient is
    replaced by a random direction from ``generator``), update the norm ``epsilon *= 1 - gamma`` if
    the iterate was adversarial, else ``*= 1 + gamma`` (capped by the largest distance the box
    allows, and by ``max_norm``), rescale ``delta`` onto the epsilon sphere, optionally quantize
    ``x + delta`` to ``levels`` values over ``clip``, and clip to the box. The final iterate is
    checked as well. ``epsilon`` starts at ``init_norm``; as in the original schedule it moves by
    at most a factor ``1 +- gamma`` per step, so distances below ``init_norm * (1 - gamma)**steps``
    (or above ``init_norm * (1 + gamma)**steps``) are out of reach: choose ``init_norm`` and
    ``steps`` for the scale of the data. With ``max_norm`` the result never exceeds it. Successes
    are re-checked by ``judge`` (see :mod:`rslib.core.attacks.base`); against a smoothed soft classifier the
    smallest candidate often sits where the smoothed prediction abstains, and ``rescue_scales``
    then finds the nearest verified point along the same direction.
    """
    y = base.check_inputs(x, y, clip)
    base.check_topk(topk)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if not 0 < gamma < 1:
        raise ValueError(f"gamma must be in (0, 1); got {gamma}")
    if init_norm <= 0 or alpha <= 0 or alpha_min < 0:
        raise ValueError("init_norm and alpha must be > 0 and alpha_min >= 0")
    if quantize and clip is None:
        raise ValueError("quantize needs a clip box (the levels span clip)")
    batch = x.shape[0]
    x = x.detach()
    final_judge = judge if judge is not None else base.default_judge(model, topk)
    flat_x = x.reshape(batch, -1).double()
    worst = torch.full((batch,), math.inf, dtype=torch.float64, device=x.device)
    if clip is not None:
        worst = torch.maximum(flat_x - clip[0], clip[1] - flat_x).norm(dim=1)
    if max_norm is not None:
        worst = torch.minimum(worst, torch.full_like(worst, float(max_norm)))
    epsilon = torch.minimum(torch.full_like(worst, float(init_norm)), worst)
    best = x.clone()
    best_norm = torch.full((batch,), math.inf, dtype=torch.float64, device=x.device)
    delta = torch.zeros_like(x)

    with eval_mode(model):
        for t in range(steps + 1):
            x_adv = base.clamp_to_box(x + delta, clip)
            last = t == steps
            logits, grad = base.input_gradient(model, x_adv, y, targeted, gradient=not last)
            predicted = judge(x_adv) if judge_every_step and judge is not None else base.topk_labels(logits, topk)
            adv = base.is_success(predicted, y, targeted, abstain_is_success)
            size = delta.reshape(batch, -1).double().norm(dim=1)
            improved = adv & (size < best_norm)
            best_norm = torch.where(improved, size, best_norm)
            best[improved] = x_adv[improved]
            if last:
                break
            alpha_t = alpha_min + (alpha - alpha_min) * (1 + math.cos(math.pi * t / steps)) / 2
            flat = grad.reshape(batch, -1)
            gnorm = flat.norm(dim=1)
            if bool((gnorm == 0).any()):
                zero = gnorm == 0
                flat = flat.clone()
                flat[zero] = torch.randn(int(zero.sum()), flat.shape[1], device=x.device, dtype=x.dtype,
                                         generator=generator)
                gnorm = flat.norm(dim=1)
            delta = delta + alpha_t * (flat / gnorm[:, None]).view_as(delta)
            epsilon = torch.minimum(torch.where(adv, epsilon * (1 - gamma), epsilon * (1 + gamma)), worst)
            dnorm = delta.reshape(batch, -1).double().norm(dim=1).clamp_min(1e-30)
            delta = delta * base.per_input_view(epsilon / dnorm, delta)
            x_new = x + delta
            if quantize:
                lo, hi = clip
                x_new = torch.round((x_new - lo) / (hi - lo) * (levels - 1)) / (levels - 1) * (hi - lo) + lo
            delta = base.clamp_to_box(x_new, clip) - x

    found = torch.isfinite(best_norm)
    x_out = torch.where(found.view(-1, *([1] * (x.dim() - 1))), best, base.clamp_to_box(x + delta, clip))
    eps = None if max_norm is None else torch.full((batch,), float(max_norm), dtype=torch.float64, device=x.device)
    return base.finalize(x, y, x_out, found, judge=final_judge, targeted=targeted,
                         abstain_is_success=abstain_is_success, rescue_scales=rescue_scales, clip=clip,
                         norm=2.0 if eps is not None else None, eps=eps)


base.register_attack(AttackSpec(
    name="ddn", stream=1, description="DDN (Rony et al. 2019), smallest successful perturbation kept",
    options=(Option("ddn_steps", int, 100, ge=1, help="iterations", neutral=False),
             Option("ddn_init_norm", float, 1.0, gt=0, help="the starting norm epsilon", neutral=False),
             Option("ddn_gamma", float, 0.05, gt=0, lt=1, help="the norm step: epsilon *= 1 -+ gamma", neutral=False)),
    attack=lambda model, x, y, options, judge, generator: ddn(
        model, x, y, steps=options["ddn_steps"], gamma=options["ddn_gamma"], init_norm=options["ddn_init_norm"],
        judge=judge, generator=generator)))
