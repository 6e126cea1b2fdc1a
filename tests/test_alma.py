"""ALMA: exact minimal l2 distances on linear classifiers (with and without the box), verified
successes on a trained CNN (never worse than DDN), top-k, targeted, judges, budgets, smoothed targets.

Oracles. A two-class linear classifier with logits (0, w.x + b) has minimal l2 distance
|w.x + b| / ||w|| without a box; inside the box [0, 1]^d the minimizer is clip(x - s lambda w) with
the smallest lambda >= 0 that reaches the boundary (KKT of a convex problem; found by bisection). A
multi-class linear classifier's class region is an intersection of half-spaces, so the minimal
untargeted distance is the smallest distance to the hyperplanes z_y = z_j, and the targeted one a
convex quadratic program (solved with SLSQP).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import Linear2
from scipy.optimize import minimize
from torch import nn

from rslib.core.attacks import ABSTAIN, alma, ddn, majority_vote_judge, smoothed
from rslib.core.noises import make_noise
from rslib.nn.architectures import build_model
from rslib.nn.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def two_class():
    gen = _seeded(0)
    d = 20
    w = torch.randn(d, generator=gen)
    x = torch.randn(64, d, generator=gen) * 0.3
    score = x @ w + 0.1
    keep = (score.abs() / w.norm() > 0.05) & (score.abs() / w.norm() < 2.0)
    x, score = x[keep][:24], score[keep][:24]
    return Linear2(w, 0.1), x, (score > 0).long(), (score.abs() / w.norm()).double()


@pytest.fixture(scope="module")
def ten_class():
    gen = _seeded(1)
    d = 20
    model = nn.Linear(d, 10)
    with torch.no_grad():
        model.weight.copy_(torch.randn(10, d, generator=gen))
        model.bias.copy_(torch.randn(10, generator=gen))
        x = torch.randn(32, d, generator=gen) * 0.5
        logits = model(x)
        y = logits.argmax(1)
        gaps = logits.gather(1, y[:, None]) - logits
        dist = gaps / (model.weight[y][:, None, :] - model.weight[None]).norm(dim=2).clamp_min(1e-12)
    dist[torch.arange(len(x)), y] = math.inf
    return model, x, y, dist.min(1).values.double()


def _box_distance(w: torch.Tensor, b: float, x: torch.Tensor) -> float:
    """Minimal l2 distance from ``x`` to the other side of ``w.x + b = 0`` inside [0, 1]^d."""
    w, x = w.double(), x.double()
    side = 1.0 if float(x @ w + b) > 0 else -1.0

    def score(lam: float) -> float:
        return side * float((x - side * lam * w).clamp(0, 1) @ w + b)

    lo, hi = 0.0, 1.0
    while score(hi) >= 0:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if score(mid) >= 0 else (lo, mid)
    return float(((x - side * hi * w).clamp(0, 1) - x).norm())


def _targeted_distance(model: nn.Linear, x: torch.Tensor, target: int) -> float:
    """Minimal l2 distance from ``x`` to the region where ``target`` has the largest logit (a QP)."""
    weight, bias = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    point = x.double().numpy()
    rivals = [j for j in range(len(bias)) if j != target]
    a, c = weight[target] - weight[rivals], bias[target] - bias[rivals]
    qp = minimize(lambda v: v @ v, point * 0, jac=lambda v: 2 * v, method="SLSQP",
                  constraints={"type": "ineq", "fun": lambda v: a @ (point + v) + c, "jac": lambda v: a},
                  options={"ftol": 1e-12, "maxiter": 500})
    assert qp.success
    return math.sqrt(qp.fun)


# ------------------------------------------------------------------------------------------------
# Exact minimal distances
# ------------------------------------------------------------------------------------------------


def test_exact_on_two_class_linear_untargeted_and_targeted(two_class):
    model, x, y, exact = two_class
    for labels, targeted in ((y, False), (1 - y, True)):
        result = alma(model, x, labels, clip=None, targeted=targeted, generator=_seeded())
        assert bool(result.success.all())
        ratio = result.l2 / exact
        assert float(ratio.min()) >= 1 - 1e-5  # never below the true minimal distance
        assert float(ratio.max()) <= 1.01


def test_exact_inside_the_box():
    gen = _seeded(2)
    d = 16
    w = torch.randn(d, generator=gen)
    x = torch.rand(64, d, generator=gen).round() * 0.9 + 0.05  # pixels near the bounds, like digits
    b = -float((x @ w).median())
    exact = torch.tensor([_box_distance(w, b, xi) for xi in x], dtype=torch.float64)
    free = ((x @ w + b).abs() / w.norm()).double()
    keep = torch.isfinite(exact) & (exact > 0.05)
    x, exact, free = x[keep][:24], exact[keep][:24], free[keep][:24]
    assert int((exact > 1.05 * free).sum()) >= 5  # the box binds for several inputs
    model = Linear2(w, b)
    y = model(x).argmax(1)
    result = alma(model, x, y, generator=_seeded())
    assert bool(result.success.all())
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
    ratio = result.l2 / exact
    assert float(ratio.min()) >= 1 - 1e-5 and float(ratio.max()) <= 1.01


def test_multiclass_linear_untargeted(ten_class):
    """The complement of a class region is a union of half-spaces, so the problem is not convex: a
    margin attack can settle on the boundary of a slightly farther class (6 or 7 of 32 inputs end
    1-10% too far, depending on the CPU: float rounding changes the path; DDN has the same weakness).
    Never below the exact distance, exact for most; 15% bounds the farther-class endings seen."""
    model, x, y, exact = ten_class
    result = alma(model, x, y, clip=None, generator=_seeded())
    assert bool(result.success.all())
    ratio = result.l2 / exact
    assert float(ratio.min()) >= 1 - 1e-5
    assert int((ratio <= 1.01).sum()) >= 24 and float(ratio.max()) <= 1.15
    assert float(ratio.median()) <= 1.001


def test_multiclass_linear_targeted_is_exact(ten_class):
    """The target's region is convex, but its nearest point is a corner where several constraints
    are active and the margin's gradient (through the largest rival only) zigzags: after 2000 steps
    the worst of 12 inputs is 1.2% above the exact distance on some CPUs (1.1% in float64 too), so
    within 2%, and never below it."""
    model, x, y, _ = ten_class
    x, y = x[:12], y[:12]
    targets = (y + 1 + torch.arange(len(y)) % 9) % 10
    result = alma(model, x, targets, targeted=True, clip=None, steps=2000, restarts=1)
    assert bool(result.success.all())
    with torch.no_grad():
        assert bool((model(result.x_adv).argmax(1) == targets).all())
    for i, t in enumerate(targets.tolist()):
        exact = _targeted_distance(model, x[i], t)
        assert exact * (1 - 1e-4) <= float(result.l2[i]) <= exact * 1.02, (i, exact, float(result.l2[i]))


# ------------------------------------------------------------------------------------------------
# A trained network: verified successes, never worse than DDN
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_cnn():
    """rslib's small CNN trained for three epochs on the embedded digits, and 32 test digits."""
    torch.manual_seed(0)
    xs, ys = load_dataset("digits", "train").tensors
    model = build_model("small_cnn", "digits")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = _seeded(0)
    for _ in range(3):
        order = torch.randperm(len(xs), generator=gen)
        for start in range(0, len(xs), 64):
            batch = order[start:start + 64]
            loss = nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x, y = load_dataset("digits", "test").tensors
    with torch.no_grad():
        right = model(x).argmax(1) == y
    return model, x[right][:32], y[right][:32]


