"""Studies: many experiments (listed, or swept over a grid) run stage by stage, then the plot notebooks.

A study file has the top-level key ``study`` instead of ``experiment``::

    study: demo                      # output folder outputs/demo/
    description: ...
    defaults: {seed: 0, data: {dataset: digits}, ...}   # merged under every experiment
    experiments:                     # each entry: name, label, and experiment keys over the defaults
      - {name: baseline, label: Baseline, stages: [train, certify, attack], train: {mode: standard}}
    sweeps:                          # each combination of `over` is one experiment
      - name: "rs4a_{noise.name}_{noise.sigma}"
        label: "{noise.name} sigma={noise.sigma}"
        over: {noise.name: [Uniform, Gaussian], noise.sigma: [0.25, 0.5]}
        base: {stages: [train, certify], train: {mode: noise}}
    report:                          # what the plot notebooks compare (reference: published numbers, a CSV)
      groups:
        - {name: heat, title: ..., experiments: [baseline, "rs4a_*"], radii: {l2: [0, 0.25, 0.5]}}

Experiments run into ``outputs/<study>/<name>/`` in dependency order (a ``train.heat_base``,
``certify.checkpoint`` or ``attack.checkpoint`` naming a sibling makes it a dependency); a failed
experiment is reported, its dependents are not run, the rest of the study continues. The plot
notebooks (``cert_plots``, ``adv_plots``) then run over the whole study into ``outputs/<study>/``.
``--shard i/n`` splits the experiments into n parts along dependency chains (a chain never spans
two shards); the plots run once every experiment of the study has finished. ``--jobs N`` runs N
experiments at once in one process, each once its dependencies have run (see :func:`run_study`). The run writes the
resolved study as ``outputs/<study>/study.json``; ``load_written`` reads it back (the plot notebooks,
through ``rslib.report.results``) with the same validation as the study file.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import yaml

from rslib.core.noises import NORM_LABELS
from rslib.core.noises.curves import spec_label
from rslib.pipeline import layout, params, runner
from rslib.pipeline.locks import LockHeld
from rslib.pipeline.params import ParamsError
from rslib.util.files import atomic_write_json, atomic_write_text
from rslib.util.provenance import provenance

PLOTS = ("cert_plots", "adv_plots")
#: The experiment stage each plot notebook reads the results of.
PLOT_INPUT = {"cert_plots": "certify", "adv_plots": "attack"}
DEFAULT_RADII = {"l2": [0.0, 0.25, 0.5, 0.75, 1.0]}
_TOP_KEYS = ("study", "description", "defaults", "experiments", "sweeps", "report", "plots")
_SWEEP_KEYS = ("name", "label", "over", "base")
_GROUP_KEYS = ("name", "title", "experiments", "radii")
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"


@dataclass(frozen=True)
class StudyExperiment:
    """One experiment of a study: its validated parameters and the siblings it reads checkpoints of."""

    name: str
    label: str
    experiment: params.Experiment
    depends_on: tuple[str, ...] = ()

    @property
    def noise_label(self) -> str:
        """The noise with its distribution parameters, e.g. ``'ExpInf(k=10, j=0)'``."""
        noise = self.experiment.noise
        return spec_label({"name": noise.name, **noise.params}) if noise is not None else "no noise"

    @property
    def sigma(self) -> float:
        """The noise's sigma (NaN without a noise section)."""
        noise = self.experiment.noise
        return float(noise.sigma) if noise is not None else math.nan

    @property
    def train_mode(self) -> str | None:
        """``train.mode`` (None without a train section)."""
        train = self.experiment.train
        return train.mode if train is not None else None

    @property
    def deterministic(self) -> bool:
        """A Gaussian-averaged model: ``certify.deterministic`` or trained in mode 'heat'."""
        certify = self.experiment.certify
        return bool(certify is not None and certify.deterministic) or self.train_mode == "heat"


@dataclass(frozen=True)
class ReportGroup:
    """Experiments compared in one set of figures and tables; ``radii`` per norm for the tables."""

    name: str
    title: str
    experiments: tuple[str, ...]
    radii: dict[str, list[float]]

    @property
    def norms(self) -> list[str]:
        """The norms of the group (the keys of ``radii``)."""
        return list(self.radii)


