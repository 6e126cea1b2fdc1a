r"""The level-set method for spherical noises against an l2 adversary (Yang et al. 2020, Sec. 4).

A spherical noise has density ``exp(-h(||z||))`` with ``h`` increasing (unit scale). For a shift ``e`` along
``e_1`` the Neyman-Pearson sets are ``S_t = {z : h(||z - e||) - h(||z||) > -t}``; conditionally on
``||z|| = r`` the direction is uniform, so

    P(z in S_t) = E_r[ B_{(d-1)/2}( ((r + e)^2 - s^2) / (4 e r) ) ],   s = h^{-1}(h(r) - t),

with ``B_a`` the Beta(a, a) CDF. The worst-case set for radius ``e`` has ``P(z + e in S) = 1/2``,
i.e. ``t*`` solves ``P(z in S_{t*}) = 1/2``, and then ``rho(e) = P(z in S_{-t*})``.

The radial expectation uses Gauss-Legendre nodes in normal-score space (``r = F^{-1}(Phi(z))``); we
solve with ``N`` and ``2N`` nodes and keep ``rho`` raised by their gap; the root is taken at the
bracket end that raises ``rho``. Raising ``rho`` for a given radius only ever lowers certified radii.
Between nodes the radius follows the left node's secant slope (a lower bound for a convex curve,
checked on the solved nodes); if that check fails the table falls back to holding the left node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import special

from rslib.core.noises.tables import RadiusTable

NODES = 96
SCORE_LIMIT = 8.5
RADIUS_GRID = {"geometric": [1e-3, 0.1, 60], "linear_step": 0.01, "max": 9.0}
RHO_CEILING = 1.0 - 1e-9
# Relative slack for slopes built from secants of solved nodes: those nodes carry absolute errors
# near 1e-11 in rho, i.e. secant errors near 1e-6 relative; 1e-4 covers that a hundred times over
# and costs at most 1e-4 relative radius between nodes.
SLOPE_MARGIN = 1e-4


@dataclass(frozen=True)
class SphericalLaw:
    """A spherical density ``exp(-h(||z||))`` in ``dim`` dimensions at unit scale."""

    dim: int
    radius_quantiles: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (lower p, upper p) -> radius
    gap: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (r, t) -> r - h^{-1}(h(r) - t), stably
    h_prime: Callable[[np.ndarray], np.ndarray]

    def quadrature(self, points: int) -> tuple[np.ndarray, np.ndarray]:
        """Radial nodes and weights (summing to one) for expectations over ``||z||``."""
        scores, weights = np.polynomial.legendre.leggauss(points)
        scores = scores * SCORE_LIMIT
        weights = weights * np.exp(-scores**2 / 2)
        radii = self.radius_quantiles(special.ndtr(scores), special.ndtr(-scores))
        return radii, weights / weights.sum()


def _outside_probability(law: SphericalLaw, radii: np.ndarray, weights: np.ndarray, t: np.ndarray,
                         e: np.ndarray, complement: bool) -> np.ndarray:
    """``P(z in S_t)`` (or its complement) for each pair ``(t[m], e[m])``."""
    r = radii[None, :]
    shift = e[:, None]
    # ((r + e)^2 - s^2) / (4 e r) with s = r - gap; the gap is formed without cancellation.
    gap = np.minimum(law.gap(r, t[:, None]), r)
    x = np.clip((shift + gap) * (2 * r + shift - gap) / (4 * shift * r), 0.0, 1.0)
    half = (law.dim - 1) / 2
    return special.betainc(half, half, 1.0 - x if complement else x) @ weights


def _solve_threshold(law: SphericalLaw, radii: np.ndarray, weights: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Lower end of a tight bracket of ``t*`` with ``P(z in S_t*) = 1/2`` (vectorized Illinois)."""

    def f(t: np.ndarray, shift: np.ndarray) -> np.ndarray:
        return _outside_probability(law, radii, weights, t, shift, complement=False) - 0.5

    hi, lo = np.zeros_like(e), -np.ones_like(e)
    f_hi, f_lo = f(hi, e), f(lo, e)
    for _ in range(200):
        need = f_lo >= 0
        if not need.any():
            break
        lo[need] *= 2
        f_lo[need] = f(lo[need], e[need])
    else:
        raise ArithmeticError("level-set method: could not bracket the Neyman-Pearson threshold")
    side = np.zeros_like(e)
    for _ in range(100):
        width = hi - lo
        active = width > 1e-13 * np.maximum(1.0, np.abs(lo))
        if not active.any():
            break
        a, b, fa, fb = lo[active], hi[active], f_lo[active], f_hi[active]
        c = b - fb * (b - a) / (fb - fa)
        c = np.where((c > a) & (c < b), c, (a + b) / 2)
        fc = f(c, e[active])
        left = fc < 0
        new_lo, new_hi = np.where(left, c, a), np.where(left, b, c)
        new_flo, new_fhi = np.where(left, fc, fa), np.where(left, fb, fc)
        last = side[active]
        # Illinois step: halve the value at the endpoint kept twice in a row.
        new_fhi = np.where(left & (last == -1), new_fhi / 2, new_fhi)
        new_flo = np.where(~left & (last == 1), new_flo / 2, new_flo)
        side[active] = np.where(left, -1, 1)
        lo[active], hi[active], f_lo[active], f_hi[active] = new_lo, new_hi, new_flo, new_fhi
    return lo


