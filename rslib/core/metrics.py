"""Certification and attack metrics: certified accuracy, ACR, curves, envelopes, distance CDFs, summaries.

Pure functions of result tables (the rows of ``results/certify.csv``, ``results/attack_<name>.csv``
and the L-bound tables); no stage, study or notebook imports. Conventions:

- certified accuracy at radius r is the fraction of ALL evaluated inputs that are correct with a
  radius >= r (abstains and errors count as failures; HeatSmoothing's notebook dropped abstains);
- certified-accuracy curves are exact step functions: between two points the value is that of the
  right one (draw with ``drawstyle='steps-pre'``);
- an attack's distance CDF at r is the fraction of ALL attacked inputs whose attack succeeded at a
  distance <= r (failures are recorded as inf and never counted).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rslib.core.noises import NORM_LABELS

MONTE_CARLO = "Monte Carlo (rigorous)"
#: The name of the per-input minimum over attacks.
BEST = "best"
LBOUND_METHOD = "L-bound (approximate)"


# --------------------------------------------------------------------------- certification


def _correct(table: pd.DataFrame) -> np.ndarray:
    """The ``correct`` column as booleans, missing (no label) counting as not correct."""
    return table["correct"].fillna(False).to_numpy(dtype=bool)


def certified_accuracy(table: pd.DataFrame, radii: Sequence[float] | np.ndarray, norm: str = "l2") -> np.ndarray:
    """Fraction of ALL rows (abstains count as failures) that are correct with radius >= r, per r."""
    correct, radius = _correct(table), table[f"radius_{norm}"].to_numpy()
    radii = np.asarray(radii, dtype=float)
    return np.array([(correct & (radius >= r)).mean() if len(table) else math.nan for r in radii])


def average_certified_radius(table: pd.DataFrame, norm: str = "l2") -> float:
    """Mean over all rows of radius * correct (ACR; abstains and errors contribute 0)."""
    return float((table[f"radius_{norm}"].to_numpy() * _correct(table)).mean()) if len(table) else math.nan


def accuracy_curves(table: pd.DataFrame, norms: Sequence[str] = NORM_LABELS, method: str = MONTE_CARLO) -> pd.DataFrame:
    """Certified accuracy as an exact step function of the radius (see the module conventions), per norm.

    Rows (method, norm, source, radius, certified_accuracy) at radius 0, at every distinct positive
    radius of a correct row, and one point beyond the largest (accuracy 0). ``source`` lists the norms
    the radii were certified in (another norm than ``norm``: by norm conversion).
    """
    parts, correct = [], _correct(table)
    for norm in norms:
        radius = table[f"radius_{norm}"].to_numpy(dtype=float)
        finite = radius[correct & (radius > 0) & np.isfinite(radius)]
        steps = np.unique(np.concatenate([[0.0], finite]))
        grid = np.append(steps, steps[-1] * 1.05 if steps[-1] > 0 else 1e-12)
        column = f"source_{norm}"
        used = sorted(set(table[column][radius > 0]) - {"none"}) if column in table else [norm]
        parts.append(pd.DataFrame({"method": method, "norm": norm, "source": ",".join(used) or norm,
                                   "radius": grid, "certified_accuracy": certified_accuracy(table, grid, norm)}))
    return pd.concat(parts, ignore_index=True)


def certify_summary(table: pd.DataFrame, norms: Sequence[str] = NORM_LABELS) -> pd.DataFrame:
    """Per norm: accuracy at radius 0, abstain rate, average certified radius, median and max radius."""
    rows, correct = [], _correct(table)
    for norm in norms:
        radius = table[f"radius_{norm}"].to_numpy(dtype=float)[correct]
        rows.append({"norm": norm, "images": len(table),
                     "certified_accuracy_r0": float(certified_accuracy(table, [0.0], norm)[0]),
                     "abstain_rate": float((table["prediction"] < 0).mean()) if len(table) else math.nan,
                     "acr": average_certified_radius(table, norm),
                     "median_radius_correct": float(np.median(radius)) if len(radius) else math.nan,
                     "max_radius": float(radius.max()) if len(radius) else math.nan})
    return pd.DataFrame(rows).set_index("norm")


def accuracy_table(table: pd.DataFrame, points: int = 6, norms: Sequence[str] = NORM_LABELS) -> pd.DataFrame:
    """Certified accuracy at ``points`` evenly spaced radii from 0 to each norm's largest radius.

    Long format (norm, point, radius, certified_accuracy); ``point`` numbers the grid of each norm.
    """
    rows, correct = [], _correct(table)
    for norm in norms:
        radius = table[f"radius_{norm}"].to_numpy(dtype=float)
        top = float(radius[correct & np.isfinite(radius)].max()) if correct.any() else 0.0
        grid = np.linspace(0.0, top, points)
        for point, (r, acc) in enumerate(zip(grid, certified_accuracy(table, grid, norm), strict=True)):
            rows.append({"norm": norm, "point": point, "radius": r, "certified_accuracy": acc})
    return pd.DataFrame(rows)


def certify_timing(table: pd.DataFrame, n0: int, n: int) -> dict[str, float]:
    """Seconds per image (selection with n0 draws, estimation with n draws, both) and samples/s."""
    if not len(table):
        return {}
    predict, estimate = float(table["seconds_predict"].mean()), float(table["seconds_certify"].mean())
    total = predict + estimate
    return {"seconds_predict_per_image": predict, "seconds_certify_per_image": estimate,
            "seconds_per_image": total, "images_per_second": 1.0 / total if total > 0 else math.inf,
            "samples_per_second": (n0 + n) / total if total > 0 else math.inf}


def lbound_as_table(lbound: pd.DataFrame) -> pd.DataFrame:
    """The L-bound rows shaped for ``certified_accuracy`` / ``accuracy_curves`` (norm l2)."""
    return pd.DataFrame({"correct": lbound["correct"].astype(bool), "radius_l2": lbound["radius"].astype(float),
                         "prediction": lbound["prediction"]})


def step_value(radius: np.ndarray, accuracy: np.ndarray, at: np.ndarray | Sequence[float],
               beyond: float = 0.0) -> np.ndarray:
    """Values at ``at`` of an ``accuracy_curves`` step function given by its points.

    The curve is left-continuous: at r it equals the value of the first point >= r, and ``beyond``
    after the last point (which lies past the largest certified radius, where the certified accuracy
    is 0). Exact.
    """
    radius, accuracy = np.asarray(radius, dtype=float), np.asarray(accuracy, dtype=float)
    order = np.argsort(radius, kind="stable")
    radius, accuracy = radius[order], accuracy[order]
    pos = np.searchsorted(radius, np.asarray(at, dtype=float), side="left")
    return np.where(pos < len(radius), accuracy[np.minimum(pos, len(radius) - 1)], beyond)


def envelope(curves: pd.DataFrame) -> pd.DataFrame:
    """Per family and norm, the best Monte-Carlo certified accuracy over sigma at every radius.

    Every curve of the family is evaluated (exactly, as a step function) on the union of the
    family's radius points, so the envelope is itself an exact step function (draw 'steps-pre').
    Columns family, noise, norm, radius, certified_accuracy, sigma and experiment (the curve that
    achieves the maximum; on ties the smallest sigma).
    """
    columns = ["family", "noise", "norm", "radius", "certified_accuracy", "sigma", "experiment"]
    monte_carlo = curves[curves["method"] == MONTE_CARLO]
    parts = []
    for (family, norm), part in monte_carlo.groupby(["family", "norm"], sort=False):
        grid = np.unique(part["radius"].to_numpy(dtype=float))
        lines = sorted(part.groupby("experiment", sort=False), key=lambda item: item[1]["sigma"].iloc[0])
        values = np.vstack([step_value(line["radius"], line["certified_accuracy"], grid) for _, line in lines])
        best = values.argmax(axis=0)
        parts.append(pd.DataFrame({
            "family": family, "noise": part["noise"].iloc[0], "norm": norm, "radius": grid,
            "certified_accuracy": values[best, np.arange(len(grid))],
            "sigma": [lines[b][1]["sigma"].iloc[0] for b in best], "experiment": [lines[b][0] for b in best]}))
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


# --------------------------------------------------------------------------- attacks


def attack_summary(tables: Mapping[str, pd.DataFrame], norms: Sequence[str] = ("l2",)) -> pd.DataFrame:
    """Per attack: images, success rate, clean errors, and per norm the median and mean distances.

    ``median_<norm>`` is over ALL images (failures count as ``inf``; it is ``inf`` when fewer than half
    succeed): the distance at which half the images are fooled. ``median_<norm>_successful`` and
    ``mean_<norm>_successful`` are over the successful images only.
    """
    rows = []
    for name, table in tables.items():
        ok, images = table["success"].to_numpy(dtype=bool), len(table)
        clean = float((ok & (table["l2"].to_numpy(float) == 0)).mean()) if images else math.nan
        success = float(ok.mean()) if images else math.nan
        row: dict[str, Any] = {"attack": name, "images": images, "success_rate": success, "misclassified_clean": clean}
        for norm in norms:
            d = table[norm].to_numpy(dtype=float)
            row[f"median_{norm}"] = float(np.median(d)) if len(d) else math.nan
            row[f"median_{norm}_successful"] = float(np.median(d[ok])) if ok.any() else math.nan
            row[f"mean_{norm}_successful"] = float(d[ok].mean()) if ok.any() else math.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("attack")


def distance_cdf(tables: Mapping[str, pd.DataFrame], norm: str = "l2", end: float | None = None) -> pd.DataFrame:
    """Empirical CDF of the adversarial distance in ``norm``, per attack, as an exact step function.

    Rows (attack, norm, distance, fraction, images): ``fraction`` at ``distance`` is the fraction of
    ALL ``images`` attacked successfully at a distance ``<= distance`` (failures are never counted, so
    the curve ends at the success rate). Points: 0, every distinct successful distance, and a last
    point ``end`` (default: 1.05 times the largest successful distance of any attack; the plateau).
    Right-continuous: draw with ``drawstyle='steps-post'``.
    """
    end = cdf_end(tables.values(), norm) if end is None else end
    parts = []
    for name, table in tables.items():
        ok, d = table["success"].to_numpy(dtype=bool), table[norm].to_numpy(dtype=float)
        hits = np.sort(d[ok & np.isfinite(d)])
        grid = np.unique(np.concatenate([[0.0], hits, [end]]))
        total = len(table)
        fraction = np.searchsorted(hits, grid, side="right") / total if total else np.full(len(grid), math.nan)
        parts.append(pd.DataFrame({"attack": name, "norm": norm, "distance": grid, "fraction": fraction,
                                   "images": total}))
    columns = ["attack", "norm", "distance", "fraction", "images"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def cdf_end(tables: Iterable[pd.DataFrame], norm: str = "l2") -> float:
    """The plateau point of ``distance_cdf``: 1.05 times the largest successful distance (1 if none)."""
    finite = [table.loc[table["success"].astype(bool), norm].to_numpy(dtype=float) for table in tables]
    largest = max((float(f[np.isfinite(f)].max()) for f in finite if np.isfinite(f).any()), default=0.0)
    return largest * 1.05 if largest > 0 else 1.0


def lbound_comparison(tables: Mapping[str, pd.DataFrame], lbound: pd.DataFrame) -> pd.DataFrame:
    """Per image: the APPROXIMATE L-bound next to the smallest l2 distance any attack found.

    Columns idx, label, correct, lbound, attack_l2 (inf when every attack failed) and
    ``lbound_exceeds_attack`` (a correctly classified image whose L-bound is larger than a
    successful perturbation: the bound does not hold there).
    """
    best = None
    for table in tables.values():
        d = table.set_index("idx")["l2"].astype(float)
        best = d if best is None else np.minimum(best, d.reindex(best.index, fill_value=math.inf))
    frame = lbound[["idx", "label", "correct_top1", "lbound"]].rename(columns={"correct_top1": "correct"}).copy()
    frame["attack_l2"] = frame["idx"].map(best).fillna(math.inf).astype(float) if best is not None else math.inf
    frame["lbound_exceeds_attack"] = frame["correct"].astype(bool) & (frame["lbound"] > frame["attack_l2"])
    return frame


def best_over_attacks(tables: Mapping[str, pd.DataFrame], norm: str = "l2") -> pd.DataFrame:
    """Per input, the row of the attack that found the smallest ``norm`` distance, named :data:`BEST`.

    An attack evaluation is an upper bound on robustness, so the tightest bound per input is the
    minimum over attacks. ``found_by`` names the attack (the first in ``tables`` order on ties;
    ``none`` when every attack failed, and then the row is a failure with distances ``inf``).
    """
    order = {name: i for i, name in enumerate(tables)}
    rows = pd.concat([table.assign(found_by=name) for name, table in tables.items()], ignore_index=True)
    rows = rows.assign(order=rows["found_by"].map(order)).sort_values(["idx", norm, "order"], kind="stable")
    best = rows.drop_duplicates("idx", keep="first").drop(columns="order").reset_index(drop=True)
    best.loc[~best["success"].astype(bool), "found_by"] = "none"
    return best.assign(attack=BEST)
