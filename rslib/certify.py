"""Randomized-smoothing prediction and certification for batches of inputs (Cohen et al. 2019).

``Smooth(model, noise, num_classes)`` wraps a base classifier ``f``; the smoothed classifier
``g(x) = argmax_c P[f(x + delta) = c]`` is evaluated by Monte Carlo:

- ``predict`` draws ``n`` samples per input and abstains (``ABSTAIN = -1``) unless a two-sided
  binomial test of the top two counts rejects equality at level ``alpha``;
- ``certify`` selects the top class (or top-k set) from ``n0`` draws, then estimates its probability
  from ``n`` *independent* draws; ``rho`` is the one-sided Clopper-Pearson lower bound at level
  ``alpha`` and the radius for every norm comes from the noise (``rho <= 1/2``: abstain, radius 0).
  With probability at least ``1 - alpha`` over the draws, a returned radius is a true certificate.

Noise for input ``i`` comes from its own generator seeded by ``(seed, i)``, so rows do not depend on
how inputs are batched or sharded across processes. Noise batches pack several inputs so that the
model always sees full batches, and memory does not grow with ``n``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch
from torch import nn

from rslib.noises import NORMS, Noise, norm_label
from rslib.stats import clopper_pearson_lower, should_abstain

ABSTAIN = -1
COLUMNS = ["idx", "label", "prediction", "correct", "count_top", "count_second", "n0", "n", "alpha", "prob_lb",
           "radius_l1", "radius_l2", "radius_linf", "seconds_predict", "seconds_certify"]
SOURCE_COLUMNS = ["source_l1", "source_l2", "source_linf"]
# The class (top of the selected set) chosen from the n0 draws, and whether the label is in that set:
# with them, recertify() can re-derive predictions and correctness from counts alone.
SELECTION_COLUMNS = ["selected", "in_selection"]
_SELECTION, _ESTIMATION, _PREDICTION = 0, 1, 2


def _generator(seed: int, index: int, stage: int, device: torch.device) -> torch.Generator:
    """Independent stream per (seed, input index, stage)."""
    mixed = (seed * 1_000_003 + index) * 4 + stage
    return torch.Generator(device=device).manual_seed(mixed % (2**63 - 1))


@dataclass
class Certificate:
    """Per-input certification results (numpy arrays of equal length); ``to_frame()`` gives the table."""

    idx: np.ndarray
    label: np.ndarray
    prediction: np.ndarray
    correct: np.ndarray
    count_top: np.ndarray
    count_second: np.ndarray
    n0: np.ndarray
    n: np.ndarray
    alpha: np.ndarray
    prob_lb: np.ndarray
    radius_l1: np.ndarray
    radius_l2: np.ndarray
    radius_linf: np.ndarray
    seconds_predict: np.ndarray
    seconds_certify: np.ndarray
    source_l1: np.ndarray
    source_l2: np.ndarray
    source_linf: np.ndarray
    selected: np.ndarray
    in_selection: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """One row per input: ``COLUMNS``, the norm each radius came from, then the selection."""
        frame = pd.DataFrame({f.name: getattr(self, f.name) for f in fields(self)})
        for column in ("label", "correct", "in_selection"):
            frame[column] = frame[column].astype("Int64" if column == "label" else "boolean")
        frame.loc[frame["label"] < 0, ["label", "correct", "in_selection"]] = pd.NA
        return frame[COLUMNS + SOURCE_COLUMNS + SELECTION_COLUMNS]


def radii_frame(prob_lb: np.ndarray, noise: Noise) -> dict[str, np.ndarray]:
    """Radius and source norm for every norm from lower bounds ``prob_lb`` (0 where ``rho <= 1/2``)."""
    out = {}
    for norm in NORMS:
        radius, source = noise.certify_with_source(prob_lb, norm)
        label = norm_label(norm)
        out[f"radius_{label}"] = radius
        out[f"source_{label}"] = np.where(radius > 0, [norm_label(s) for s in source], "none")
    return out


class Smooth:
    """Monte-Carlo smoothed classifier around ``model`` with ``noise`` (any rslib noise)."""

    def __init__(self, model: nn.Module, noise: Noise, num_classes: int, *, seed: int = 0,
                 autocast: torch.dtype | None = None, channels_last: bool = False) -> None:
        self.model = model.eval()
        self.noise = noise
        self.num_classes = num_classes
        self.seed = seed
        self.autocast = autocast
        self.channels_last = channels_last

    def _forward_classes(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self.autocast is not None:
            with torch.autocast(batch.device.type, dtype=self.autocast):
                return self.model(batch).argmax(1)
        return self.model(batch).argmax(1)

    @torch.inference_mode()
    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int, indices: Sequence[int],
                      stage: int = _ESTIMATION) -> torch.Tensor:
        """Class counts (B, num_classes) of ``f(x_i + delta)`` over ``num`` draws per input.

        The (input, draw) pairs are processed in chunks of ``batch_size`` rows that may span inputs.
        """
        device = x.device
        batch = x.shape[0]
        counts = torch.zeros(batch, self.num_classes, dtype=torch.long, device=device)
        generators = [_generator(self.seed, int(i), stage, device) for i in indices]
        flat = x.reshape(batch, -1)
        total = batch * num
        buffer = torch.empty(min(batch_size, total), flat.shape[1], device=device, dtype=flat.dtype)
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            owners = torch.arange(start, stop, device=device) // num
            for image in range(start // num, (stop - 1) // num + 1):
                lo, hi = max(start, image * num) - start, min(stop, (image + 1) * num) - start
                self.noise.perturb_(buffer[lo:hi], flat[image], generators[image])
            predictions = self._forward_classes(buffer[: stop - start].view(stop - start, *x.shape[1:]))
            counts.index_put_((owners, predictions), torch.ones_like(predictions), accumulate=True)
        return counts

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int = 4096,
                indices: Sequence[int] | None = None) -> torch.Tensor:
        """Smoothed prediction per input, ``ABSTAIN`` unless the top class wins a binomial test at ``alpha``."""
        indices = range(len(x)) if indices is None else indices
        counts = self.sample_counts(x, n, batch_size, indices, _PREDICTION).cpu()
        top2 = counts.topk(2, dim=1)
        abstain = should_abstain(top2.values[:, 0].numpy(), top2.values[:, 1].numpy(), alpha)
        labels = top2.indices[:, 0].clone()
        labels[torch.as_tensor(np.asarray(abstain))] = ABSTAIN
        return labels.to(x.device)

    def certify(self, x: torch.Tensor, y: torch.Tensor | None = None, n0: int = 100, n: int = 100_000,
                alpha: float = 0.001, batch_size: int = 4096, topk: int = 1,
                indices: Sequence[int] | None = None) -> Certificate:
        """Certify every input of the batch ``x``; ``y`` (optional) marks rows correct or not.

        With ``topk > 1`` the certified event is "the label is in the top-k set selected from the
        ``n0`` draws": ``count_top`` is the estimation count of that set and ``prediction`` its top class.
        """
        if not 1 <= topk < self.num_classes:
            raise ValueError(f"topk must be in [1, num_classes - 1] = [1, {self.num_classes - 1}]; got {topk}")
        if n0 < 1 or n < 1:
            raise ValueError(f"n0 and n must be >= 1; got n0={n0}, n={n}")
        indices = list(range(len(x))) if indices is None else [int(i) for i in indices]
        tic = time.perf_counter()
        selection = self.sample_counts(x, n0, batch_size, indices, _SELECTION).cpu()
        seconds_predict = time.perf_counter() - tic
        chosen = selection.topk(topk, dim=1).indices
        tic = time.perf_counter()
        estimation = self.sample_counts(x, n, batch_size, indices, _ESTIMATION).cpu()
        seconds_certify = time.perf_counter() - tic
        count_top = estimation.gather(1, chosen).sum(1).numpy()
        rest = estimation.clone().scatter_(1, chosen, -1)
        count_second = rest.max(1).values.clamp_min(0).numpy()
        prob_lb = clopper_pearson_lower(count_top, n, alpha)
        certified = prob_lb > 0.5
        prediction = np.where(certified, chosen[:, 0].numpy(), ABSTAIN)
        batch = len(x)
        labels = y.detach().cpu().numpy().astype(np.int64) if y is not None else np.full(batch, -1)
        in_selection = (chosen == torch.as_tensor(labels)[:, None]).any(1).numpy()
        full = np.full
        return Certificate(
            idx=np.asarray(indices), label=labels, prediction=prediction, correct=certified & in_selection,
            count_top=count_top, count_second=count_second, n0=full(batch, n0), n=full(batch, n),
            alpha=full(batch, alpha), prob_lb=prob_lb, seconds_predict=full(batch, seconds_predict / batch),
            seconds_certify=full(batch, seconds_certify / batch), selected=chosen[:, 0].numpy(),
            in_selection=in_selection, **radii_frame(prob_lb, self.noise))


def recertify(table: pd.DataFrame, noise: Noise, alpha: float | None = None) -> pd.DataFrame:
    """Recompute ``prob_lb`` and every radius from saved counts (optionally at another ``alpha``)."""
    table = table.copy()
    if alpha is not None:
        table["alpha"] = alpha
    prob_lb = clopper_pearson_lower(table["count_top"].to_numpy(), table["n"].to_numpy(), table["alpha"].to_numpy())
    table["prob_lb"] = prob_lb
    for column, values in radii_frame(np.atleast_1d(prob_lb), noise).items():
        table[column] = values
    certified = table["prob_lb"] > 0.5
    table["prediction"] = table["selected"].where(certified, ABSTAIN)
    table["correct"] = table["in_selection"].astype("boolean") & certified
    return table


def certified_accuracy(table: pd.DataFrame, radii: Sequence[float] | np.ndarray, norm: str = "l2") -> np.ndarray:
    """Fraction of ALL rows (abstains count as failures) that are correct with radius >= r, per r."""
    correct = table["correct"].fillna(False).to_numpy(dtype=bool)
    radius = table[f"radius_{norm}"].to_numpy()
    radii = np.asarray(radii, dtype=float)
    return np.array([(correct & (radius >= r)).mean() if len(table) else math.nan for r in radii])


def average_certified_radius(table: pd.DataFrame, norm: str = "l2") -> float:
    """Mean over all rows of radius * correct (ACR; abstains and errors contribute 0)."""
    correct = table["correct"].fillna(False).to_numpy(dtype=bool)
    return float((table[f"radius_{norm}"].to_numpy() * correct).mean()) if len(table) else math.nan


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
    """HeatSmoothing's L-bound: ``R = sigma * sqrt(pi/2) * margin`` of the softmax outputs.

    APPROXIMATE: it holds for an exact Gaussian average with outputs in [0, 1], which a trained
    averaged network only approximates. ``margin`` is ``p_(k) - p_(k+1)`` (top-1: top minus runner-up).
    For a rigorous certificate, smooth the same model with ``Smooth`` and Gaussian noise at ``sigma``.
    """
    tic = time.perf_counter()
    probs = torch.softmax(model.eval()(x), dim=1)
    ordered = probs.topk(topk + 1, dim=1)
    margin = (ordered.values[:, topk - 1] - ordered.values[:, topk]).cpu().numpy()
    seconds = (time.perf_counter() - tic) / len(x)
    indices = ordered.indices.cpu().numpy()
    return DeterministicResult(prediction=indices[:, 0], topk_indices=indices[:, :topk], margin=margin,
                               radius=sigma * math.sqrt(math.pi / 2) * margin, seconds=np.full(len(x), seconds))
