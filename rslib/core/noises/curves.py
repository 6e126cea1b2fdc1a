"""Certified radius as a function of rho for many noises at one dimension and sigma.

These tables back the noise-radii tutorial: every radius comes from ``Noise.certify_with_source``,
so it is sound (closed forms, or tables that never overstate) and cached on disk like any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rslib.core.noises import NORMS, Noise, noise_from_params, norm_label, parse_norm

NO_CERTIFICATE = "none"
COLUMNS = ["noise", "norm", "rho", "radius", "source", "method"]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:g}"
    return str(value)


def spec_label(spec: Mapping[str, Any]) -> str:
    """``{"name": "ExpInf", "k": 10, "j": 0}`` -> ``"ExpInf(k=10, j=0)"``; just the name without parameters."""
    params = {k: v for k, v in spec.items() if k != "name"}
    if "name" not in spec:
        raise ValueError(f"a noise spec needs a 'name', e.g. {{'name': 'Gaussian'}}; got {dict(spec)!r}")
    if not params:
        return str(spec["name"])
    inner = ", ".join(f"{k}={_format_value(v)}" for k, v in params.items())
    return f"{spec['name']}({inner})"


def certificate_method(noise: Noise, source: float, target: float) -> str:
    """How an ``l_target`` radius is obtained from the direct ``l_source`` certificate of ``noise``."""
    method = noise.method(source)
    if source == target:
        return method
    factor = noise.conversion_factor(source, target)
    if factor == 1.0:
        return f"{method}, converted from {norm_label(source)} (same radius)"
    return f"{method}, converted from {norm_label(source)} (radius / {factor:.4g})"


def _labels(specs: Sequence[Mapping[str, Any]]) -> list[str]:
    labels = [spec_label(s) for s in specs]
    if repeated := sorted({x for x in labels if labels.count(x) > 1}):
        raise ValueError(f"noise specs must be distinct; repeated: {', '.join(repeated)}")
    return labels


def radius_curves(specs: Sequence[Mapping[str, Any]], dim: int, sigma: float, rho: np.ndarray,
                  adv: Any) -> pd.DataFrame:
    """One row per (noise, rho): the certified ``adv``-norm radius at ``dim`` and ``sigma``.

    Columns: ``noise`` (``spec_label``), ``norm`` ('l1', 'l2' or 'linf'), ``rho``, ``radius``,
    ``source`` (norm of the direct certificate used, equal to ``norm`` unless converted;
    'none' where rho <= 1/2 gives no certificate) and ``method`` (how that radius is computed).
    """
    norm = parse_norm(adv)
    rho = np.asarray(rho, dtype=np.float64)
    if rho.ndim != 1 or rho.size == 0:
        raise ValueError(f"rho must be a non-empty 1-D array; got shape {rho.shape}")
    frames = []
    for spec, label in zip(specs, _labels(specs), strict=True):
        noise = noise_from_params(spec, dim, sigma)
        radius, source = noise.certify_with_source(rho, norm)
        certified = rho > 0.5
        methods = {q: certificate_method(noise, q, norm) for q in np.unique(source[certified])}
        frames.append(pd.DataFrame({
            "noise": label, "norm": norm_label(norm), "rho": rho, "radius": radius,
            "source": [norm_label(q) if ok else NO_CERTIFICATE for q, ok in zip(source, certified, strict=True)],
            "method": [methods[q] if ok else "no certificate (rho <= 1/2): radius 0, abstain"
                       for q, ok in zip(source, certified, strict=True)],
        }))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c in ("rho", "radius") else object) for c in COLUMNS})
    return pd.concat(frames, ignore_index=True)


def noise_summary(specs: Sequence[Mapping[str, Any]], dim: int, sigma: float) -> pd.DataFrame:
    """One row per distinct noise: sigma, lambd, the norms with a direct certificate, and, per norm,
    ``describe_certificate``."""
    rows, seen = [], set()
    for spec in specs:
        label = spec_label(spec)
        if label in seen:
            continue
        seen.add(label)
        noise = noise_from_params(spec, dim, sigma)
        rows.append({"noise": label, "dim": noise.dim, "sigma": noise.sigma, "lambd": noise.lambd,
                     "direct": ", ".join(norm_label(q) for q in noise.direct_norms()),
                     **{f"certificate_{norm_label(q)}": noise.describe_certificate(q) for q in NORMS}})
    return pd.DataFrame(rows)


def radii_at(frame: pd.DataFrame, rho: Sequence[float], noises: Sequence[str] | None = None) -> pd.DataFrame:
    """Radii of a ``radius_curves`` frame at the grid points nearest to ``rho``: rows noise, columns rho.

    Use a frame computed on the exact ``rho`` values for exact numbers.
    """
    if frame["norm"].nunique() > 1:
        raise ValueError("radii_at needs a frame with one norm; filter it with frame[frame.norm == ...]")
    grid = np.sort(frame["rho"].unique())
    nearest = {float(r): float(grid[np.argmin(np.abs(grid - r))]) for r in rho}
    wanted = frame[frame["rho"].isin(set(nearest.values()))]
    table = wanted.pivot(index="noise", columns="rho", values="radius")[[nearest[float(r)] for r in rho]]
    order = list(noises) if noises is not None else list(dict.fromkeys(frame["noise"]))
    table = table.loc[[n for n in order if n in table.index]]
    table.columns.name = "rho"
    return table


def winners(frame: pd.DataFrame, rtol: float = 0.01) -> pd.DataFrame:
    """For each norm, the rho intervals over which each noise (or group of near-ties) is best.

    At each rho the best noises are those whose radius is within ``rtol`` (relative) of the
    largest one; consecutive grid points with the same group form one interval. Columns:
    ``norm``, ``best`` (the group, joined with ' ~ ', largest first at ``rho_to``), ``rho_from``,
    ``rho_to`` (grid points, inclusive), ``radius_from``, ``radius_to`` (largest radius at each
    end) and ``runner_up`` (the best noise outside the group at ``rho_to``, with its radius).
    Points where every radius is 0 (no certificate) are left out.
    """
    if not 0.0 <= rtol < 1.0:
        raise ValueError(f"rtol must be in [0, 1); got {rtol}")
    rows = []
    for norm, part in frame.groupby("norm", sort=False):
        order = list(dict.fromkeys(part["noise"]))
        wide = part.pivot(index="rho", columns="noise", values="radius").sort_index()[order]
        wide = wide[wide.max(axis=1) > 0]
        if wide.empty:
            continue
        near = wide.ge(wide.max(axis=1) * (1.0 - rtol), axis=0)
        groups = near.apply(lambda r: tuple(r.index[r.to_numpy()]), axis=1)
        run_id = (groups != groups.shift()).cumsum()
        for _, run in groups.groupby(run_id):
            first, last, group = run.index[0], run.index[-1], run.iloc[0]
            at_last = wide.loc[last].sort_values(ascending=False, kind="stable")
            others = [n for n in at_last.index if n not in group]
            rows.append({
                "norm": norm, "best": " ~ ".join(n for n in at_last.index if n in group),
                "rho_from": first, "rho_to": last, "radius_from": wide.loc[first].max(), "radius_to": at_last.iloc[0],
                "runner_up": f"{others[0]} ({at_last[others[0]]:.4g})" if others else None})
    return pd.DataFrame(rows, columns=["norm", "best", "rho_from", "rho_to", "radius_from", "radius_to", "runner_up"])


def certificate_sources(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (norm, noise, source, method) of a ``radius_curves`` frame, with its rho range.

    Tells at a glance which radii come from closed forms, the differential or level-set method,
    or norm conversion (rows with ``rho <= 1/2``, which certify nothing, are left out).
    """
    part = frame[frame["source"] != NO_CERTIFICATE]
    keys = ["norm", "noise", "source", "method"]
    table = (part.groupby(keys, sort=False)["rho"].agg(["min", "max"])
             .rename(columns={"min": "rho_from", "max": "rho_to"}).reset_index())
    table.insert(3, "converted", table["source"] != table["norm"])
    return table