@dataclass(frozen=True)
class Study:
    """A validated study: experiments in dependency order, report groups and plot notebooks."""

    name: str
    description: str
    experiments: list[StudyExperiment]
    groups: list[ReportGroup]
    plots: tuple[str, ...]
    source: Path | None = None  # the file it was read from: the study YAML, or study.json (load_written)
    salts: dict[str, str] = field(default_factory=dict)
    reference: str | None = None  # absolute path of the published certified accuracies (report.reference)
    dir: Path | None = None  # the study folder, when read back from its study.json (load_written)

    def get(self, name: str) -> StudyExperiment:
        """The experiment called ``name`` (KeyError naming the known ones otherwise)."""
        for e in self.experiments:
            if e.name == name:
                return e
        raise KeyError(f"study {self.name!r} has no experiment {name!r}; it has "
                       f"{', '.join(e.name for e in self.experiments)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-able resolved study (every experiment with all its parameters)."""
        return {
            "study": self.name,
            "description": self.description,
            "experiments": [
                {"name": e.name, "label": e.label, "dir": e.name, "stages": list(e.experiment.stages),
                 "depends_on": list(e.depends_on), "params": e.experiment.to_dict()}
                for e in self.experiments
            ],
            "report": {"groups": [
                {"name": g.name, "title": g.title, "experiments": list(g.experiments), "radii": g.radii}
                for g in self.groups
            ], "reference": self.reference},
            "plots": list(self.plots),
        }


# --------------------------------------------------------------------------- loading


def is_study(path: str | os.PathLike[str]) -> bool:
    """Whether a parameter file is a study (top-level ``study`` key) rather than one experiment."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # params.load reports the problem
    return isinstance(raw, dict) and "study" in raw


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``; mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _namespace(value: Any) -> Any:
    if isinstance(value, Mapping):
        return SimpleNamespace(**{str(k): _namespace(v) for k, v in value.items()})
    return value


def _format(template: Any, raw: Mapping[str, Any], where: str) -> str:
    """Fill ``{section.key}`` fields of a sweep's name or label from the experiment's values."""
    if not isinstance(template, str):
        raise ParamsError(f"{where} must be a string template such as 'rs4a_{{noise.name}}', got {template!r}")
    try:
        return template.format_map(_namespace(raw).__dict__)
    except (KeyError, AttributeError, IndexError, ValueError) as err:
        raise ParamsError(f"{where} {template!r}: cannot fill {err} from the experiment's parameters") from None


def _set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"{where}.over: key {key!r}: '{part}' is not a mapping")
    node[last] = copy.deepcopy(value)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ParamsError(f"{where} must be a mapping of keys to values, got {value!r}")
    return dict(value)


def _list(raw: Mapping[str, Any], key: str, label: str) -> list[Any]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise ParamsError(f"{label}: {key} must be a list of mappings, got {value!r}")
    return value


def _study_name(raw: Mapping[str, Any], label: str) -> str:
    name = raw.get("study")
    if not isinstance(name, str) or not re.fullmatch(_NAME, name):
        raise ParamsError(f"{label}: study must be a name of letters, digits, '_', '.' and '-', got {name!r}")
    return name


def _entries(raw: Mapping[str, Any], label: str) -> Iterator[tuple[str, str, dict[str, Any], str]]:
    """(name, label, experiment mapping, where) for every listed and swept experiment."""
    defaults = _mapping(raw.get("defaults"), f"{label}: defaults")
    if "experiment" in defaults:
        raise ParamsError(f"{label}: defaults.experiment is not allowed (each experiment has its own name)")
    for i, entry in enumerate(_list(raw, "experiments", label)):
        where = f"{label}: experiments[{i}]"
        entry = _mapping(entry, where)
        name = entry.pop("name", None)
        if not isinstance(name, str):
            raise ParamsError(f"{where} needs a 'name' (the experiment's output folder)")
        title = entry.pop("label", name)
        yield name, str(title), deep_merge(defaults, entry), f"{where} ('{name}')"
    for i, sweep in enumerate(_list(raw, "sweeps", label)):
        where = f"{label}: sweeps[{i}]"
        sweep = _mapping(sweep, where)
        unknown = sorted(set(sweep) - set(_SWEEP_KEYS), key=str)
        if unknown:
            raise ParamsError(f"{where}: unknown key '{unknown[0]}' (valid keys: {', '.join(_SWEEP_KEYS)})")
        over = _mapping(sweep.get("over"), f"{where}.over")
        if not over or not all(isinstance(k, str) and isinstance(v, list) and v for k, v in over.items()):
            raise ParamsError(f"{where}.over must map dotted keys to non-empty lists, e.g. "
                              "{noise.sigma: [0.25, 0.5]}")
        if "name" not in sweep:
            raise ParamsError(f"{where} needs a 'name' template such as 'rs4a_{{noise.name}}_{{noise.sigma}}'")
        base = deep_merge(defaults, _mapping(sweep.get("base"), f"{where}.base"))
        for combo in itertools.product(*over.values()):
            exp = copy.deepcopy(base)
            for key, value in zip(over, combo, strict=True):
                _set_dotted(exp, key, value, where)
            name = _format(sweep["name"], exp, f"{where}.name")
            title = _format(sweep.get("label", sweep["name"]), exp, f"{where}.label")
            yield name, title, exp, f"{where} ('{name}')"


def _override_experiment(raw: dict[str, Any], overrides: Mapping[str, Any], where: str) -> tuple[dict[str, Any], set]:
    """Apply the overrides that concern this experiment; return the new mapping and the keys used.

    ``section.key`` applies when the experiment has that section or one of its stages needs it;
    header keys (``seed``, ``device``, ...) apply to every experiment.
    """
    stages = raw.get("stages")
    needed = {s for stage in (stages if isinstance(stages, list) else []) if isinstance(stage, str)
              and stage in params.STAGES for s in params.STAGES[stage].requires}
    used = set()
    for key, value in overrides.items():
        head = key.split(".")[0]
        if head == "experiment":
            raise ParamsError(f"{where}: override '{key}' cannot rename study experiments")
        if "." in key and head not in raw and head not in needed:
            continue
        raw = params.apply_overrides(raw, {key: value}, where)
        used.add(key)
    return raw, used


def _dependencies(exp: params.Experiment, names: Sequence[str], where: str) -> tuple[str, ...]:
    """The siblings whose checkpoints the experiment reads; an unknown non-path reference is an error."""
    deps = []
    for section, key, reference in params.read_checkpoints(exp):
        if reference in names:
            if reference == exp.experiment:
                raise ParamsError(f"{where}: {section}.{key} names the experiment itself")
            deps.append(reference)
        elif not layout.is_checkpoint_path(reference):
            raise ParamsError(
                f"{where}: {section}.{key} {reference!r} is neither a .pt checkpoint nor an experiment of "
                f"this study ({', '.join(names)})"
            )
    return tuple(dict.fromkeys(deps))


def _order(experiments: list[StudyExperiment], label: str) -> list[StudyExperiment]:
    """Dependencies first, otherwise the order of the file; a cycle is an error."""
    done: list[StudyExperiment] = []
    waiting = list(experiments)
    while waiting:
        names = {e.name for e in done}
        ready = next((e for e in waiting if set(e.depends_on) <= names), None)
        if ready is None:
            cycle = ", ".join(e.name for e in waiting)
            raise ParamsError(f"{label}: the experiments {cycle} depend on each other in a cycle")
        done.append(ready)
        waiting.remove(ready)
    return done


def _groups(raw: Any, names: Sequence[str], label: str) -> list[ReportGroup]:
    if raw is None:
        return [ReportGroup("all", "All experiments", tuple(names), copy.deepcopy(DEFAULT_RADII))]
    raw = _mapping(raw, f"{label}: report")
    unknown = sorted(set(raw) - {"groups", "reference"}, key=str)
    if unknown:
        raise ParamsError(f"{label}: unknown key 'report.{unknown[0]}' (valid keys: groups, reference)")
    items = raw.get("groups")
    if not isinstance(items, list) or not items:
        raise ParamsError(f"{label}: report.groups must be a non-empty list of groups")
    groups = []
    for i, item in enumerate(items):
        where = f"{label}: report.groups[{i}]"
        item = _mapping(item, where)
        unknown = sorted(set(item) - set(_GROUP_KEYS), key=str)
        if unknown:
            raise ParamsError(f"{where}: unknown key '{unknown[0]}' (valid keys: {', '.join(_GROUP_KEYS)})")
        name = item.get("name")
        if not isinstance(name, str) or not re.fullmatch(_NAME, name):
            raise ParamsError(f"{where}.name must be a name of letters, digits, '_', '.' and '-', got {name!r}")
        patterns = item.get("experiments", ["*"])
        if not isinstance(patterns, list) or not patterns:
            raise ParamsError(f"{where}.experiments must be a non-empty list of names or glob patterns")
        members: list[str] = []
        for pattern in patterns:
            matched = [n for n in names if fnmatch.fnmatchcase(n, str(pattern))]
            if not matched:
                raise ParamsError(f"{where}.experiments: {pattern!r} matches no experiment ({', '.join(names)})")
            members += [n for n in matched if n not in members]
        radii = _mapping(item.get("radii", DEFAULT_RADII), f"{where}.radii")
        for norm, values in radii.items():
            ok = isinstance(values, list) and values and all(
                isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in values)
            if norm not in NORM_LABELS or not ok:
                raise ParamsError(f"{where}.radii must map norms ({', '.join(NORM_LABELS)}) to non-empty lists of "
                                  f"radii >= 0, got {norm!r}: {values!r}")
        groups.append(ReportGroup(name, str(item.get("title", name)), tuple(members),
                                  {k: [float(v) for v in vals] for k, vals in radii.items()}))
    if len({g.name for g in groups}) != len(groups):
        raise ParamsError(f"{label}: report.groups repeat a group name")
    return groups


#: Columns of a ``report.reference`` CSV: published certified accuracy (a fraction) of an experiment
#: (its name or label) at an l2 radius, and where the number comes from.
REFERENCE_COLUMNS = ("experiment", "radius", "accuracy", "source")


def _reference(raw: Any, path: Path, experiments: Sequence[StudyExperiment], label: str,
               check: bool = True) -> str | None:
    """``report.reference``: a CSV of published numbers, relative to the study file; read and checked
    now unless ``check`` is false."""
    value = (raw or {}).get("reference") if isinstance(raw, Mapping) else None
    if value is None:
        return None
    where = f"{label}: report.reference"
    if not isinstance(value, str):
        raise ParamsError(f"{where} must be the path of a CSV file (relative to the study file), got {value!r}")
    csv = (path.parent / value).resolve()
    if not check:
        return str(csv)
    try:
        table = pd.read_csv(csv)
    except (OSError, ValueError) as err:
        raise ParamsError(f"{where}: cannot read {csv} ({err}); give a CSV with columns "
                          f"{', '.join(REFERENCE_COLUMNS)}") from None
    missing = [c for c in REFERENCE_COLUMNS if c not in table.columns]
    if missing:
        raise ParamsError(f"{where}: {csv} lacks the column(s) {', '.join(missing)} "
                          f"(expected {', '.join(REFERENCE_COLUMNS)})")
    known = {e.name for e in experiments} | {e.label for e in experiments}
    unknown = sorted(set(table["experiment"].astype(str)) - known)
    if unknown:
        raise ParamsError(f"{where}: {csv} names {unknown[0]!r}, which is no experiment name or label of the study")
    return str(csv)


def _plots(raw: Any, experiments: Sequence[StudyExperiment], label: str) -> tuple[str, ...]:
    if raw is None:
        stages = {s for e in experiments for s in e.experiment.stages}
        return tuple(p for p in PLOTS if PLOT_INPUT[p] in stages)
    if not isinstance(raw, list) or any(p not in PLOTS for p in raw):
        raise ParamsError(f"{label}: plots must be a list of {', '.join(PLOTS)}, got {raw!r}")
    return tuple(dict.fromkeys(raw))


def _salts(experiments: Sequence[StudyExperiment]) -> dict[str, str]:
    """Per experiment: a digest of the training of every sibling it reads a checkpoint from."""
    salts: dict[str, str] = {}
    for e in experiments:  # dependency order: a sibling's salt is known before it is needed
        parts = {}
        for dep in e.depends_on:
            sibling = next(s for s in experiments if s.name == dep)
            parts[dep] = sibling.experiment.stage_digest("train", salts[dep])
        text = json.dumps(parts, sort_keys=True)
        salts[e.name] = hashlib.sha256(text.encode()).hexdigest() if parts else ""
    return salts


def _check_overrides_keep_sweeps(raw: Mapping[str, Any], overrides: Mapping[str, Any], label: str) -> None:
    """An override may not replace a swept key: the sweep's names and labels would lie."""
    swept = {key for sweep in raw.get("sweeps") or [] for key in sweep["over"]}
    for key in overrides:
        clash = next((k for k in sorted(swept) if k == key or k.startswith(key + ".")), None)
        if clash is not None:
            raise ParamsError(f"{label}: override '{key}' would replace the sweep over '{clash}' (the experiments' "
                              "names and labels come from it); edit the sweep in the study file instead")


def load(path: str | os.PathLike[str], **overrides: Any) -> Study:
    """Read, expand (sweeps), override and validate a study file.

    ``overrides`` (dotted keys) apply to every experiment that has, or whose stages need, the
    section; an override that concerns no experiment is an error.
    """
    path = Path(path)
    label = str(path)
    raw = params.read_yaml_mapping(path)
    unknown = sorted(set(raw) - set(_TOP_KEYS), key=str)
    if unknown:
        raise ParamsError(f"{label}: unknown key '{unknown[0]}' (valid keys of a study: {', '.join(_TOP_KEYS)})")
    name = _study_name(raw, label)
    entries = list(_entries(raw, label))
    _check_overrides_keep_sweeps(raw, overrides, label)
    used: set[str] = set()
    validated = []
    for exp_name, title, exp_raw, where in entries:
        exp_raw, applied = _override_experiment({**exp_raw, "experiment": exp_name}, overrides, where)
        used |= applied
        validated.append((exp_name, title, params.validate(exp_raw, source=path, label=where), where))
    unused = sorted(set(overrides) - used)
    if unused and entries:  # without experiments, _assemble says so
        raise ParamsError(f"{label}: override '{unused[0]}' concerns no experiment of the study")
    return _assemble(name, raw, validated, label, path)


def _assemble(name: str, raw: Mapping[str, Any], validated: Sequence[tuple[str, str, params.Experiment, str]],
              label: str, source: Path, folder: Path | None = None) -> Study:
    """The study of validated experiments (name, label, parameters, where in the file): their
    dependencies and order, the report and the plots. ``folder``: read back from a study folder
    (``load_written``), whose ``report.reference`` is kept as a path and not read again."""
    if not validated:
        raise ParamsError(f"{label}: the study has no experiments (add 'experiments' or 'sweeps')")
    names = [n for n, *_ in validated]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ParamsError(f"{label}: experiment name {repeated[0]!r} is used twice (names are output folders)")
    experiments = [StudyExperiment(n, title, exp, _dependencies(exp, names, where))
                   for n, title, exp, where in validated]
    for e in experiments:
        for dep in e.depends_on:
            if "train" not in next(s for s in experiments if s.name == dep).experiment.stages:
                raise ParamsError(f"{label}: experiment '{e.name}' reads the checkpoint of '{dep}', "
                                  f"which has no train stage")
    ordered = _order(experiments, label)
    report = raw.get("report")
    return Study(name, str(raw.get("description", "")), ordered, _groups(report, names, label),
                 _plots(raw.get("plots"), ordered, label), source, _salts(ordered),
                 _reference(report, source, ordered, label, check=folder is None), folder)


_RUN_FIRST = "run `rslib run <study yaml>` first"


def load_written(folder: str | os.PathLike[str]) -> Study:
    """The study a run wrote into its folder (``study.json``; ``folder`` may also be the file itself).

    Read back like a study file: every experiment's parameters through ``params.validate``, the
    report groups and plots through the same checks, dependencies, order and salts derived again;
    ``report.reference`` stays a path (a CSV gone since is noted where the tables are drawn).
    FileNotFoundError when the file is missing; ParamsError naming the file and the fix when it is
    corrupt or malformed.
    """
    path = Path(folder)
    path = (path if path.name == layout.STUDY_FILE and not path.is_dir() else path / layout.STUDY_FILE).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no {layout.STUDY_FILE} in {path.parent}: this is not a finished study folder; "
                                f"{_RUN_FIRST} (it writes {layout.STUDY_FILE} beside the experiment folders)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ParamsError(f"{path} is corrupt ({err}); {_RUN_FIRST} (again) to rewrite it") from None
    label = str(path)
    try:
        raw = _mapping(raw, f"{label}: the top level")
        name = _study_name(raw, label)
        validated = []
        for i, entry in enumerate(_list(raw, "experiments", label)):
            where = f"{label}: experiments[{i}]"
            entry = _mapping(entry, where)
            exp = params.validate(_mapping(entry.get("params"), f"{where}.params"), label=f"{where}.params")
            for key in ("name", "dir"):  # an experiment's folder is its name
                if entry.get(key, exp.experiment) != exp.experiment:
                    raise ParamsError(f"{where}.{key} {entry[key]!r} is not params.experiment {exp.experiment!r}")
            validated.append((exp.experiment, str(entry.get("label", exp.experiment)), exp,
                              f"{where} ('{exp.experiment}')"))
        return _assemble(name, raw, validated, label, path, path.parent)
    except ParamsError as err:
        raise ParamsError(f"{err}; the file is damaged or was not written by this rslib: {_RUN_FIRST} (again) "
                          "to rewrite it") from None


# --------------------------------------------------------------------------- sharding


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/3"`` -> (2, 3): the second of three shards (1-based)."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = 0
    if not sep or n < 1 or not 1 <= i <= n:
        raise ParamsError(f"--shard {text!r} must be i/n with 1 <= i <= n, e.g. --shard 1/4")
    return i, n


def shard_of(study: Study, count: int) -> dict[str, int]:
    """Shard (1-based) of every experiment: dependency chains stay together, stages balanced greedily."""
    return partition(study.experiments, count)


def partition(experiments: Sequence[StudyExperiment], count: int) -> dict[str, int]:
    """Part (1-based, of ``count``) of every experiment: dependency chains among ``experiments`` stay in
    one part, and parts are balanced greedily by number of stages."""
    parent = {e.name: e.name for e in experiments}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for e in experiments:
        for dep in e.depends_on:
            if dep in parent:
                parent[root(e.name)] = root(dep)
    components: dict[str, list[StudyExperiment]] = {}
    for e in experiments:
        components.setdefault(root(e.name), []).append(e)
    load = [0] * count
    assignment = {}
    for members in sorted(components.values(), key=lambda m: -sum(len(e.experiment.stages) for e in m)):
        target = load.index(min(load))
        load[target] += sum(len(e.experiment.stages) for e in members)
        assignment.update({e.name: target + 1 for e in members})
    return assignment


# --------------------------------------------------------------------------- running


@dataclass
class StudyReport:
    """Outcome of a study run: one report per experiment (None: not run) and the plot notebooks."""

    study: str
    output_dir: Path
    experiments: dict[str, runner.RunReport | None] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)
    held: dict[str, str] = field(default_factory=dict)
    plots: runner.RunReport | None = None
    plots_note: str = ""

    @property
    def ok(self) -> bool:
        """True when every experiment of this run and the plots ran or were skipped as finished."""
        reports = [r for r in self.experiments.values() if r is not None]
        return (not self.blocked and not self.held and all(r.ok for r in reports)
                and (self.plots is None or self.plots.ok))


