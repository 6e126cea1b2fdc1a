"""Tests of the pure-torch samplers in ``rslib.core.noises.sampling``.

Statistical tests run at fixed seeds, so every outcome is deterministic: a KS or chi-square p-value
computed from a seeded ``torch.Generator`` is the same number on every run (the CPU generator is a
Mersenne twister and all draws happen in a fixed order). The thresholds are loose (p > 1e-3, or
|z| < 5 for moments) so that a correct sampler passes at essentially any seed, while the sample
sizes (2e4 to 2e6) are large enough that a wrong distribution (wrong shape, scale, tail, sign or
layer bookkeeping) gives p-values many orders of magnitude smaller.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from rslib.core.noises import sampling as S

P_MIN = 1e-3  # KS / chi-square acceptance threshold (see the module docstring)
Z_MAX = 5.0  # moment checks: |estimate - truth| < 5 standard errors


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ks(sample: torch.Tensor, cdf) -> float:
    return stats.kstest(sample.detach().double().cpu().numpy().ravel(), cdf).pvalue


def assert_balanced_signs(x: torch.Tensor) -> None:
    n = x.numel()
    pos = int((x > 0).sum())
    assert int((x == 0).sum()) == 0
    assert abs(pos - n / 2) < Z_MAX * math.sqrt(n / 4), (pos, n)


# ------------------------------------------------------------------------------------------ gamma

@pytest.mark.parametrize("c", [0.05, 0.1, 0.5, 1.0, 2.5, 30.0, 3072.0, 150528.0, 1e6])
def test_standard_gamma_matches_scipy(c):
    n = 20000
    g = S.standard_gamma(c, (n,), generator=gen(1))
    assert g.shape == (n,) and g.dtype == torch.float64
    assert torch.isfinite(g).all() and (g >= 0).all()
    if c >= 1000:  # standardised variable, whose law is nearly N(0, 1); scipy's gamma cdf is exact
        z = (g - c) / math.sqrt(c)
        assert ks(z, lambda t: stats.gamma(c).cdf(c + math.sqrt(c) * t)) > P_MIN
    else:
        assert ks(g, stats.gamma(c).cdf) > P_MIN
    # mean and variance within CLT tolerances: sd(mean) = sqrt(c/n), sd(var) ~ sqrt((2c^2 + 6c)/n)
    assert abs(g.mean().item() - c) < Z_MAX * math.sqrt(c / n)
    assert abs(g.var().item() - c) < Z_MAX * math.sqrt((2 * c * c + 6 * c) / n)


def test_large_concentration_acceptance_runs_in_float64():
    # d - d v + d log v cancels from O(d) to O(1): in float32 the error would be ~3 d eps ~ 0.03
    # at d = 150528, a few-percent distortion of the acceptance that a 2e4-sample KS cannot see
    for c in (3072.0, 150528.0, 1e6):
        assert S._gamma_dtype(c, torch.float32, "cpu") == (torch.float64, True)
    assert S._gamma_dtype(2.0, torch.float32, "cpu") == (torch.float32, False)


@pytest.mark.parametrize("c", [0.3, 4.0, 150528.0])
def test_standard_gamma_float32(c):
    g = S.standard_gamma(c, (50, 400), generator=gen(2), dtype=torch.float32)
    assert g.shape == (50, 400) and g.dtype == torch.float32
    assert torch.isfinite(g).all()
    if c > 1000:
        assert ks((g.double() - c) / math.sqrt(c),
                  lambda t: stats.gamma(c).cdf(c + math.sqrt(c) * t)) > P_MIN
    else:
        assert ks(g, stats.gamma(c).cdf) > P_MIN


def test_standard_gamma_tiny_concentration_is_sound_in_log_space():
    # Gamma(0.05) puts ~1% of its mass below 1e-38: float64 keeps the values, and the boost
    # U^(1/c) computed in log space never produces NaN or inf.
    g = S.standard_gamma(0.05, (100000,), generator=gen(3))
    assert torch.isfinite(g).all() and (g >= 0).all()
    tiny = (g < 1e-38).double().mean().item()
    expected = stats.gamma(0.05).cdf(1e-38)
    assert abs(tiny - expected) < Z_MAX * math.sqrt(expected * (1 - expected) / g.numel())


@pytest.mark.parametrize("alpha,beta", [(3.0, 5.0), (0.5, 2.5), (3072.0, 10.0), (10.0, 0.7)])
def test_betaprime_matches_scipy(alpha, beta):
    x = S.betaprime(alpha, beta, (20000,), generator=gen(4))
    assert x.dtype == torch.float64 and torch.isfinite(x).all() and (x > 0).all()
    assert ks(x, stats.betaprime(alpha, beta).cdf) > P_MIN


# ------------------------------------------------------------------------------------ elementwise

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_laplace(dtype):
    x = S.laplace_(torch.empty(400, 500, dtype=dtype), generator=gen(5))
    assert x.dtype == dtype and torch.isfinite(x).all()
    assert ks(x, stats.laplace.cdf) > P_MIN
    assert_balanced_signs(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_pareto(dtype):
    a = 3.0
    x = S.symmetric_pareto_(torch.empty(200000, dtype=dtype), a, generator=gen(6))
    assert torch.isfinite(x).all()
    assert ks(x.abs(), stats.lomax(a).cdf) > P_MIN
    assert_balanced_signs(x)


@pytest.mark.parametrize("p", [0.1, 0.5, 1.0, 1.5, 2.0, 4.0, 10.0, 0.03, 80.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_generalized_gamma(p, dtype):
    if p < 0.05 and dtype == torch.float32:
        pytest.skip("|x| ~ Gamma(1/p)^(1/p) is typically above 1e38: not representable in float32")
    x = S.symmetric_generalized_gamma_(torch.empty(100, 1000, dtype=dtype), p, generator=gen(7))
    assert x.dtype == dtype and torch.isfinite(x).all()
    # |x|^p ~ Gamma(1/p); scipy's gennorm(p) is exactly the density exp(-|x|^p) / (2 Gamma(1 + 1/p))
    assert ks(x.abs().double().pow(p), stats.gamma(1.0 / p).cdf) > P_MIN
    if p >= 0.1:
        assert ks(x, stats.gennorm(p).cdf) > P_MIN
    assert_balanced_signs(x)


@pytest.mark.parametrize("p", [0.3, 0.7, 3.0])
def test_generalized_gamma_large_sample(p):
    # 2^21 draws: power to see a ~1e-3 distortion of the CDF, e.g. one mis-sized ziggurat layer
    x = S.symmetric_generalized_gamma_(torch.empty(1 << 21), p, generator=gen(8))
    assert ks(x.abs().double().pow(p), stats.gamma(1.0 / p).cdf) > P_MIN
    # mass beyond the ziggurat's base-layer edge r comes from the tail sampler: binomial count
    xs, _, _ = S._ziggurat_layers(p)
    r = xs[1]
    expected = stats.gamma(1.0 / p).sf(r ** p)
    count = int((x.abs() > r).sum())
    n = x.numel()
    assert abs(count - n * expected) < Z_MAX * math.sqrt(n * expected * (1 - expected)) + 1


@pytest.mark.parametrize("p", [0.1, 0.5, 2.0, 10.0])
def test_ziggurat_tail_sampler(p):
    xs, _, y0 = S._ziggurat_layers(p)
    t = S._ziggurat_tail(20000, p, y0, gen(9), torch.device("cpu"), torch.float64)
    assert (t > xs[1] * (1 - 1e-12)).all()
    a = 1.0 / p
    sf0 = stats.gamma(a).sf(y0)
    assert ks(t.pow(p), lambda y: (sf0 - stats.gamma(a).sf(y)) / sf0) > P_MIN


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 1.5, 2.0, 4.0, 10.0, 50.0])
def test_ziggurat_layers_have_equal_areas(p):
    xs, fs, y0 = S._ziggurat_layers(p)
    n = S._ZIG_LAYERS
    assert len(xs) == n + 1 and xs[-1] == 0.0 and all(a > b for a, b in zip(xs[:-1], xs[1:], strict=True))
    tail = math.gamma(1 + 1 / p) * stats.gamma(1 / p).sf(y0)
    v = xs[1] * fs[1] + tail
    assert xs[0] * fs[1] == pytest.approx(v, rel=1e-12)
    areas = [xs[i] * (fs[i + 1] - fs[i]) for i in range(1, n)]
    assert max(abs(area / v - 1) for area in areas) < 1e-8
    assert n * v > math.gamma(1 + 1 / p)  # the layers cover the area under the curve


# ------------------------------------------------------------------------------------------ rows

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linf_sphere(dtype):
    b, d = 4000, 50
    x = S.linf_sphere_(torch.empty(b, d, dtype=dtype), generator=gen(10))
    ax = x.abs()
    assert (ax.amax(dim=1) == 1).all()
    on_face = ax == 1
    assert (on_face.sum(dim=1) == 1).all()
    assert ks(x[~on_face], stats.uniform(-1, 2).cdf) > P_MIN
    index = on_face.double().argmax(dim=1)
    counts = torch.bincount(index, minlength=d).numpy()
    assert stats.chisquare(counts).pvalue > P_MIN
    assert_balanced_signs(x[on_face])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_l2_sphere(dtype, tol):
    b, d = 20000, 10
    x = S.l2_sphere_(torch.empty(b, d, dtype=dtype), generator=gen(11))
    norms = torch.linalg.vector_norm(x.double(), dim=1)
    assert (norms - 1).abs().max() < tol
    x = x.double()
    # E x_j = 0 (sd 1/sqrt(b d)), E x_j^2 = 1/d (var of x_j^2 = 2(d-1)/(d^2 (d+2)))
    assert x.mean(dim=0).abs().max() < Z_MAX / math.sqrt(b * d)
    sd2 = math.sqrt(2 * (d - 1) / (d * d * (d + 2)) / b)
    assert ((x * x).mean(dim=0) - 1 / d).abs().max() < Z_MAX * sd2
    # one coordinate of a uniform point on S^(d-1): (x_1 + 1) / 2 ~ Beta((d-1)/2, (d-1)/2)
    assert ks((x[:, 0] + 1) / 2, stats.beta((d - 1) / 2, (d - 1) / 2).cdf) > P_MIN


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_l1_sphere(dtype, tol):
    b, d = 20000, 8
    x = S.l1_sphere_(torch.empty(b, d, dtype=dtype), generator=gen(12))
    norms = x.double().abs().sum(dim=1)
    assert (norms - 1).abs().max() < tol
    # (|x_1|, ..., |x_d|) is Dirichlet(1, ..., 1): each marginal is Beta(1, d - 1)
    assert ks(x[:, 0].abs(), stats.beta(1, d - 1).cdf) > P_MIN
    assert ks(x[:, -1].abs(), stats.beta(1, d - 1).cdf) > P_MIN
    assert_balanced_signs(x)


# ----------------------------------------------------------------------- reproducibility, dtypes

def _fillers():
    return {
        "laplace_": lambda out, g: S.laplace_(out, generator=g),
        "symmetric_pareto_": lambda out, g: S.symmetric_pareto_(out, 3.0, generator=g),
        "gengamma_0.5": lambda out, g: S.symmetric_generalized_gamma_(out, 0.5, generator=g),
        "gengamma_2": lambda out, g: S.symmetric_generalized_gamma_(out, 2.0, generator=g),
        "gengamma_4": lambda out, g: S.symmetric_generalized_gamma_(out, 4.0, generator=g),
        "gengamma_100": lambda out, g: S.symmetric_generalized_gamma_(out, 100.0, generator=g),
        "linf_sphere_": lambda out, g: S.linf_sphere_(out, generator=g),
        "l2_sphere_": lambda out, g: S.l2_sphere_(out, generator=g),
        "l1_sphere_": lambda out, g: S.l1_sphere_(out, generator=g),
        "standard_gamma": lambda out, g: out.copy_(
            S.standard_gamma(0.7, out.shape, generator=g, dtype=out.dtype)),
        "betaprime": lambda out, g: out.copy_(
            S.betaprime(2.0, 3.0, out.shape, generator=g, dtype=out.dtype)),
    }


@pytest.mark.parametrize("name", list(_fillers()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reproducible_and_in_place(name, dtype):
    fill = _fillers()[name]
    shape = (64, 300)
    a = torch.empty(shape, dtype=dtype)
    ret = fill(a, gen(42))
    assert ret is a and a.dtype == dtype and a.shape == shape
    assert torch.isfinite(a).all()
    assert torch.equal(fill(torch.empty(shape, dtype=dtype), gen(42)), a)
    assert not torch.equal(fill(torch.empty(shape, dtype=dtype), gen(43)), a)


@pytest.mark.parametrize("name", ["laplace_", "gengamma_0.5", "linf_sphere_", "l2_sphere_"])
def test_non_contiguous_out(name):
    fill = _fillers()[name]
    base = torch.zeros(300, 64)
    view = base.t()  # (64, 300), not contiguous
    fill(view, gen(5))
    assert torch.equal(view, fill(torch.empty(64, 300), gen(5)))


def test_default_generator_and_device_arguments():
    torch.manual_seed(0)
    x = S.laplace_(torch.empty(1000))
    assert torch.isfinite(x).all()
    g = S.standard_gamma(2.0, 5, device="cpu", dtype=torch.float32)
    assert g.shape == (5,) and g.device.type == "cpu" and g.dtype == torch.float32
    assert S.betaprime(2.0, 3.0, (0,)).shape == (0,)
    assert S.symmetric_generalized_gamma_(torch.empty(0, 3), 0.5).shape == (0, 3)


def test_bad_parameters():
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="concentration"):
            S.standard_gamma(bad, (3,))
        with pytest.raises(ValueError, match="alpha"):
            S.betaprime(bad, 1.0, (3,))
        with pytest.raises(ValueError, match="beta"):
            S.betaprime(1.0, bad, (3,))
        with pytest.raises(ValueError, match="a must"):
            S.symmetric_pareto_(torch.empty(3), bad)
        with pytest.raises(ValueError, match="p must"):
            S.symmetric_generalized_gamma_(torch.empty(3), bad)
    with pytest.raises(ValueError, match="out2d"):
        S.l2_sphere_(torch.empty(3))
    with pytest.raises(TypeError, match="floating-point"):
        S.laplace_(torch.empty(3, dtype=torch.int64))


def test_no_nan_or_inf_at_extremes():
    g = gen(13)
    x = S.symmetric_pareto_(torch.empty(1 << 20), 0.5, generator=g)  # very heavy tail
    assert torch.isfinite(x).all()
    x = S.laplace_(torch.empty(1 << 20, dtype=torch.bfloat16), generator=g)
    assert torch.isfinite(x).all()
    assert torch.isfinite(S.betaprime(0.05, 0.05, (10000,), generator=g)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(_fillers()))
def test_cuda_device(name):
    fill = _fillers()[name]
    out = torch.empty(256, 1000, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    fill(out, g)
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    again = fill(torch.empty_like(out), torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(out, again)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("p", [0.5, 1.5, 4.0])
def test_cuda_generalized_gamma_distribution(p):
    x = S.symmetric_generalized_gamma_(torch.empty(1 << 20, device="cuda"), p,
                                       generator=torch.Generator(device="cuda").manual_seed(1))
    assert ks(x.abs().double().pow(p), stats.gamma(1.0 / p).cdf) > P_MIN
    g = S.standard_gamma(150528.0, (20000,), device="cuda",
                         generator=torch.Generator(device="cuda").manual_seed(2))
    assert g.device.type == "cuda"
    c = 150528.0
    assert ks((g - c) / math.sqrt(c), lambda t: stats.gamma(c).cdf(c + math.sqrt(c) * t)) > P_MIN


def test_module_imports_only_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(S))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "functools", "math", "torch"}, imported
    assert np is not None  # numpy is only used by the tests
