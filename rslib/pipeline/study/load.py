"""Reading a study: the study file (defaults, listed experiments, sweeps, overrides, report) or the
``study.json`` a run wrote, with the same validation; dependencies, order and sibling salts derived."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import itertools
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import yaml

from rslib.core.noises import NORM_LABELS
from rslib.pipeline import layout, params
from rslib.pipeline.schema import ParamsError, apply_overrides, read_yaml_mapping
from rslib.pipeline.stage import STAGES, study_stages
from rslib.pipeline.study.spec import DEFAULT_RADII, ReportGroup, Study, StudyExperiment
from rslib.util.digest import digest

_TOP_KEYS = ("study", "description", "defaults", "experiments", "sweeps", "report", "plots")
_SWEEP_KEYS = ("name", "label", "over", "base")
_GROUP_KEYS = ("name", "title", "experiments", "radii")
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"


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


def _name(value: Any, what: str) -> str:
    """``value`` when it is a valid study or group name (an output file name part); ParamsError otherwise."""
    if not isinstance(value, str) or not re.fullmatch(_NAME, value):
        raise ParamsError(f"{what} must be a name of letters, digits, '_', '.' and '-', got {value!r}")
    return value


def _no_unknown_keys(raw: Mapping[str, Any], valid: Sequence[str], where: str, prefix: str = "", of: str = "") -> None:
    """ParamsError naming the first unknown key of ``raw`` (sorted) and the valid ones."""
    unknown = sorted(set(raw) - set(valid), key=str)
    if unknown:
        raise ParamsError(f"{where}: unknown key '{prefix}{unknown[0]}' (valid keys{of}: {', '.join(valid)})")


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
        _no_unknown_keys(sweep, _SWEEP_KEYS, where)
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
    header keys (``seed``, ``device``, ...) apply to every experiment."""
    stages = raw.get("stages")
    needed = {s for stage in (stages if isinstance(stages, list) else []) if isinstance(stage, str)
              and stage in STAGES for s in STAGES[stage].requires}
    used = set()
    for key, value in overrides.items():
        head = key.split(".")[0]
        if head == "experiment":
            raise ParamsError(f"{where}: override '{key}' cannot rename study experiments")
        if "." in key and head not in raw and head not in needed:
            continue
        raw = apply_overrides(raw, {key: value}, where)
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
            raise ParamsError(f"{where}: {section}.{key} {reference!r} is neither a .pt checkpoint nor an experiment "
                              f"of this study ({', '.join(names)})")
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
    _no_unknown_keys(raw, ("groups", "reference"), label, prefix="report.")
    items = raw.get("groups")
    if not isinstance(items, list) or not items:
        raise ParamsError(f"{label}: report.groups must be a non-empty list of groups")
    groups = []
    for i, item in enumerate(items):
        where = f"{label}: report.groups[{i}]"
        item = _mapping(item, where)
        _no_unknown_keys(item, _GROUP_KEYS, where)
        name = _name(item.get("name"), f"{where}.name")
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
        return tuple(p for p in study_stages() if set(STAGES[p].reads) & stages)
    if not isinstance(raw, list) or any(p not in study_stages() for p in raw):
        raise ParamsError(f"{label}: plots must be a list of {', '.join(study_stages())}, got {raw!r}")
    return tuple(dict.fromkeys(raw))


def _salts(experiments: Sequence[StudyExperiment]) -> dict[str, str]:
    """Per experiment: a digest of the training of every sibling it reads a checkpoint from."""
    salts: dict[str, str] = {}
    for e in experiments:  # dependency order: a sibling's salt is known before it is needed
        parts = {}
        for dep in e.depends_on:
            sibling = next(s for s in experiments if s.name == dep)
            parts[dep] = sibling.experiment.stage_digest("train", salts[dep])
        salts[e.name] = digest(parts, spaced=True) if parts else ""
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
    section; an override that concerns no experiment is an error."""
    path = Path(path)
    label = str(path)
    raw = read_yaml_mapping(path)
    _no_unknown_keys(raw, _TOP_KEYS, label, of=" of a study")
    name = _name(raw.get("study"), f"{label}: study")
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


_RUN_FIRST = "run the study first (`rslib run` on its YAML file, e.g. `make demo` for params/demo.yaml)"


def load_written(folder: str | os.PathLike[str]) -> Study:
    """The study a run wrote into its folder (``study.json``; ``folder`` may also be the file itself).

    Read back like a study file: every experiment's parameters through ``params.validate``, the
    report groups and plots through the same checks, dependencies, order and salts derived again;
    ``report.reference`` stays a path (a CSV gone since is noted where the tables are drawn).
    FileNotFoundError when the file is missing; ParamsError naming the file and the fix when it is
    corrupt or malformed."""
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
        name = _name(raw.get("study"), f"{label}: study")
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


def load_experiment_folder(folder: str | os.PathLike[str]) -> Study:
    """One finished experiment folder (``rslib run`` or the stage notebooks run by hand) viewed as a study of
    one experiment, so the plot stages can show it: its parameters from ``params.yaml`` (written by
    ``rslib run``), else from the metadata its certify or attack stage wrote; the plots go into the folder.
    FileNotFoundError saying what to run when it holds neither."""
    path = Path(folder).resolve()
    sources = [path / layout.PARAMS_FILE, *(layout.table_paths(layout.results_dir(path), table)[1]
                                            for table in (layout.CERTIFY_TABLE, "attack"))]
    for source in sources:
        raw = read_yaml_mapping(source) if source.suffix == ".yaml" and source.is_file() else None
        if raw is None and source.is_file():
            raw = (json.loads(source.read_text(encoding="utf-8")) or {}).get("params")
        if isinstance(raw, dict):
            exp = params.validate(raw, source=source, label=str(source))
            study = _assemble(exp.experiment, {}, [(exp.experiment, exp.experiment, exp, str(source))], str(source),
                              source, path.parent)
            return dataclasses.replace(study, out_dir=path)
    raise FileNotFoundError(
        f"no finished experiment in {path}: run the stage notebooks first (notebooks/train.ipynb, then "
        f"certify.ipynb and attack.ipynb, which write it), or `rslib run <its params file>`")
