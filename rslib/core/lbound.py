"""The L-bound of Gaussian-averaged models (HeatSmoothing): its one formula, the deterministic
certificate of an averaged model, and the per-input "test statistics".

:func:`lbound_radius` is ``R = sigma * sqrt(pi/2) * margin`` of softmax outputs. Two tables use it:
:func:`lbound_rows` (the certify stage's ``lbound_certify.csv``: one clean forward per batch, the
one-pass classification of an averaged model, timed) and :func:`test_statistics` (the attack stage's
``lbound.csv``, with margin-gradient norms, for base, averaged or Monte-Carlo smoothed models).

For a classifier with softmax outputs ``p(x)`` (a deterministic averaged model, a base model, or a
Monte-Carlo smoothed model whose ``p`` is the mean softmax over ``R`` noise draws),
:func:`test_statistics` reports per input:

* ``margin_top1 = p_(1) - p_(2)`` and ``margin_topk = p_(k) - p_(k+1)`` (sorted probabilities);
  ``label_margin = p_y - max_{i != y} p_i`` (HeatSmoothing's negated "loss"; < 0 when misclassified);
* ``grad_l2`` and ``grad_l1``: the l2 and l1 norms of ``grad_x (p_c - p_r)`` with ``c, r`` the top two
  classes at ``x`` (held fixed). They are the dual norms for l2 and linf adversaries respectively:
  to first order the margin falls at rate ``grad_l2`` per unit l2 step and ``grad_l1`` per unit
  linf step, giving the linearized distances ``first_order_l2 = margin_top1 / grad_l2`` and
  ``first_order_linf = margin_top1 / grad_l1`` (estimates, not bounds). The same for the logit
  margin ``z_c - z_r`` (``logit_margin``, ``logit_grad_l2``, ``logit_grad_l1``; for a linear model
  these are the norms of ``w_c - w_r``). For a smoothed model the "logits" are ``log p``.
* ``lbound = sigma * sqrt(pi/2) * margin_top1`` and ``lbound_topk`` (with ``margin_topk``): the
  L-bound of Campbell et al. on the l2 distance to the decision boundary. It is **APPROXIMATE**:
  it holds for an exact Gaussian average at scale ``sigma`` of a function with values in [0, 1]
  (whose gradient norm is then at most ``1 / (sigma sqrt(2 pi))`` per output, hence a margin
  gradient norm at most ``sqrt(2 / pi) / sigma``), which a trained averaged network or a finite-R
  Monte-Carlo average only approximates. For a rigorous certificate use ``rslib.core.certify.Smooth``.
  A global-Lipschitz version (HeatSmoothing's ``Lbound``) is ``max(label_margin, 0) / max(grad_l2)``
  over the evaluated set, computable from the frame.
* ``prediction``, ``rank`` of the label (0 = top), ``correct_top1``, ``correct_topk``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from rslib.core.certify import smoothed
from rslib.core.modules import eval_mode
from rslib.core.noises import Noise

__all__ = ["COLUMNS", "LBOUND_COLUMNS", "DeterministicResult", "deterministic_certify", "lbound_radius",
           "lbound_rows", "test_statistics"]

COLUMNS = ["idx", "label", "prediction", "rank", "correct_top1", "correct_topk", "prob_top1", "margin_top1",
           "margin_topk", "label_margin", "grad_l2", "grad_l1", "logit_margin", "logit_grad_l2", "logit_grad_l1",
           "first_order_l2", "first_order_linf", "lbound", "lbound_topk", "sigma", "topk", "draws"]
_DISCRETE = ("prediction", "rank", "correct_top1", "correct_topk")
#: Columns of :func:`lbound_rows` (``radius`` is the approximate l2 L-bound).
LBOUND_COLUMNS = ["idx", "label", "prediction", "margin", "radius", "correct", "seconds", "norm", "approximate"]


def lbound_radius(margin, sigma: float):
    """HeatSmoothing's APPROXIMATE l2 radius ``sigma * sqrt(pi/2) * margin`` of a softmax margin (a float,
    array or Series); approximate as explained in the module docstring (``lbound``)."""
    return sigma * math.sqrt(math.pi / 2) * margin


@dataclass
class DeterministicResult:
    """One-pass classification of an averaged model with its approximate L-bound radius."""

    prediction: np.ndarray
    topk_indices: np.ndarray
    margin: np.ndarray
    radius: np.ndarray
    seconds: np.ndarray

    def correct(self, labels: np.ndarray) -> np.ndarray:
        """Whether each label is in the top-k set (top-1 when k = 1)."""
        return (self.topk_indices == np.asarray(labels)[:, None]).any(1)


@torch.inference_mode()
def deterministic_certify(model: nn.Module, x: torch.Tensor, sigma: float, topk: int = 1) -> DeterministicResult:
    """HeatSmoothing's APPROXIMATE L-bound :func:`lbound_radius` of ``margin = p_(k) - p_(k+1)`` (top-1: top
    minus runner-up). For a rigorous certificate, smooth the same model with ``rslib.core.certify.Smooth``
    and Gaussian noise at ``sigma``."""
    tic = time.perf_counter()
    probs = torch.softmax(model.eval()(x), dim=1)
    ordered = probs.topk(topk + 1, dim=1)
    margin = (ordered.values[:, topk - 1] - ordered.values[:, topk]).cpu().numpy()
    seconds = (time.perf_counter() - tic) / len(x)
    indices = ordered.indices.cpu().numpy()
    return DeterministicResult(prediction=indices[:, 0], topk_indices=indices[:, :topk], margin=margin,
                               radius=lbound_radius(margin, sigma), seconds=np.full(len(x), seconds))


def lbound_rows(model: nn.Module, x: Tensor, y: Tensor, indices: Sequence[int], sigma: float, topk: int,
                warm_up: bool = False) -> pd.DataFrame:
    """The L-bound table (:data:`LBOUND_COLUMNS`) of one batch: one clean forward, ``seconds`` per image;
    ``warm_up``: run one untimed pass first (the first call of a process pays one-off costs)."""
    if warm_up:
        deterministic_certify(model, x, sigma, topk)
    result = deterministic_certify(model, x, sigma, topk)
    labels = y.cpu().numpy()
    return pd.DataFrame({"idx": list(indices), "label": labels, "prediction": result.prediction,
                         "margin": result.margin, "radius": result.radius, "correct": result.correct(labels),
                         "seconds": result.seconds, "norm": "l2", "approximate": True})[LBOUND_COLUMNS]


def _statistics(model: nn.Module, x: Tensor, y: Tensor | None, topk: int, noise: Noise | None, draws: int,
                generator: torch.Generator | None) -> dict[str, Tensor]:
    batch = x.shape[0]
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        # log p(x): log-softmax of the model, or log of the mean softmax over ``draws`` noise draws
        log_p = (torch.log_softmax(model(xg), dim=-1) if noise is None
                 else smoothed(model, noise, draws, fresh=True, generator=generator)(xg))
        p = log_p.exp()
        ordered = p.detach().topk(topk + 1, dim=1)
        c, r = ordered.indices[:, 0], ordered.indices[:, 1]
        rows = torch.arange(batch, device=x.device)
        (grad_p,) = torch.autograd.grad((p[rows, c] - p[rows, r]).sum(), xg, retain_graph=True)
        # logits: for a plain model log_softmax differs from the logits by a per-input constant,
        # so z_c - z_r == log p_c - log p_r exactly (and its input gradient too).
        logit_margin = log_p[rows, c] - log_p[rows, r]
        (grad_z,) = torch.autograd.grad(logit_margin.sum(), xg)
    flat_p, flat_z = grad_p.reshape(batch, -1), grad_z.reshape(batch, -1)
    probs, top = p.detach(), ordered.values
    out = {"prediction": c, "prob_top1": top[:, 0], "margin_top1": top[:, 0] - top[:, 1],
           "margin_topk": top[:, topk - 1] - top[:, topk], "grad_l2": flat_p.norm(dim=1),
           "grad_l1": flat_p.abs().sum(1), "logit_margin": logit_margin.detach(),
           "logit_grad_l2": flat_z.norm(dim=1), "logit_grad_l1": flat_z.abs().sum(1)}
    if y is not None:
        out["correct_top1"] = c == y
        out["correct_topk"] = (ordered.indices[:, :topk] == y[:, None]).any(1)
        out["rank"] = (probs > probs[rows, y][:, None]).sum(1)
        others = probs.clone()
        others[rows, y] = -math.inf
        out["label_margin"] = probs[rows, y] - others.amax(1)
    return out


def test_statistics(model: nn.Module, x: Tensor, y: Tensor | Sequence[int] | None, sigma: float, *,
                    topk: int = 5, smoothed_noise: Noise | None = None, draws: int = 0,
                    generator: torch.Generator | None = None, batch_size: int = 256,
                    indices: Sequence[int] | np.ndarray | None = None) -> pd.DataFrame:
    """Per-input margins, margin-gradient norms and the (approximate) L-bound: one row per input with the
    columns :data:`COLUMNS` (see the module docstring).

    Args:
        model: returns logits; evaluated in eval mode (modes restored); parameters' ``.grad`` untouched.
        x: inputs (B, ...); ``y``: labels (or ``None``: label columns are NA).
        sigma: the Gaussian scale of the averaging, used by ``lbound = sigma * sqrt(pi/2) * margin``.
        topk: k of the top-k margin and correctness (``1 <= topk < num_classes``).
        smoothed_noise, draws: for a Monte-Carlo smoothed model, the noise and the number ``R`` of
            draws per input; ``p`` is then the mean softmax over the draws (gradients flow through
            the average). Both or neither must be given.
        generator: source of the draws (on ``x``'s device).
        batch_size: inputs per forward (each costs ``draws`` rows when smoothed).
        indices: the ``idx`` column (default ``0 .. B-1``).
    """
    if (smoothed_noise is None) != (draws == 0):
        raise ValueError("give smoothed_noise together with draws >= 1 (or neither); "
                         f"got smoothed_noise={smoothed_noise!r}, draws={draws!r}")
    for name, value, low in (("draws", draws, 0), ("topk", topk, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0; got {sigma!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (B, ...); got shape {tuple(x.shape)}")
    batch = x.shape[0]
    labels = None if y is None else torch.as_tensor(y, device=x.device).long().reshape(-1)
    if labels is not None and labels.shape[0] != batch:
        raise ValueError(f"y must have one label per input ({batch}); got {labels.shape[0]}")
    parts: list[dict[str, Tensor]] = []
    with eval_mode(model):
        with torch.no_grad():
            classes = model(x[:1]).shape[-1]
        if not topk < classes:
            raise ValueError(f"topk must be < the number of classes ({classes}); got {topk}")
        for start in range(0, batch, batch_size):
            stop = start + batch_size
            parts.append(_statistics(model, x[start:stop], None if labels is None else labels[start:stop],
                                     topk, smoothed_noise, draws, generator))
    cols = {key: torch.cat([part[key] for part in parts]).detach().cpu() for key in parts[0]}
    cols = {key: value.numpy() if key in _DISCRETE else value.double().numpy() for key, value in cols.items()}
    idx = np.arange(batch) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) != batch:
        raise ValueError(f"indices must have length {batch}; got {len(idx)}")
    if labels is None:  # the label columns are missing values
        missing = {"label": "Int64", "rank": "Int64", "correct_top1": "boolean", "correct_topk": "boolean"}
        cols.update({key: pd.array([pd.NA] * batch, dtype=dtype) for key, dtype in missing.items()})
        cols["label_margin"] = np.full(batch, np.nan)
    else:
        cols["label"] = labels.cpu().numpy()
    frame = pd.DataFrame({"idx": idx, **cols, "sigma": float(sigma), "topk": topk, "draws": draws})
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["first_order_l2"] = np.where(frame["grad_l2"] > 0, frame["margin_top1"] / frame["grad_l2"], np.inf)
        frame["first_order_linf"] = np.where(frame["grad_l1"] > 0, frame["margin_top1"] / frame["grad_l1"], np.inf)
    frame["lbound"] = lbound_radius(frame["margin_top1"], sigma)
    frame["lbound_topk"] = lbound_radius(frame["margin_topk"], sigma)
    return frame[COLUMNS]


test_statistics.__test__ = False  # a library function, not a pytest test (if imported into tests)