def study_dir(study: Study, output_root: str | os.PathLike[str] = "outputs") -> Path:
    """Absolute ``<output_root>/<study>``."""
    return layout.study_dir(study.name, output_root)


def all_finished(study: Study, out: Path, notebooks_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether every stage of every experiment of the study has finished with its current parameters."""
    return all(
        p.action == "skip"
        for e in study.experiments
        for p in runner.plan(e.experiment, None, False, out, notebooks_dir, study.salts[e.name])
    )


def _plots_digest(study: Study, out: Path) -> str:
    """Changes when the report settings or any experiment's finished results change."""
    results = {}
    for e in study.experiments:
        for stage in e.experiment.stages:
            marker = runner.read_marker(out / e.name, stage) or {}
            results[f"{e.name}:{stage}"] = [marker.get("digest"), marker.get("finished_at")]
    data = {"study": study.to_dict(), "results": results}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def plan_plots(study: Study, out: Path, force: bool = False,
               notebooks_dir: str | os.PathLike[str] | None = None) -> list[runner.PlannedStage]:
    """Run or skip each plot notebook of the study."""
    digest = _plots_digest(study, out)
    return [runner.plan_stage(name, runner.stage_notebook(name, notebooks_dir), out, digest, force) for name in study.plots]


def _stage_filter(only: Sequence[str] | None, exp: params.Experiment) -> list[str] | None:
    return None if only is None else [s for s in exp.stages if s in only]


def check_only(study: Study, only: Sequence[str] | None) -> None:
    """Every ``--only`` name must be a stage of some experiment, a plot notebook or 'plots'."""
    if only is None:
        return
    if not only:
        raise ParamsError("only: no stage names given")
    known = {s for e in study.experiments for s in e.experiment.stages} | set(study.plots) | {"plots"}
    for name in only:
        if name not in known:
            raise ParamsError(f"only: {name!r} is not a stage of study '{study.name}' ({', '.join(sorted(known))})")


def format_plan(study: Study, out: Path, only: Sequence[str] | None = None, force: bool = False,
                notebooks_dir: str | os.PathLike[str] | None = None, shards: int = 1) -> str:
    """What a run would do: every experiment's stages, its shard, and the plot notebooks."""
    check_only(study, only)
    shard = shard_of(study, shards)
    lines = [f"study '{study.name}' -> {out} ({len(study.experiments)} experiments)"]
    for e in study.experiments:
        stages = _stage_filter(only, e.experiment)
        if stages == []:
            continue
        planned = runner.plan(e.experiment, stages, force, out, notebooks_dir, study.salts[e.name])
        extra = f" [shard {shard[e.name]}/{shards}]" if shards > 1 else ""
        needs = f" (needs {', '.join(e.depends_on)})" if e.depends_on else ""
        lines.append(f"  {e.name}{extra}{needs}: " + ", ".join(f"{p.name} {p.action}" for p in planned))
    if only is None or "plots" in only or set(only) & set(study.plots):
        plotted = plan_plots(study, out, force, notebooks_dir)
        lines.append("  plots: " + (", ".join(f"{p.name} {p.action}" for p in plotted) or "none"))
    return "\n".join(lines)


def _write_study_files(study: Study, out: Path) -> Path:
    """``study.yaml`` (the plot notebooks' parameters), ``study.json`` and ``provenance.json``."""
    for sub in layout.SUBFOLDERS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    resolved = study.to_dict()
    header = f"# Resolved study {study.source}, written by rslib run.\n"
    params_file = out / layout.STUDY_PARAMS_FILE
    atomic_write_text(params_file, header + yaml.safe_dump(resolved, sort_keys=False))
    atomic_write_json(out / layout.STUDY_FILE, {**resolved, "provenance": provenance()})
    atomic_write_json(out / layout.PROVENANCE_FILE, provenance())
    return params_file


def run_study(
    study: Study,
    only: Sequence[str] | None = None,
    force: bool = False,
    output_root: str | os.PathLike[str] = "outputs",
    notebooks_dir: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] = (1, 1),
    log: Callable[[str], None] = print,
    progress: bool = False,
    lock: runner.LockPolicy = runner.REFUSE,
    jobs: int = 1,
) -> StudyReport:
    """Run the study's experiments (those of ``shard``) in dependency order, then its plots.

    A failed experiment does not stop the others; experiments that need its model, when its training
    did not finish, are reported as blocked. An experiment another run holds (``rslib.pipeline.locks``) is
    left to that run and reported in ``held`` (``lock.wait``: waited for, then its finished stages
    are skipped). The plot notebooks run, under the study folder's lock, when this call covers the
    whole study (no shard) or when every experiment of the study has finished (the last shard to
    finish draws them; a shard that finds another one drawing them leaves it to that one).

    ``jobs > 1`` runs that many experiments at once, each as soon as its dependencies have run (see
    :func:`run_when_ready`), each stage notebook with ``torch`` limited to ``cpu_count // jobs`` threads
    (``OMP_NUM_THREADS``, unless set): on a CPU, kernel start-up and imports of one experiment overlap the
    computation of the other without the two oversubscribing the cores.
    """
    check_only(study, only)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1; got {jobs!r}")
    out = study_dir(study, output_root)
    params_file = _write_study_files(study, out)
    mine = shard_of(study, shard[1])
    report = StudyReport(study.name, out)
    selected = [e for e in study.experiments if mine[e.name] == shard[0]]
    numbers = {e.name: number for number, e in enumerate(selected, 1)}
    without_model: set[str] = set()  # experiments whose training did not finish

    def run(e: StudyExperiment) -> None:
        stages = _stage_filter(only, e.experiment)
        if stages == []:
            return
        log(f"[{numbers[e.name]}/{len(selected)}] experiment '{e.name}' ({e.label})")
        _run_one(study, e, stages, force, out, notebooks_dir, log, progress, lock, report, without_model)

    workers = min(jobs, len(selected) or 1)
    if workers <= 1:
        for e in selected:
            run(e)
    else:
        with _threads_per_job(workers):
            run_when_ready(selected, workers, run)
    if only is not None and "plots" not in only and not set(only) & set(study.plots):
        return report
    if not study.plots:
        return report
    try:
        with lock.lock(out, log):
            _draw_plots(study, report, only, force, notebooks_dir, shard, params_file, log, progress)
    except LockHeld as held:
        report.plots_note = f"the plots are left to another run, which is drawing them: {held.holder.describe()}"
        log(report.plots_note)
    return report


