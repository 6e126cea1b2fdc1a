"""Tests for rslib.core.stats: Clopper-Pearson bounds and the abstention test (CPU, deterministic, fast)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from rslib.core.stats import (
    binomial_abstain_pvalue,
    clopper_pearson_lower,
    clopper_pearson_upper,
    should_abstain,
)

ALPHAS = [1e-6, 1e-3, 0.01, 0.05, 0.25, 0.49]
NS = [1, 2, 7, 100, 1000, 100_000]


def _counts(n: int) -> list[int]:
    """Edge and interior counts for n trials: 0, 1, n // 2, n - 1, n (deduplicated)."""
    return sorted({0, min(1, n), n // 2, max(n - 1, 0), n})


GRID = [(k, n, a) for n in NS for k in _counts(n) for a in ALPHAS]


# ----------------------------------------------------------------------------------------------
# Clopper-Pearson: agreement with statsmodels and closed forms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n", "alpha"), GRID)
def test_lower_equals_statsmodels_two_sided_at_twice_alpha(k, n, alpha):
    expected = proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]
    got = clopper_pearson_lower(k, n, alpha)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


def test_bounds_equal_statsmodels_vectorized():
    k, n, alpha = (np.array(v) for v in zip(*GRID, strict=True))
    lo_sm, up_sm = proportion_confint(k, n, alpha=2 * alpha, method="beta")
    lo, up = clopper_pearson_lower(k, n, alpha), clopper_pearson_upper(k, n, alpha)
    assert lo.dtype == np.float64 and lo.shape == k.shape
    np.testing.assert_allclose(lo, lo_sm, rtol=1e-12, atol=0)
    np.testing.assert_allclose(up, up_sm, rtol=1e-12, atol=0)


def test_closed_forms():
    for n, alpha in itertools.product(NS, ALPHAS):
        # P(Binom(n, p) >= n) = p**n = alpha  =>  bound = alpha**(1/n)
        np.testing.assert_allclose(clopper_pearson_lower(n, n, alpha), alpha ** (1 / n), rtol=1e-12)
        assert clopper_pearson_lower(0, n, alpha) == 0.0
        assert clopper_pearson_upper(n, n, alpha) == 1.0
        # P(Binom(n, p) <= 0) = (1 - p)**n = alpha  =>  upper bound = 1 - alpha**(1/n)
        np.testing.assert_allclose(
            clopper_pearson_upper(0, n, alpha), 1 - alpha ** (1 / n), rtol=1e-9
        )


def test_upper_is_mirror_of_lower():
    n = 1000
    k = np.arange(n + 1)
    np.testing.assert_allclose(
        clopper_pearson_upper(k, n, 0.01),
        1 - clopper_pearson_lower(n - k, n, 0.01),
        rtol=1e-12,
        atol=1e-15,
    )


def test_two_sided_at_alpha_is_strictly_more_conservative():
    # The rs4a slip: proportion_confint(nA, n, alpha=alpha)[0] == one-sided bound at alpha / 2.
    for n, alpha in itertools.product([2, 10, 100, 1000, 100_000], [1e-3, 0.05]):
        k = np.unique(np.linspace(1, n - 1, 50).round().astype(int))  # interior counts
        ours = clopper_pearson_lower(k, n, alpha)
        slip = proportion_confint(k, n, alpha=alpha, method="beta")[0]
        np.testing.assert_allclose(slip, clopper_pearson_lower(k, n, alpha / 2), rtol=1e-12)
        assert np.all(slip < ours)
        assert np.all((0 < ours) & (ours < k / n))  # and ours still lies below the point estimate


def test_monotone_in_count_and_alpha():
    k = np.arange(101)
    lo = clopper_pearson_lower(k, 100, 0.05)
    assert np.all(np.diff(lo) > 0)
    assert np.all(clopper_pearson_lower(k[1:], 100, 0.01) < lo[1:])  # smaller alpha, lower bound
    assert np.all(clopper_pearson_upper(k, 100, 0.05) > lo)


# ----------------------------------------------------------------------------------------------
# Coverage
# ----------------------------------------------------------------------------------------------

COVERAGE_CASES = list(itertools.product([0.5, 0.9, 0.99, 0.999], [10, 100, 1000], [0.001, 0.05]))


def _exact_noncoverage(bounds_of_k: np.ndarray, p: float, n: int, upper: bool = False) -> float:
    """P_{K ~ Binom(n, p)}(bound(K) misses p), summed exactly over all n + 1 outcomes."""
    pmf = stats.binom.pmf(np.arange(n + 1), n, p)
    miss = bounds_of_k < p if upper else bounds_of_k > p
    return float(pmf[miss].sum())


@pytest.mark.parametrize(("p", "n", "alpha"), COVERAGE_CASES)
def test_exact_coverage(p, n, alpha):
    k = np.arange(n + 1)
    pmf = stats.binom.pmf(k, n, p)
    lower = clopper_pearson_lower(k, n, alpha)
    upper = clopper_pearson_upper(k, n, alpha)
    # Exact coverage, no randomness: sum over every outcome k of pmf(k) * [bound(k) <= p].
    assert float(pmf[lower <= p].sum()) >= 1 - alpha
    assert float(pmf[upper >= p].sum()) >= 1 - alpha


def test_exact_coverage_detects_an_anticonservative_bound():
    # Power check for the oracle above: the classic off-by-one beta.ppf(alpha, k + 1, n - k)
    # is too high, and the exact coverage computation catches it.
    n, p, alpha = 100, 0.5, 0.05
    k = np.arange(n + 1)
    wrong = stats.beta.ppf(alpha, k + 1, n - k)
    assert _exact_noncoverage(wrong, p, n) > alpha
    assert _exact_noncoverage(np.asarray(clopper_pearson_lower(k, n, alpha)), p, n) <= alpha


DRAWS = 200_000


def _simulation_margin(alpha: float) -> float:
    return 4 * np.sqrt(alpha * (1 - alpha) / DRAWS)


def test_simulated_coverage():
    # Cannot flake: the generator is seeded (default_rng(0)) and the draws are consumed in a fixed
    # order, so the counts -- hence the empirical non-coverage -- are identical on every run and
    # every platform numpy supports; the test is a deterministic function of the code under test.
    # Honest margin: for a valid bound the true non-coverage q is <= alpha, and the empirical rate
    # over DRAWS independent draws has standard deviation sqrt(q (1 - q) / DRAWS)
    # <= sqrt(alpha (1 - alpha) / DRAWS) (q <= alpha <= 1/2). Allowing 4 standard deviations means a
    # correct implementation would fail for fewer than ~1 in 30,000 seeds (normal tail), while the
    # margin stays small compared with alpha (0.002 at alpha = 0.05), so a real excess is caught
    # (see test_simulation_detects_an_anticonservative_bound).
    rng = np.random.default_rng(0)
    for p, n, alpha in COVERAGE_CASES:
        counts = rng.binomial(n, p, size=DRAWS)
        lower_of_k = clopper_pearson_lower(np.arange(n + 1), n, alpha)
        upper_of_k = clopper_pearson_upper(np.arange(n + 1), n, alpha)
        miss_low = np.mean(lower_of_k[counts] > p)
        miss_up = np.mean(upper_of_k[counts] < p)
        limit = alpha + _simulation_margin(alpha)
        assert miss_low < limit, (p, n, alpha, miss_low)
        assert miss_up < limit, (p, n, alpha, miss_up)
        # Vectorized call on the raw draws gives the same bounds as the lookup table.
        np.testing.assert_array_equal(
            clopper_pearson_lower(counts[:1000], n, alpha), lower_of_k[counts[:1000]]
        )


def test_simulation_detects_an_anticonservative_bound():
    n, p, alpha = 100, 0.5, 0.05  # exact non-coverage of the off-by-one bound is ~0.067
    counts = np.random.default_rng(0).binomial(n, p, size=DRAWS)
    wrong = stats.beta.ppf(alpha, counts + 1, n - counts)
    assert np.mean(wrong > p) > alpha + _simulation_margin(alpha)


# ----------------------------------------------------------------------------------------------
# Vectorization and input types
# ----------------------------------------------------------------------------------------------


def test_broadcasting_and_return_types():
    assert isinstance(clopper_pearson_lower(3, 10, 0.05), float)
    assert isinstance(clopper_pearson_upper(np.int64(3), np.int32(10), np.float32(0.05)), float)
    out = clopper_pearson_lower([[0], [5], [10]], [10, 20], 0.05)
    assert out.shape == (3, 2) and out.dtype == np.float64
    assert out[1, 1] == clopper_pearson_lower(5, 20, 0.05)
    per_alpha = clopper_pearson_lower(50, 100, np.array([0.001, 0.01, 0.1]))
    assert per_alpha.shape == (3,) and np.all(np.diff(per_alpha) > 0)
    assert clopper_pearson_lower(np.zeros((0,), dtype=int), 5, 0.05).shape == (0,)
    # integer-valued floats are accepted as counts
    assert clopper_pearson_lower(np.array([3.0]), 10.0, 0.05)[0] == clopper_pearson_lower(
        3, 10, 0.05
    )
    with pytest.raises(ValueError, match="count"):
        clopper_pearson_lower([1, 2, 3], [10, 10], 0.05)


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    k = torch.tensor([0, 5, 10])
    got = clopper_pearson_lower(k, torch.tensor(10), 0.05)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_array_equal(got, clopper_pearson_lower([0, 5, 10], 10, 0.05))
    assert isinstance(clopper_pearson_lower(torch.tensor(5), 10, 0.05), float)
    np.testing.assert_array_equal(
        binomial_abstain_pvalue(torch.tensor([9, 5]), torch.tensor([1, 5])),
        binomial_abstain_pvalue([9, 5], [1, 5]),
    )


# ----------------------------------------------------------------------------------------------
# Abstention test
# ----------------------------------------------------------------------------------------------

PVALUE_GRID = [
    (0, 0),
    (1, 0),
    (0, 1),
    (7, 0),
    (0, 7),
    (3, 3),
    (5, 4),
    (4, 5),
    (60, 40),
    (500, 500),
    (501, 500),
    (990, 10),
    (5000, 4800),
    (50_500, 49_500),
    (100_000, 99_000),
    (100_000, 0),
    (1_000_000, 998_000),
]


@pytest.mark.parametrize(("a", "b"), PVALUE_GRID)
def test_pvalue_equals_scipy_binomtest(a, b):
    got = binomial_abstain_pvalue(a, b)
    assert isinstance(got, float)
    expected = 1.0 if a + b == 0 else stats.binomtest(a, a + b, 0.5).pvalue
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=0)


