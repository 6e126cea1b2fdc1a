"""Exact binomial statistics used by certification.

* :func:`clopper_pearson_lower` / :func:`clopper_pearson_upper`: one-sided Clopper-Pearson
  confidence bounds on a binomial proportion (the ``rho`` of a randomized-smoothing certificate is
  the lower bound on the top-class probability).
* :func:`binomial_abstain_pvalue` / :func:`should_abstain`: the two-sided exact binomial test of the
  top two class counts at ``p = 1/2`` that ``Smooth.predict`` uses to decide whether to abstain.

Every function is vectorized: arguments may be Python scalars, lists, numpy arrays or torch tensors
(any device) and are broadcast against each other. Scalar input gives a Python scalar back, anything
else a numpy array.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats as _sps

__all__ = ["binomial_abstain_pvalue", "clopper_pearson_lower", "clopper_pearson_upper", "should_abstain"]


# --------------------------------------------------------------------------- input handling (shared by every function)

def _to_numpy(x: Any, name: str) -> np.ndarray:
    """``x`` as a numpy array; torch tensors on any device are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:  # ragged lists and the like
        raise ValueError(f"{name} must be array-like of numbers, got {x!r}") from exc


def _integer_values(x: Any, name: str, valid: str) -> np.ndarray:
    """Integer-valued input as float64 (exact up to 2**53), else ValueError naming ``name``.

    Integer dtypes are accepted as is; float dtypes only when every value is a finite integer
    (so a float tensor of counts works, but 2.5 does not). Booleans and other dtypes are refused.
    """
    arr = _to_numpy(x, name)
    if arr.dtype.kind in "iu":
        return arr.astype(np.float64)
    if arr.dtype.kind == "f":
        values = arr.astype(np.float64)
        if np.all(np.isfinite(values)) and np.all(values == np.floor(values)):
            return values
        raise ValueError(f"{name} must be integers in {valid}, got non-integer value(s) {x!r}")
    raise ValueError(f"{name} must be integers in {valid}, got dtype {arr.dtype} ({x!r})")


def _level(alpha: Any, name: str = "alpha") -> np.ndarray:
    """Validated significance level(s): real numbers strictly between 0 and 1."""
    arr = _to_numpy(alpha, name)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a number in the open interval (0, 1), got {alpha!r}")
    values = arr.astype(np.float64)
    if not np.all((values > 0.0) & (values < 1.0)):  # also refuses NaN
        raise ValueError(f"{name} must be in the open interval (0, 1), got {alpha!r}")
    return values


def _broadcast(names: tuple[str, ...], *arrays: np.ndarray) -> list[np.ndarray]:
    try:
        return np.broadcast_arrays(*arrays)
    except ValueError as exc:
        shapes = ", ".join(f"{n}{a.shape}" for n, a in zip(names, arrays, strict=True))
        raise ValueError(f"{' and '.join(names)} cannot be broadcast together: {shapes}") from exc


