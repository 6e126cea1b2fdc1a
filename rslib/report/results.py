"""Study-level analysis: certified-accuracy curves, envelopes over sigma, attack CDFs and tables.

A study folder (written by ``rslib run <study yaml>``) holds ``study.json`` and one experiment
folder ``<study_dir>/<experiment>`` per experiment; ``rslib.pipeline.study.load_written`` reads the study back
(``open_study`` does it for the plot notebooks). The functions below read each experiment's
``results/*.csv`` (the schemas of ``rslib.pipeline.stages.certify`` and ``rslib.pipeline.stages.attack``) for one report
group and turn them into long tables that ``rslib.report.plots`` draws and ``write_tables`` saves under
``<study_dir>/results/<table>_<group>.csv``.

Conventions:

- certified accuracy at radius r is the fraction of ALL evaluated inputs that are correct with a
  radius >= r (abstains count as failures; ``rslib.core.certify.certified_accuracy``). Curves are exact
  step functions (``metrics.accuracy_curves``): between two points the value is that of the
  right one;
- an attack CDF at distance r is the percent of ALL attacked inputs whose attack succeeded at a
  distance <= r (failures, recorded as inf, are never counted; inputs misclassified without any
  perturbation count at distance 0);
- an experiment of a group without results (it failed, or has no certify / attack stage) is skipped
  with a printed note naming it; nothing here raises for missing results.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rslib.core import metrics
from rslib.core.lbound import LBOUND_COLUMNS
from rslib.core.metrics import certified_accuracy
from rslib.core.noises import NORM_LABELS
from rslib.pipeline import layout
from rslib.pipeline.stages import attack as attack_stage
from rslib.pipeline.stages import certify as certify_stage
from rslib.pipeline.study import (
    ReportGroup,
    Study,
    StudyExperiment,
    load_experiment_folder,
    load_written,
)
from rslib.report import plots
from rslib.util.tables import write_csv

#: Columns of ``group_curves``.
CURVE_COLUMNS = ["experiment", "label", "noise", "sigma", "train_mode", "family", "method", "norm", "source",
                 "radius", "certified_accuracy"]
_CERTIFY_REQUIRED = ("idx", "prediction", "correct", "n0", "n", "radius_l1", "radius_l2", "radius_linf",
                     "seconds_predict", "seconds_certify")

Log = Callable[[str], None]


def experiment_results(study: Study, exp: StudyExperiment) -> Path:
    """``<study_dir>/<experiment>/results``: where the run wrote the experiment's tables."""
    return layout.results_dir(study.dir / exp.name)


def attack_names(study: Study, exp: StudyExperiment) -> list[str]:
    """``attack.attacks`` (and ``best`` when there are several and it was written), else the
    ``attack_<name>.csv`` files present."""
    folder = experiment_results(study, exp)
    attack = exp.experiment.attack
    if attack is None:
        return attack_stage.attack_names_present(folder)
    best = len(attack.attacks) > 1 and attack_stage.result_path(folder, metrics.BEST).exists()
    return [*attack.attacks, *([metrics.BEST] if best else [])]


def describe(exp: StudyExperiment) -> dict[str, Any]:
    """The columns that identify an experiment in every study table."""
    return {"experiment": exp.name, "label": exp.label, "noise": exp.noise_label, "sigma": exp.sigma,
            "train_mode": exp.train_mode}


# --------------------------------------------------------------------------- reading results


def _why_missing(exp: StudyExperiment, stage: str) -> str:
    return f"its {stage} stage failed or has not run" if stage in exp.experiment.stages else f"it has no {stage} stage"