def test_pvalue_properties_and_shapes():
    a, b = (np.array(v) for v in zip(*PVALUE_GRID, strict=True))
    p = binomial_abstain_pvalue(a, b)
    assert p.shape == a.shape and p.dtype == np.float64
    assert np.all((p >= 0) & (p <= 1))  # 2 * 0.5**100_000 underflows to 0
    np.testing.assert_array_equal(p, binomial_abstain_pvalue(b, a))  # symmetric
    assert binomial_abstain_pvalue(10, 10) == 1.0
    assert binomial_abstain_pvalue(0, 0) == 1.0
    assert binomial_abstain_pvalue(10, 0) == 2 * 0.5**10
    grid = binomial_abstain_pvalue(np.arange(4)[:, None], np.arange(5)[None, :])
    assert grid.shape == (4, 5)
    assert binomial_abstain_pvalue([[1, 2]], [[3], [4], [5]]).shape == (3, 2)


def test_should_abstain():
    # clear decisions
    assert should_abstain(1000, 0, 0.001) is False
    assert should_abstain(500, 500, 0.001) is True
    assert should_abstain(0, 0, 0.05) is True
    assert should_abstain(6, 4, 0.05) is True
    out = should_abstain(np.array([1000, 500, 10, 60]), np.array([0, 500, 0, 40]), 0.05)
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, [False, True, False, True])
    # boundary: abstain iff p-value > alpha (p-value of (10, 0) is exactly 2 ** -9)
    assert should_abstain(10, 0, 2.0**-9) is False
    assert should_abstain(10, 0, 2.0**-9 * 0.999) is True
    assert should_abstain([[5], [50]], [0, 1, 2], 0.05).shape == (2, 3)


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------

