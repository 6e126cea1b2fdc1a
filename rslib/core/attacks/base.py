"""What every attack shares: results, distances, projections, judges, the final check, and the registry.

Every attack is **batched** (all inputs attacked at once, no Python loop over inputs), runs on the
device of ``x``, and returns an :class:`AttackResult` with, per input, the success flag and the l0,
l1, l2 and linf norms of the *final* perturbation ``x_adv - x``. A failed attack has every distance
equal to ``inf`` (never 0, never the budget). The attacks (:func:`pgd` and its minimal-distance mode
:func:`pgd_minimal`, :func:`ddn`, :func:`alma`) are documented in their modules.

Success
-------
Untargeted: the prediction changes, i.e. the label ``y`` is not the predicted class (``topk = 1``) or
not in the predicted top-k set. Targeted (``targeted=True``, ``y`` are the targets): the target is the
prediction (is in the top-k set). An input that is already misclassified is a success at distance 0.
To attack the model's *own* decision, pass its predictions as ``y``.

During the iterations success is read from the logits the attack computes anyway (cheap). The final
word belongs to ``judge``: a callable ``judge(x_adv) -> labels`` returning predicted labels ``(B,)``
(or top-k sets ``(B, k)``), ``ABSTAIN`` (-1) allowed; by default the argmax (top-k) of
``model(x_adv)``. Before returning, every reported success is **re-checked** with ``judge``; a
candidate the judge rejects is retried at the scaled perturbations ``rescue_scales`` (e.g. 1.05 x,
staying inside the budget), smallest scale first, and is marked failed (distances ``inf``) if none of
them convinces the judge. ``judge_every_step=True`` calls ``judge`` at every success check during the
iterations as well (exact but costly for Monte-Carlo judges).

An ``ABSTAIN`` from the judge is **not** a wrong label: it counts as a success only with
``abstain_is_success=True`` (default ``False``), since an abstaining smoothed classifier has not been
fooled into a wrong answer.

Smoothed targets
----------------
:func:`smoothed` wraps a base model into the smoothed *soft* classifier whose forward returns
``log mean_j softmax(model(x + delta_j))`` over ``m`` noise draws, so an attack on it follows the
gradient of the expectation over the noise (EOT; the loss of Salman et al.'s SmoothAdv). Judge the
success of such attacks with the smoothed *hard* classifier: :func:`majority_vote_judge` (majority
vote over ``n`` draws) or :func:`smooth_predict_judge` (``Smooth.predict`` with its abstain rule).

Budgets are never exceeded: the final perturbation is projected (in float64, with a relative safety
margin of a few ulps) onto the ball, and checked. ``clip=(lo, hi)`` keeps pixels in the box (inputs
must lie in it); ``clip=None`` removes the box.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rslib.core import autotune
from rslib.core.certify import ABSTAIN, Smooth, perturb_with, vote_counts
from rslib.core.modules import eval_mode
from rslib.core.noises import Noise, parse_norm
from rslib.util.options import Option
from rslib.util.registry import Registry

Judge = Callable[[Tensor], Tensor]
DEFAULT_RESCUE_SCALES: tuple[float, ...] = (1.02, 1.05, 1.1, 1.25, 1.5, 2.0)
LABELS = {1.0: "l1", 2.0: "l2", math.inf: "linf"}
FRAME_COLUMNS = ["idx", "label", "attack", "success", "l0", "l1", "l2", "linf"]


# ------------------------------------------------------------------------------- results

@dataclass
class AttackResult:
    """Per-input outcome of an attack (tensors of length B on the inputs' device).

    ``x_adv``: the adversarial examples; for failed inputs it holds the attack's last iterate (for
    :func:`pgd` inside the budget), which is *not* adversarial. ``success``: bool. ``l0``, ``l1``,
    ``l2``, ``linf``: float64 norms of ``x_adv - x`` for successes, ``inf`` for failures (``l0``
    counts the exactly nonzero coordinates). ``labels``: the labels (or targets) attacked.
    """

    x_adv: Tensor
    success: Tensor
    l0: Tensor
    l1: Tensor
    l2: Tensor
    linf: Tensor
    labels: Tensor | None = None

    def distance(self, norm: float | str) -> Tensor:
        """The per-input distance in ``norm`` (0, 1, 2, inf or 'l0' ... 'linf')."""
        if str(norm).lower() in ("0", "l0", "0.0"):
            return self.l0
        return {1.0: self.l1, 2.0: self.l2, math.inf: self.linf}[parse_norm(norm)]

    def to_frame(self, indices: Sequence[int] | np.ndarray | Tensor | None = None,
                 labels: Sequence[int] | np.ndarray | Tensor | None = None,
                 attack_name: str = "attack") -> pd.DataFrame:
        """One row per input: ``idx, label, attack, success, l0, l1, l2, linf`` (failures: inf)."""
        batch = len(self.success)
        idx = np.arange(batch) if indices is None else _numpy(indices).astype(np.int64)
        labels = self.labels if labels is None else labels
        label = pd.array(_numpy(labels).astype(np.int64) if labels is not None else [pd.NA] * batch, dtype="Int64")
        if len(idx) != batch or len(label) != batch:
            raise ValueError(f"indices and labels must have length {batch}; got {len(idx)} and {len(label)}")
        return pd.DataFrame({
            "idx": idx, "label": label, "attack": attack_name, "success": _numpy(self.success).astype(bool),
            "l0": _numpy(self.l0).astype(np.float64), "l1": _numpy(self.l1).astype(np.float64),
            "l2": _numpy(self.l2).astype(np.float64), "linf": _numpy(self.linf).astype(np.float64),
        })[FRAME_COLUMNS]


def _numpy(values) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)


def distances(delta: Tensor) -> dict[str, Tensor]:
    """l0, l1, l2, linf norms (float64) of each row of ``delta`` (shape (B, ...))."""
    flat = delta.detach().reshape(delta.shape[0], -1).double()
    return {"l0": (flat != 0).sum(1).double(), "l1": flat.abs().sum(1), "l2": flat.norm(dim=1),
            "linf": flat.abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0])}


# --------------------------------------------- projections and random points in lp balls

def per_input(value: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """``value`` (scalar or (B,)) as a float64 (B,) tensor on ``like``'s device."""
    out = torch.as_tensor(value, dtype=torch.float64, device=like.device)
    out = out.expand(batch) if out.dim() == 0 else out.reshape(-1)
    if out.shape[0] != batch:
        raise ValueError(f"expected a scalar or one value per input ({batch}); got shape {tuple(out.shape)}")
    return out


