"""Sampling through the Noise API: empirical sigma, radial laws, generators, shapes and devices.

All draws use fixed torch generators, so every statistic below is the same number on every run; the
tolerances are several standard errors wide (stated per test) so a correct sampler passes with room,
while a wrong scale or law (errors of percent or more) fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from rslib.core.noises import make_noise

FINITE_FOURTH_MOMENT = [
    ("Gaussian", {}), ("Laplace", {}), ("Uniform", {}), ("Pareto", {"a": 10}), ("UniformBall", {}),
    ("ExpInf", {"k": 10, "j": 10}), ("ExpInf", {"k": 1}), ("PowInf", {"a": 64 + 40}), ("Exp1", {"k": 1}),
    ("Exp1", {"k": 3}), ("Exp2", {"k": 1}), ("Exp2", {"k": 4, "j": 10}), ("Pow2", {"k": 2, "a": 60}),
    ("Expp", {"p": 0.5}), ("Expp", {"p": 1.5}), ("Expp", {"p": 3}),
]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("name", "params"), FINITE_FOURTH_MOMENT)
def test_empirical_sigma_matches(name, params):
    # 20000 x 64 draws: the relative standard error of the RMS is below 0.5% for these laws (their
    # kurtosis is moderate); 2.5% tolerance is >5 standard errors.
    noise = make_noise(name, 64, sigma=0.7, **params)
    x = torch.zeros(20_000, 1, 8, 8, dtype=torch.float64)
    delta = noise.sample(x, generator=generator(1))
    rms = delta.pow(2).mean().sqrt().item()
    assert rms == pytest.approx(0.7, rel=0.025), (name, params, rms)
    assert abs(delta.mean().item()) < 0.02


@pytest.mark.parametrize(("name", "params", "norm", "law"), [
    ("ExpInf", {"k": 2, "j": 5}, math.inf, lambda d: stats.gamma((d - 5) / 2)),
    ("Exp2", {"k": 3}, 2, lambda d: stats.gamma(d / 3)),
    ("Exp1", {"k": 0.5}, 1, lambda d: stats.gamma(d / 0.5)),
])
def test_radial_law_of_norm_based_noises(name, params, norm, law):
    # ||delta / lambd||^k must follow the stated Gamma law: KS test at a fixed seed (p > 1e-3).
    d = 64
    noise = make_noise(name, d, lambd=1.0, **params)
    delta = noise.sample_noise(5000, generator=generator(2), dtype=torch.float64)
    power = delta.norm(p=norm, dim=1).pow(params["k"]).numpy()
    assert stats.kstest(power, law(d).cdf).pvalue > 1e-3


def test_uniform_ball_fills_the_ball():
    d = 16
    noise = make_noise("UniformBall", d, lambd=2.0)
    radius = noise.sample_noise(5000, generator=generator(3), dtype=torch.float64).norm(dim=1) / 2
    assert radius.max() <= 1.0
    assert stats.kstest(radius.numpy() ** d, "uniform").pvalue > 1e-3


def test_linf_noises_touch_the_cube_face_once():
    noise = make_noise("ExpInf", 64, lambd=1.0, k=1)
    delta = noise.sample_noise(100, generator=generator(4), dtype=torch.float64)
    top = delta.abs().max(dim=1).values
    assert torch.all((delta.abs() == top[:, None]).sum(dim=1) == 1)


@pytest.mark.parametrize(("name", "params"), FINITE_FOURTH_MOMENT)
def test_generator_reproducible_shape_dtype(name, params):
    noise = make_noise(name, 64, sigma=0.5, **params)
    x = torch.rand(3, 1, 8, 8)
    a, b = noise.sample(x, generator=generator(5)), noise.sample(x, generator=generator(5))
    c = noise.sample(x, generator=generator(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert torch.isfinite(a).all()


def test_sample_rejects_dimension_mismatch_and_integer_input():
    noise = make_noise("Gaussian", 64, sigma=0.5)
    with pytest.raises(ValueError, match="dim"):
        noise.sample(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="floating"):
        noise.sample(torch.zeros(2, 64, dtype=torch.int64))


def test_sample_does_not_modify_input():
    noise = make_noise("Laplace", 64, sigma=0.5)
    x = torch.rand(4, 64)
    before = x.clone()
    noise.sample(x, generator=generator(7))
    assert torch.equal(x, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "params"), FINITE_FOURTH_MOMENT)
def test_sampling_stays_on_cuda(name, params):
    noise = make_noise(name, 64, sigma=0.5, **params)
    x = torch.zeros(4096, 64, device="cuda")
    delta = noise.sample(x, generator=torch.Generator(device="cuda").manual_seed(0))
    assert delta.device.type == "cuda"
    assert delta.pow(2).mean().sqrt().item() == pytest.approx(0.5, rel=0.1)


def test_expp_two_is_gaussian_in_law():
    noise = make_noise("Expp", 64, sigma=1.0, p=2)
    delta = noise.sample_noise(2000, generator=generator(8), dtype=torch.float64).numpy().ravel()
    assert stats.kstest(delta[:100_000], "norm").pvalue > 1e-3
    assert np.isclose(delta.std(), 1.0, rtol=0.01)
