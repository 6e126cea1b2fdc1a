r"""The eleven smoothing distributions of rs4a (Yang et al. 2020), with their certificates.

Unit scale (``lambd = 1``) densities, ``r`` the norm named in each family:

=============  =========================================  =====================================
name           density                                    direct certificates
=============  =========================================  =====================================
Gaussian       exp(-||x||_2^2 / 2)                        l2 closed form (Cohen et al.)
Laplace        exp(-||x||_1)                              l1 closed form; linf differential
Uniform        uniform on [-1, 1]^d                       l1, linf closed forms
Pareto(a)      prod_i (1 + |x_i|)^-(a+1)                   l1 closed form (hypergeometric)
UniformBall    uniform on the unit l2 ball                l2 closed form
ExpInf(k, j)   ||x||_inf^-j exp(-||x||_inf^k)             l1 closed form; linf closed (k=1) or
                                                          differential (j = 0)
PowInf(a)      (1 + ||x||_inf)^-a                         l1 closed form; linf differential
Exp1(k)        exp(-||x||_1^k)                            l1 closed (k=1) or differential
Exp2(k, j)     ||x||_2^-j exp(-||x||_2^k)                 l2 closed (j=0, k in {1, 2}) or level set
Pow2(k, a)     (1 + ||x||_2^k)^-a                         l2 level set
Expp(p)        exp(-||x||_p^p)  (iid)                     l1 closed (p >= 1, p = 1/2) or differential
=============  =========================================  =====================================

Other norms come from norm conversion (see ``Noise.certify_with_source``).
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import torch
from scipy import special, stats

from rslib.core.noises import levelset, sampling
from rslib.core.noises.base import Noise, check_positive, register_noise
from rslib.core.noises.differential import GRID_SPEC, differential_table
from rslib.core.noises.levelset import SphericalLaw, levelset_table
from rslib.core.noises.tables import RadiusTable, cached_table, table_key

INF = math.inf
DIFFERENTIAL = "differential method (sound table)"
LEVEL_SET = "level-set method (sound table)"


def _radius_dtype(out: torch.Tensor) -> torch.dtype:
    return torch.float32 if out.device.type == "mps" else torch.float64


def _scale_rows(out: torch.Tensor, radius: torch.Tensor) -> None:
    out.mul_(radius.to(out.dtype).unsqueeze(1))


def _gamma_rows(out: torch.Tensor, concentration: float, power: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One radius per row: ``Gamma(concentration) ** power``."""
    g = sampling.standard_gamma(concentration, (out.shape[0],), generator=generator,
                                device=out.device, dtype=_radius_dtype(out))
    return g.pow_(power)


def _differential(kind: str, phi, **spec: float) -> RadiusTable:
    return cached_table(table_key(kind, grid=GRID_SPEC, **spec), lambda: differential_table(phi))


def _gamma_ratio(a: float, b: float) -> float:
    """Gamma(a) / Gamma(b), computed in log space."""
    return math.exp(math.lgamma(a) - math.lgamma(b))


def _half_laplace_radius(rho: np.ndarray) -> np.ndarray:
    """``-log(2 (1 - rho))``: the l1 radius of iid unit Laplace noise."""
    return -np.log(2.0 * (1.0 - rho))


def gamma_radial_phi(dim: int, k: float):
    """Phi for a density ``exp(-r^k)`` where ``r`` is a norm and the adversary's norm is its dual.

    Covers ExpInf against linf and Exp1 against l1: the directional derivative is
    ``k r^(k-1) * sign``, with ``r^k ~ Gamma(dim / k)``.
    """
    a, b = dim / k, (dim + k - 1) / k
    scale = k / 2 * _gamma_ratio(b, a)
    if k >= 1:
        return lambda p: scale * special.gammaincc(b, special.gammainccinv(a, 2 * p))
    return lambda p: scale * special.gammainc(b, special.gammaincinv(a, 2 * p))


@register_noise
class Gaussian(Noise):
    """Isotropic Gaussian, ``lambd`` = standard deviation."""

    name = "Gaussian"

    def unit_sigma(self) -> float:
        return 1.0

    def _fill_unit_noise(self, out, generator):
        out.normal_(generator=generator)

    def direct_norms(self):
        return (2.0,)

    def method(self, norm):
        return "closed form sigma * PhiInv(rho) (Cohen et al. 2019)"

    def _unit_radius(self, rho, norm):
        return special.ndtri(rho)