def per_input_view(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) in ``like``'s dtype, for broadcasting against ``like``."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def project_l1_ball(v: Tensor, radius: float | Tensor) -> Tensor:
    """Exact Euclidean projection of each row of ``v`` onto the l1 ball of ``radius`` (per row or scalar).

    Sort-based algorithm of Duchi et al. (2008), vectorized over the batch and computed in float64:
    ``w = sign(v) * max(|v| - theta, 0)`` with ``theta`` from the sorted magnitudes; rows already
    inside the ball are returned unchanged.
    """
    batch = v.shape[0]
    flat = v.reshape(batch, -1).double()
    r = per_input(radius, batch, v)
    if bool((r < 0).any()):
        raise ValueError("radius must be >= 0")
    mags = flat.abs()
    inside = mags.sum(1) <= r
    u = mags.sort(dim=1, descending=True).values
    css = u.cumsum(1)
    j = torch.arange(1, flat.shape[1] + 1, device=v.device, dtype=torch.float64)
    positive = u - (css - r[:, None]) / j > 0
    rho = (positive * j).amax(1).long()  # largest j with u_j > (css_j - r) / j (0 only when r == 0)
    theta = (css.gather(1, (rho - 1).clamp_min(0)[:, None]).squeeze(1) - r) / rho.clamp_min(1)
    projected = flat.sign() * (mags - theta[:, None]).clamp_min(0)
    projected[rho == 0] = 0
    return torch.where(inside[:, None], flat, projected).to(v.dtype).view_as(v)