def _read_result(exp: StudyExperiment, group: ReportGroup, path: Path, stage: str, reader: Callable[[Path], pd.DataFrame],
                 log: Log, skipped: str = "", why: str = "", required: Sequence[str] = ()) -> pd.DataFrame | None:
    """``reader(path)``, or None with a note naming the experiment when it is missing, unreadable, empty or
    lacks a ``required`` column. ``skipped`` says what is left out (default: the experiment), ``why`` why a
    file may be missing."""
    where = f"note: group {group.name!r}: {skipped or 'skipping'} {exp.name!r} ({exp.label})"
    if not path.is_file():
        log(f"{where}: no {path} ({why or _why_missing(exp, stage)})")
        return None
    try:
        frame = reader(path)
    except (OSError, ValueError, KeyError) as err:
        log(f"{where}: {path} is unreadable ({type(err).__name__}: {err})")
        return None
    if not len(frame):
        log(f"{where}: {path} has no rows")
        return None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        log(f"{where}: {path} lacks the column(s) {', '.join(missing)} (written by another rslib version?)")
        return None
    return frame


def certify_tables(study: Study, group: ReportGroup, log: Log = print) -> dict[str, pd.DataFrame]:
    """{experiment name: its ``results/certify.csv``} for the group's experiments that have one."""
    tables = {}
    for exp in map(study.get, group.experiments):
        path = layout.table_paths(experiment_results(study, exp), layout.CERTIFY_TABLE)[0]
        table = _read_result(exp, group, path, "certify", certify_stage.read_table, log, required=_CERTIFY_REQUIRED)
        if table is not None:
            tables[exp.name] = table
    return tables


def lbound_certify_tables(study: Study, group: ReportGroup, names: Iterable[str],
                          log: Log = print) -> dict[str, pd.DataFrame]:
    """{experiment: ``results/lbound_certify.csv``} for the experiments among ``names`` certified with
    ``certify.deterministic`` (the setting that writes that file)."""
    out = {}
    for name in names:
        exp = study.get(name)
        if exp.experiment.certify is None or not exp.experiment.certify.deterministic:
            continue
        path = experiment_results(study, exp) / layout.LBOUND_CERTIFY
        table = _read_result(exp, group, path, "certify", pd.read_csv, log, skipped="no L-bound curve for",
                             required=LBOUND_COLUMNS)
        if table is not None:
            out[name] = table
    return out


def attack_tables(study: Study, group: ReportGroup, log: Log = print) -> dict[tuple[str, str], pd.DataFrame]:
    """{(experiment, attack): its ``results/attack_<attack>.csv``} for the group's attacked experiments."""
    tables = {}
    for exp in map(study.get, group.experiments):
        names = attack_names(study, exp)
        if not names:
            log(f"note: group {group.name!r}: skipping {exp.name!r} ({exp.label}) in attack plots: no attack "
                f"results in {experiment_results(study, exp)} ({_why_missing(exp, 'attack')})")
        for attack in names:
            path = attack_stage.result_path(experiment_results(study, exp), attack)
            table = _read_result(exp, group, path, "attack", attack_stage.read_table, log)
            if table is not None:
                tables[exp.name, attack] = table
    return tables


def _by_experiment(tables: Mapping[tuple[str, str], pd.DataFrame]) -> dict[str, dict[str, pd.DataFrame]]:
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for (name, attack), table in tables.items():
        out.setdefault(name, {})[attack] = table
    return out


def _tag(frame: pd.DataFrame, exp: StudyExperiment, **extra: Any) -> pd.DataFrame:
    """``frame`` with the experiment's identifying columns (and ``extra``) in front."""
    front = {**describe(exp), **extra}
    return frame.assign(**front)[[*front, *(c for c in frame.columns if c not in front)]]


# --------------------------------------------------------------------------- certification


