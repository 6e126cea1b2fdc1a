"""Smoothing noises of all shapes and sizes: sampling on any torch device and sound certified radii.

>>> from rslib.noises import make_noise
>>> noise = make_noise("Uniform", dim=3072, sigma=0.5)
>>> radius = noise.certify(0.9, adv=1)
"""

from __future__ import annotations

import torch

from rslib.noises.base import NORMS, Noise, norm_label, parse_norm
from rslib.noises.distributions import NOISES

__all__ = ["NOISES", "NORMS", "Noise", "make_noise", "noise_from_spec", "norm_label", "parse_norm"]


def make_noise(name: str, dim: int, sigma: float | None = None, lambd: float | None = None,
               device: str | torch.device | None = None, **params: float) -> Noise:
    """Build a noise by its rs4a name (case-insensitive), e.g. ``make_noise("ExpInf", 3072, 0.5, k=10)``."""
    lookup = {key.lower(): cls for key, cls in NOISES.items()}
    cls = lookup.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown noise {name!r}; valid names: {', '.join(NOISES)}")
    return cls(dim, sigma=sigma, lambd=lambd, device=device, **params)


def noise_from_spec(spec: dict) -> Noise:
    """Rebuild a noise from ``Noise.spec()`` (uses ``lambd``, which is always finite)."""
    spec = dict(spec)
    spec.pop("sigma", None)
    return make_noise(spec.pop("name"), spec.pop("dim"), lambd=spec.pop("lambd"), **spec)
