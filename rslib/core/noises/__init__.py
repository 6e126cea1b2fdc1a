"""Smoothing noises of all shapes and sizes: sampling on any torch device and sound certified radii.

>>> from rslib.core.noises import make_noise
>>> noise = make_noise("Uniform", dim=3072, sigma=0.5)
>>> radius = noise.certify(0.9, adv=1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from rslib.core.noises import distributions  # noqa: F401 -- importing it registers the noises
from rslib.core.noises.base import (
    NOISES,
    NORM_LABELS,
    NORMS,
    Noise,
    conversion_factor,
    norm_label,
    parse_norm,
)

__all__ = ["NOISES", "NORMS", "NORM_LABELS", "Noise", "conversion_factor", "make_noise", "noise_from_params",
           "norm_label", "parse_norm"]


def make_noise(name: str, dim: int, sigma: float | None = None, lambd: float | None = None,
               device: str | torch.device | None = None, **params: float) -> Noise:
    """Build a noise by its rs4a name (case-insensitive), e.g. ``make_noise("ExpInf", 3072, 0.5, k=10)``."""
    canonical = {key.lower(): key for key in NOISES}.get(str(name).lower(), name)
    return NOISES[canonical](dim, sigma=sigma, lambd=lambd, device=device, **params)


def noise_from_params(spec: Mapping[str, Any], dim: int, sigma: float) -> Noise:
    """``make_noise`` for a parameter mapping such as ``{"name": "Pareto", "a": 3}`` at ``dim`` and ``sigma``.

    The one way rslib turns noise parameters (YAML sections, tutorial lists) into a noise; a missing
    name or a reserved key (dim, sigma, device, lambd) raises ValueError naming it.
    """
    params = dict(spec)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"a noise needs a 'name', e.g. {{name: Gaussian}}; got {dict(spec)!r}")
    if reserved := sorted(set(params) & {"dim", "sigma", "device", "lambd"}):
        raise ValueError(f"noise parameters must not set {', '.join(reserved)} (they come from the section)")
    return make_noise(name, dim, sigma=sigma, **params)