def reference_rows(study: Study, names: Iterable[str], log: Log = print) -> pd.DataFrame:
    """The published certified accuracies (``report.reference``) of the experiments ``names``.

    Rows match an experiment by name or label; columns experiment, label, radius, accuracy, source.
    Empty when the study names no reference (or it became unreadable: noted)."""
    columns = ["experiment", "label", "radius", "accuracy", "source"]
    if study.reference is None:
        return pd.DataFrame(columns=columns)
    try:
        published = pd.read_csv(study.reference)
    except (OSError, ValueError) as err:
        log(f"note: the reference {study.reference} is unreadable ({err}); no published numbers shown")
        return pd.DataFrame(columns=columns)
    parts = []
    for name in names:
        exp = study.get(name)
        rows = published[published["experiment"].astype(str).isin({exp.name, exp.label})]
        parts.append(rows.assign(experiment=exp.name, label=exp.label)[columns])
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def reference_comparison(tables: Mapping[str, pd.DataFrame], reference: pd.DataFrame) -> pd.DataFrame:
    """Ours next to the published certified accuracy at every published l2 radius, and the difference
    (percentage points, ours minus published)."""
    rows = []
    for _, ref in reference.iterrows():
        if ref["experiment"] not in tables:
            continue
        ours = float(certified_accuracy(tables[ref["experiment"]], [float(ref["radius"])], "l2")[0])
        rows.append({"experiment": ref["experiment"], "label": ref["label"], "radius": float(ref["radius"]),
                     "ours": ours, "published": float(ref["accuracy"]),
                     "difference_points": 100.0 * (ours - float(ref["accuracy"])), "source": ref["source"]})
    columns = ["experiment", "label", "radius", "ours", "published", "difference_points", "source"]
    return pd.DataFrame(rows, columns=columns)


def families(study: Study, names: Iterable[str]) -> dict[str, str]:
    """{experiment: family}: the noise, plus the training mode when the experiments use several. Experiments
    of one family differ (at most) by sigma: envelopes and best-sigma tables are per family."""
    exps = [study.get(n) for n in names]
    several = len({e.train_mode for e in exps}) > 1
    return {e.name: f"{e.noise_label}, {e.train_mode or 'no'} training" if several else e.noise_label for e in exps}


def sigma_sweeps(study: Study, names: Iterable[str]) -> dict[str, list[str]]:
    """{family: its experiments} for the families that have at least two distinct sigmas."""
    members: dict[str, list[str]] = {}
    for name, family in families(study, names).items():
        members.setdefault(family, []).append(name)
    return {f: ns for f, ns in members.items() if len({study.get(n).sigma for n in ns}) >= 2}