@register_noise
class Laplace(Noise):
    """Iid Laplace with scale ``lambd``."""

    name = "Laplace"

    def unit_sigma(self) -> float:
        return math.sqrt(2.0)

    def _fill_unit_noise(self, out, generator):
        sampling.laplace_(out, generator=generator)

    def direct_norms(self):
        return (1.0, INF)

    def method(self, norm):
        return "closed form -lambd log(2(1 - rho))" if norm == 1 else f"{DIFFERENTIAL}, binomial Phi"

    def _unit_radius(self, rho, norm):
        return _half_laplace_radius(rho) if norm == 1 else self._linf_table.lookup(rho)

    def linf_phi(self, p: np.ndarray) -> np.ndarray:
        """Phi for linf: the top-p mass of ``sum_i sign(x_i) = 2B - d``, ``B ~ Binomial(d, 1/2)``."""
        d = self.dim
        k = stats.binom.isf(p, d, 0.5)
        above = special.bdtrc(k, d, 0.5)
        mean_above = d * special.bdtrc(k - 1, d - 1, 0.5) - d * above if d > 1 else above
        return (2 * k - d) * (p - above) + mean_above

    @cached_property
    def _linf_table(self) -> RadiusTable:
        return _differential("laplace_linf", self.linf_phi, dim=self.dim)

    def approximate_linf_radius(self, prob_lb):
        """rs4a's approximation ``lambd PhiInv(rho) / sqrt(d)``: NOT a certificate, for comparison."""
        rho = np.asarray(prob_lb, dtype=np.float64)
        return np.where(rho > 0.5, self.lambd * special.ndtri(rho) / math.sqrt(self.dim), 0.0)


@register_noise
class Uniform(Noise):
    """Uniform on the cube ``[-lambd, lambd]^dim``."""

    name = "Uniform"

    def unit_sigma(self) -> float:
        return 1 / math.sqrt(3.0)

    def _fill_unit_noise(self, out, generator):
        out.uniform_(-1.0, 1.0, generator=generator)

    def direct_norms(self):
        return (1.0, INF)

    def method(self, norm):
        return "closed form 2 lambd (rho - 1/2)" if norm == 1 else "closed form 2 lambd (1 - (3/2 - rho)^(1/d))"

    def _unit_radius(self, rho, norm):
        return 2.0 * (rho - 0.5) if norm == 1 else -2.0 * np.expm1(np.log1p(0.5 - rho) / self.dim)


@register_noise
class Pareto(Noise):
    """Iid symmetric Pareto: ``|x_i|`` has density ``a (1 + |x|/lambd)^-(a+1) / lambd``."""

    name = "Pareto"
    defaults = {"a": 3.0}

    def _check_params(self):
        self.a = check_positive("a (Pareto tail exponent)", self.a)

    def _infinite_sigma_hint(self):
        return f"Pareto needs a > 2 for a finite sigma, got a={self.a}"

    def unit_sigma(self) -> float:
        a = self.a
        return math.sqrt(2 / ((a - 1) * (a - 2))) if a > 2 else INF

    def _fill_unit_noise(self, out, generator):
        sampling.symmetric_pareto_(out, self.a, generator=generator)

    def direct_norms(self):
        return (1.0,)

    def method(self, norm):
        return "closed form lambd (x/a) 2F1(1, b; b+1; x^(1+1/a)), b = a/(a+1), x = 2 rho - 1"

    def _unit_radius(self, rho, norm):
        a = self.a
        x = 2 * rho - 1
        b = a / (a + 1)
        return special.hyp2f1(1.0, b, b + 1.0, x ** (1 + 1 / a)) * x / a


@register_noise
class UniformBall(Noise):
    """Uniform on the l2 ball of radius ``lambd``."""

    name = "UniformBall"

    def unit_sigma(self) -> float:
        return 1 / math.sqrt(self.dim + 2)

    def _fill_unit_noise(self, out, generator):
        sampling.l2_sphere_(out, generator=generator)
        u = torch.rand(out.shape[0], device=out.device, dtype=_radius_dtype(out), generator=generator)
        _scale_rows(out, u.pow_(1.0 / self.dim))

    def direct_norms(self):
        return (2.0,)

    def method(self, norm):
        return "closed form lambd (2 - 4 BetaInv(3/4 - rho/2; (d+1)/2, (d+1)/2))"

    def _unit_radius(self, rho, norm):
        half = (self.dim + 1) / 2
        return 2.0 - 4.0 * special.betaincinv(half, half, 0.75 - rho / 2)


