"""The common interface of smoothing noises: scale conventions, sampling and certification.

Conventions (as in rs4a): ``lambd`` is the scale parameter of the distribution and ``sigma`` the
per-coordinate RMS, ``sigma**2 = E||delta||_2**2 / dim``; ``sigma = lambd * unit_sigma`` where
``unit_sigma`` is the RMS at ``lambd = 1``. Certified radii scale linearly with ``lambd``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from rslib.util.registry import Registry

NORMS: tuple[float, ...] = (1.0, 2.0, math.inf)
_NORM_NAMES = {"1": 1.0, "l1": 1.0, "2": 2.0, "l2": 2.0, "inf": math.inf, "linf": math.inf}


def parse_norm(adv: Any) -> float:
    """Normalize an adversary norm (1, 2, math.inf, or 'l1' / 'l2' / 'linf') to a float."""
    key = str(adv).lower().replace("np.", "").replace("math.", "")
    key = "inf" if key in {"infinity", "float('inf')"} else key
    if key.endswith(".0"):
        key = key[:-2]
    if key not in _NORM_NAMES:
        raise ValueError(f"adv must be one of 1, 2, math.inf (or 'l1', 'l2', 'linf'); got {adv!r}")
    return _NORM_NAMES[key]


def norm_label(norm: float) -> str:
    return "linf" if math.isinf(norm) else f"l{int(norm)}"


#: The labels of :data:`NORMS` ("l1", "l2", "linf"): column suffixes and keys everywhere in rslib.
NORM_LABELS: tuple[str, ...] = tuple(norm_label(norm) for norm in NORMS)


def conversion_factor(dim: int, source: Any, target: Any) -> float:
    """Divide an ``l_source`` radius by this (>= 1) to get a sound ``l_target`` radius in dimension ``dim``.

    ``||v||_target <= ||v||_source`` for ``target >= source``; otherwise
    ``||v||_source <= dim^(1/source - 1/target) ||v||_target`` (Hoelder).
    """
    source, target = parse_norm(source), parse_norm(target)
    return 1.0 if target <= source else float(dim ** (1.0 / source - 1.0 / target))


def _as_probabilities(prob_lb: Any) -> np.ndarray:
    """float64 copy of ``prob_lb`` after checking that every value lies in [0, 1]."""
    values = (prob_lb.detach().to("cpu", torch.float64).numpy() if isinstance(prob_lb, torch.Tensor)
              else np.asarray(prob_lb, dtype=np.float64))
    bad = ~((values >= 0.0) & (values <= 1.0))
    if bad.any():
        raise ValueError(f"prob_lb must lie in [0, 1] (a lower confidence bound on a probability); "
                         f"got {values[bad].ravel()[:5].tolist()}")
    return values


def _like_input(radius: np.ndarray, prob_lb: Any) -> Any:
    """Return radii in the container type of ``prob_lb`` (float, ndarray or float64 tensor)."""
    if isinstance(prob_lb, torch.Tensor):
        return torch.as_tensor(radius, dtype=torch.float64, device=prob_lb.device)
    if np.ndim(prob_lb) == 0 and not isinstance(prob_lb, np.ndarray):
        return float(radius)
    return radius


def check_positive(name: str, value: float, *, strict: bool = True, upper: float | None = None,
                   upper_label: str = "") -> float:
    """Return ``value`` as float, or raise ValueError naming ``name`` and the valid range."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {value!r}") from None
    low_ok = value > 0 if strict else value >= 0
    high_ok = upper is None or value < upper
    if not (math.isfinite(value) and low_ok and high_ok):
        low = "> 0" if strict else ">= 0"
        high = f" and < {upper_label or upper}" if upper is not None else ""
        raise ValueError(f"{name} must be finite, {low}{high}; got {value}")
    return value