def group_curves(study: Study, tables: Mapping[str, pd.DataFrame], norms: Sequence[str] = NORM_LABELS,
                 lbounds: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Certified accuracy vs radius (``CURVE_COLUMNS``), per experiment, method and norm.

    Monte-Carlo curves from ``metrics.accuracy_curves``; for experiments in ``lbounds`` also the
    approximate l2 L-bound curve (method ``metrics.LBOUND_METHOD``) when ``'l2'`` is in ``norms``."""
    family = families(study, tables)
    parts = []
    for name, table in tables.items():
        exp = study.get(name)
        parts.append(_tag(metrics.accuracy_curves(table, norms), exp, family=family[name]))
        if lbounds is not None and name in lbounds and "l2" in norms:
            lbound = metrics.lbound_as_table(lbounds[name])
            curve = metrics.accuracy_curves(lbound, ["l2"], metrics.LBOUND_METHOD)
            parts.append(_tag(curve, exp, family=family[name]))
    if not parts:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    return pd.concat(parts, ignore_index=True)[CURVE_COLUMNS]


def _units(study: Study, names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Rows of the best-sigma table: a swept family (best over its sigmas) or a single experiment."""
    sweeps = sigma_sweeps(study, names)
    family = families(study, names)
    units, seen = [], set()
    for name in names:
        if family[name] in sweeps:
            if family[name] not in seen:
                seen.add(family[name])
                units.append((family[name], sweeps[family[name]]))
        else:
            units.append((study.get(name).label, [name]))
    return units


def accuracy_at_radii(study: Study, tables: Mapping[str, pd.DataFrame],
                      radii: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """rs4a's table: certified accuracy at the given radii, the best over sigma per noise family.

    One row per unit, norm and radius. A unit is a family with several sigmas (its best experiment
    at that radius is named, with its sigma; ties go to the smaller sigma) or else one experiment.
    Accuracies are fractions of ALL evaluated inputs (abstains count as failures)."""
    rows = []
    for unit, names in _units(study, list(tables)):
        names = sorted(names, key=lambda n: study.get(n).sigma)
        for norm, values in radii.items():
            values = [float(r) for r in values]
            accuracy = np.vstack([certified_accuracy(tables[n], values, norm) for n in names])
            for j, radius in enumerate(values):
                best = int(np.argmax(accuracy[:, j]))
                exp = study.get(names[best])
                rows.append({"unit": unit, "noise": exp.noise_label, "train_mode": exp.train_mode, "norm": norm,
                             "radius": radius, "certified_accuracy": float(accuracy[best, j]), "sigma": exp.sigma,
                             "experiment": exp.name, "label": exp.label, "candidates": len(names)})
    columns = ["unit", "noise", "train_mode", "norm", "radius", "certified_accuracy", "sigma", "experiment",
               "label", "candidates"]
    return pd.DataFrame(rows, columns=columns)


def accuracy_at_radii_wide(table: pd.DataFrame) -> pd.DataFrame:
    """``accuracy_at_radii`` for reading: rows units, columns (norm, radius), '62.5% (σ=0.5)' cells; the
    winning sigma is shown for swept families where some sigma certifies anything."""
    if not len(table):
        return pd.DataFrame()
    text = table.apply(lambda row: f"{100 * row['certified_accuracy']:.1f}%"
                       + (f" (σ={row['sigma']:g})" if row["candidates"] > 1 and row["certified_accuracy"] > 0
                          else ""), axis=1)
    wide = table.assign(cell=text, r=table["radius"].map(lambda r: f"r={r:g}"))
    order = list(dict.fromkeys(table["unit"]))
    out = wide.pivot_table(index="unit", columns=["norm", "r"], values="cell", aggfunc="first", sort=False)
    return out.reindex(order)


def acr_table(study: Study, tables: Mapping[str, pd.DataFrame],
              norms: Sequence[str] = NORM_LABELS) -> pd.DataFrame:
    """Per experiment and norm: ``metrics.certify_summary`` (accuracy at r = 0, abstain rate, ACR, radii)."""
    parts = [_tag(metrics.certify_summary(table, norms).reset_index(), study.get(name))
             for name, table in tables.items()]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _device(results: Path) -> str | None:
    try:
        meta = json.loads(layout.table_paths(results, layout.CERTIFY_TABLE)[1].read_text(encoding="utf-8"))
        return f"{meta['device']} ({meta['provenance']['device']})"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def draws_per_image(study: Study, tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per input of each sequentially certified experiment: the estimation draws it used (``n``), of
    ``n_max``, and its stopping look. Empty when no experiment used sequential certification."""
    parts = [_tag(table[["idx", "n", "n_max", "stop_look"]], study.get(name))
             for name, table in tables.items() if "stop_look" in table.columns]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def timing_table(study: Study, tables: Mapping[str, pd.DataFrame],
                 lbounds: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Seconds per image per experiment: Monte-Carlo prediction (selection, n0 draws), estimation (n),
    certification (n0 + n) and, for deterministic models, one-pass classification (the L-bound) with
    the Monte-Carlo / one-pass ratios. Measured on the device named in ``device``."""
    rows = []
    for name, table in tables.items():
        exp = study.get(name)
        n0, n = int(table["n0"].iloc[0]), int(table["n"].iloc[0])
        t = metrics.certify_timing(table, n0, n)
        row = {**describe(exp), "images": len(table), "n0": n0, "n": n,
               "mc_prediction_s_per_image": t["seconds_predict_per_image"],
               "mc_estimation_s_per_image": t["seconds_certify_per_image"],
               "mc_certification_s_per_image": t["seconds_per_image"], "samples_per_second": t["samples_per_second"],
               "deterministic_s_per_image": math.nan, "mc_prediction_over_deterministic": math.nan,
               "mc_certification_over_deterministic": math.nan, "device": _device(experiment_results(study, exp))}
        if lbounds is not None and name in lbounds:
            one = float(lbounds[name]["seconds"].mean())
            row["deterministic_s_per_image"] = one
            for mc in ("prediction", "certification"):
                row[f"mc_{mc}_over_deterministic"] = row[f"mc_{mc}_s_per_image"] / one if one > 0 else math.inf
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- attacks


def attack_cdf(study: Study, tables: Mapping[tuple[str, str], pd.DataFrame], norm: str = "l2") -> pd.DataFrame:
    """Per experiment and attack, the ECDF of the adversarial distance (``metrics.distance_cdf``).

    ``percent_attacked`` at ``distance`` r = 100 x the fraction of ALL attacked inputs whose attack
    succeeded at a distance <= r (failures never count; clean misclassifications count at 0).
    Right-continuous (draw 'steps-post'); every curve ends at the same plateau point."""
    end = metrics.cdf_end(tables.values(), norm)
    parts = []
    for name, attacks in _by_experiment(tables).items():
        cdf = metrics.distance_cdf(attacks, norm, end)
        parts.append(_tag(cdf.assign(percent_attacked=100.0 * cdf["fraction"]), study.get(name)))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def not_certified(study: Study, cert_tables: Mapping[str, pd.DataFrame],
                  tables: Mapping[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """The overlay of the attack CDF: percent of inputs NOT certified at l2 radius r.

    ``percent_not_certified = 100 * (1 - certified_accuracy_l2(r))`` per experiment and attack, on the
    images both certified and attacked (``basis`` says so), or on all certified images when the two
    sets do not overlap. For a sound certificate (up to its alpha) it bounds from above the percent
    of inputs an attack on the smoothed classifier can fool at distance <= r. Left-continuous
    (draw 'steps-pre')."""
    parts = []
    for (name, attack), attacked in tables.items():
        if name not in cert_tables:
            continue
        table = cert_tables[name]
        common = table["idx"].isin(set(attacked["idx"]))
        basis = "certified and attacked images" if common.any() else "all certified images (none attacked)"
        subset = table[common] if common.any() else table
        curve = metrics.accuracy_curves(subset, ["l2"])
        curve = curve.assign(attack=attack, percent_not_certified=100.0 * (1.0 - curve["certified_accuracy"]),
                             images=len(subset), basis=basis)
        parts.append(_tag(curve.drop(columns=["method", "source"]), study.get(name)))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def attack_summary(study: Study, tables: Mapping[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """Per experiment and attack: ``metrics.attack_summary`` in l2 (images, success rate, medians, mean).

    ``median_l2`` is over ALL inputs (failures are inf, so it is inf when more than half fail);
    ``median_l2_successful`` / ``mean_l2_successful`` over the successes only. ``target`` and
    ``search_norm`` (the norm the attack minimized) come from the experiment's parameters."""
    parts = []
    for (name, attack), table in tables.items():
        exp = study.get(name)
        stats = metrics.attack_summary({attack: table}, ["l2"]).reset_index()
        settings = exp.experiment.attack
        parts.append(_tag(stats, exp, target=settings.target if settings else None,
                          search_norm=settings.norm if settings and attack == "pgd" else "l2"))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def lbound_distribution(study: Study, group: ReportGroup, tables: Mapping[tuple[str, str], pd.DataFrame],
                        log: Log = print) -> pd.DataFrame:
    """Per experiment and image: the APPROXIMATE L-bound of ``results/lbound.csv`` and its correctness.

    With ``metrics.lbound_comparison``: ``attack_l2`` (smallest successful l2 distance of any
    attack, inf if none) and ``lbound_exceeds_attack`` (correct input whose L-bound is larger than a
    successful perturbation). The class label is ``true_class``; ``sigma_lbound`` the sigma used."""
    attacks = _by_experiment(tables)
    parts = []
    for exp in map(study.get, group.experiments):
        if exp.name not in attacks:
            continue
        path = layout.table_paths(experiment_results(study, exp), layout.LBOUND_TABLE)[0]
        lbound = _read_result(exp, group, path, "attack", pd.read_csv, log, skipped="no L-bound distribution for",
                              why="its attack stage did not finish the L-bound statistics",
                              required=("idx", "label", "correct_top1", "lbound", "sigma"))
        if lbound is None:
            continue
        frame = metrics.lbound_comparison(attacks.get(exp.name, {}), lbound)
        frame = frame.rename(columns={"label": "true_class"}).assign(sigma_lbound=lbound["sigma"].to_numpy())
        parts.append(_tag(frame, exp))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def lbound_summary(distribution: pd.DataFrame) -> pd.DataFrame:
    """Per experiment: images, accuracy, L-bound quantiles over correct inputs, bound violations."""
    rows = []
    for (name, label), part in distribution.groupby(["experiment", "label"], sort=False):
        correct = part["correct"].astype(bool).to_numpy()
        values = part["lbound"].to_numpy(dtype=float)[correct]
        attacked = np.isfinite(part["attack_l2"].to_numpy(dtype=float)) & correct
        rows.append({"experiment": name, "label": label, "images": len(part), "accuracy": correct.mean(),
                     "median_lbound_correct": float(np.median(values)) if len(values) else math.nan,
                     "mean_lbound_correct": float(values.mean()) if len(values) else math.nan,
                     "correct_and_attacked": int(attacked.sum()),
                     "lbound_exceeds_attack": int(part["lbound_exceeds_attack"].astype(bool).sum())})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- loading a group at once


@dataclass(frozen=True)
class CertifyGroup:
    """A group's certification data: tables, L-bound tables (deterministic models), curves and ``sweeps``
    (the families with at least two sigmas: facets and envelopes are drawn only for those)."""

    group: ReportGroup
    tables: dict[str, pd.DataFrame]
    lbounds: dict[str, pd.DataFrame]
    curves: pd.DataFrame
    sweeps: dict[str, list[str]]
    reference: pd.DataFrame  # published numbers of the group's experiments (empty without report.reference)


def load_certify_group(study: Study, group: ReportGroup, log: Log = print) -> CertifyGroup | None:
    """Read the group's certification results; None (with a note) when no experiment has any."""
    tables = certify_tables(study, group, log)
    if not tables:
        log(f"note: group {group.name!r}: no experiment has certification results; no certification figures")
        return None
    lbounds = lbound_certify_tables(study, group, tables, log)
    return CertifyGroup(group, tables, lbounds, group_curves(study, tables, group.norms, lbounds),
                        sigma_sweeps(study, tables), reference_rows(study, tables, log))


@dataclass(frozen=True)
class AttackGroup:
    """A group's attack data: attack tables, the certify tables of the same experiments, L-bounds."""

    group: ReportGroup
    tables: dict[tuple[str, str], pd.DataFrame]
    cert_tables: dict[str, pd.DataFrame]
    lbound: pd.DataFrame


def load_attack_group(study: Study, group: ReportGroup, log: Log = print) -> AttackGroup | None:
    """Read the group's attack results; None (with a note) when no experiment has any."""
    tables = attack_tables(study, group, log)
    if not tables:
        log(f"note: group {group.name!r}: no experiment has attack results; no attack figures")
        return None
    attacked = {name for name, _ in tables}
    cert = {n: t for n, t in certify_tables(study, group, log=lambda _: None).items() if n in attacked}
    return AttackGroup(group, tables, cert, lbound_distribution(study, group, tables, log))


# --------------------------------------------------------------------------- output files


def table_path(study: Study, name: str, group: ReportGroup) -> Path:
    """``<study_dir>/results/<name>_<group>.csv``."""
    return layout.results_dir(study.report_dir) / f"{name}_{group.name}.csv"


def figure_path(study: Study, name: str, group: ReportGroup) -> Path:
    """``<study_dir>/figures/<name>_<group>`` (``plots.save_figure`` adds .png and .pdf)."""
    return study.report_dir / layout.FIGURES / f"{name}_{group.name}"


def write_tables(study: Study, group: ReportGroup, tables: Mapping[str, pd.DataFrame | None]) -> list[Path]:
    """Write each non-empty table atomically as ``results/<name>_<group>.csv``; return the paths."""
    return [write_csv(table_path(study, name, group), frame) for name, frame in tables.items()
            if frame is not None and len(frame)]


@dataclass
class Outputs:
    """A plot notebook's outputs: saves figures (PNG + PDF) and tables of a study, remembers the files."""

    study: Study
    produced: list[Path] = field(default_factory=list)

    def figure(self, figure: Figure, name: str, group: ReportGroup) -> None:
        """Save ``figure`` as ``figures/<name>_<group>.{png,pdf}``, display it (in a notebook), close it."""
        from IPython.display import display

        self.produced += plots.save_figure(figure, figure_path(self.study, name, group))
        display(figure)
        plt.close(figure)

    def tables(self, group: ReportGroup, tables: Mapping[str, pd.DataFrame | None]) -> None:
        """``write_tables`` and remember the files."""
        self.produced += write_tables(self.study, group, tables)


#: What the plot notebooks show when ``output_dir`` is empty (paths relative to ``notebooks/``): the demo
#: study once ``make demo`` has run, else the experiment the stage notebooks chain through.
DEFAULT_FOLDERS = ("../outputs/demo", "../outputs/demo_experiment")


def results_folder(output_dir: str | Path | None) -> Path:
    """``output_dir``, or when it is empty the first of :data:`DEFAULT_FOLDERS` that holds results;
    FileNotFoundError saying, in notebook terms, what to run to make some."""
    if output_dir:
        return Path(output_dir).resolve()
    for candidate in map(Path, DEFAULT_FOLDERS):
        if (candidate / layout.STUDY_FILE).is_file() or layout.table_paths(layout.results_dir(candidate),
                                                                            layout.CERTIFY_TABLE)[1].is_file():
            return candidate.resolve()
    study, single = (Path(f).resolve() for f in DEFAULT_FOLDERS)
    raise FileNotFoundError(f"nothing to show yet: no demo study in {study} and no finished experiment in {single}. "
                            f"{what_to_run()}; then run this notebook again")


def what_to_run() -> str:
    """What a new user runs to have results to show, in notebook terms, with the folders it fills."""
    study, single = (Path(f).resolve() for f in DEFAULT_FOLDERS)
    return (f"Open and run notebooks/train.ipynb, then certify.ipynb and attack.ipynb (they write {single}), "
            f"or run `make demo` (it writes {study})")


def open_study(output_dir: str | Path | None, load_group: Callable[..., Any],
               log: Log = print) -> tuple[Study, dict[str, Any], Outputs]:
    """The study in ``output_dir`` (a study folder, or one experiment's folder viewed as a study; empty: see
    :func:`results_folder`), ``load_group(study, group)`` for each group with results (others noted), and
    its Outputs."""
    folder = results_folder(output_dir)
    study = load_written(folder) if (folder / layout.STUDY_FILE).is_file() else load_experiment_folder(folder)
    log(f"study {study.name!r}: {study.description}")
    log(f"{len(study.experiments)} experiments, groups: {', '.join(g.name for g in study.groups)}")
    data = {g.name: loaded for g in study.groups if (loaded := load_group(study, g, log)) is not None}
    return study, data, Outputs(study)