@register_noise
class ExpInf(Noise):
    """``||x||_inf^-j exp(-||x / lambd||_inf^k)``: cube-shaped level sets."""

    name = "ExpInf"
    defaults = {"k": 1.0, "j": 0.0}

    def _check_params(self):
        if self.dim < 2:
            raise ValueError("ExpInf needs dim >= 2 (in one dimension use Expp with p = k)")
        self.k = check_positive("k", self.k)
        self.j = check_positive("j", self.j, strict=False, upper=self.dim - 1, upper_label=f"dim - 1 = {self.dim - 1}")

    def unit_sigma(self) -> float:
        d, k, j = self.dim, self.k, self.j
        return math.sqrt(((d - 1) / 3 + 1) / d * _gamma_ratio((d + 2 - j) / k, (d - j) / k))

    def _fill_unit_noise(self, out, generator):
        sampling.linf_sphere_(out, generator=generator)
        _scale_rows(out, _gamma_rows(out, (self.dim - self.j) / self.k, 1 / self.k, generator))

    def direct_norms(self):
        return (1.0, INF) if self.j == 0 else (1.0,)

    def method(self, norm):
        if norm == 1:
            return "closed form 2 lambd (d/(d-1)) Gamma((d-j)/k)/Gamma((d-j-1)/k) (rho - 1/2)"
        return "closed form lambd log(1/(2(1-rho)))" if self.k == 1 else DIFFERENTIAL

    def _unit_radius(self, rho, norm):
        d, k, j = self.dim, self.k, self.j
        if norm == 1:
            factor = d / (d - 1) * _gamma_ratio((d - j) / k, (d - j - 1) / k)
            return 2.0 * factor * (rho - 0.5)
        if k == 1:
            return _half_laplace_radius(rho)
        return _differential("gamma_radial", gamma_radial_phi(d, k), dim=d, k=k).lookup(rho)


@register_noise
class PowInf(Noise):
    """``(1 + ||x / lambd||_inf)^-a``: a power law with cube-shaped level sets (needs a > dim)."""

    name = "PowInf"
    defaults = {"a": None}

    def _check_params(self):
        if self.dim < 2:
            raise ValueError("PowInf needs dim >= 2")
        if self.a is None:
            raise ValueError(f"PowInf needs the parameter a > dim (e.g. a = dim + 10 = {self.dim + 10})")
        self.a = check_positive("a", self.a)
        if self.a <= self.dim:
            raise ValueError(f"PowInf needs a > dim = {self.dim}; got a={self.a}")

    def _infinite_sigma_hint(self):
        return f"PowInf needs a > dim + 2 = {self.dim + 2} for a finite sigma, got a={self.a}"

    def unit_sigma(self) -> float:
        d, a = self.dim, self.a
        return math.sqrt(((d - 1) / 3 + 1) * (d + 1) / ((a - d - 1) * (a - d - 2))) if a > d + 2 else INF

    def _fill_unit_noise(self, out, generator):
        sampling.linf_sphere_(out, generator=generator)
        radius = sampling.betaprime(self.dim, self.a - self.dim, (out.shape[0],), generator=generator,
                                    device=out.device, dtype=_radius_dtype(out))
        _scale_rows(out, radius)

    def direct_norms(self):
        return (1.0, INF)

    def method(self, norm):
        return "closed form 2 lambd d/(a-d) (rho - 1/2)" if norm == 1 else DIFFERENTIAL

    def _unit_radius(self, rho, norm):
        d, a = self.dim, self.a
        if norm == 1:
            return 2.0 * d / (a - d) * (rho - 0.5)
        return _differential("powinf_linf", self.linf_phi, dim=d, a=a).lookup(rho)

    def linf_phi(self, p: np.ndarray) -> np.ndarray:
        d, a = self.dim, self.a
        return (a - d) / 2 * special.betainc(d, a + 1 - d, special.betaincinv(d, a - d, 2 * p))


@register_noise
class Exp1(Noise):
    """``exp(-||x / lambd||_1^k)``: cross-polytope level sets."""

    name = "Exp1"
    defaults = {"k": 1.0}

    def _check_params(self):
        self.k = check_positive("k", self.k)

    def unit_sigma(self) -> float:
        d, k = self.dim, self.k
        return math.sqrt(2 / (d * (d + 1)) * _gamma_ratio((d + 2) / k, d / k))

    def _fill_unit_noise(self, out, generator):
        sampling.l1_sphere_(out, generator=generator)
        _scale_rows(out, _gamma_rows(out, self.dim / self.k, 1 / self.k, generator))

    def direct_norms(self):
        return (1.0,)

    def method(self, norm):
        return "closed form -lambd log(2(1-rho)) (iid Laplace)" if self.k == 1 else DIFFERENTIAL

    def _unit_radius(self, rho, norm):
        if self.k == 1:
            return _half_laplace_radius(rho)
        d, k = self.dim, self.k
        return _differential("gamma_radial", gamma_radial_phi(d, k), dim=d, k=k).lookup(rho)