def test_cnn_successes_are_verified_and_not_worse_than_ddn(digits_cnn):
    model, x, y = digits_cnn
    result = alma(model, x, y, generator=_seeded())
    reference = ddn(model, x, y)
    assert bool(result.success.all())
    with torch.no_grad():
        assert bool((model(result.x_adv).argmax(1) != y).all())
    assert torch.allclose(result.l2, (result.x_adv - x).flatten(1).double().norm(dim=1))
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
    assert float(result.l2.median()) <= 1.01 * float(reference.l2.median())


def test_restarts_and_determinism(digits_cnn):
    model, x, y = digits_cnn
    single = alma(model, x, y, steps=100, restarts=1)
    several = alma(model, x, y, steps=100, restarts=3, generator=_seeded(5))
    again = alma(model, x, y, steps=100, restarts=3, generator=_seeded(5))
    assert torch.equal(several.l2, again.l2) and torch.equal(several.x_adv, again.x_adv)
    # the first run starts at x like the single run, so the best of three is rarely worse (a larger
    # batch may round differently, and rounding differences can grow along a run)
    assert float((several.l2 <= single.l2 * (1 + 1e-3)).double().mean()) >= 0.9
    assert float(several.l2.median()) < float(single.l2.median())


# ------------------------------------------------------------------------------------------------
# Top-k, judges, budgets, failures
# ------------------------------------------------------------------------------------------------


