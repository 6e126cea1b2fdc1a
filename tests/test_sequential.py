"""Sequential certification: K looks at level alpha / K, inputs stop once their radii of interest are settled.

Coverage is checked by simulation on classifiers whose smoothed probabilities are known exactly:
binomial draws fed through the same stopping code (``sequential_counts`` + ``stopping_rule``), and
``Smooth.certify`` end to end on a one-dimensional linear classifier, whose class-1 probability under
N(0, sigma^2) noise is Phi(x / sigma).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import Linear2
from scipy import stats
from torch import nn

from rslib.core.certify import (
    COLUMNS,
    SELECTION_COLUMNS,
    SEQUENTIAL_COLUMNS,
    SOURCE_COLUMNS,
    Smooth,
    certified_levels,
    look_sizes,
    parse_radii,
    recertify,
    sequential_counts,
    stopping_rule,
)
from rslib.core.metrics import certified_accuracy
from rslib.core.noises import make_noise
from rslib.core.stats import clopper_pearson_lower, clopper_pearson_upper

RADII = {"l2": [0.0, 0.25, 0.5, 0.75, 1.0]}
TIMING = ["seconds_predict", "seconds_certify"]


class Identity3(nn.Module):
    """Three logits equal to the three input coordinates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@pytest.fixture(scope="module")
def linear_case():
    torch.manual_seed(0)
    d = 16
    w = torch.randn(d, dtype=torch.float64)
    x = torch.randn(60, d, dtype=torch.float64) * 0.4
    margin = x @ w + 0.05
    return Linear2(w, 0.05), x, (margin > 0).long(), make_noise("Gaussian", d, sigma=0.5)


def _sequential(linear_case, looks: int = 4, n: int = 2000, alpha: float = 0.01, **kw) -> pd.DataFrame:
    model, x, y, noise = linear_case
    smooth = Smooth(model, noise, 2, seed=2)
    return smooth.certify(x, y, n0=64, n=n, alpha=alpha, radii_of_interest=RADII, looks=looks, **kw).to_frame()


# --------------------------------------------------------------------------- schedule and arguments


def test_look_sizes_double_up_to_n():
    assert look_sizes(10_000, 6) == [313, 625, 1250, 2500, 5000, 10_000]
    assert look_sizes(1, 1) == [1]
    assert look_sizes(8, 4) == [1, 2, 4, 8]
    sizes = look_sizes(12_345, 9)
    assert sizes[-1] == 12_345 and all(b > a for a, b in zip(sizes, sizes[1:], strict=False))


@pytest.mark.parametrize("looks", [0, -1, 1.5, True, "2"])
def test_bad_looks(looks):
    with pytest.raises(ValueError, match="looks must be an integer >= 1"):
        look_sizes(1000, looks)


def test_bad_arguments(linear_case):
    model, x, y, noise = linear_case
    smooth = Smooth(model, noise, 2)
    with pytest.raises(ValueError, match="n >= 2"):
        look_sizes(7, 4)
    with pytest.raises(ValueError, match="needs radii_of_interest"):
        smooth.certify(x, y, n0=10, n=100, looks=3)
    with pytest.raises(ValueError, match="adv must be one of"):
        smooth.certify(x, y, n0=10, n=100, radii_of_interest={"l3": [0.1]}, looks=2)
    with pytest.raises(ValueError, match="looks must be"):
        smooth.certify(x, y, n0=10, n=100, radii_of_interest=RADII, looks=0)
    for bad in ({}, [0.1], {"l2": [-0.1]}, {"l2": [math.inf]}, {"l2": 0.5}, {"l2": ["a"]}, {"l2": [0.1], 2: [0.2]}):
        with pytest.raises(ValueError, match="radii_of_interest|radii of interest"):
            parse_radii(bad)


def test_certified_levels_count_reached_radii_per_norm():
    noise = make_noise("Gaussian", 4, sigma=1.0)
    radii = parse_radii({"l2": [0.5, 0.0], "linf": [0.1, 0.3]})
    prob = stats.norm.cdf([-0.1, 0.22, 0.51, 3.0])
    # l2 radius = Phi^-1(p); linf radius = l2 / sqrt(4) = l2 / 2. Level 0 = abstain.
    np.testing.assert_array_equal(certified_levels(prob, noise, radii), [[0, 0], [2, 2], [3, 2], [3, 3]])


# --------------------------------------------------------------------------- soundness