def _spherical_table(kind: str, law: SphericalLaw, unit_sigma: float, **spec: float) -> RadiusTable:
    grid = {"nodes": levelset.NODES, "score_limit": levelset.SCORE_LIMIT, "radii": levelset.RADIUS_GRID,
            "ceiling": levelset.RHO_CEILING, "slope_margin": levelset.SLOPE_MARGIN}
    return cached_table(table_key(kind, grid=grid, **spec), lambda: levelset_table(law, unit_sigma))


def _power_gap(r: np.ndarray, t: np.ndarray, k: float) -> np.ndarray:
    """``r - (r^k - t)^(1/k)`` (0 inside the root clipped to 0), without cancellation."""
    ratio = np.minimum(t / r**k, 1.0)
    with np.errstate(divide="ignore"):
        return np.where(ratio >= 1, r, -r * np.expm1(np.log1p(-ratio) / k))


def _log_power_gap(r: np.ndarray, t: np.ndarray, k: float, j: float) -> np.ndarray:
    """``r - s`` where ``j log s + s^k = j log r + r^k - t`` (j > 0).

    With ``s = r e^-g``: ``F(g) = j g - r^k expm1(-k g) = t``; F is increasing and concave, so
    Newton from the tangent at 0 converges monotonically from below.
    """
    rk = r**k
    g = t / (j + k * rk)
    for _ in range(60):
        step = (t - (j * g - rk * np.expm1(-k * g))) / (j + k * rk * np.exp(-k * g))
        g = g + step
        if np.all(np.abs(step) <= 1e-15 * np.maximum(1.0, np.abs(g))):
            break
    return -r * np.expm1(-g)


@register_noise
class Exp2(Noise):
    """``||x||_2^-j exp(-||x / lambd||_2^k)``: spherical, certified against l2."""

    name = "Exp2"
    defaults = {"k": 1.0, "j": 0.0}

    def _check_params(self):
        self.k = check_positive("k", self.k)
        self.j = check_positive("j", self.j, strict=False, upper=self.dim, upper_label=f"dim = {self.dim}")

    def unit_sigma(self) -> float:
        d, k, j = self.dim, self.k, self.j
        return math.sqrt(_gamma_ratio((d + 2 - j) / k, (d - j) / k) / d)

    def _fill_unit_noise(self, out, generator):
        sampling.l2_sphere_(out, generator=generator)
        _scale_rows(out, _gamma_rows(out, (self.dim - self.j) / self.k, 1 / self.k, generator))

    def direct_norms(self):
        return (2.0,)

    def method(self, norm):
        if self.j == 0 and self.k == 1:
            return "closed form lambd (d-1) atanh(1 - 2 BetaInv(1 - rho; (d-1)/2, (d-1)/2)) (slightly conservative)"
        if self.j == 0 and self.k == 2:
            return "closed form lambd PhiInv(rho) / sqrt(2) (a Gaussian)"
        return LEVEL_SET

    def _unit_radius(self, rho, norm):
        d, k, j = self.dim, self.k, self.j
        if j == 0 and k == 1:
            half = (d - 1) / 2
            return (d - 1) * np.arctanh(1 - 2 * special.betaincinv(half, half, 1 - rho))
        if j == 0 and k == 2:
            return special.ndtri(rho) / math.sqrt(2)
        return _spherical_table("exp2_l2", self.law(), self.unit_sigma(), dim=d, k=k, j=j).lookup(rho)

    def law(self) -> SphericalLaw:
        d, k, j = self.dim, self.k, self.j
        shape = (d - j) / k

        def quantiles(lower, upper):
            power = np.where(lower < 0.5, special.gammaincinv(shape, lower), special.gammainccinv(shape, upper))
            return power ** (1 / k)

        return SphericalLaw(dim=d, radius_quantiles=quantiles, h_prime=lambda r: j / r + k * r ** (k - 1),
                            gap=(lambda r, t: _log_power_gap(r, t, k, j)) if j else (lambda r, t: _power_gap(r, t, k)))


