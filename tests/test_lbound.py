"""HeatSmoothing test statistics: margins, L-bound and margin-gradient norms against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rslib.core.certify import smoothed
from rslib.core.lbound import COLUMNS, deterministic_certify
from rslib.core.lbound import test_statistics as statistics
from rslib.core.noises import make_noise

PROBS = torch.tensor([
    [0.50, 0.30, 0.10, 0.06, 0.04],
    [0.10, 0.20, 0.60, 0.06, 0.04],
    [0.25, 0.24, 0.23, 0.22, 0.06],
    [0.05, 0.05, 0.11, 0.09, 0.70],
], dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_margins_and_lbound_on_known_softmax():
    model = nn.Identity()  # inputs are the logits: log-probabilities give softmax == PROBS
    x = PROBS.log()
    y = torch.tensor([0, 1, 3, 2])
    sigma = 0.25
    frame = statistics(model, x, y, sigma, topk=2)
    assert list(frame.columns) == COLUMNS
    np.testing.assert_allclose(frame["prob_top1"], [0.5, 0.6, 0.25, 0.7])
    np.testing.assert_allclose(frame["margin_top1"], [0.2, 0.4, 0.01, 0.59], atol=1e-12)
    np.testing.assert_allclose(frame["margin_topk"], [0.2, 0.1, 0.01, 0.02], atol=1e-12)  # p_(2) - p_(3)
    np.testing.assert_allclose(frame["label_margin"], [0.2, -0.4, -0.03, -0.59], atol=1e-12)
    assert frame["prediction"].tolist() == [0, 2, 0, 4]
    assert frame["rank"].tolist() == [0, 1, 3, 1]
    assert frame["correct_top1"].tolist() == [True, False, False, False]
    assert frame["correct_topk"].tolist() == [True, True, False, True]
    scale = sigma * math.sqrt(math.pi / 2)
    np.testing.assert_allclose(frame["lbound"], scale * frame["margin_top1"])
    np.testing.assert_allclose(frame["lbound_topk"], scale * frame["margin_topk"])
    np.testing.assert_allclose(frame["logit_margin"], np.log([0.5 / 0.3, 0.6 / 0.2, 0.25 / 0.24, 0.7 / 0.11]))
    assert (frame["sigma"] == sigma).all() and (frame["topk"] == 2).all() and (frame["draws"] == 0).all()
    # top-5 correctness with topk=4 of 5 classes
    frame4 = statistics(model, x, y, sigma, topk=4)
    np.testing.assert_allclose(frame4["margin_topk"], [0.02, 0.02, 0.16, 0.0], atol=1e-12)
    assert frame4["correct_topk"].all()


def test_lbound_agrees_with_deterministic_certify():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x = torch.randn(12, 6, dtype=torch.float64)
    frame = statistics(model, x, None, 0.5, topk=1)
    det = deterministic_certify(model, x, 0.5)
    np.testing.assert_allclose(frame["lbound"], det.radius, rtol=1e-12)
    np.testing.assert_allclose(frame["margin_top1"], det.margin, rtol=1e-12)
    assert frame["label"].isna().all() and frame["correct_top1"].isna().all()
    assert (frame["prediction"].to_numpy() == det.prediction).all()


def test_gradient_norms_on_a_linear_model():
    torch.manual_seed(1)
    linear = nn.Linear(8, 5).double()
    model = nn.Sequential(nn.Flatten(), linear)
    x = torch.randn(10, 2, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (10,))
    frame = statistics(model, x, y, 0.1, topk=2)
    W = linear.weight.detach()
    logits = model(x).detach()
    p = logits.softmax(1)
    top = p.topk(2, dim=1).indices
    c, r = top[:, 0], top[:, 1]
    # logit margin z_c - z_r: gradient w_c - w_r; l2 norm and its dual for linf (l1)
    diff = W[c] - W[r]
    np.testing.assert_allclose(frame["logit_grad_l2"], diff.norm(dim=1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(frame["logit_grad_l1"], diff.abs().sum(1).numpy(), rtol=1e-10)
    # softmax margin p_c - p_r: d p_i / d z = p_i (e_i - p), chained through W
    eye = torch.eye(5, dtype=torch.float64)
    rows = torch.arange(10)
    dz = p[rows, c, None] * (eye[c] - p) - p[rows, r, None] * (eye[r] - p)
    grad = dz @ W
    np.testing.assert_allclose(frame["grad_l2"], grad.norm(dim=1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(frame["grad_l1"], grad.abs().sum(1).numpy(), rtol=1e-10)
    # ... and against autograd's full Jacobian
    jac = torch.autograd.functional.jacobian(lambda v: model(v).softmax(1), x).reshape(10, 5, 10, 8)
    auto = torch.stack([jac[i, c[i], i] - jac[i, r[i], i] for i in range(10)])
    np.testing.assert_allclose(frame["grad_l2"], auto.norm(dim=1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(frame["first_order_l2"], frame["margin_top1"] / frame["grad_l2"])
    np.testing.assert_allclose(frame["first_order_linf"], frame["margin_top1"] / frame["grad_l1"])
    assert linear.weight.grad is None  # parameters untouched


def test_smoothed_statistics_use_the_averaged_softmax():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10), nn.BatchNorm1d(10))
    model.train()
    x = torch.rand(6, 1, 4, 4)
    y = torch.arange(6)
    noise = make_noise("Gaussian", 16, sigma=0.25)
    frame = statistics(model, x, y, 0.25, topk=3, smoothed_noise=noise, draws=50,
                            generator=torch.Generator().manual_seed(7))
    assert model.training  # mode restored
    model.eval()
    probs = smoothed(model, noise, 50, generator=torch.Generator().manual_seed(7))(x).exp().detach()
    top = probs.topk(4, dim=1).values
    np.testing.assert_allclose(frame["margin_top1"], (top[:, 0] - top[:, 1]).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(frame["margin_topk"], (top[:, 2] - top[:, 3]).numpy(), rtol=1e-5, atol=1e-7)
    assert (frame["draws"] == 50).all()
    assert (frame["grad_l2"] > 0).all()
    # chunking over inputs gives the same statistics as one batch (fixed draws make it exact)
    fixed_frames = [
        statistics(model, x, y, 0.25, topk=3, smoothed_noise=noise, draws=50,
                        generator=torch.Generator().manual_seed(7), batch_size=bs)
        for bs in (6, 2)
    ]
    np.testing.assert_allclose(fixed_frames[0]["prob_top1"], frame["prob_top1"], rtol=1e-6)
    assert len(fixed_frames[1]) == 6


def test_bad_arguments():
    model = nn.Identity()
    x = PROBS.log()
    with pytest.raises(ValueError, match="smoothed_noise"):
        statistics(model, x, None, 0.25, topk=1, draws=5)
    with pytest.raises(ValueError, match="topk"):
        statistics(model, x, None, 0.25, topk=5)
    with pytest.raises(ValueError, match="sigma"):
        statistics(model, x, None, -1.0, topk=1)
    with pytest.raises(ValueError, match="one label per input"):
        statistics(model, x, [0, 1], 0.25, topk=1)
