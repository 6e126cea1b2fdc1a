r"""The differential method (Yang et al. 2020, Thm. 3.4): ``R(rho) = \int_{1-rho}^{1/2} dp / Phi(p)``.

``Phi(p)`` is the largest rate at which the noise measure of a set of measure ``p`` can change when
the noise is shifted along a unit vector of the adversary's norm. For the symmetric noises here
``Phi`` is nondecreasing on ``(0, 1/2]``, so ``R`` is convex in ``rho`` and ``dR/drho = 1/Phi(1-rho)``.

The integral is evaluated on a fixed grid of ``u = 1 - rho`` (linear near 1/2, geometric towards
``u = 1e-12``) with Gauss-Legendre rules of 8 and 16 points per cell in ``log u``; each cell keeps the
16-point value minus the gap to the 8-point value, and radii and slopes are lowered by a further
``1e-8`` relative, which covers floating-point accumulation (measured errors are below 1e-10).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rslib.core.noises.tables import RadiusTable

U_MIN = 1e-12
SAFETY = 1.0 - 1e-8
GRID_SPEC = {"linear": [0.5, 0.05, 900], "geometric": [0.05, U_MIN, 1200], "gauss": [8, 16], "safety": SAFETY}


def u_grid() -> np.ndarray:
    """Descending grid of ``u = 1 - rho`` from 1/2 to ``U_MIN``."""
    start, stop, cells = GRID_SPEC["linear"]
    linear = np.linspace(start, stop, int(cells) + 1)
    start, stop, cells = GRID_SPEC["geometric"]
    geometric = np.geomspace(start, stop, int(cells) + 1)
    return np.concatenate([linear, geometric[1:]])


def _cell_integrals(integrand: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray,
                    points: int) -> np.ndarray:
    nodes, weights = np.polynomial.legendre.leggauss(points)
    half = (hi - lo)[:, None] / 2
    x = (lo + hi)[:, None] / 2 + half * nodes[None, :]
    return (integrand(x) * weights[None, :] * half).sum(axis=1)


def differential_table(phi: Callable[[np.ndarray], np.ndarray]) -> RadiusTable:
    """Tabulate ``R(rho)`` for a vectorized ``phi(p)`` defined on ``(0, 1/2]`` (unit scale)."""
    u = u_grid()
    s_hi, s_lo = np.log(u[:-1]), np.log(u[1:])

    def integrand(s: np.ndarray) -> np.ndarray:
        p = np.exp(s)
        return p / phi(p)

    coarse_points, fine_points = GRID_SPEC["gauss"]
    fine = _cell_integrals(integrand, s_lo, s_hi, fine_points)
    coarse = _cell_integrals(integrand, s_lo, s_hi, coarse_points)
    increments = fine - np.abs(fine - coarse)
    phi_nodes = phi(u)
    if not (np.all(np.isfinite(increments)) and np.all(phi_nodes > 0)):
        raise ArithmeticError("differential method: Phi is not positive and finite on (0, 1/2]")
    if np.any(np.diff(phi_nodes) > 1e-12 * phi_nodes[:-1]):
        raise ArithmeticError("differential method: Phi must be nondecreasing on (0, 1/2]")
    radius = np.concatenate([[0.0], np.cumsum(np.maximum(increments, 0.0))]) * SAFETY
    return RadiusTable(rho=1.0 - u, radius=radius, slope=SAFETY / phi_nodes)


def integrate_radius(phi: Callable[[np.ndarray], np.ndarray], rho: float) -> float:
    """Reference radius by adaptive quadrature (scipy ``quad``), for tests and spot checks."""
    from scipy import integrate

    if rho <= 0.5:
        return 0.0
    value, _ = integrate.quad(lambda p: 1.0 / float(phi(np.array([p]))[0]), 1.0 - rho, 0.5,
                              limit=500, epsabs=0.0, epsrel=1e-10)
    return value