BOUNDS = [clopper_pearson_lower, clopper_pearson_upper]


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize(
    ("count", "n", "alpha", "name"),
    [
        (11, 10, 0.05, "count"),
        ([1, 11], 10, 0.05, "count"),
        (-1, 10, 0.05, "count"),
        (2.5, 10, 0.05, "count"),
        (np.nan, 10, 0.05, "count"),
        (True, 10, 0.05, "count"),
        ("3", 10, 0.05, "count"),
        (0, 0, 0.05, "n"),
        (0, -3, 0.05, "n"),
        (1, 10.5, 0.05, "n"),
        (3, 10, 0.0, "alpha"),
        (3, 10, 1.0, "alpha"),
        (3, 10, -0.1, "alpha"),
        (3, 10, np.nan, "alpha"),
        (3, 10, [0.05, 1.5], "alpha"),
    ],
)
def test_bad_inputs_raise(bound, count, n, alpha, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b") as info:
        bound(count, n, alpha)
    message = str(info.value)
    expected_range = {"count": "[0, n]", "n": "1", "alpha": "(0, 1)"}[name]
    assert expected_range in message


@pytest.mark.parametrize(
    ("a", "b", "name"),
    [
        (-1, 3, "count_top"),
        (3, -1, "count_second"),
        (2.5, 3, "count_top"),
        (3, [1, 0.5], "count_second"),
    ],
)
def test_bad_pvalue_inputs_raise(a, b, name):
    with pytest.raises(ValueError, match=name):
        binomial_abstain_pvalue(a, b)
    with pytest.raises(ValueError, match=name):
        should_abstain(a, b, 0.05)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -1.0, 2.0])
def test_should_abstain_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        should_abstain(10, 0, alpha)