def project_lp_ball(delta: Tensor, norm: float, radius: float | Tensor) -> Tensor:
    """Euclidean projection of each row of ``delta`` onto the ``norm``-ball (1, 2 or inf) of ``radius``."""
    norm = parse_norm(norm)
    r = per_input(radius, delta.shape[0], delta)
    if norm == 1:
        return project_l1_ball(delta, r)
    if norm == 2:
        size = delta.reshape(delta.shape[0], -1).double().norm(dim=1)
        factor = torch.where(size > r, r / size.clamp_min(1e-300), torch.ones_like(size))
        return delta * per_input_view(factor, delta)
    bound = per_input_view(r, delta)
    return torch.maximum(torch.minimum(delta, bound), -bound)


def uniform_ball(shape: torch.Size, norm: float, radius: Tensor, *, device, dtype,
                  generator: torch.Generator | None) -> Tensor:
    """Points drawn uniformly in the lp ball (p in {1, 2, inf}) of per-row ``radius``."""
    batch, dim = shape[0], math.prod(shape[1:])
    kw = {"device": device, "dtype": torch.float64, "generator": generator}
    if norm == math.inf:
        flat = torch.rand(batch, dim, **kw) * 2 - 1
    elif norm == 2:
        direction = torch.randn(batch, dim, **kw)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-300)
        flat = direction * torch.rand(batch, 1, **kw) ** (1.0 / dim)
    else:
        # (E_1, ..., E_d) / (E_1 + ... + E_{d+1}) with iid Exp(1) is uniform on {y >= 0, sum y <= 1}.
        exp = -torch.log1p(-torch.rand(batch, dim + 1, **kw))
        magnitudes = exp[:, :dim] / exp.sum(1, keepdim=True)
        signs = torch.randint(0, 2, (batch, dim), device=device, generator=generator).double() * 2 - 1
        flat = magnitudes * signs
    return (flat * radius.to(device)[:, None]).to(dtype).view(shape)


# -------------------------------------------------------- success, judges, model helpers

def is_success(predicted: Tensor, y: Tensor, targeted: bool, abstain_is_success: bool) -> Tensor:
    """Success per input from predicted labels (B,) or top-k sets (B, k)."""
    predicted = torch.as_tensor(predicted).to(y.device)
    if predicted.dim() == 1:
        predicted = predicted[:, None]
    hit = (predicted == y[:, None]).any(1)
    if targeted:
        return hit
    abstain = predicted[:, 0] == ABSTAIN
    return ~hit & (~abstain | abstain_is_success)


def topk_labels(logits: Tensor, topk: int) -> Tensor:
    """Top-1 labels ``(B,)`` or top-k sets ``(B, k)`` of scores ``(B, K)``."""
    return logits.argmax(1) if topk == 1 else logits.topk(topk, dim=1).indices


def default_judge(model: nn.Module, topk: int) -> Judge:
    """The model's own top-1 label (or top-k set), in eval mode without gradients."""
    def judge(x: Tensor) -> Tensor:
        with torch.no_grad(), eval_mode(model):
            return topk_labels(model(x), topk)
    return judge


def majority_vote_judge(model: nn.Module, noise: Noise, n: int, generator: torch.Generator | None = None,
                        *, batch_size: int | str = autotune.AUTO, topk: int = 1) -> Judge:
    """Judge by the smoothed hard classifier's majority vote over ``n`` noise draws per input.

    Returns the most frequent class (``topk = 1``) or the ``topk`` most frequent classes; never
    abstains (use :func:`smooth_predict_judge` for a judge with a confidence test). Draws come from
    ``generator`` (on the inputs' device) if given; the (input, draw) rows are evaluated in chunks
    of ``batch_size`` (``"auto"``: measured, see ``rslib.core.autotune``).
    """
    autotune.parse_batch_size(batch_size)
    if n < 1:
        raise ValueError(f"n must be >= 1; got n={n}")

    def judge(x: Tensor) -> Tensor:
        with eval_mode(model), autotune.tuned(model, x, batch_size=batch_size) as choice:
            def logits_of(rows: Tensor) -> Tensor:
                return model(autotune.in_format(rows, choice.channels_last))
            counts = vote_counts(logits_of, x, n, choice.batch_size, perturb_with(noise, [generator] * len(x)))
        return topk_labels(counts, topk)
    return judge