def run_when_ready(experiments: Sequence[StudyExperiment], workers: int,
                   run: Callable[[StudyExperiment], None]) -> None:
    """Call ``run`` on every experiment from ``workers`` threads at once, each taking the first one (in
    study order) whose dependencies among ``experiments`` have been handled, so experiments that share a
    finished dependency run side by side. An exception in one stops the others from starting new ones
    and is raised once the running ones end."""
    names = {e.name for e in experiments}
    pending, handled = list(experiments), set()
    state = threading.Condition()
    stop = threading.Event()

    def next_ready() -> StudyExperiment | None:
        with state:
            while pending and not stop.is_set():
                ready = next((e for e in pending if all(d in handled or d not in names for d in e.depends_on)), None)
                if ready is not None:
                    pending.remove(ready)
                    return ready
                state.wait()
            return None

    def worker() -> None:
        while (e := next_ready()) is not None:
            try:
                run(e)
            except BaseException:
                stop.set()
                raise
            finally:
                with state:
                    handled.add(e.name)
                    state.notify_all()

    with ThreadPoolExecutor(workers, thread_name_prefix="lane") as pool:
        futures = [pool.submit(worker) for _ in range(workers)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            stop.set()   # no worker starts another experiment; running notebooks end with the interrupt
            with state:
                state.notify_all()
            raise


def _run_one(study: Study, e: StudyExperiment, stages: list[str] | None, force: bool, out: Path,
             notebooks_dir: str | os.PathLike[str] | None, log: Callable[[str], None], progress: bool,
             lock: runner.LockPolicy, report: StudyReport, without_model: set[str]) -> None:
    """Run one experiment's stages into ``report``, unless a dependency's training did not finish."""
    broken = [d for d in e.depends_on if d in without_model]
    if broken:
        report.blocked[e.name] = f"not run: it needs the model of '{broken[0]}', whose training did not finish"
        without_model.add(e.name)
        log(f"{e.name}: {report.blocked[e.name]}")
        return
    try:
        result = runner.run_experiment(e.experiment, stages, force, out, notebooks_dir, log,
                                       study.salts[e.name], f"Experiment '{e.name}' of study '{study.name}'",
                                       progress, lock)
    except LockHeld as held:
        report.held[e.name] = str(held)
        log(f"{e.name}: left to another run: {held}")
        if not _trained(e, out, notebooks_dir, study.salts[e.name]):
            without_model.add(e.name)
        return
    report.experiments[e.name] = result
    if any(r.name == "train" and r.status in ("failed", "not run") for r in result.stages):
        without_model.add(e.name)


@contextmanager
def _threads_per_job(jobs: int) -> Iterator[None]:
    """``OMP_NUM_THREADS = cpu_count // jobs`` for the kernels started inside (unless already set)."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


def _trained(e: StudyExperiment, out: Path, notebooks_dir: str | os.PathLike[str] | None, salt: str) -> bool:
    """Whether the experiment has no train stage or its training finished with the current parameters."""
    planned = runner.plan(e.experiment, None, False, out, notebooks_dir, salt)
    return all(p.action == "skip" for p in planned if p.name == "train")


def _draw_plots(study: Study, report: StudyReport, only: Sequence[str] | None, force: bool,
                notebooks_dir: str | os.PathLike[str] | None, shard: tuple[int, int], params_file: Path,
                log: Callable[[str], None], progress: bool) -> None:
    """Run the plot notebooks that are not up to date (caller holds the study folder's lock)."""
    out = report.output_dir
    if shard[1] > 1 and not all_finished(study, out, notebooks_dir):
        report.plots_note = (f"plots wait for the other shards: once all have finished, run "
                             f"`rslib run {study.source} --only plots`")
        log(report.plots_note)
        return
    plotted = plan_plots(study, out, force, notebooks_dir)
    if only is not None and "plots" not in only:
        plotted = [p for p in plotted if p.name in only]
    report.plots = runner.RunReport(f"{study.name} (plots)", out)
    for stage in plotted:  # each plot notebook is independent: one failing does not stop the other
        runner.execute_stages([stage], out, params_file, report.plots, log, progress)


def produced_files(out: Path) -> list[Path]:
    """The study's figures (PNG) and tables (CSV), for the final summary."""
    return sorted([*out.glob(f"{layout.FIGURES}/*.png"), *out.glob(f"{layout.RESULTS}/*.csv")])