def _rho_curve(law: SphericalLaw, e: np.ndarray, points: int) -> np.ndarray:
    radii, weights = law.quadrature(points)
    t = _solve_threshold(law, radii, weights, e)
    return 1.0 - _outside_probability(law, radii, weights, -t, e, complement=True)


def radius_grid(unit_sigma: float) -> np.ndarray:
    """Radii (unit scale) at which ``rho`` is solved: geometric near 0, then linear, in sigmas."""
    start, stop, count = RADIUS_GRID["geometric"]
    geometric = np.geomspace(start, stop, int(count), endpoint=False)
    linear = np.arange(stop, RADIUS_GRID["max"] + 1e-9, RADIUS_GRID["linear_step"])
    return unit_sigma * np.concatenate([geometric, linear])


def slope_at_half(law: SphericalLaw) -> float:
    """``dR/drho`` at ``rho = 1/2``: ``1/Phi(1/2)`` with ``Phi(1/2) = E[h'(r)] E|u_1| / 2``."""
    radii, weights = law.quadrature(2 * NODES)
    mean_h_prime = float(law.h_prime(radii) @ weights)
    d = law.dim
    mean_abs_coordinate = np.exp(special.gammaln(d / 2) - special.gammaln((d + 1) / 2)) / np.sqrt(np.pi)
    return 2.0 / (mean_h_prime * mean_abs_coordinate)


def levelset_table(law: SphericalLaw, unit_sigma: float) -> RadiusTable:
    """Tabulate the certified l2 radius of a spherical noise (unit scale) against ``rho``."""
    e = radius_grid(unit_sigma)
    coarse = _rho_curve(law, e, NODES)
    fine = _rho_curve(law, e, 2 * NODES)
    rho = np.maximum(coarse, fine) + np.abs(fine - coarse)
    usable = np.flatnonzero((rho <= 0.5) | (rho >= RHO_CEILING) | ~np.isfinite(rho))
    stop = usable[0] if len(usable) else len(rho)
    increasing = np.flatnonzero(np.diff(rho[:stop]) <= 0)
    stop = min(stop, increasing[0] + 1) if len(increasing) else stop
    rho, e = np.concatenate([[0.5], rho[:stop]]), np.concatenate([[0.0], e[:stop]])
    # Node i > 0 takes the secant of the cell on its left: below the derivative for a convex curve.
    slopes = np.concatenate([[slope_at_half(law)], np.diff(e) / np.diff(rho)]) * (1 - SLOPE_MARGIN)
    if np.any(np.diff(slopes) < -SLOPE_MARGIN * slopes[1:]):
        # Without convexity only monotonicity is safe: hold the radius of the left node.
        slopes = np.zeros_like(slopes)
    return RadiusTable(rho=rho, radius=e, slope=slopes)