def smooth_predict_judge(smooth: Smooth, n: int, alpha: float, batch_size: int | str = autotune.AUTO) -> Judge:
    """Judge by ``Smooth.predict(x, n, alpha, batch_size)``: ``ABSTAIN`` unless the top class wins
    the two-sided binomial test at ``alpha``. With a large ``n`` and a small ``alpha`` (e.g. 2000 and
    0.001) Monte-Carlo noise cannot fake a success. Its draws are seeded per position in the batch
    (``Smooth``'s scheme), so the judge is deterministic for a given input.
    """
    def judge(x: Tensor) -> Tensor:
        return smooth.predict(x, n=n, alpha=alpha, batch_size=batch_size)
    return judge


# ---------------------------------------------------------------------- shared machinery

def check_inputs(x: Tensor, y: Tensor, clip: tuple[float, float] | None) -> Tensor:
    """Validate a batch, its labels and the box; returns ``y`` on ``x``'s device (shared by every attack)."""
    if x.dim() < 2:
        raise ValueError(f"x must be a batch (B, ...); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
    y = torch.as_tensor(y, device=x.device).long().reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one label per input ({x.shape[0]}); got {y.shape[0]}")
    if clip is not None:
        lo, hi = clip
        if not lo < hi:
            raise ValueError(f"clip must be (lo, hi) with lo < hi; got {clip}")
        if x.numel() and (float(x.min()) < lo or float(x.max()) > hi):
            raise ValueError(f"inputs must lie in the clip box {clip}; got values in "
                             f"[{float(x.min()):.4g}, {float(x.max()):.4g}] (pass clip=None for no box)")
    return y


def clamp_to_box(x_adv: Tensor, clip: tuple[float, float] | None) -> Tensor:
    """``x_adv`` clamped to the input box ``clip`` (unchanged when ``None``)."""
    return x_adv if clip is None else x_adv.clamp(clip[0], clip[1])


def check_topk(topk: int) -> None:
    """ValueError unless ``topk`` is an integer >= 1."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1; got {topk!r}")


def _enforce_budget(x: Tensor, x_adv: Tensor, norm: float, eps: Tensor, clip: tuple[float, float] | None) -> Tensor:
    """Shrink ``x_adv - x`` (measured in float64) until its ``norm`` is at most ``eps`` per input.

    The target radius is ``eps`` less a relative margin of a few ulps of ``x``'s dtype (growing if
    rounding back to that dtype still overshoots), so the check holds after the cast.
    """
    tiny = 4 * torch.finfo(x.dtype).eps
    for attempt in range(10):
        delta = x_adv.double() - x.double()
        over = distances(delta)[LABELS[norm]] > eps
        if not bool(over.any()):
            return x_adv
        target = eps[over] * (1 - min(tiny * 4**attempt, 0.5))
        shrunk = project_lp_ball(delta[over], norm, target)
        x_adv = x_adv.clone()
        x_adv[over] = clamp_to_box((x[over].double() + shrunk).to(x.dtype), clip)
    raise RuntimeError("could not bring the perturbation inside the budget (numerical trouble)")


def finalize(x: Tensor, y: Tensor, x_adv: Tensor, candidate: Tensor, *, judge: Judge, targeted: bool,
              abstain_is_success: bool, rescue_scales: Sequence[float], clip: tuple[float, float] | None,
              norm: float | None = None, eps: Tensor | None = None) -> AttackResult:
    """Enforce the budget, re-check every candidate success with ``judge``, rescue or fail the rest."""
    x_adv = x_adv.detach()
    if eps is not None:
        x_adv = _enforce_budget(x, x_adv, norm, eps, clip)
    success = torch.zeros_like(candidate)
    pending = candidate.nonzero().squeeze(1)
    scales = [1.0, *[float(s) for s in rescue_scales]]
    with torch.no_grad():
        for scale in scales:
            if pending.numel() == 0:
                break
            trial = x_adv[pending]
            if scale != 1.0:
                base = x[pending]
                trial = clamp_to_box(base + scale * (trial - base), clip)
                if eps is not None:
                    trial = _enforce_budget(base, trial, norm, eps[pending], clip)
            ok = is_success(judge(trial), y[pending], targeted, abstain_is_success)
            x_adv[pending[ok]] = trial[ok]
            success[pending[ok]] = True
            pending = pending[~ok]
    dist = distances(x_adv.double() - x.double())
    if eps is not None and bool((dist[LABELS[norm]] > eps).any()):  # paranoid final check: never exceed the budget
        raise AssertionError("attack exceeded its budget")
    inf = torch.full_like(dist["l2"], math.inf)
    dist = {key: torch.where(success, value, inf) for key, value in dist.items()}
    return AttackResult(x_adv=x_adv, success=success, labels=y, **dist)


def input_gradient(model: nn.Module, x_adv: Tensor, y: Tensor, targeted: bool,
                   gradient: bool = True) -> tuple[Tensor, Tensor | None]:
    """(logits, gradient w.r.t. ``x_adv`` of the summed per-input loss to ascend: the cross-entropy of the
    label, or minus that of the target when ``targeted``); model parameters' .grad untouched. Without
    ``gradient`` (an attack's last check) only the logits, from a forward without autograd, and None."""
    if not gradient:
        with torch.no_grad():
            return model(x_adv), None
    with torch.enable_grad():
        xg = x_adv.detach().requires_grad_(True)
        logits = model(xg)
        ce = F.cross_entropy(logits, y, reduction="none")
        (grad,) = torch.autograd.grad((-ce if targeted else ce).sum(), xg)
    return logits.detach(), grad


# ------------------------------------------------------------------------------ registry

#: ``attack(model, x, y, options, judge, generator)``: one batch attacked with the stage's options.
AttackBatch = Callable[[nn.Module, Tensor, Tensor, Mapping[str, Any], Judge | None, torch.Generator], AttackResult]


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: everything the attack stage needs to run, seed, digest and record it.

    ``options`` are its YAML keys in the ``attack`` section (only they, with the shared settings,
    enter its digest); ``stream`` numbers its per-chunk random generators (unique, never reused, so
    rows stay reproducible); ``norm`` is the distance it minimizes (a function of the options when it
    has a choice); ``attack`` attacks one batch.
    """

    name: str
    stream: int
    description: str
    options: tuple[Option, ...]
    attack: AttackBatch
    norm: str | Callable[[Mapping[str, Any]], str] = "l2"

    def norm_of(self, options: Mapping[str, Any]) -> str:
        """The norm this attack minimizes with these options."""
        return self.norm if isinstance(self.norm, str) else self.norm(options)

    def settings(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """What the attack's metadata records: the method, its norm and its options."""
        return {"method": self.description, "norm": self.norm_of(options),
                **{option.key: options[option.key] for option in self.options}}


#: Every attack, registered by its module (``rslib.core.attacks.<name>``).
ATTACKS: Registry[AttackSpec] = Registry("attack")
#: The stream of the attack stage's L-bound statistics (no attack may use it).
LBOUND_STREAM = 3


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Add ``spec`` to :data:`ATTACKS`; its stream must be unused (two attacks never share random draws)."""
    taken = {LBOUND_STREAM: "the L-bound statistics"} | {other.stream: name for name, other in ATTACKS.items()}
    if spec.stream in taken or spec.stream < 1:
        raise ValueError(f"attack {spec.name!r}: stream {spec.stream} is taken (by {taken.get(spec.stream)!r}) "
                         f"or < 1; the streams in use are {sorted(taken)}")
    return ATTACKS.register(spec.name, spec)
