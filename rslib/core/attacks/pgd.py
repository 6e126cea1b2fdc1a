"""PGD in l2, linf and l1 balls, and its minimal-distance mode (a per-input bisection over the budget).

l2: normalized-gradient steps and projection on the ball; linf: sign steps and clamping; l1: a sparse
steepest-ascent step (the ``l1_sparsity`` fraction of coordinates with the largest gradient magnitude,
skipping coordinates pinned at the box bound in the gradient's direction, as in SLIDE, Tramer & Boneh
2019) followed by the **exact** Euclidean projection onto the l1 ball (``project_l1_ball``, Duchi et
al. 2008).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from rslib.core.attacks import base
from rslib.core.attacks.base import DEFAULT_RESCUE_SCALES, AttackResult, AttackSpec, Judge
from rslib.core.modules import eval_mode
from rslib.core.noises import parse_norm
from rslib.util.options import Option


def _pgd_step(x: Tensor, x_adv: Tensor, grad: Tensor, norm: float, eps: Tensor, step: Tensor,
              clip: tuple[float, float] | None, l1_sparsity: float) -> Tensor:
    """One ascent step from ``x_adv`` followed by projection on the ball around ``x`` and the box."""
    batch = x.shape[0]
    delta = x_adv - x
    if norm == 2:
        flat = grad.reshape(batch, -1)
        direction = (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)).view_as(grad)
    elif norm == math.inf:
        direction = grad.sign()
    else:
        flat = grad.reshape(batch, -1)
        movable = torch.ones_like(flat, dtype=torch.bool)
        if clip is not None:  # coordinates pinned at the bound the gradient pushes towards cannot move
            pos = x_adv.reshape(batch, -1)
            movable = ~(((pos >= clip[1]) & (flat > 0)) | ((pos <= clip[0]) & (flat < 0)))
        magnitude = torch.where(movable, flat.abs(), torch.zeros_like(flat))
        k = max(1, int(math.ceil(l1_sparsity * flat.shape[1])))
        top = magnitude.topk(k, dim=1).indices
        chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True) & (magnitude > 0)
        count = chosen.sum(1, keepdim=True).clamp_min(1)
        direction = (flat.sign() * chosen / count).view_as(grad)
    delta = base.project_lp_ball(delta + base.per_input_view(step, delta) * direction, norm, eps)
    return base.clamp_to_box(x + delta, clip)


def pgd(model: nn.Module, x: Tensor, y: Tensor, norm: float | str = 2, eps: float | Tensor = 0.5, *,
        steps: int = 40, step_size: float | Tensor | None = None, random_start: bool = False,
        early_stop: bool = True, targeted: bool = False, generator: torch.Generator | None = None,
        topk: int = 1, clip: tuple[float, float] | None = (0.0, 1.0), judge: Judge | None = None,
        judge_every_step: bool = False, abstain_is_success: bool = False,
        rescue_scales: Sequence[float] = DEFAULT_RESCUE_SCALES, l1_sparsity: float = 0.05) -> AttackResult:
    """Projected gradient descent on all inputs at once, in the ``norm``-ball (1, 2, inf) of ``eps``.

    Args:
        model: returns logits (or log-probabilities, e.g. :func:`smoothed`); run in eval mode.
        x: inputs (B, ...) inside ``clip``; ``y``: labels (untargeted) or targets (``targeted``).
        eps: radius, a float or one per input (B,). ``step_size``: default ``2.5 * eps / steps``
            (l2: length of the normalized step; linf: size of the sign step; l1: l1 length of the
            sparse step).
        steps: gradient steps (``steps + 1`` success checks). ``random_start``: start from a point
            drawn uniformly in the ball (then clipped), from ``generator`` (on ``x``'s device).
        early_stop: freeze each input as soon as it is adversarial (its smallest-step success);
            otherwise every input runs all steps and the final iterate is judged.
        topk, judge, judge_every_step, abstain_is_success, rescue_scales: see :mod:`rslib.core.attacks.base`.
        l1_sparsity: fraction of coordinates moved by an l1 step.

    Returns:
        :class:`AttackResult`; successes are re-checked with ``judge`` and inside the budget.
    """
    norm = parse_norm(norm)
    y = base.check_inputs(x, y, clip)
    base.check_topk(topk)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0; got {steps!r}")
    if not 0 < l1_sparsity <= 1:
        raise ValueError(f"l1_sparsity must be in (0, 1]; got {l1_sparsity}")
    batch = x.shape[0]
    eps_t = base.per_input(eps, batch, x)
    if bool((eps_t < 0).any()) or not bool(torch.isfinite(eps_t).all()):
        raise ValueError("eps must be finite and >= 0")
    step_t = 2.5 * eps_t / max(steps, 1) if step_size is None else base.per_input(step_size, batch, x)
    final_judge = judge if judge is not None else base.default_judge(model, topk)
    x = x.detach()

    with eval_mode(model):
        x_adv = x.clone()
        if random_start:
            start = base.uniform_ball(x.shape, norm, eps_t, device=x.device, dtype=x.dtype, generator=generator)
            x_adv = base.clamp_to_box(x + start, clip)
        found = torch.zeros(batch, dtype=torch.bool, device=x.device)
        active = torch.ones(batch, dtype=torch.bool, device=x.device)
        for t in range(steps + 1):
            idx = active.nonzero().squeeze(1) if early_stop else torch.arange(batch, device=x.device)
            if idx.numel() == 0:
                break
            xa, ya = x_adv[idx], y[idx]
            last = t == steps
            logits, grad = base.input_gradient(model, xa, ya, targeted, gradient=not last)
            keep = torch.ones(idx.numel(), dtype=torch.bool, device=x.device)
            if early_stop or last:
                predicted = judge(xa) if judge_every_step and judge is not None else base.topk_labels(logits, topk)
                adv = base.is_success(predicted, ya, targeted, abstain_is_success)
                if early_stop:
                    found[idx[adv]] = True
                    active[idx[adv]] = False
                    keep = ~adv
                else:
                    found[idx] = adv
            if last:
                break
            moving = idx[keep]
            if moving.numel() == 0:
                continue
            x_adv[moving] = _pgd_step(x[moving], xa[keep], grad[keep], norm, eps_t[moving], step_t[moving],
                                      clip, l1_sparsity)
        return base.finalize(x, y, x_adv, found, judge=final_judge, targeted=targeted,
                             abstain_is_success=abstain_is_success, rescue_scales=rescue_scales, clip=clip,
                             norm=norm, eps=eps_t)


def pgd_minimal(model: nn.Module, x: Tensor, y: Tensor, norm: float | str, eps_max: float | Tensor, *,
                search_steps: int = 10, **pgd_kwargs) -> AttackResult:
    """Minimal-distance PGD: per-input bisection over ``eps`` in ``[0, eps_max]``.

    PGD first runs at ``eps_max``; inputs it cannot fool there fail (``inf``). For the others the
    bracket ``[lo, hi]`` starts at ``[0, found distance]``; each of ``search_steps`` rounds runs PGD
    (batched over the still-searching inputs, each at its own ``eps = (lo + hi) / 2``), keeps the
    perturbation when it is smaller than the best so far, and shrinks the bracket. The result holds
    the smallest successful (judge-verified) perturbation per input; its distance is within
    ``eps_max / 2**search_steps`` of the smallest budget at which this PGD succeeds.
    ``pgd_kwargs`` go to :func:`pgd` (``steps``, ``step_size``, ``random_start``, ``judge``, ...;
    ``early_stop`` defaults to True so each run stops at its first success).
    """
    norm = parse_norm(norm)
    if isinstance(search_steps, bool) or not isinstance(search_steps, int) or search_steps < 0:
        raise ValueError(f"search_steps must be an integer >= 0; got {search_steps!r}")
    label = base.LABELS[norm]
    batch = x.shape[0]
    y = torch.as_tensor(y, device=x.device).long().reshape(-1)
    hi = base.per_input(eps_max, batch, x)
    best = pgd(model, x, y, norm, hi, **pgd_kwargs)
    best_size = best.distance(label).clone()
    hi = torch.minimum(hi, best_size)
    lo = torch.zeros_like(hi)
    for _ in range(search_steps):
        idx = (best.success & (hi > 0)).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        mid = (lo[idx] + hi[idx]) / 2
        trial = pgd(model, x[idx], y[idx], norm, mid, **pgd_kwargs)
        size = trial.distance(label)
        ok = trial.success
        better = ok & (size < best_size[idx])
        where = idx[better]
        for name in ("x_adv", "l0", "l1", "l2", "linf"):
            getattr(best, name)[where] = getattr(trial, name)[better]
        best_size[where] = size[better]
        hi[idx[ok]] = torch.minimum(mid[ok], size[ok])
        lo[idx[~ok]] = mid[~ok]
    return best


base.register_attack(AttackSpec(
    name="pgd", stream=2,
    description="PGD, minimal-distance mode (bisection over the budget in [0, eps_max]; step 2.5 eps / steps; "
                "precision eps_max / 2**search_steps)",
    options=(Option("norm", Literal["l2", "linf", "l1"], "l2", help="the ball of the perturbation", neutral=False),
             Option("eps_max", float, 4.0, gt=0, help="the largest budget tried", neutral=False),
             Option("pgd_steps", int, 20, ge=1, help="PGD steps per budget", neutral=False),
             Option("search_steps", int, 8, ge=0, help="bisection rounds over the budget", neutral=False)),
    attack=lambda model, x, y, options, judge, generator: pgd_minimal(
        model, x, y, options["norm"], options["eps_max"], search_steps=options["search_steps"],
        steps=options["pgd_steps"], judge=judge),
    norm=lambda options: options["norm"]))