def _binomial_args(count: Any, n: Any, alpha: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and broadcast ``(count, n, alpha)``; returns float64 arrays of one shape."""
    nn = _integer_values(n, "n", "[1, inf)")
    if np.any(nn < 1):
        raise ValueError(f"n must be integers >= 1, got {n!r}")
    k, nn, a = _broadcast(("count", "n", "alpha"), _integer_values(count, "count", "[0, n]"), nn, _level(alpha))
    if np.any((k < 0) | (k > nn)):
        raise ValueError(f"count must be integers in [0, n], got count={count!r} with n={n!r}")
    return k, nn, a


def _result(values: np.ndarray) -> np.ndarray | float:
    """Python float for 0-d (all-scalar) input, float64 ndarray otherwise."""
    values = np.asarray(values, dtype=np.float64)
    return float(values) if values.ndim == 0 else values


# --------------------------------------------------------------------------- Clopper-Pearson bounds

def _clopper_pearson(count: Any, n: Any, alpha: Any, *, upper: bool) -> np.ndarray | float:
    """One-sided Clopper-Pearson bound, the single implementation behind both public bounds. At the edge
    (lower: ``k == 0``, bound 0; upper: ``k == n``, bound 1) the Beta distribution is degenerate, so its shape
    parameter is replaced by a harmless 1 before calling scipy (no warnings, no NaN) and the exact edge value
    is filled in."""
    k, nn, a = _binomial_args(count, n, alpha)
    if upper:
        edge, fill = k == nn, 1.0
        bound = _sps.beta.isf(a, k + 1.0, np.where(edge, 1.0, nn - k))
    else:
        edge, fill = k == 0, 0.0
        bound = _sps.beta.ppf(a, np.where(edge, 1.0, k), nn - k + 1.0)
    return _result(np.where(edge, fill, bound))


def clopper_pearson_lower(count: Any, n: Any, alpha: Any) -> np.ndarray | float:
    """One-sided Clopper-Pearson lower confidence bound on a binomial proportion.

    Returns ``scipy.stats.beta.ppf(alpha, count, n - count + 1)``, and exactly 0 where
    ``count == 0``. Equivalently, it is the smallest ``p`` such that a ``Binomial(n, p)`` variable
    reaches ``count`` or more with probability at least ``alpha``. This is exactly the value of
    ``statsmodels.stats.proportion.proportion_confint(count, n, alpha=2 * alpha, method="beta")[0]``.

    Guarantee: for every true ``p`` and ``K ~ Binomial(n, p)``,
    ``P(p >= clopper_pearson_lower(K, n, alpha)) >= 1 - alpha`` (one-sided coverage). That is the
    statement a randomized-smoothing certificate needs: ``rho = clopper_pearson_lower(nA, n, alpha)``
    lower-bounds the top-class probability, failing with probability at most ``alpha``.

    Why not the two-sided interval at ``alpha``: its lower end is ``beta.ppf(alpha / 2, ...)``, i.e.
    the one-sided bound at ``alpha / 2``. Only the lower side matters for a certificate, so spending
    half of ``alpha`` on an upper bound that is never used makes ``rho`` (and every radius) smaller
    than necessary while the actual failure probability is only ``alpha / 2``. Calling
    ``proportion_confint(nA, n, alpha=alpha)`` is a known slip in rs4a; the two-sided call with
    ``alpha=2 * alpha`` is the correct one.

    Args: ``count`` successes, integers in ``[0, n]`` (integer-valued floats accepted); ``n`` trials,
    integers ``>= 1``; ``alpha`` failure probability in ``(0, 1)``. They broadcast against each other
    (see the module docstring for types and the return type). ValueError names the offending argument
    and its valid range.
    """
    return _clopper_pearson(count, n, alpha, upper=False)


def clopper_pearson_upper(count: Any, n: Any, alpha: Any) -> np.ndarray | float:
    """One-sided Clopper-Pearson upper confidence bound on a binomial proportion.

    Returns ``scipy.stats.beta.isf(alpha, count + 1, n - count)`` (the ``1 - alpha`` quantile of
    ``Beta(count + 1, n - count)``), and exactly 1 where ``count == n``; equal to
    ``proportion_confint(count, n, alpha=2 * alpha, method="beta")[1]`` and to
    ``1 - clopper_pearson_lower(n - count, n, alpha)``.

    Guarantee: ``P(p <= clopper_pearson_upper(K, n, alpha)) >= 1 - alpha`` for ``K ~ Binomial(n, p)``.
    Useful for top-k rules (bounding the probabilities of competing classes) and diagnostics.

    Arguments, broadcasting, return type and errors are as for :func:`clopper_pearson_lower`.
    """
    return _clopper_pearson(count, n, alpha, upper=True)


# --------------------------------------------------------------------------- abstention test

def binomial_abstain_pvalue(count_top: Any, count_second: Any) -> np.ndarray | float:
    """Two-sided exact binomial test p-value of ``count_top`` vs ``count_second`` at ``p = 1/2``.

    This is the test Cohen et al.'s ``Smooth.predict`` uses: given the counts of the two most
    frequent classes ``a = count_top`` and ``b = count_second``, the p-value of observing ``a``
    successes in ``a + b`` trials under ``H0: p = 1/2``. Since ``Binomial(a + b, 1/2)`` is symmetric,
    the two-sided p-value is exactly ``min(1, 2 * binom.cdf(min(a, b), a + b, 1/2))``; it equals
    ``scipy.stats.binomtest(a, a + b, 0.5).pvalue`` (the removed ``scipy.stats.binom_test`` is not
    used). ``a + b == 0`` gives 1. The function is symmetric in its arguments.

    The counts are non-negative integers that broadcast against each other; ValueError names the
    offending argument if a count is negative or not an integer.
    """
    a = _integer_values(count_top, "count_top", "[0, inf)")
    b = _integer_values(count_second, "count_second", "[0, inf)")
    for name, values, given in (("count_top", a, count_top), ("count_second", b, count_second)):
        if np.any(values < 0):
            raise ValueError(f"{name} must be integers in [0, inf), got {given!r}")
    a, b = _broadcast(("count_top", "count_second"), a, b)
    total = a + b
    empty = total == 0
    tail = _sps.binom.cdf(np.minimum(a, b), np.where(empty, 1.0, total), 0.5)
    return _result(np.where(empty, 1.0, np.minimum(1.0, 2.0 * tail)))


def should_abstain(count_top: Any, count_second: Any, alpha: Any) -> np.ndarray | bool:
    """True where ``predict`` must abstain: ``binomial_abstain_pvalue(count_top, count_second) > alpha``.

    Inputs broadcast as in :func:`binomial_abstain_pvalue`; ``alpha`` must be in ``(0, 1)``. Returns a
    Python bool if every argument is a scalar, else a bool ndarray of the broadcast shape.
    """
    a = _level(alpha)
    pvalue, a = _broadcast(("counts", "alpha"), np.asarray(binomial_abstain_pvalue(count_top, count_second)), a)
    out = pvalue > a
    return bool(out) if out.ndim == 0 else out
