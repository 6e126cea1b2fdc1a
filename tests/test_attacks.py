"""Attacks: exact minimal distances on linear classifiers, budgets, re-checks, projections, smoothing.

A two-class linear classifier with logits (0, w.x + b) and no box has minimal adversarial distance
|w.x + b| / ||w||_q in the lp norm, with q the dual exponent (l2: ||w||_2, linf: ||w||_1,
l1: ||w||_inf). Attacks must find these within 2% and never report less.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import Linear2
from scipy.optimize import minimize
from torch import nn

from rslib.core.attacks import (
    ABSTAIN,
    FRAME_COLUMNS,
    AttackResult,
    ddn,
    majority_vote_judge,
    pgd,
    pgd_minimal,
    project_l1_ball,
    project_lp_ball,
    smooth_predict_judge,
    smoothed,
)
from rslib.core.certify import Smooth
from rslib.core.noises import make_noise
from rslib.nn.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _norm(delta: torch.Tensor, p: float) -> torch.Tensor:
    return delta.flatten(1).double().norm(p=p, dim=1)


@pytest.fixture(scope="module")
def linear_case():
    gen = torch.Generator().manual_seed(0)
    d = 20
    w = torch.randn(d, generator=gen)
    x = torch.randn(64, d, generator=gen) * 0.3
    b = 0.1
    score = x @ w + b
    # DDN's norm schedule starts at init_norm = 1 and moves by (1 +- gamma) per step, so keep
    # inputs whose l2 distance it can reach in 100 steps (all of them are >= 0.05 here).
    keep = (score.abs() / w.norm() > 0.05) & (score.abs() / w.norm() < 2.0)
    x, score = x[keep][:24], score[keep][:24]
    y = (score > 0).long()
    return Linear2(w, b), x, y, {
        2.0: (score.abs() / w.norm()).double(),
        math.inf: (score.abs() / w.abs().sum()).double(),
        1.0: (score.abs() / w.abs().max()).double(),
    }


# ------------------------------------------------------------------------------------------------
# Minimal distances on linear classifiers
# ------------------------------------------------------------------------------------------------


def test_ddn_finds_minimal_l2_distance_of_linear_classifier(linear_case):
    model, x, y, exact = linear_case
    result = ddn(model, x, y, steps=100, clip=None)
    assert bool(result.success.all())
    ratio = result.l2 / exact[2.0]
    assert float(ratio.min()) >= 1 - 1e-5  # no perturbation below the true minimal distance
    assert float(ratio.max()) <= 1.02


@pytest.mark.parametrize("norm", [2.0, math.inf, 1.0])
def test_pgd_minimal_finds_minimal_distance_of_linear_classifier(linear_case, norm):
    model, x, y, exact = linear_case
    kwargs = {"l1_sparsity": 1 / x.shape[1]} if norm == 1.0 else {}
    result = pgd_minimal(model, x, y, norm, eps_max=float(3 * exact[norm].max()), search_steps=12,
                         steps=20, clip=None, **kwargs)
    assert bool(result.success.all())
    ratio = result.distance(norm) / exact[norm]
    assert float(ratio.min()) >= 1 - 1e-5
    assert float(ratio.max()) <= 1.02


def test_pgd_minimal_is_not_a_staircase_of_budgets(linear_case):
    model, x, y, exact = linear_case
    result = pgd_minimal(model, x, y, 2, eps_max=2.5, search_steps=10, steps=20, clip=None)
    # distinct inputs get distinct distances, not a handful of budget levels
    assert len(np.unique(np.round(result.l2.numpy(), 6))) == len(x)


def test_targeted_and_topk_success(linear_case):
    model, x, y, exact = linear_case
    # targeted at the other class == untargeted for two classes
    result = pgd_minimal(model, x, 1 - y, 2, eps_max=2.5, search_steps=10, steps=20, clip=None, targeted=True)
    assert bool(result.success.all())
    assert float((result.l2 / exact[2.0]).max()) <= 1.02
    # top-2 of two classes always contains the label: the attack can never succeed
    result = pgd(model, x, y, 2, eps=10.0, clip=None, topk=2)
    assert not bool(result.success.any())
    assert bool(torch.isinf(result.l2).all())


# ------------------------------------------------------------------------------------------------
# Budgets, re-checks, failures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_case():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(32, 1, 8, 8, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.mark.parametrize("norm,eps", [(2.0, 0.9), (math.inf, 0.17), (1.0, 3.0)])
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_respects_budget_and_recheck(mlp_case, norm, eps, random_start):
    model, x, y = mlp_case
    gen = torch.Generator().manual_seed(3)
    result = pgd(model, x, y, norm, eps, steps=30, random_start=random_start, generator=gen)
    delta = result.x_adv - x
    assert float(_norm(delta, norm).max()) <= eps + 1e-6  # every row, failed ones included
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    assert bool((pred[result.success] != y[result.success]).all())
    assert bool(torch.isinf(result.l2[~result.success]).all())
    assert bool(torch.isfinite(result.l2[result.success]).all())
    assert 0 < int(result.success.sum()) < len(x)  # the budgets are chosen to give a mix


def test_pgd_per_input_eps_and_minimal_budget_on_mlp(mlp_case):
    model, x, y = mlp_case
    eps = torch.linspace(0.05, 1.0, len(x))
    result = pgd(model, x, y, 2, eps, steps=30)
    assert bool((_norm(result.x_adv - x, 2) <= eps.double() + 1e-6).all())
    minimal = pgd_minimal(model, x, y, math.inf, 0.3, search_steps=6, steps=20)
    assert bool((minimal.linf[minimal.success] <= 0.3 + 1e-6).all())
    with torch.no_grad():
        pred = model(minimal.x_adv).argmax(1)
    assert bool((pred[minimal.success] != y[minimal.success]).all())


def test_ddn_recheck_and_max_norm(mlp_case):
    model, x, y = mlp_case
    result = ddn(model, x, y, steps=50, max_norm=0.5)
    assert float(_norm(result.x_adv - x, 2).max()) <= 0.5 + 1e-6
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    assert bool((pred[result.success] != y[result.success]).all())
    assert bool(torch.isinf(result.l2[~result.success]).all())
    quantized = ddn(model, x, y, steps=50, quantize=True)
    assert bool(quantized.success.all())
    levels = quantized.x_adv * 255  # every best iterate was quantized to 256 levels
    assert float((levels - levels.round()).abs().max()) < 1e-3


def test_judge_has_the_final_word(mlp_case):
    model, x, y = mlp_case
    baseline = pgd(model, x, y, 2, 2.0, steps=20)
    assert bool(baseline.success.any())

    def abstains(x_adv: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x_adv),), ABSTAIN)

    def same_label(x_adv: torch.Tensor) -> torch.Tensor:  # the label of the nearest clean input
        return y[torch.cdist(x_adv.flatten(1), x.flatten(1)).argmin(1)]

    # a judge that always answers the clean label rejects every candidate: all failures, inf distances
    for attack in (lambda j: pgd(model, x, y, 2, 2.0, steps=20, judge=j),
                   lambda j: ddn(model, x, y, steps=30, judge=j)):
        rejected = attack(same_label)
        assert not bool(rejected.success.any())
        assert bool(torch.isinf(torch.stack([rejected.l0, rejected.l1, rejected.l2, rejected.linf])).all())
    # abstain is not a wrong label unless asked
    assert not bool(pgd(model, x, y, 2, 2.0, steps=20, judge=abstains).success.any())
    counted = pgd(model, x, y, 2, 2.0, steps=20, judge=abstains, abstain_is_success=True)
    assert bool(counted.success.any())


def test_rescue_scale_recovers_borderline_candidates(linear_case):
    model, x, y, exact = linear_case
    band = 0.02  # the judge abstains within l2 distance `band` of the linear boundary

    def banded_judge(x_adv: torch.Tensor) -> torch.Tensor:
        dist = (x_adv.flatten(1) @ model.w + model.b) / model.w.norm()
        out = (dist > 0).long()
        out[dist.abs() < band] = ABSTAIN
        return out

    needed = exact[2.0] + band  # the smallest distance this judge accepts
    no_rescue = ddn(model, x, y, steps=100, clip=None, judge=banded_judge, rescue_scales=())
    rescued = ddn(model, x, y, steps=100, clip=None, judge=banded_judge)
    assert int(rescued.success.sum()) > int(no_rescue.success.sum())
    assert bool(rescued.success.all())
    assert float((rescued.l2 / needed).min()) >= 1 - 1e-5
    assert float((rescued.l2 / needed).max()) <= 1.4  # next rescue scale at most 4/3 too far
    # judging at every step needs no rescue: PGD keeps going until the strict judge agrees
    strict = pgd_minimal(model, x, y, 2, eps_max=2.5, search_steps=12, steps=40, clip=None,
                         judge=banded_judge, judge_every_step=True, rescue_scales=())
    assert bool(strict.success.all())
    ratio = strict.l2 / needed
    assert float(ratio.min()) >= 1 - 1e-5 and float(ratio.max()) <= 1.02


def test_to_frame(mlp_case):
    model, x, y = mlp_case
    result = pgd(model, x, y, math.inf, 0.03, steps=10)
    frame = result.to_frame(indices=np.arange(100, 100 + len(x)), attack_name="pgd_linf")
    assert list(frame.columns) == FRAME_COLUMNS
    assert frame["idx"].tolist() == list(range(100, 100 + len(x)))
    assert (frame["label"].to_numpy() == y.numpy()).all()
    assert (frame["attack"] == "pgd_linf").all()
    assert np.isinf(frame.loc[~frame["success"], ["l0", "l1", "l2", "linf"]].to_numpy()).all()
    bare = AttackResult(result.x_adv, result.success, result.l0, result.l1, result.l2, result.linf)
    assert bare.to_frame()["label"].isna().all()
    assert isinstance(frame, pd.DataFrame)


def test_already_misclassified_is_success_at_zero(mlp_case):
    model, x, y = mlp_case
    wrong = (y + 1) % 10
    for result in (pgd(model, x, wrong, 2, 0.5), ddn(model, x, wrong, steps=5),
                   pgd_minimal(model, x, wrong, 2, 0.5, search_steps=2, steps=5)):
        assert bool(result.success.all())
        assert float(result.l2.max()) == 0.0


def test_bad_arguments(mlp_case):
    model, x, y = mlp_case
    with pytest.raises(ValueError, match="clip box"):
        pgd(model, x * 3 - 1, y, 2, 0.5)
    with pytest.raises(ValueError, match="adv must be one of"):
        pgd(model, x, y, 3, 0.5)
    with pytest.raises(ValueError, match="eps"):
        pgd(model, x, y, 2, -1.0)
    with pytest.raises(ValueError, match="gamma"):
        ddn(model, x, y, gamma=1.5)


# ------------------------------------------------------------------------------------------------
# Projections and random starts
# ------------------------------------------------------------------------------------------------


def _qp_projection(v: np.ndarray, r: float) -> np.ndarray:
    """Reference: min ||v - (a - b)||^2 s.t. sum(a + b) <= r, a, b >= 0 (a smooth QP), by SLSQP."""
    d = len(v)

    def objective(z):
        diff = v - (z[:d] - z[d:])
        return float(diff @ diff)

    def gradient(z):
        diff = v - (z[:d] - z[d:])
        return np.concatenate([-2 * diff, 2 * diff])

    start = np.zeros(2 * d)
    cons = [{"type": "ineq", "fun": lambda z: r - z.sum(), "jac": lambda z: -np.ones(2 * d)}]
    res = minimize(objective, start, jac=gradient, bounds=[(0, None)] * (2 * d), constraints=cons,
                   method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    return res.x[:d] - res.x[d:]


def _threshold_projection(v: np.ndarray, r: float) -> np.ndarray:
    """Reference: soft-threshold at the theta solving sum max(|v| - theta, 0) = r (bisection)."""
    if np.abs(v).sum() <= r:
        return v.copy()
    lo, hi = 0.0, np.abs(v).max()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(np.abs(v) - mid, 0).sum() > r else (lo, mid)
    return np.sign(v) * np.maximum(np.abs(v) - (lo + hi) / 2, 0)


def test_l1_projection_is_exact():
    rng = np.random.default_rng(0)
    vs = rng.normal(size=(40, 6)) * rng.uniform(0.1, 3, size=(40, 1))
    vs[3, 2] = vs[3, 4]  # ties
    radii = rng.uniform(0.0, 4.0, size=40)
    radii[:3] = [0.0, 100.0, 1e-4]
    out = project_l1_ball(torch.as_tensor(vs), torch.as_tensor(radii)).numpy()
    for v, r, w in zip(vs, radii, out, strict=True):
        assert np.abs(w).sum() <= r + 1e-12
        np.testing.assert_allclose(w, _threshold_projection(v, r), atol=1e-9)
        qp = _qp_projection(v, r)
        # the QP reference is feasible and never closer to v than our projection
        assert np.linalg.norm(v - w) <= np.linalg.norm(v - qp) + 1e-7
        np.testing.assert_allclose(w, qp, atol=1e-4)
    # float32, images, one radius for all
    img = torch.randn(5, 3, 4, 4)
    proj = project_l1_ball(img, 2.0)
    assert proj.shape == img.shape and proj.dtype == img.dtype
    np.testing.assert_allclose(_norm(proj, 1).numpy(), 2.0, rtol=1e-5)


def test_lp_ball_projection_l2_linf():
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4], [-2.0, 0.5]])
    np.testing.assert_allclose(project_lp_ball(v, 2, 1.0).numpy(), [[0.6, 0.8], [0.3, 0.4], [-2 / 4.25**0.5, 0.5 / 4.25**0.5]],
                               rtol=1e-6)
    np.testing.assert_allclose(project_lp_ball(v, math.inf, 1.0).numpy(), [[1, 1], [0.3, 0.4], [-1, 0.5]])


@pytest.mark.parametrize("norm", [1.0, 2.0, math.inf])
def test_random_start_is_uniform_in_the_ball(norm):
    d, n, eps = 5, 4000, 0.7
    model = Linear2(torch.zeros(d), 1.0)  # class 1 everywhere: never fooled
    x = torch.zeros(n, d)
    y = torch.ones(n, dtype=torch.long)
    gen = torch.Generator().manual_seed(4)
    start = pgd(model, x, y, norm, eps, steps=0, random_start=True, generator=gen, clip=None).x_adv
    sizes = _norm(start, norm) / eps
    assert float(sizes.max()) <= 1 + 1e-6
    if norm == math.inf:
        # coordinates iid uniform on [-eps, eps]: mean |u_i| / eps = 1/2 (se ~ 0.002)
        assert abs(float(start.abs().mean()) / eps - 0.5) < 0.01
    else:
        # uniform in a d-dimensional ball: the norm has P(r <= t) = t^d, mean d / (d + 1)
        # (sd ~ 0.14, so se ~ 0.0022 over 4000 draws; the tolerance is > 6 se)
        assert abs(float(sizes.mean()) - d / (d + 1)) < 0.015
    assert float(start.sum(0).abs().max()) / n < 0.05 * eps  # centred
    without = pgd(model, x[:10], y[:10], norm, eps, steps=0, clip=None).x_adv
    assert float(without.abs().max()) == 0.0


def test_random_start_changes_the_result(mlp_case):
    model, x, y = mlp_case
    plain = pgd(model, x, y, 2, 0.3, steps=5)
    started = pgd(model, x, y, 2, 0.3, steps=5, random_start=True, generator=torch.Generator().manual_seed(0))
    assert float((plain.x_adv - started.x_adv).abs().max()) > 1e-3
    again = pgd(model, x, y, 2, 0.3, steps=5, random_start=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(started.x_adv, again.x_adv)  # seeded


# ------------------------------------------------------------------------------------------------
# Smoothed targets
# ------------------------------------------------------------------------------------------------


def test_smoothed_wrapper_fresh_and_fixed_draws(mlp_case):
    model, x, _ = mlp_case
    noise = make_noise("Gaussian", 64, sigma=0.25)
    pair = torch.cat([x[:1], x[:1]])
    fresh = smoothed(model, noise, 16, fresh=True, generator=torch.Generator().manual_seed(0))
    out1, out2 = fresh(pair), fresh(pair)
    assert not torch.allclose(out1, out2)  # new draws per call
    assert not torch.allclose(out1[0], out1[1])  # and per input
    np.testing.assert_allclose(torch.logsumexp(out1, 1).detach().numpy(), 0.0, atol=1e-5)  # log-probs

    fixed = smoothed(model, noise, 16, fresh=False, generator=torch.Generator().manual_seed(0))
    a, b = fixed(pair), fixed(pair)
    assert torch.equal(a, b)  # same draws on every call ...
    assert torch.allclose(a[0], a[1])  # ... shared by every input
    assert torch.allclose(fixed(x[:3])[0], a[0])  # whatever the batch size
    draws = fixed.draws(x[:1])
    assert draws.shape == (1, 16, 1, 8, 8)
    manual = torch.softmax(model((x[:1].unsqueeze(1) + draws).reshape(16, 1, 8, 8)), 1).mean(0).log()
    torch.testing.assert_close(a[0], manual, rtol=1e-5, atol=1e-6)
    fixed.resample()
    assert not torch.allclose(fixed(pair), a)

    xg = x[:4].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fresh(xg)[:, 3].sum(), xg)
    assert float(grad.abs().sum()) > 0


def test_majority_and_predict_judges():
    w = torch.zeros(16)
    w[0] = 1.0
    model = Linear2(w, -0.5)  # class 1 iff x_0 > 0.5
    noise = make_noise("Gaussian", 16, sigma=0.1)
    x = torch.full((3, 16), 0.5)
    x[0, 0], x[1, 0] = 0.0, 1.0  # far left, far right, on the boundary
    vote = majority_vote_judge(model, noise, 200, torch.Generator().manual_seed(0), batch_size=128)
    assert vote(x)[:2].tolist() == [0, 1]
    predict = smooth_predict_judge(Smooth(model, noise, 2, seed=0), n=2000, alpha=0.001)
    assert predict(x).tolist() == [0, 1, ABSTAIN]


@pytest.fixture(scope="module")
def smoothed_digits_model():
    """An MLP trained with Gaussian noise augmentation (sigma 0.25) on the embedded digits."""
    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    xs, ys = train.tensors
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        order = torch.randperm(len(xs), generator=gen)
        for start in range(0, len(xs), 128):
            batch = order[start:start + 128]
            noisy = xs[batch] + 0.25 * torch.randn(xs[batch].shape, generator=gen)
            loss = nn.functional.cross_entropy(model(noisy), ys[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_attacks_on_smoothed_model_never_beat_the_certificate(smoothed_digits_model):
    """Cross-check: no verified adversarial example lies inside a certified l2 ball.

    Certification (n = 2000, alpha = 0.001) and the judge (Smooth.predict, n = 2000, alpha = 0.001,
    an independent seed) can each be wrong with probability <= alpha per input; at this fixed seed
    neither is, so a violation would mean a bug in the attacks' distances or success checks.
    """
    model = smoothed_digits_model
    test = load_dataset("digits", "test")
    x, y = test.tensors[0][:10], test.tensors[1][:10]
    noise = make_noise("Gaussian", 64, sigma=0.25)
    cert = Smooth(model, noise, 10, seed=0).certify(x, y, n0=100, n=2000, alpha=0.001, batch_size=10_000)
    certified = torch.as_tensor(cert.radius_l2 > 0)
    assert int(certified.sum()) >= 6
    xc = x[certified]
    yc = torch.as_tensor(cert.prediction)[certified]  # attack the smoothed model's own decision
    radius = torch.as_tensor(cert.radius_l2)[certified]
    judge = smooth_predict_judge(Smooth(model, noise, 10, seed=12345), n=2000, alpha=0.001, batch_size=10_000)
    target = smoothed(model, noise, 32, fresh=True, generator=torch.Generator().manual_seed(1))

    results = {
        "ddn": ddn(target, xc, yc, steps=60, init_norm=1.0, judge=judge),
        "pgd_l2": pgd_minimal(target, xc, yc, 2, eps_max=3.0, search_steps=5, steps=15, judge=judge),
    }
    for name, result in results.items():
        ok = result.success
        assert int(ok.sum()) >= len(xc) // 2, f"{name}: too few verified successes to be a check"
        assert bool((result.l2[ok] >= radius[ok]).all()), (name, result.l2[ok], radius[ok])
        # the returned examples really fool the judge
        assert bool((judge(result.x_adv[ok]) != yc[ok]).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attacks_run_on_cuda(linear_case):
    model, x, y, exact = linear_case
    model = Linear2(model.w.cuda(), model.b)
    xc, yc = x.cuda(), y.cuda()
    result = ddn(model, xc, yc, steps=100, clip=None)
    assert result.l2.device.type == "cuda"
    assert float((result.l2.cpu() / exact[2.0]).max()) <= 1.02
    result = pgd_minimal(model, xc, yc, math.inf, 3 * float(exact[math.inf].max()), steps=20, clip=None,
                         random_start=True, generator=torch.Generator(device="cuda").manual_seed(0))
    assert float((result.linf.cpu() / exact[math.inf]).max()) <= 1.02
    noise = make_noise("Gaussian", x.shape[1], sigma=0.25)
    target = smoothed(model, noise, 8, generator=torch.Generator(device="cuda").manual_seed(0))
    assert target(xc).shape == (len(x), 2)
