"""Each training objective against a value computed by hand on a tiny linear model.

The objectives draw their noise from torch's global generator; every test re-seeds it and draws the
same noise again to build the expected value from the formula of the paper (explicit loops, no code
shared with ``rslib.nn.objectives``). Tolerance 1e-10: float64 throughout, only rounding differs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rslib.core.noises import make_noise
from rslib.nn.objectives import DirectLikelihood, NoiseAugmentation, SmoothAdv, Stability, Standard

TOL = 1e-10


@pytest.fixture()
def case():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = torch.rand(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    noise = make_noise("Gaussian", 4, sigma=0.5)
    return model, x, y, noise


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """mean over rows of -log softmax(logits)_y, one row at a time."""
    total = 0.0
    for row, label in zip(logits.tolist(), y.tolist(), strict=True):
        log_norm = math.log(sum(math.exp(v) for v in row))
        total += log_norm - row[label]
    return total / len(y)


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _draw(noise, shape, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return noise.sample(torch.zeros(shape, dtype=torch.float64))


def test_standard_is_cross_entropy_on_clean_inputs(case):
    model, x, y, _ = case
    loss, logits, targets = Standard()(model, x, y, epoch=0)
    assert loss.item() == pytest.approx(_cross_entropy(model(x).detach(), y), abs=TOL)
    assert torch.equal(targets, y) and logits.shape == (5, 3)


def test_noise_augmentation_is_cross_entropy_on_noisy_inputs(case):
    model, x, y, noise = case
    delta = _draw(noise, x.shape, seed=1)
    torch.manual_seed(1)
    loss, _, _ = NoiseAugmentation(noise)(model, x, y, epoch=0)
    assert loss.item() == pytest.approx(_cross_entropy(model(x + delta).detach(), y), abs=TOL)


def test_stability_adds_the_weighted_kl_of_clean_to_noisy(case):
    model, x, y, noise = case
    weight = 6.0
    delta = _draw(noise, x.shape, seed=2)
    torch.manual_seed(2)
    loss, _, _ = Stability(noise, weight)(model, x, y, epoch=0)
    clean, noisy = model(x).detach().tolist(), model(x + delta).detach().tolist()
    kl = 0.0
    for c, n in zip(clean, noisy, strict=True):
        p, q = _softmax(c), _softmax(n)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected = _cross_entropy(model(x).detach(), y) + weight * kl / len(y)
    assert loss.item() == pytest.approx(expected, abs=TOL)


def test_direct_likelihood_is_minus_log_of_the_mean_softmax(case):
    model, x, y, noise = case
    draws = 3
    delta = _draw(noise, (len(x) * draws, 4), seed=3)
    torch.manual_seed(3)
    loss, _, _ = DirectLikelihood(noise, draws)(model, x, y, epoch=0)
    total = 0.0
    for i in range(len(x)):
        probs = [_softmax(model(x[i] + delta[i * draws + j]).detach().tolist())[int(y[i])] for j in range(draws)]
        total += -math.log(sum(probs) / draws)
    assert loss.item() == pytest.approx(total / len(x), abs=TOL)


@pytest.mark.parametrize(("epoch", "expected"), [(0, 0.1), (1, 0.2), (4, 0.5), (9, 0.5)])
def test_smoothadv_epsilon_warms_up_linearly(epoch, expected):
    objective = SmoothAdv(make_noise("Gaussian", 4, sigma=0.5), draws=1, eps=0.5, steps=1, warmup_epochs=5)
    assert objective.epsilon(epoch) == pytest.approx(expected)
    assert SmoothAdv(objective.noise, 1, 0.5, 1, warmup_epochs=0).epsilon(0) == 0.5


def test_smoothadv_one_step_moves_along_the_loss_gradient_then_trains_there(case):
    # One draw, one step: the step 2 eps along g / ||g|| is projected back to the eps sphere, so
    # adv = eps g / ||g|| with g = W^T (softmax(W (x + delta) + b) - e_y), the input gradient of the
    # cross-entropy of a linear model. The loss is then the cross-entropy at x + adv + delta.
    model, x, y, noise = case
    eps = 0.3
    delta = _draw(noise, x.shape, seed=4)
    objective = SmoothAdv(noise, draws=1, eps=eps, steps=1, warmup_epochs=0, attack_model=model)
    torch.manual_seed(4)
    loss, _, targets = objective(model, x, y, epoch=0)
    weight = model.weight.detach()
    adv = []
    for i in range(len(x)):
        p = torch.tensor(_softmax(model(x[i] + delta[i]).detach().tolist()), dtype=torch.float64)
        p[int(y[i])] -= 1.0
        g = weight.T @ p
        adv.append(eps * g / g.norm())
    expected = _cross_entropy(model(x + torch.stack(adv) + delta).detach(), y)
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    assert torch.equal(targets, y)


def test_stability_with_cross_entropy_adds_the_clean_entropy(case):
    # H(p, q) = KL(p || q) + H(p): the published consistency protocols' divergence.
    model, x, y, noise = case
    weight = 2.0
    delta = _draw(noise, x.shape, seed=5)
    torch.manual_seed(5)
    loss, _, _ = Stability(noise, weight, "cross_entropy")(model, x, y, epoch=0)
    clean, noisy = model(x).detach().tolist(), model(x + delta).detach().tolist()
    cross = 0.0
    for c, n in zip(clean, noisy, strict=True):
        p, q = _softmax(c), _softmax(n)
        cross += -sum(pi * math.log(qi) for pi, qi in zip(p, q, strict=True))
    expected = _cross_entropy(model(x).detach(), y) + weight * cross / len(y)
    assert loss.item() == pytest.approx(expected, abs=TOL)