def _simulate(p: np.ndarray, alpha_look: float, looks: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Binomial draws for a class of known probability ``p`` through the stopping code; (prob_lb, draws used)."""
    rng = np.random.default_rng(seed)
    noise = make_noise("Gaussian", 1, sigma=1.0)
    sizes = look_sizes(n, looks)

    def draw(active: np.ndarray, num: int) -> np.ndarray:
        top = rng.binomial(num, p[active])
        return np.stack([top, num - top], axis=1)

    chosen = np.zeros((len(p), 2), dtype=bool)
    chosen[:, 0] = True
    rule = stopping_rule(noise, parse_radii({"l2": [0.0, 0.5, 1.0, 1.5, 2.0]}), alpha_look, np.zeros(len(p), bool))
    counts, stop_look = sequential_counts(draw, chosen, sizes, rule)
    used = np.asarray(sizes)[stop_look - 1]
    return clopper_pearson_lower(counts[:, 0], used, alpha_look), used


def test_coverage_by_binomial_simulation():
    """P(prob_lb > p) <= alpha. Half the inputs sit exactly on a radius of interest (p = Phi(r)),
    where stopping is hardest; alpha = 0.1 makes failures frequent enough to measure.

    N = 40,000 inputs: a procedure failing at rate alpha would exceed alpha + 0.006 (4 standard
    deviations, sqrt(0.09 / N) = 0.0015) with probability < 1e-4; the seed is fixed, so the test is
    deterministic. The same simulation without the alpha / K split fails the bound (the test has power).
    """
    rng = np.random.default_rng(0)
    n_inputs, alpha, looks = 40_000, 0.1, 5
    p = np.concatenate([rng.uniform(0.3, 0.999, n_inputs // 2),
                        stats.norm.cdf(rng.choice([0.5, 1.0, 1.5, 2.0], n_inputs // 2))])
    tolerance = 4 * math.sqrt(alpha * (1 - alpha) / n_inputs)
    prob_lb, used = _simulate(p, alpha / looks, looks, 1600, seed=1)
    assert 0 < np.mean(prob_lb > p) <= alpha + tolerance
    assert used.mean() < 0.8 * 1600
    fixed, _ = _simulate(p, alpha, 1, 1600, seed=2)
    assert np.mean(fixed > p) <= alpha + tolerance
    naive, _ = _simulate(p, alpha, looks, 1600, seed=3)  # every look at alpha: optional stopping inflates
    assert np.mean(naive > p) > alpha + tolerance


def test_coverage_end_to_end_on_a_linear_classifier():
    """``Smooth.certify`` on f(x) = [x > 0] in one dimension, sigma = 1: the selected class has
    probability Phi(x) or Phi(-x). With N = 3,000 inputs at alpha = 0.2, four standard deviations are
    4 * sqrt(0.16 / N) = 0.029; the seed is fixed (deterministic)."""
    n_inputs, alpha = 3000, 0.2
    x = torch.linspace(-2.5, 2.5, n_inputs, dtype=torch.float64)[:, None]
    smooth = Smooth(Linear2(torch.ones(1, dtype=torch.float64), 0.0), make_noise("Gaussian", 1, sigma=1.0), 2, seed=5)
    cert = smooth.certify(x, (x[:, 0] > 0).long(), n0=32, n=800, alpha=alpha, batch_size=50_000,
                          radii_of_interest={"l2": [0.0, 0.5, 1.0, 1.5]}, looks=4)
    p_one = stats.norm.cdf(x[:, 0].numpy())
    p_selected = np.where(cert.selected == 1, p_one, 1 - p_one)
    failed = cert.prob_lb > p_selected
    assert 0 < failed.mean() <= alpha + 4 * math.sqrt(alpha * (1 - alpha) / n_inputs)
    true_radius = np.where(p_selected > 0.5, np.abs(x[:, 0].numpy()), 0.0)
    assert np.all((cert.radius_l2 <= true_radius + 1e-9) | failed)
    assert cert.n.mean() < 0.5 * 800


# --------------------------------------------------------------------------- the reported certificate


def test_one_look_equals_fixed_n(linear_case):
    model, x, y, noise = linear_case
    smooth = Smooth(model, noise, 2, seed=2)
    fixed = smooth.certify(x, y, n0=64, n=700, alpha=0.01).to_frame()
    one = smooth.certify(x, y, n0=64, n=700, alpha=0.01, radii_of_interest=RADII, looks=1).to_frame()
    assert list(fixed.columns) == COLUMNS + SOURCE_COLUMNS + SELECTION_COLUMNS
    assert list(one.columns) == list(fixed.columns) + SEQUENTIAL_COLUMNS
    pd.testing.assert_frame_equal(one[fixed.columns].drop(columns=TIMING), fixed.drop(columns=TIMING))
    assert (one["looks"] == 1).all() and (one["stop_look"] == 1).all() and (one["n_max"] == 700).all()


def test_reported_bound_is_the_lower_bound_at_the_stopping_look(linear_case):
    frame = _sequential(linear_case, looks=4, n=2000, alpha=0.01)
    sizes = np.asarray(look_sizes(2000, 4))
    assert (frame["alpha"] == 0.01 / 4).all() and (frame["looks"] == 4).all() and (frame["n_max"] == 2000).all()
    np.testing.assert_array_equal(frame["n"], sizes[frame["stop_look"] - 1])
    assert frame["stop_look"].nunique() > 1
    # Exactly the fixed-n bound at alpha / K on the counts at the stopping look: never more.
    np.testing.assert_array_equal(frame["prob_lb"], clopper_pearson_lower(frame["count_top"], frame["n"], 0.01 / 4))


def test_early_stops_obey_the_rule(linear_case):
    frame = _sequential(linear_case, looks=4, n=2000, alpha=0.01)
    noise, radii = linear_case[3], parse_radii(RADII)
    early = frame[(frame["stop_look"] < 4) & frame["in_selection"]]
    assert len(early)
    lower = clopper_pearson_lower(early["count_top"], early["n"], early["alpha"])
    upper = clopper_pearson_upper(early["count_top"], early["n"], early["alpha"])
    np.testing.assert_array_equal(certified_levels(lower, noise, radii), certified_levels(upper, noise, radii))
    wrong = frame[frame["in_selection"] == False]  # noqa: E712 (nullable boolean)
    assert (wrong["stop_look"] == 1).all()


def test_recertify_reproduces_sequential_rows(linear_case, tmp_path):
    frame = _sequential(linear_case, looks=4, n=2000, alpha=0.01)
    noise = linear_case[3]
    pd.testing.assert_frame_equal(recertify(frame, noise), frame, check_dtype=False)
    pd.testing.assert_frame_equal(recertify(frame, noise, alpha=0.01), frame, check_dtype=False)
    frame.to_csv(tmp_path / "certify.csv", index=False)
    saved = pd.read_csv(tmp_path / "certify.csv", dtype={"label": "Int64", "correct": "boolean",
                                                         "in_selection": "boolean"})
    again = recertify(saved, noise)
    for column in ("prob_lb", "radius_l1", "radius_l2", "radius_linf"):
        np.testing.assert_array_equal(again[column], frame[column])
    looser = recertify(frame, noise, alpha=0.1)
    assert (looser["alpha"] == 0.1 / 4).all()


def test_inputs_that_run_every_look_see_the_fixed_n_stream(linear_case):
    """Each input's stream continues across looks: after the last look its counts are those of
    fixed-n certification with n draws (the Gaussian sampler fills rows identically however split)."""
    frame = _sequential(linear_case, looks=4, n=2000, alpha=0.01)
    model, x, y, noise = linear_case
    fixed = Smooth(model, noise, 2, seed=2).certify(x, y, n0=64, n=2000, alpha=0.01 / 4).to_frame()
    last = frame["stop_look"] == 4
    assert last.any()
    columns = ["count_top", "count_second", "prob_lb", "radius_l2", "prediction"]
    pd.testing.assert_frame_equal(frame.loc[last, columns], fixed.loc[last, columns])


def test_sequential_rows_do_not_depend_on_batching(linear_case):
    model, x, y, noise = linear_case
    smooth = Smooth(model, noise, 2, seed=2)
    kw = {"n0": 64, "n": 1000, "alpha": 0.01, "radii_of_interest": RADII, "looks": 3}
    whole = smooth.certify(x, y, batch_size=4096, **kw).to_frame()
    parts = [smooth.certify(x[i:i + 13], y[i:i + 13], batch_size=57, indices=range(i, min(i + 13, len(x))), **kw)
             for i in range(0, len(x), 13)]
    pieces = pd.concat([p.to_frame() for p in parts], ignore_index=True)
    pd.testing.assert_frame_equal(whole.drop(columns=TIMING), pieces.drop(columns=TIMING))


# --------------------------------------------------------------------------- savings


def test_easy_inputs_stop_early_with_the_same_certified_accuracy():
    """Three classes, logits = the input, sigma = 1: (8, 0, 0) is certified beyond every radius of
    interest, (0, 0, 0) abstains (p = 1/3), (2, 0, 0) labelled 1 is wrong."""
    x = torch.tensor([[8.0, 0, 0]] * 10 + [[0.0, 0, 0]] * 10 + [[2.0, 0, 0]] * 10)
    y = torch.tensor([0] * 20 + [1] * 10)
    smooth = Smooth(Identity3(), make_noise("Gaussian", 3, sigma=1.0), 3, seed=0)
    radii = [0.0, 0.25, 0.5, 1.0, 1.5]
    fixed = smooth.certify(x, y, n0=100, n=10_000, alpha=0.001).to_frame()
    sequential = smooth.certify(x, y, n0=100, n=10_000, alpha=0.001, radii_of_interest={"l2": radii},
                                looks=6).to_frame()
    assert sequential["n"].mean() < 0.1 * 10_000
    np.testing.assert_array_equal(certified_accuracy(sequential, radii), certified_accuracy(fixed, radii))
    assert (sequential["prediction"][10:20] == -1).all()