def test_topk(ten_class, two_class):
    model, x, y, exact = ten_class
    result = alma(model, x, y, topk=2, clip=None, steps=200, generator=_seeded())
    assert bool(result.success.all())
    with torch.no_grad():
        top2 = model(result.x_adv).topk(2, dim=1).indices
    assert not bool((top2 == y[:, None]).any())
    assert bool((result.l2 >= exact * (1 - 1e-5)).all())  # leaving the top 2 is farther than the top 1
    # two classes: the label is always in the top 2, so every input fails, with inf distances
    model2, x2, y2, _ = two_class
    never = alma(model2, x2, y2, topk=2, clip=None, steps=20)
    assert not bool(never.success.any())
    assert bool(torch.isinf(torch.stack([never.l0, never.l1, never.l2, never.linf])).all())


def test_judge_has_the_final_word(two_class):
    model, x, y, exact = two_class

    def same_label(x_adv: torch.Tensor) -> torch.Tensor:  # the label of the nearest clean input
        return y[torch.cdist(x_adv.flatten(1), x.flatten(1)).argmin(1)]

    def abstains(x_adv: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x_adv),), ABSTAIN)

    rejected = alma(model, x, y, clip=None, steps=50, judge=same_label, rescue_scales=())
    assert not bool(rejected.success.any()) and bool(torch.isinf(rejected.l2).all())
    assert not bool(alma(model, x, y, clip=None, steps=50, judge=abstains).success.any())
    assert bool(alma(model, x, y, clip=None, steps=50, judge=abstains, abstain_is_success=True).success.all())

    band = 0.02  # this judge abstains within l2 distance `band` of the boundary

    def banded(x_adv: torch.Tensor) -> torch.Tensor:
        dist = (x_adv.flatten(1) @ model.w + model.b) / model.w.norm()
        out = (dist > 0).long()
        out[dist.abs() < band] = ABSTAIN
        return out

    rescued = alma(model, x, y, clip=None, judge=banded)
    assert bool(rescued.success.all())
    assert float((rescued.l2 / (exact + band)).min()) >= 1 - 1e-5
    # judging every step needs no rescue; the attack still descends towards the model's boundary,
    # so its smallest judged iterate lands a little beyond the band
    strict = alma(model, x, y, clip=None, judge=banded, judge_every_step=True, rescue_scales=())
    assert bool(strict.success.all())
    ratio = strict.l2 / (exact + band)
    assert float(ratio.min()) >= 1 - 1e-5 and float(ratio.max()) <= 1.05


def test_max_norm_and_already_misclassified(two_class):
    model, x, y, exact = two_class
    capped = alma(model, x, y, clip=None, max_norm=0.3)
    assert bool((capped.success == (exact <= 0.3 * 0.999)).all())
    assert float((capped.x_adv - x)[capped.success].flatten(1).norm(dim=1).max()) <= 0.3
    assert bool(torch.isinf(capped.l2[~capped.success]).all())
    wrong = alma(model, x, 1 - y, clip=None, steps=5)
    assert bool(wrong.success.all()) and float(wrong.l2.max()) == 0.0


def test_bad_arguments(two_class):
    model, x, y, _ = two_class
    for kwargs in ({"steps": 0}, {"restarts": 0}, {"lr": 0.0}, {"lr_decay": 0.0}, {"ema": 1.0},
                   {"rho_growth": 0.5}, {"init_radius": -1.0}, {"topk": 0}, {"steps": 2.5}):
        with pytest.raises(ValueError):
            alma(model, x, y, clip=None, **kwargs)
    with pytest.raises(ValueError):
        alma(model, x, y)  # inputs outside the default [0, 1] box


# ------------------------------------------------------------------------------------------------
# Smoothed targets
# ------------------------------------------------------------------------------------------------


def test_smoothed_linear_target(two_class):
    """Gaussian smoothing leaves a linear two-class boundary where it is, so the exact distance still
    holds. The attack follows noisy log-probabilities (16 fresh draws per step), so its smallest
    candidates are often spurious: the majority vote (512 draws) judges them, and the rescue scales
    recover most (here 19 of 24; DDN, whose norm moves by 5% per step, recovers all 24). Near the
    boundary the vote is a coin flip: a success may sit slightly inside it."""
    model, x, y, exact = two_class
    noise = make_noise("Gaussian", x.shape[1], sigma=0.25)
    target = smoothed(model, noise, 16, generator=_seeded(3))
    judge = majority_vote_judge(model, noise, 512, _seeded(4))
    result = alma(target, x, y, clip=None, steps=100, judge=judge, generator=_seeded())
    ok = result.success
    assert int(ok.sum()) >= 18
    ratio = result.l2[ok] / exact[ok]
    assert float(ratio.min()) >= 0.9 and float(ratio.median()) <= 1.3
    with torch.no_grad():  # the base model has the same boundary: it agrees but for the coin flips
        assert float((model(result.x_adv[ok]).argmax(1) != y[ok]).float().mean()) >= 0.8