@register_noise
class Pow2(Noise):
    """``(1 + ||x / lambd||_2^k)^-a``: a spherical power law (needs a > dim / k; default dim + 10)."""

    name = "Pow2"
    defaults = {"k": 1.0, "a": None}

    def _check_params(self):
        self.k = check_positive("k", self.k)
        self.a = check_positive("a", float(self.dim + 10) if self.a is None else self.a)
        if self.a <= self.dim / self.k:
            raise ValueError(f"Pow2 needs a > dim / k = {self.dim / self.k:g}; got a={self.a}")

    def _infinite_sigma_hint(self):
        return f"Pow2 needs a > (dim + 2) / k = {(self.dim + 2) / self.k:g} for a finite sigma"

    def unit_sigma(self) -> float:
        d, k, a = self.dim, self.k, self.a
        if a <= (d + 2) / k:
            return INF
        g = math.lgamma
        return math.exp(0.5 * (g((d + 2) / k) + g(a - (d + 2) / k) - g(d / k) - g(a - d / k) - math.log(d)))

    def _fill_unit_noise(self, out, generator):
        sampling.l2_sphere_(out, generator=generator)
        radius = sampling.betaprime(self.dim / self.k, self.a - self.dim / self.k, (out.shape[0],),
                                    generator=generator, device=out.device, dtype=_radius_dtype(out))
        _scale_rows(out, radius.pow_(1 / self.k))

    def direct_norms(self):
        return (2.0,)

    def method(self, norm):
        return LEVEL_SET

    def _unit_radius(self, rho, norm):
        return _spherical_table("pow2_l2", self.law(), self.unit_sigma(), dim=self.dim, k=self.k, a=self.a).lookup(rho)

    def law(self) -> SphericalLaw:
        d, k, a = self.dim, self.k, self.a
        alpha, beta = d / k, a - d / k

        def quantiles(lower, upper):
            # X = B / (1 - B) with B ~ Beta(alpha, beta); 1 - B ~ Beta(beta, alpha) keeps both tails exact.
            b = special.betaincinv(alpha, beta, lower)
            one_minus_b = special.betaincinv(beta, alpha, upper)
            return (b / one_minus_b) ** (1 / k)

        return SphericalLaw(dim=d, radius_quantiles=quantiles, gap=self._gap,
                            h_prime=lambda r: a * k * r ** (k - 1) / (1 + r**k))

    def _gap(self, r: np.ndarray, t: np.ndarray) -> np.ndarray:
        """``r - s`` with ``(1 + s^k) = (1 + r^k) e^(-t/a)``, i.e. ``s^k = r^k (1 + z)``."""
        k, a = self.k, self.a
        z = (1 + r ** (-k)) * np.expm1(-t / a)
        return np.where(z <= -1, r, -r * np.expm1(np.log1p(np.maximum(z, -1.0)) / k))


@register_noise
class Expp(Noise):
    """Iid ``exp(-|x_i / lambd|^p)`` (generalized normal); p = 1 is Laplace, p = 2 a Gaussian."""

    name = "Expp"
    defaults = {"p": 1.0}

    def _check_params(self):
        self.p = check_positive("p", self.p)

    def unit_sigma(self) -> float:
        return math.exp(0.5 * (math.lgamma(3 / self.p) - math.lgamma(1 / self.p)))

    def _fill_unit_noise(self, out, generator):
        sampling.symmetric_generalized_gamma_(out, self.p, generator=generator)

    def direct_norms(self):
        return (1.0,)

    def method(self, norm):
        if self.p >= 1:
            return "closed form lambd GammaInv(2 rho - 1; 1/p)^(1/p) (one-coordinate shift)"
        if self.p == 0.5:
            return "closed form 2 lambd (-c log(1 - e^-c) + Li2(e^-c)), c = GammaInv(2(1-rho); 2)"
        return DIFFERENTIAL

    def _unit_radius(self, rho, norm):
        p = self.p
        if p >= 1:
            return special.gammainccinv(1 / p, 2 * (1 - rho)) ** (1 / p)
        if p == 0.5:
            c = special.gammaincinv(2.0, 2 * (1 - rho))
            ec = np.exp(-c)
            return 2 * (-c * np.log1p(-ec) + special.spence(1 - ec))
        return _differential("expp_l1", self.l1_phi, p=p).lookup(rho)

    def l1_phi(self, u: np.ndarray) -> np.ndarray:
        """Phi for l1 (p < 1): a single-coordinate shift; ``q(0) - q(threshold)``."""
        p = self.p
        return -np.expm1(-special.gammaincinv(1 / p, 2 * u)) / (2 * math.gamma(1 + 1 / p))