class Noise(ABC):
    """A smoothing distribution over R^dim with sampling and certified radii."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, float]] = {}

    def __init__(self, dim: int, sigma: float | None = None, lambd: float | None = None,
                 device: str | torch.device | None = None, **params: float) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer (number of input coordinates); got {dim!r}")
        self.dim = int(dim)
        self.device = torch.device(device) if device is not None else None
        if unknown := set(params) - set(self.defaults):
            valid = ", ".join(self.defaults) or "none"
            raise ValueError(f"{self.name} does not take parameter(s) {sorted(unknown)}; valid: {valid}")
        for key, default in self.defaults.items():
            setattr(self, key, params.get(key, default))
        self._check_params()
        if (sigma is None) == (lambd is None):
            raise ValueError(f"{self.name}: give exactly one of sigma or lambd")
        unit = self.unit_sigma()
        if sigma is not None:
            sigma = check_positive("sigma", sigma)
            if not math.isfinite(unit):
                raise ValueError(f"{self.name}{self.params()}: sigma is infinite for these parameters "
                                 f"({self._infinite_sigma_hint()}); give lambd instead")
            self.sigma, self.lambd = sigma, sigma / unit
        else:
            self.lambd = check_positive("lambd", lambd)
            self.sigma = self.lambd * unit

    # --- distribution-specific pieces -------------------------------------------------------
    def _check_params(self) -> None:  # noqa: B027 - optional hook; most noises have no parameters
        """Validate distribution parameters (raise ValueError naming the parameter)."""

    def _infinite_sigma_hint(self) -> str:
        return "the second moment does not exist"

    @abstractmethod
    def unit_sigma(self) -> float:
        """Per-coordinate RMS at ``lambd = 1`` (``math.inf`` when the variance does not exist)."""

    @abstractmethod
    def _fill_unit_noise(self, out: torch.Tensor, generator: torch.Generator | None) -> None:
        """Fill ``out`` of shape (batch, dim) in place with noise at ``lambd = 1``."""

    @abstractmethod
    def direct_norms(self) -> tuple[float, ...]:
        """Norms with a direct certificate; the others are reached by norm conversion."""

    @abstractmethod
    def _unit_radius(self, rho: np.ndarray, norm: float) -> np.ndarray:
        """Direct certified radius at ``lambd = 1`` for ``rho`` in (1/2, 1] and a direct norm."""

    @abstractmethod
    def method(self, norm: float) -> str:
        """How the direct certificate for ``norm`` is computed (closed form, differential, level set)."""

    # --- public API -------------------------------------------------------------------------
    def params(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in self.defaults}

    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild this noise (saved next to certification counts)."""
        return {"name": self.name, "dim": self.dim, "sigma": self.sigma, "lambd": self.lambd, **self.params()}

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.params().items())
        return f"{self.name}(dim={self.dim}{extra}, sigma={self.sigma:.6g}, lambd={self.lambd:.6g})"

    def sample_noise(self, batch: int, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise of shape (batch, dim) on ``device`` (default: the noise's device, else CPU)."""
        device = torch.device(device) if device is not None else (self.device or torch.device("cpu"))
        out = torch.empty((batch, self.dim), device=device, dtype=dtype)
        self._fill_unit_noise(out, generator)
        return out.mul_(self.lambd)

    def perturb_(self, out: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fill ``out`` (rows, dim) in place with ``x + delta``, ``x`` broadcast to the rows (no copies)."""
        self._fill_unit_noise(out, generator)
        return torch.add(x.reshape(-1, self.dim), out, alpha=self.lambd, out=out)

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return ``x + delta`` with ``delta`` drawn independently for each row of the batch ``x``."""
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"{self.name}: x must have shape (batch, *shape) with prod(shape) == dim "
                             f"== {self.dim}; got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
        out = torch.empty((x.shape[0], self.dim), device=x.device, dtype=x.dtype)
        return self.perturb_(out, x, generator).view(x.shape)

    def certify(self, prob_lb: Any, adv: Any) -> Any:
        """Certified radius against the ``adv``-norm adversary for each lower bound ``prob_lb``.

        Sound by construction: exact closed forms, or tables whose lookups never overstate.
        Returns the container type of ``prob_lb`` (float, ndarray, or float64 tensor on its device).
        """
        return _like_input(self.certify_with_source(prob_lb, adv)[0], prob_lb)

    def certify_with_source(self, prob_lb: Any, adv: Any) -> tuple[np.ndarray, np.ndarray]:
        """Radii (float64 ndarray) and the norm of the certificate each one came from.

        Every direct certificate ``R_q`` yields an ``l_p`` radius: ``R_q`` when ``p <= q`` and
        ``R_q / dim**(1/q - 1/p)`` when ``p > q``; we return the best of them.
        """
        norm = parse_norm(adv)
        rho = _as_probabilities(prob_lb)
        above = rho > 0.5
        best = np.zeros(rho.shape)
        source = np.full(rho.shape, norm)
        for direct in self.direct_norms():
            radius = np.zeros(rho.shape)
            with np.errstate(divide="ignore", over="ignore"):
                radius[above] = self._unit_radius(rho[above], direct) * self.lambd
            radius = radius / self.conversion_factor(direct, norm)
            better = radius > best
            best[better], source[better] = radius[better], direct
        return best, source

    def conversion_factor(self, source: float, target: float) -> float:
        """Divide an ``l_source`` radius by this to get a sound ``l_target`` radius."""
        return conversion_factor(self.dim, source, target)

    def describe_certificate(self, adv: Any) -> str:
        """One line saying how the ``adv`` radius is obtained."""
        norm = parse_norm(adv)
        parts = []
        for direct in self.direct_norms():
            factor = "" if direct == norm or norm < direct else (
                f" / dim^(1/{norm_label(direct)[1:]} - 1/{norm_label(norm)[1:]})")
            via = "" if direct == norm else f" converted from {norm_label(direct)}{factor}"
            parts.append(f"{self.method(direct)}{via}")
        return f"{self.name} {norm_label(norm)}: best of [" + "; ".join(parts) + "]"


#: Every noise distribution by its rs4a name, registered by its class (``@register_noise``).
NOISES: Registry[type[Noise]] = Registry("noise")


def register_noise(cls: type[Noise]) -> type[Noise]:
    """Class decorator: add a :class:`Noise` subclass to :data:`NOISES` under its ``name``."""
    return NOISES.register(cls.name, cls)
