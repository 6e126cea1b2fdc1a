"""Soundness of Monte-Carlo certification on classifiers whose smoothed behaviour is known exactly.

A linear classifier f(x) = argmax(0, w.x + b) smoothed by N(0, s^2 I) predicts class 1 with
probability Phi((w.x + b) / (s ||w||)) and its exact l2 robustness radius is |w.x + b| / ||w||.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import Linear2
from scipy import stats
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from rslib.core.certify import (
    ABSTAIN,
    COLUMNS,
    Smooth,
    mean_softmax_log,
    recertify,
    soft_average,
    vote_counts,
)
from rslib.core.lbound import deterministic_certify
from rslib.core.metrics import average_certified_radius, certified_accuracy
from rslib.core.noises import make_noise


@pytest.fixture(scope="module")
def linear_case():
    torch.manual_seed(0)
    d = 16
    w = torch.randn(d, dtype=torch.float64)
    x = torch.randn(40, d, dtype=torch.float64) * 0.3
    b = 0.05
    sigma = 0.5
    margin = (x @ w + b).numpy()
    true_radius = np.abs(margin) / w.norm().item()
    prob = stats.norm.cdf(np.abs(margin) / (sigma * w.norm().item()))
    labels = torch.as_tensor((margin > 0).astype(np.int64))
    return Linear2(w, b), x, labels, sigma, true_radius, prob


def test_certified_radius_never_exceeds_the_true_radius_and_converges(linear_case):
    model, x, y, sigma, true_radius, _ = linear_case
    smooth = Smooth(model, make_noise("Gaussian", 16, sigma=sigma), num_classes=2, seed=1)
    gaps = []
    for n in (1_000, 100_000):
        cert = smooth.certify(x, y, n0=100, n=n, alpha=0.001, batch_size=20_000)
        radius = cert.radius_l2
        # Probability of any violation is <= alpha per input; at this fixed seed none occurs.
        assert np.all(radius <= true_radius + 1e-12)
        certified = radius > 0
        assert np.all(cert.prediction[certified] == y.numpy()[certified])
        gaps.append(np.mean(true_radius - radius))
    assert gaps[1] < gaps[0] / 2
    # At n = 1e5 the bound is within a few hundredths of sigma for confidently classified inputs.
    confident = true_radius > 0.5 * sigma
    assert np.all(true_radius[confident] - radius[confident] < 0.1 * sigma)


def test_prob_lb_is_one_sided_clopper_pearson(linear_case):
    model, x, y, sigma, _, _ = linear_case
    cert = Smooth(model, make_noise("Gaussian", 16, sigma=sigma), 2).certify(x, y, n0=50, n=500, alpha=0.01)
    expected = np.array([proportion_confint(k, 500, alpha=0.02, method="beta")[0] if k > 0 else 0.0
                         for k in cert.count_top])
    np.testing.assert_allclose(cert.prob_lb, expected, rtol=1e-12)


def test_rows_do_not_depend_on_batching_or_order(linear_case):
    model, x, y, sigma, _, _ = linear_case
    smooth = Smooth(model, make_noise("Laplace", 16, sigma=sigma), 2, seed=3)
    whole = smooth.certify(x, y, n0=64, n=300, batch_size=4096).to_frame()
    parts = [smooth.certify(x[i:i + 7], y[i:i + 7], n0=64, n=300, batch_size=33, indices=range(i, min(i + 7, 40)))
             for i in range(0, 40, 7)]
    pieces = pd.concat([p.to_frame() for p in parts], ignore_index=True)
    timing = ["seconds_predict", "seconds_certify"]
    pd.testing.assert_frame_equal(whole.drop(columns=timing), pieces.drop(columns=timing))


def test_predict_abstains_near_the_boundary(linear_case):
    model, x, y, sigma, true_radius, prob = linear_case
    smooth = Smooth(model, make_noise("Gaussian", 16, sigma=sigma), 2)
    labels = smooth.predict(x, n=2000, alpha=0.001).numpy()
    clear = prob > 0.7
    assert np.all(labels[clear] == y.numpy()[clear])
    assert np.all(labels[prob < 0.51] == ABSTAIN)


def test_frame_columns_abstain_and_accuracy_denominator(linear_case):
    model, x, y, sigma, _, prob = linear_case
    smooth = Smooth(model, make_noise("Gaussian", 16, sigma=sigma), 2)
    frame = smooth.certify(x, y, n0=100, n=200, alpha=0.001).to_frame()
    assert list(frame.columns[: len(COLUMNS)]) == COLUMNS
    abstained = frame["prediction"] == ABSTAIN
    assert abstained.any() and (frame.loc[abstained, "radius_l2"] == 0).all()
    assert not frame.loc[abstained, "correct"].any()
    accuracy = certified_accuracy(frame, [0.0], "l2")[0]
    assert accuracy == pytest.approx(frame["correct"].sum() / len(frame))
    assert average_certified_radius(frame) == pytest.approx((frame["radius_l2"] * frame["correct"]).mean())
    unlabeled = smooth.certify(x, None, n0=10, n=20).to_frame()
    assert unlabeled["label"].isna().all() and unlabeled["correct"].isna().all()


def test_recertify_from_counts(linear_case):
    model, x, y, sigma, _, _ = linear_case
    noise = make_noise("Gaussian", 16, sigma=sigma)
    frame = Smooth(model, noise, 2).certify(x, y, n0=100, n=300, alpha=0.001).to_frame()
    again = recertify(frame, noise)
    pd.testing.assert_frame_equal(again, frame, check_dtype=False)
    looser = recertify(frame, noise, alpha=0.1)
    assert (looser["radius_l2"] >= frame["radius_l2"]).all() and (looser["radius_l2"] > frame["radius_l2"]).any()
    other = recertify(frame, make_noise("Gaussian", 16, sigma=2 * sigma))
    np.testing.assert_allclose(other["radius_l2"], 2 * frame["radius_l2"])


def test_topk_certifies_set_membership():
    # Scores (x1, x2, 0) at x = (0.3, -0.5), sigma = 0.3: class 0 wins ~80% of draws, class 2 (the
    # label) ~16%, class 1 ~4%. Top-1 is wrong; "label in the top-2 set {0, 2}" holds w.p. ~96%.
    class Three(nn.Module):
        def forward(self, x):
            return torch.stack([x[:, 0], x[:, 1], torch.zeros_like(x[:, 0])], dim=1)

    x = torch.tensor([[0.3, -0.5]])
    smooth = Smooth(Three(), make_noise("Gaussian", 2, sigma=0.3), 3)
    top1 = smooth.certify(x, torch.tensor([2]), n0=200, n=5000, topk=1)
    top2 = smooth.certify(x, torch.tensor([2]), n0=200, n=5000, topk=2)
    assert not top1.correct[0] and top1.prediction[0] == 0
    assert top2.correct[0] and top2.prediction[0] == 0
    assert 0.93 < top2.count_top[0] / 5000 < 0.99 and top2.radius_l2[0] > top1.radius_l2[0]
    with pytest.raises(ValueError, match="topk"):
        smooth.certify(x, None, topk=3)


def test_deterministic_lbound_formula():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    model = nn.Identity()
    result = deterministic_certify(model, logits, sigma=0.5)
    np.testing.assert_allclose(result.margin, [0.5, 0.05], rtol=1e-6)
    np.testing.assert_allclose(result.radius, 0.5 * math.sqrt(math.pi / 2) * np.array([0.5, 0.05]), rtol=1e-6)
    top2 = deterministic_certify(model, logits, sigma=0.5, topk=2)
    np.testing.assert_allclose(top2.margin, [0.1, 0.1], rtol=1e-5)


def test_memory_does_not_grow_with_n(linear_case):
    model, x, y, sigma, _, _ = linear_case
    seen = []

    class Spy(nn.Module):
        def forward(self, batch):
            seen.append(len(batch))
            return model(batch)

    Smooth(Spy(), make_noise("Gaussian", 16, sigma=sigma), 2).certify(x[:3], None, n0=10, n=5000, batch_size=256)
    assert max(seen) == 256 and sum(seen) == 3 * (10 + 5000)


def test_soft_average_of_a_linear_model_is_its_clean_output():
    # E[W(x + delta) + b] = W x + b. Each coordinate's Monte-Carlo mean has sd sigma ||W_k|| / sqrt(n);
    # 5 sd bounds it (Gaussian tail 6e-7 per coordinate, 15 coordinates; fixed seed, so deterministic).
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    x = torch.rand(5, 6, dtype=torch.float64)
    sigma, n = 0.5, 4000
    noise = make_noise("Gaussian", 6, sigma=sigma)
    average = soft_average(model, x, noise, n, batch_size=777, generator=torch.Generator().manual_seed(1),
                           output="logits")
    sd = sigma * model.weight.detach().norm(dim=1) / math.sqrt(n)
    assert average.shape == (5, 3) and average.dtype == torch.float64
    assert torch.all((average - model(x).detach()).abs() < 5 * sd)
    probs = soft_average(model, x, noise, 50, batch_size=64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, dtype=torch.float64))


def test_vote_counts_pack_rows_across_inputs():
    # A classifier of the sign of the first coordinate, far from the boundary: every draw votes the same
    # way, so the counts are exact whatever the packing of (input, draw) rows into batches.
    def logits(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([-x[:, 0], x[:, 0]], dim=1)

    x = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [5.0, 1.0]])
    noise = make_noise("Uniform", 2, sigma=0.1)
    for batch_size in (1, 7, 100):
        counts = vote_counts(logits, x, 10, batch_size, lambda rows, clean, image: noise.perturb_(rows, clean))
        assert counts.tolist() == [[0, 10], [10, 0], [0, 10]]


def test_mean_softmax_log_is_the_log_of_the_mean_softmax():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = torch.softmax(logits, 1).view(2, 3, 4).mean(1).log()
    torch.testing.assert_close(mean_softmax_log(logits, 3), expected)
