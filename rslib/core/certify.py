"""Randomized-smoothing prediction and certification for batches of inputs (Cohen et al. 2019).

``Smooth(model, noise, num_classes)`` wraps a base classifier ``f``; the smoothed classifier
``g(x) = argmax_c P[f(x + delta) = c]`` is evaluated by Monte Carlo:

- ``predict`` draws ``n`` samples per input and abstains (``ABSTAIN = -1``) unless a two-sided
  binomial test of the top two counts rejects equality at level ``alpha``;
- ``certify`` selects the top class (or top-k set) from ``n0`` draws, then estimates its probability
  from ``n`` *independent* draws; ``rho`` is the one-sided Clopper-Pearson lower bound at level
  ``alpha`` and the radius for every norm comes from the noise (``rho <= 1/2``: abstain, radius 0).
  With probability at least ``1 - alpha`` over the draws, a returned radius is a true certificate.
- sequential certification (``radii_of_interest``, ``looks=K``): the ``n`` estimation draws come in
  ``K`` looks of doubling size (:func:`look_sizes`), each bounded at level ``alpha / K``; an input
  stops once more draws cannot change which radii of interest it certifies (:func:`sequential_counts`).
  A union bound over the looks keeps the guarantee at ``alpha`` whatever the stopping rule.

Noise for input ``i`` comes from its own generator seeded by ``(seed, i)``, so rows do not depend on
how inputs are batched or sharded across processes. Noise batches pack several inputs so that the
model always sees full batches, and memory does not grow with ``n``. Their size (rows per forward) and
the model's memory format are measured once per model, input shape, device and dtype by
``rslib.core.autotune`` unless given (``batch_size="auto"`` is every loop's default).

This module is the one home of the Monte-Carlo smoothed classifier, hard and soft: the packed loop
:func:`noisy_batches`, with :func:`vote_counts` (``Smooth``, the attacks' majority-vote judge) and
:func:`soft_average` (the Gaussian average a heat-smoothed model approximates) over it, and
:func:`mean_softmax_log`, the smoothed soft classifier of :func:`smoothed` (attacks, L-bound statistics)
and of the training objectives (direct likelihood, SmoothAdv).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from rslib.core import autotune
from rslib.core.modules import eval_mode
from rslib.core.noises import NORMS, Noise, norm_label, parse_norm
from rslib.core.stats import clopper_pearson_lower, clopper_pearson_upper, should_abstain

ABSTAIN = -1
COLUMNS = ["idx", "label", "prediction", "correct", "count_top", "count_second", "n0", "n", "alpha", "prob_lb",
           "radius_l1", "radius_l2", "radius_linf", "seconds_predict", "seconds_certify"]
SOURCE_COLUMNS = ["source_l1", "source_l2", "source_linf"]
# The class (top of the selected set) chosen from the n0 draws, and whether the label is in that set:
# with them, recertify() can re-derive predictions and correctness from counts alone.
SELECTION_COLUMNS = ["selected", "in_selection"]
# Sequential certification only (radii_of_interest given): the number of looks K, the 1-based stopping look
# and the requested maximum of estimation draws. There ``n`` is the number of draws used and ``alpha`` the
# per-look level (overall / K), so recertify() and every reader of (count_top, n, alpha) reproduce ``prob_lb``.
SEQUENTIAL_COLUMNS = ["looks", "stop_look", "n_max"]
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
    looks: np.ndarray | None = None
    stop_look: np.ndarray | None = None
    n_max: np.ndarray | None = None

    @property
    def sequential(self) -> bool:
        """Whether the rows come from sequential certification (``SEQUENTIAL_COLUMNS`` present)."""
        return self.looks is not None

    def to_frame(self) -> pd.DataFrame:
        """One row per input, with the columns :func:`frame_columns`; no label (-1): label columns missing."""
        frame = pd.DataFrame({name: getattr(self, name) for name in frame_columns(self.sequential)})
        frame = frame.astype({"label": "Int64", "correct": "boolean", "in_selection": "boolean"})
        frame.loc[frame["label"] < 0, ["label", "correct", "in_selection"]] = pd.NA
        return frame


def frame_columns(sequential: bool) -> list[str]:
    """The columns of ``Certificate.to_frame()``, in order, for fixed-n or sequential certification."""
    return COLUMNS + SOURCE_COLUMNS + SELECTION_COLUMNS + (SEQUENTIAL_COLUMNS if sequential else [])


def radii_frame(prob_lb: np.ndarray, noise: Noise) -> dict[str, np.ndarray]:
    """Radius and source norm for every norm from lower bounds ``prob_lb`` (0 where ``rho <= 1/2``)."""
    out = {}
    for norm in NORMS:
        radius, source = noise.certify_with_source(prob_lb, norm)
        label = norm_label(norm)
        out[f"radius_{label}"] = radius
        out[f"source_{label}"] = np.where(radius > 0, [norm_label(s) for s in source], "none")
    return out


# --------------------------------------------------------------------------- sequential certification

#: ``draw(active, num)``: class counts ``(len(active), C)`` of ``num`` more draws for the inputs ``active``.
Draw = Callable[[np.ndarray, int], np.ndarray]
#: ``settled(active, count_top, n)``: True where the inputs ``active`` (counts at ``n`` draws) may stop.
Settled = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def look_sizes(n: int, looks: int) -> list[int]:
    """Cumulative estimation draws at looks ``k = 1..looks``: ``ceil(n / 2**(looks - k))``.

    Doubling sizes that end at ``n``: an input whose answer is settled after ``m`` draws stops by about
    ``2 m``, and the number of looks only costs the per-look level ``alpha / looks``. The sizes depend on
    ``n`` and ``looks`` alone, fixed before any draw, as the union bound of ``Smooth.certify`` requires.
    """
    if isinstance(looks, bool) or not isinstance(looks, int) or looks < 1:
        raise ValueError(f"looks must be an integer >= 1; got {looks!r}")
    if n < 2 ** (looks - 1):
        raise ValueError(f"{looks} doubling looks need n >= 2**(looks - 1) = {2 ** (looks - 1)}; got n={n}")
    return [-(-n // 2 ** (looks - k)) for k in range(1, looks + 1)]


def parse_radii(radii_of_interest: Mapping[Any, Any]) -> dict[float, np.ndarray]:
    """``{norm: sorted radii}`` of ``{norm: [r1, ...]}`` (norms 1, 2, inf or 'l1', 'l2', 'linf'; finite radii >= 0)."""
    if not isinstance(radii_of_interest, Mapping) or not radii_of_interest:
        raise ValueError(f"radii_of_interest must be a non-empty mapping {{norm: [radius, ...]}}; "
                         f"got {radii_of_interest!r}")
    out: dict[float, np.ndarray] = {}
    for name, radii in radii_of_interest.items():
        norm = parse_norm(name)
        if norm in out:
            raise ValueError(f"radii_of_interest names the {norm_label(norm)} norm twice")
        try:
            values = np.asarray(radii, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"radii of interest for {name!r} must be a list of numbers; got {radii!r}") from exc
        if values.ndim != 1 or not np.all(np.isfinite(values) & (values >= 0)):
            raise ValueError(f"radii of interest for {name!r} must be a list of finite radii >= 0; got {radii!r}")
        out[norm] = np.sort(values)
    return out


def certified_levels(prob: np.ndarray, noise: Noise, radii: Mapping[float, np.ndarray]) -> np.ndarray:
    """``(B, norms)``: 0 where ``prob <= 1/2`` (abstain), else 1 + the number of radii of interest that
    the radius certified at ``prob`` reaches (``radius >= r``, as in certified accuracy)."""
    prob = np.asarray(prob, dtype=np.float64)
    columns = []
    for norm, values in radii.items():
        radius = np.asarray(noise.certify(prob, norm))
        reached = (radius[:, None] >= values[None, :]).sum(1)
        columns.append(np.where(prob > 0.5, 1 + reached, 0))
    return np.stack(columns, axis=1) if columns else np.zeros((len(prob), 0), dtype=np.int64)


def stopping_rule(noise: Noise, radii: Mapping[float, np.ndarray], alpha: float, done: np.ndarray) -> Settled:
    """Stop where the radii of interest certified at the Clopper-Pearson lower bound equal those at the
    upper bound (both at level ``alpha``): no probability up to the upper bound certifies more, and an
    upper bound <= 1/2 (certain abstention) is the case where both certify none. Inputs marked ``done``
    (the selection misses the label: they count at no radius) stop at once."""
    def settled(active: np.ndarray, count_top: np.ndarray, n: int) -> np.ndarray:
        lower = clopper_pearson_lower(count_top, n, alpha)
        upper = clopper_pearson_upper(count_top, n, alpha)
        same = certified_levels(lower, noise, radii) == certified_levels(upper, noise, radii)
        return same.all(1) | done[active]
    return settled


def sequential_counts(draw: Draw, chosen: np.ndarray, sizes: Sequence[int],
                      settled: Settled) -> tuple[np.ndarray, np.ndarray]:
    """Class counts ``(B, C)`` of every input at its stopping look, and that look (1-based).

    At look ``k`` each input still active gets ``sizes[k] - sizes[k - 1]`` more draws (its counts
    accumulate); it stops at the last look or where ``settled(active, count_top, sizes[k])``, with
    ``count_top`` the counts of its ``chosen`` classes (boolean mask ``(B, C)``). Stopped inputs drop out.
    """
    counts = np.zeros(chosen.shape, dtype=np.int64)
    stop_look = np.zeros(len(chosen), dtype=np.int64)
    active = np.arange(len(chosen))
    for look, (previous, size) in enumerate(zip([0, *sizes], sizes, strict=False), start=1):
        counts[active] += draw(active, size - previous)
        stop = (np.ones(len(active), dtype=bool) if look == len(sizes)
                else np.asarray(settled(active, (counts[active] * chosen[active]).sum(1), size), dtype=bool))
        stop_look[active[stop]] = look
        active = active[~stop]
        if not len(active):
            break
    return counts, stop_look


# --------------------------------------------------------------------------- the Monte-Carlo loop

#: ``perturb(rows, clean, image)`` fills ``rows`` (a view of the reused buffer) with noisy copies of
#: the flattened input ``clean`` of position ``image`` in the batch.
Perturb = Callable[[torch.Tensor, torch.Tensor, int], None]


def noisy_batches(x: torch.Tensor, num: int, batch_size: int,
                  perturb: Perturb) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(owners, noisy)`` over the ``B * num`` (input, draw) rows of ``x`` in chunks of ``batch_size``.

    A chunk may span inputs, so the model always sees full batches; ``owners`` gives each row's input.
    The rows live in one reused buffer (memory does not grow with ``num``): use a chunk before the next.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"the number of draws and batch_size must be >= 1; got {num} and {batch_size}")
    batch, device = x.shape[0], x.device
    flat, total = x.reshape(batch, -1), batch * num
    buffer = torch.empty(min(batch_size, total), flat.shape[1], device=device, dtype=flat.dtype)
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        owners = torch.arange(start, stop, device=device) // num
        for image in range(start // num, (stop - 1) // num + 1):
            lo, hi = max(start, image * num) - start, min(stop, (image + 1) * num) - start
            perturb(buffer[lo:hi], flat[image], image)
        yield owners, buffer[: stop - start].view(stop - start, *x.shape[1:])


def perturb_with(noise: Noise, generators: Sequence[torch.Generator | None]) -> Perturb:
    """Fill rows of input ``i`` from ``generators[i]`` (one generator per input, or the same one repeated)."""
    def perturb(rows: torch.Tensor, clean: torch.Tensor, image: int) -> None:
        noise.perturb_(rows, clean, generators[image])
    return perturb


@torch.inference_mode()
def vote_counts(logits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, num: int, batch_size: int,
                perturb: Perturb) -> torch.Tensor:
    """Class counts ``(B, K)`` of ``argmax logits_of(x_i + delta)`` over ``num`` draws per input."""
    counts: torch.Tensor | None = None
    for owners, noisy in noisy_batches(x, num, batch_size, perturb):
        logits = logits_of(noisy)
        predictions = logits.argmax(1)
        if counts is None:
            counts = torch.zeros(x.shape[0], logits.shape[1], dtype=torch.long, device=x.device)
        counts.index_put_((owners, predictions), torch.ones_like(predictions), accumulate=True)
    assert counts is not None  # num >= 1
    return counts


def soft_average(model: nn.Module, x: torch.Tensor, noise: Noise, num: int, *,
                 batch_size: int | str = autotune.AUTO, generator: torch.Generator | None = None,
                 output: Literal["softmax", "logits"] = "softmax") -> torch.Tensor:
    """Monte-Carlo estimate of ``E[softmax(model(x + delta))]`` (or of the logits), shape ``(B, K)``: the
    smoothed soft classifier, the Gaussian average that a heat-smoothed model approximates (Gaussian ``noise``).

    ``num`` draws per input from ``generator``, evaluated in eval mode without gradients in chunks of
    ``batch_size`` rows (``"auto"``: see ``rslib.core.autotune``), averaged in float64 and returned in the
    model's output dtype.
    """
    if output not in ("softmax", "logits"):
        raise ValueError(f"output must be 'softmax' or 'logits'; got {output!r}")
    total: torch.Tensor | None = None
    with torch.no_grad(), eval_mode(model), autotune.tuned(model, x, batch_size=batch_size) as choice:
        perturb = perturb_with(noise, [generator] * len(x))
        for owners, noisy in noisy_batches(x, num, choice.batch_size, perturb):
            out = model(autotune.in_format(noisy, choice.channels_last))
            out = torch.softmax(out, dim=-1) if output == "softmax" else out
            if total is None:
                dtype = out.dtype
                total = out.new_zeros((x.shape[0], out.shape[-1]), dtype=torch.float64)
            total.index_add_(0, owners, out.to(torch.float64))
    assert total is not None
    return (total / num).to(dtype)


def mean_softmax_log(logits: torch.Tensor, draws: int) -> torch.Tensor:
    """``log`` of the mean softmax over ``draws`` consecutive rows per input: ``(B * draws, K) -> (B, K)``."""
    log_probs = F.log_softmax(logits, dim=-1).view(-1, draws, logits.shape[-1])
    return torch.logsumexp(log_probs, dim=1) - math.log(draws)


class SmoothedSoftClassifier(nn.Module):
    """``log( mean_j softmax(model(x + delta_j)) )`` over ``m`` noise draws (see :func:`smoothed`)."""

    def __init__(self, model: nn.Module, noise: Noise, m: int, fresh: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m (number of noise draws) must be an integer >= 1; got {m!r}")
        self.model, self.noise, self.m, self.fresh, self.generator = model, noise, m, fresh, generator
        self._fixed: dict[tuple, torch.Tensor] = {}

    def resample(self) -> None:
        """Forget the fixed draws (``fresh=False``): the next call samples new ones."""
        self._fixed.clear()

    def draws(self, x: torch.Tensor) -> torch.Tensor:
        """Noise of shape (B, m, *shape) (fresh) or (1, m, *shape) (fixed, shared by all inputs)."""
        shape = tuple(x.shape[1:])
        if math.prod(shape) != self.noise.dim:
            raise ValueError(f"noise dim {self.noise.dim} does not match the input shape {shape}")
        kw = {"device": x.device, "dtype": x.dtype, "generator": self.generator}
        if self.fresh:
            return self.noise.sample_noise(x.shape[0] * self.m, **kw).view(x.shape[0], self.m, *shape)
        key = (shape, x.device, x.dtype)
        if key not in self._fixed:
            self._fixed[key] = self.noise.sample_noise(self.m, **kw).view(1, self.m, *shape)
        return self._fixed[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = (x.unsqueeze(1) + self.draws(x)).reshape(x.shape[0] * self.m, *x.shape[1:])
        return mean_softmax_log(self.model(noisy), self.m)

    def extra_repr(self) -> str:
        return f"noise={self.noise!r}, m={self.m}, fresh={self.fresh}"


def smoothed(model: nn.Module, noise: Noise, m: int, fresh: bool = True,
             generator: torch.Generator | None = None) -> SmoothedSoftClassifier:
    """The smoothed soft classifier of ``model`` under ``noise``, for attacks (expectation over noise).

    ``forward(x)`` returns the LOG of the mean softmax of ``model(x + delta_j)`` over ``m`` draws
    ``delta_j`` (computed stably with ``logsumexp``); it is a valid log-probability vector, so the
    cross-entropy of an attack is the negative log of the smoothed soft probability of the label, and
    gradients flow to ``x`` through the average. Every forward evaluates ``B * m`` rows at once.

    ``fresh=True``: new draws at every call (every attack step sees new noise; each input its own).
    ``fresh=False``: the ``m`` draws are sampled ONCE per input shape (and device/dtype) on the first
    call and then reused by every later call and shared by all inputs of every batch, so the attack
    sees a deterministic function (``resample()`` draws new ones). Draws come from ``generator``
    (on the inputs' device) when given.

    The argmax of this output is a noisy estimate of the smoothed prediction: judge attacks on it
    with the smoothed hard classifier (``Smooth.predict`` or a majority vote of :func:`vote_counts`).
    """
    return SmoothedSoftClassifier(model, noise, m, fresh=fresh, generator=generator)


# --------------------------------------------------------------------------- Smooth

class Smooth:
    """Monte-Carlo smoothed classifier around ``model`` with ``noise`` (any rslib noise)."""

    def __init__(self, model: nn.Module, noise: Noise, num_classes: int, *, seed: int = 0,
                 autocast: torch.dtype | None = None, channels_last: bool | None = None) -> None:
        """``channels_last``: the model's memory format; ``batch_size`` of ``predict`` and ``certify``: noisy
        rows per forward. ``None`` / ``"auto"`` (the defaults): measured by ``rslib.core.autotune`` (cached on
        disk); :attr:`choice` holds the last choice used (``choice.metadata()`` describes it)."""
        self.model, self.noise, self.num_classes, self.seed = model.eval(), noise, num_classes, seed
        self.autocast, self.channels_last = autocast, channels_last
        self.choice: autotune.Choice | None = None

    @contextmanager
    def _tuned(self, x: torch.Tensor, batch_size: int | str) -> Iterator[int]:
        """The rows per forward for inputs like ``x``, with the model in the chosen memory format."""
        with autotune.tuned(self.model, x, batch_size=batch_size, channels_last=self.channels_last,
                            autocast=self.autocast) as choice:
            self.choice = choice
            yield choice.batch_size

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        batch = autotune.in_format(batch, self.choice is not None and self.choice.channels_last)
        with torch.autocast(batch.device.type, dtype=self.autocast) if self.autocast is not None else nullcontext():
            return self.model(batch)

    def _check_classes(self, counts: torch.Tensor) -> torch.Tensor:
        if counts.shape[1] != self.num_classes:
            raise ValueError(f"the model outputs {counts.shape[1]} classes but Smooth was built with "
                             f"num_classes={self.num_classes}")
        return counts

    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int | str, indices: Sequence[int],
                      stage: int = _ESTIMATION) -> torch.Tensor:
        """Class counts (B, num_classes) of ``f(x_i + delta)`` over ``num`` draws per input, the draws of
        input ``i`` from its own stream ``(seed, indices[i], stage)``."""
        generators = [_generator(self.seed, int(i), stage, x.device) for i in indices]
        with self._tuned(x, batch_size) as rows:
            counts = vote_counts(self._logits, x, num, rows, perturb_with(self.noise, generators))
        return self._check_classes(counts)

    def _estimation_draw(self, x: torch.Tensor, batch_size: int, indices: Sequence[int]) -> Draw:
        """``draw(active, num)`` for :func:`sequential_counts`: each input's estimation stream continues
        across looks (its generator is kept), so its draws at look k are the first ``sizes[k]`` of the stream."""
        generators = [_generator(self.seed, i, _ESTIMATION, x.device) for i in indices]

        def draw(active: np.ndarray, num: int) -> np.ndarray:
            rows = x[torch.as_tensor(active, device=x.device)]
            perturb = perturb_with(self.noise, [generators[i] for i in active])
            return self._check_classes(vote_counts(self._logits, rows, num, batch_size, perturb)).cpu().numpy()
        return draw

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int | str = autotune.AUTO,
                indices: Sequence[int] | None = None) -> torch.Tensor:
        """Smoothed prediction per input, ``ABSTAIN`` unless the top class wins a binomial test at ``alpha``."""
        indices = range(len(x)) if indices is None else indices
        counts = self.sample_counts(x, n, batch_size, indices, _PREDICTION).cpu()
        top2 = counts.topk(2, dim=1)
        abstain = should_abstain(top2.values[:, 0].numpy(), top2.values[:, 1].numpy(), alpha)
        return torch.where(torch.as_tensor(np.asarray(abstain)), ABSTAIN, top2.indices[:, 0]).to(x.device)

    def certify(self, x: torch.Tensor, y: torch.Tensor | None = None, n0: int = 100, n: int = 100_000,
                alpha: float = 0.001, batch_size: int | str = autotune.AUTO, topk: int = 1,
                indices: Sequence[int] | None = None, *,
                radii_of_interest: Mapping[Any, Sequence[float]] | None = None, looks: int = 1) -> Certificate:
        """Certify every input of the batch ``x``; ``y`` (optional) marks rows correct or not.

        With ``topk > 1`` the certified event is "the label is in the top-k set selected from the
        ``n0`` draws": ``count_top`` is the estimation count of that set and ``prediction`` its top class.

        Sequential certification, with ``radii_of_interest={norm: [r1, ...]}`` (:func:`parse_radii`): the
        estimation draws come in ``looks = K`` looks of cumulative sizes ``n_1 < ... < n_K = n``
        (:func:`look_sizes`). At each look, the Clopper-Pearson lower and upper bounds ``L_k <= U_k`` at
        level ``alpha / K`` of the selected class's probability ``p`` are computed; an input stops at the
        first look where the radii of interest certified at ``L_k`` equal those at ``U_k`` (this includes
        ``U_k <= 1/2``: certain to abstain) or where its selection misses its label (it counts at no
        radius), and at look K otherwise. Its row reports ``prob_lb = L_k`` at the stopping look, ``n`` =
        the draws used, ``alpha`` = ``alpha / K``, and ``SEQUENTIAL_COLUMNS``; with K = 1 it is the fixed-n
        certificate at ``alpha``. The batch's estimation time is shared out in ``seconds_certify`` in
        proportion to the draws used.

        Soundness (whatever the stopping rule): given the selection (independent n0 draws), ``p`` is
        fixed and the estimation draws of an input form one i.i.d. stream, of which look k sees the
        first ``n_k`` (sizes fixed in advance). Imagine the stream continued to ``n`` draws even after
        the input stops: then the count at look k is ``Binomial(n_k, p)`` and the one-sided
        Clopper-Pearson bound gives ``P(L_k > p) <= alpha / K`` for each k. By the union bound,
        ``P(L_k > p for some k) <= alpha``. Outside that event ``L_k <= p`` at every look, in
        particular at the stopping look, however it was chosen (using ``U_k``, the label, or
        anything else), so the reported radius is certified with probability at least ``1 - alpha``.
        The upper bounds steer the stopping only and spend no level.
        """
        if not 1 <= topk < self.num_classes:
            raise ValueError(f"topk must be in [1, num_classes - 1] = [1, {self.num_classes - 1}]; got {topk}")
        if n0 < 1 or n < 1:
            raise ValueError(f"n0 and n must be >= 1; got n0={n0}, n={n}")
        sequential = radii_of_interest is not None
        if not sequential and looks != 1:
            raise ValueError(f"looks={looks!r} > 1 needs radii_of_interest (the radii whose certification "
                             "decides when an input may stop)")
        radii = parse_radii(radii_of_interest) if sequential else {}
        sizes = look_sizes(n, looks)
        alpha_look = alpha / looks
        indices = list(range(len(x))) if indices is None else [int(i) for i in indices]
        tic = time.perf_counter()
        selection = self.sample_counts(x, n0, batch_size, indices, _SELECTION).cpu()
        seconds_predict = time.perf_counter() - tic
        chosen = selection.topk(topk, dim=1).indices
        mask = torch.zeros_like(selection, dtype=torch.bool).scatter_(1, chosen, True).numpy()
        batch = len(x)
        labels = y.detach().cpu().numpy().astype(np.int64) if y is not None else np.full(batch, -1)
        in_selection = (chosen == torch.as_tensor(labels)[:, None]).any(1).numpy()
        tic = time.perf_counter()
        rule = stopping_rule(self.noise, radii, alpha_look, (labels >= 0) & ~in_selection)
        with self._tuned(x, batch_size) as rows:
            counts, stop_look = sequential_counts(self._estimation_draw(x, rows, indices), mask, sizes, rule)
        seconds_certify = time.perf_counter() - tic
        used = np.asarray(sizes)[stop_look - 1]
        count_top = (counts * mask).sum(1)
        count_second = np.where(mask, -1, counts).max(1).clip(min=0)
        prob_lb = clopper_pearson_lower(count_top, used, alpha_look)
        certified = prob_lb > 0.5
        full = np.full
        extra = {"looks": full(batch, looks), "stop_look": stop_look, "n_max": full(batch, n)} if sequential else {}
        return Certificate(
            idx=np.asarray(indices), label=labels, prediction=np.where(certified, chosen[:, 0].numpy(), ABSTAIN),
            correct=certified & in_selection, count_top=count_top, count_second=count_second,
            n0=full(batch, n0), n=used, alpha=full(batch, alpha_look), prob_lb=prob_lb,
            seconds_predict=full(batch, seconds_predict / batch),
            seconds_certify=seconds_certify * used / used.sum(), selected=chosen[:, 0].numpy(),
            in_selection=in_selection, **radii_frame(prob_lb, self.noise), **extra)


def recertify(table: pd.DataFrame, noise: Noise, alpha: float | None = None) -> pd.DataFrame:
    """Recompute ``prob_lb`` and every radius from saved counts (optionally at another overall ``alpha``).

    Sequential rows (with a ``looks`` column) keep the per-look level in ``alpha``: another overall
    ``alpha`` becomes ``alpha / looks`` there (the union bound holds for any stopping look).
    """
    table = table.copy()
    if alpha is not None:
        table["alpha"] = alpha / table["looks"] if "looks" in table else alpha
    prob_lb = clopper_pearson_lower(table["count_top"].to_numpy(), table["n"].to_numpy(), table["alpha"].to_numpy())
    table = table.assign(prob_lb=prob_lb, **radii_frame(np.atleast_1d(prob_lb), noise))
    certified = table["prob_lb"] > 0.5
    table["prediction"] = table["selected"].where(certified, ABSTAIN)
    table["correct"] = table["in_selection"].astype("boolean") & certified
    return table
