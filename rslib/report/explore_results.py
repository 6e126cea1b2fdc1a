"""The results browser (``notebooks/results_browser.ipynb``): every finished experiment and study on disk.

:func:`discover` finds experiment folders ``<root>/<name>/`` or ``<root>/<study>/<name>/`` holding
``results/certify.csv`` (published only when every row is in; unfinished ones are listed apart) and study
folders (``study.json``). :class:`ResultsBrowser` overlays their certified-accuracy curves (with a study's
published reference), filters the per-image certify table, and shows one image: noisy draws of the
experiment's noise, its recorded counts, p_A lower bound and radii, and an adversarial example recomputed
with the registered attack and the experiment's attack options. Every view is cached per selection.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
import yaml
from IPython.display import Markdown, clear_output, display
from matplotlib.figure import Figure

from rslib.core import metrics
from rslib.core.attacks import ATTACKS
from rslib.core.noises import NORM_LABELS
from rslib.nn import checkpoints
from rslib.nn.data import DATASETS, batch_of, load_dataset
from rslib.pipeline import inputs, layout
from rslib.pipeline.params import Experiment
from rslib.pipeline.stages import attack as attack_stage
from rslib.pipeline.stages import certify as certify_stage
from rslib.pipeline.study import Study, StudyExperiment, load_experiment_folder, load_written
from rslib.report import plots
from rslib.report.explore_noise import png, show_mosaic, single_thread
from rslib.report.results import reference_rows, what_to_run

OUTCOMES = ("all", "correct", "wrong", "abstain")
TARGETS = ("base", "smoothed")
DRAWS = 6
SHOWN_ROWS = 15
TABLE_COLUMNS = ["idx", "label", "prediction", "correct", "count_top", "count_second", "n0", "n", "prob_lb"]


def nothing_yet(root: str | os.PathLike[str]) -> str:
    """What to run, in notebook terms, when ``root`` holds no finished experiment."""
    return f"**Nothing to browse yet:** no finished experiment under `{Path(root).resolve()}`. {what_to_run()}."


@dataclass(frozen=True)
class Entry:
    """One finished experiment: its key (folder relative to the root), folder and study (a lone experiment
    is a study of one)."""

    key: str
    folder: Path
    study: Study = field(compare=False)
    name: str

    @property
    def exp(self) -> StudyExperiment:
        return self.study.get(self.name)

    @property
    def experiment(self) -> Experiment:
        return self.exp.experiment

    @property
    def results(self) -> Path:
        return layout.results_dir(self.folder)

    def attacks(self) -> list[str]:
        """The attacks with a finished table (``attack_<name>.csv``), 'best' left out."""
        names = attack_stage.attack_names_present(self.results)
        return [n for n in names if n in ATTACKS]

    def describe(self) -> str:
        train = f", {self.exp.train_mode}" if self.exp.train_mode else ""
        return f"{self.key}: {self.exp.noise_label} sigma={self.exp.sigma:g}{train}"


@dataclass
class Discovery:
    """What :func:`discover` found under ``root``."""

    root: Path
    entries: dict[str, Entry] = field(default_factory=dict)
    studies: dict[str, Study] = field(default_factory=dict)
    unfinished: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph: how many experiments and studies, what was left out and why."""
        lone = sum(1 for e in self.entries.values() if e.study.dir is None)
        text = (f"{self.root}: {len(self.entries)} finished experiments ({lone} on their own, the others in "
                f"{len(self.studies)} studies: {', '.join(self.studies) or 'none'})")
        if self.unfinished:
            text += f"; {len(self.unfinished)} unfinished left out ({', '.join(p.name for p in self.unfinished)})"
        return "\n".join([text, *self.notes])


def _finished(folder: Path) -> bool:
    return layout.table_paths(layout.results_dir(folder), layout.CERTIFY_TABLE)[0].is_file()


def _wants_certify(folder: Path) -> bool:
    """Whether ``folder`` is an experiment meant to be certified: certify rows are being written, or its
    ``params.yaml`` lists the certify stage."""
    if layout.partial_files(layout.results_dir(folder), layout.CERTIFY_TABLE):
        return True
    try:
        raw = yaml.safe_load((folder / layout.PARAMS_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "certify" in (raw.get("stages") or [])


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def discover(root: str | os.PathLike[str]) -> Discovery:
    """Every finished experiment under ``root`` (itself, its subfolders, and the experiments of study folders
    and of plain folders one level down), keyed by folder relative to ``root``; never raises for a damaged
    folder (noted instead)."""
    root = Path(root).resolve()
    found = Discovery(root)
    if not root.is_dir():
        found.notes.append(f"note: {root} is not a folder")
        return found

    def key(folder: Path) -> str:
        return folder.relative_to(root).as_posix() if folder != root else root.name

    def lone(folder: Path) -> None:
        if not _finished(folder):
            if _wants_certify(folder):
                found.unfinished.append(folder)
            return
        try:
            study = load_experiment_folder(folder)
        except (OSError, ValueError) as err:
            found.notes.append(f"note: {key(folder)} left out: {err}")
            return
        name = study.experiments[0].name
        found.entries[key(folder)] = Entry(key(folder), folder, dataclasses.replace(study, dir=None), name)

    def study_folder(folder: Path) -> None:
        try:
            study = load_written(folder)
        except (OSError, ValueError) as err:
            found.notes.append(f"note: study {key(folder)} left out: {err}")
            return
        found.studies[study.name] = study
        for exp in study.experiments:
            sub = folder / exp.name
            if _finished(sub):
                found.entries[key(sub)] = Entry(key(sub), sub, study, exp.name)
            elif "certify" in exp.experiment.stages:
                found.unfinished.append(sub)

    for folder in [root, *_subfolders(root)]:
        if (folder / layout.STUDY_FILE).is_file():
            study_folder(folder)
        elif _finished(folder) or _wants_certify(folder) or (folder / layout.PARAMS_FILE).is_file():
            lone(folder)
        elif folder != root:
            for sub in _subfolders(folder):
                lone(sub)
    return found


# --------------------------------------------------------------------------- tables and curves


def outcome_of(table: pd.DataFrame) -> pd.Series:
    """Per row: 'correct' (certified, label in the selection), 'abstain' (prediction -1) or 'wrong'."""
    correct = table["correct"].fillna(False).astype(bool)
    abstain = table["prediction"] == -1
    return pd.Series(np.where(correct, "correct", np.where(abstain, "abstain", "wrong")), index=table.index)


def filter_rows(table: pd.DataFrame, label: int | None = None, outcome: str = "all",
                radius: tuple[float, float] | None = None, norm: str = "l2") -> pd.DataFrame:
    """Rows of a certify table with that ``label`` (None: any), ``outcome`` (:data:`OUTCOMES`) and a
    ``norm`` radius in the closed interval ``radius`` (None: any)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}; got {outcome!r}")
    keep = pd.Series(True, index=table.index)
    if label is not None:
        keep &= table["label"] == label
    if outcome != "all":
        keep &= outcome_of(table) == outcome
    if radius is not None:
        column = table[f"radius_{norm}"]
        keep &= (column >= radius[0]) & (column <= radius[1])
    return table[keep.fillna(False).astype(bool)]


def overlay_curves(tables: Mapping[str, pd.DataFrame], norm: str) -> pd.DataFrame:
    """Certified accuracy against the ``norm`` radius of each table (``metrics.accuracy_curves``), with a
    column ``experiment`` (the key)."""
    parts = [metrics.accuracy_curves(table, [norm]).assign(experiment=key) for key, table in tables.items()]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def published(entries: Sequence[Entry], log: Callable[[str], None] = print) -> pd.DataFrame:
    """The study's published certified accuracies (l2) of each entry that has some, keyed by entry."""
    parts = [reference_rows(e.study, [e.name], log).assign(experiment=e.key) for e in entries
             if e.study.reference is not None]
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["experiment", "radius", "accuracy"])


def curves_figure(curves: pd.DataFrame, reference: pd.DataFrame, norm: str, labels: Mapping[str, str]) -> Figure:
    """Certified accuracy (steps) per experiment; published numbers (l2) as dotted markers of its colour."""
    plots.style()
    fig = Figure(figsize=(10.5, 4.0))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.07, right=0.56, bottom=0.13, top=0.92)
    colors = plots.noise_palette(list(dict.fromkeys(curves["experiment"])))
    for key, line in curves.groupby("experiment", sort=False):
        via = sorted(set(line["source"].iloc[0].split(",")) - {norm})
        name = labels[key] + (f" [from {', '.join(via)}]" if via else "")
        ax.plot(line["radius"], line["certified_accuracy"], drawstyle="steps-pre", lw=1.8, color=colors[key],
                label=name)
        ref = reference[reference["experiment"] == key] if norm == "l2" else reference.iloc[:0]
        if not ref.empty:
            ax.plot(ref["radius"], ref["accuracy"], ls=":", marker="o", color=colors[key], label=f"{name}: published")
    ax.set(xlabel=f"{norm} radius", ylabel="certified accuracy", ylim=(0, 1.02), xlim=(0, None),
           title=f"certified accuracy, {norm} adversary (abstains count as failures)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    return fig


# --------------------------------------------------------------------------- one image


def checkpoint_of(entry: Entry) -> Path:
    """The model the experiment certified: ``certify.checkpoint`` resolved from its folder, else the path its
    ``certify.json`` recorded; FileNotFoundError naming both when neither exists."""
    path = layout.resolve_checkpoint(entry.experiment.certify.checkpoint, entry.folder)
    if path.is_file():
        return path
    meta = certify_stage.read_results(entry.folder)[1]
    recorded = Path((meta.get("checkpoint") or {}).get("path") or path)
    if recorded.is_file():
        return recorded
    raise FileNotFoundError(f"no checkpoint at {path} (nor at {recorded}): the model is gone")


def noisy_draws(entry: Entry, x: torch.Tensor, idx: int, draws: int = DRAWS) -> torch.Tensor:
    """``draws`` samples of ``x + delta`` (x: one image (1, C, H, W)) with the experiment's noise, seeded by
    the experiment's seed and the image index."""
    noise = inputs.experiment_noise(entry.experiment)
    generator = torch.Generator().manual_seed(entry.experiment.seed * 1_000_003 + idx)
    return noise.sample(x.expand(draws, *x.shape[1:]).contiguous(), generator=generator)


@dataclass(frozen=True)
class Adversarial:
    """An attack recomputed on one image."""

    attack: str
    target: str
    norm: str
    x_adv: torch.Tensor
    success: bool
    distance: float
    seconds: float


def adversarial(entry: Entry, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, idx: int, attack: str,
                target: str = "base") -> Adversarial:
    """The registered ``attack`` with the experiment's attack options on one image, against the base model
    or the smoothed classifier (``target``), seeded by the experiment's seed and the image index."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
    spec = dataclasses.replace(entry.experiment.attack, target=target)
    noise = inputs.experiment_noise(entry.experiment)
    num_classes = DATASETS[entry.experiment.data.dataset].num_classes
    tic = time.perf_counter()
    result = attack_stage.attack_batch(attack, model, x, y, spec, noise, num_classes,
                                       entry.experiment.seed * 1_000_003 + idx)
    seconds = time.perf_counter() - tic
    norm = ATTACKS[attack].norm_of(spec.options(attack))
    return Adversarial(attack, target, norm, result.x_adv.detach(), bool(result.success[0]),
                       float(getattr(result, norm)[0]), seconds)


def recorded_attack(entry: Entry, attack: str, idx: int) -> pd.Series | None:
    """The attack stage's row of image ``idx`` in ``attack_<attack>.csv`` (None when it was not attacked)."""
    rows = attack_stage.read_table(attack_stage.result_path(entry.results, attack))
    match = rows[rows["idx"] == idx]
    return match.iloc[0] if len(match) else None


def _radii_text(row: pd.Series) -> str:
    via = {n: row.get(f"source_{n}", n) for n in NORM_LABELS}
    return ", ".join(f"{n} {row[f'radius_{n}']:.4g}" + (f" (from {via[n]})" if via[n] not in (n, "none") else "")
                     for n in NORM_LABELS)


# --------------------------------------------------------------------------- the browser


class ResultsBrowser:
    """The browser's widgets and views over a :class:`Discovery`. ``widget()`` is the interactive UI (one
    ``interactive_output`` per section); ``show(section)`` displays one section statically at the current
    selection. Tables, models, datasets and rendered views are cached."""

    SECTIONS = ("curves", "table", "image", "attack")
    _NEEDS = {"curves": ("experiment", "compare", "norm"),
              "table": ("experiment", "label", "outcome", "radius", "norm"),
              "image": ("image",), "attack": ("image", "attack", "target")}

    def __init__(self, found: Discovery, experiment: str = "", image: int = -1) -> None:
        self.found = found
        self._cache: dict[tuple, Any] = {}
        self._busy = False
        self._outputs: dict[str, widgets.Output] = {}
        self.controls: dict[str, widgets.ValueWidget] = {}
        if not found.entries:
            return
        keys = list(found.entries)
        if experiment and experiment not in found.entries:
            raise KeyError(f"no finished experiment {experiment!r} under {found.root}; found: {', '.join(keys)}")
        first = experiment or next((k for k in keys if found.entries[k].attacks()), keys[0])
        entry = found.entries[first]
        siblings = [k for k in keys if found.entries[k].study is entry.study][:8]
        classes = max(DATASETS[e.experiment.data.dataset].num_classes for e in found.entries.values())
        slider = {"continuous_update": False, "style": {"description_width": "initial"}}
        self.controls = {
            "experiment": widgets.Dropdown(options=[(e.describe(), k) for k, e in found.entries.items()], value=first,
                                           description="experiment", layout=widgets.Layout(width="60%")),
            "compare": widgets.SelectMultiple(options=keys, value=siblings, rows=min(8, len(keys)),
                                              description="overlay", layout=widgets.Layout(width="60%")),
            "norm": widgets.ToggleButtons(options=list(NORM_LABELS), value="l2", description="norm"),
            "label": widgets.Dropdown(options=[("any", -1), *((str(c), c) for c in range(classes))], value=-1,
                                      description="class"),
            "outcome": widgets.ToggleButtons(options=list(OUTCOMES), value="all", description="outcome"),
            "radius": widgets.FloatRangeSlider(value=(0.0, 1.0), min=0.0, max=1.0, step=0.01, readout_format=".3g",
                                               description="radius", **slider),
            "image": widgets.Dropdown(description="image", layout=widgets.Layout(width="60%")),
            "attack": widgets.Dropdown(description="attack"),
            "target": widgets.ToggleButtons(options=list(TARGETS), value="base", description="attack target"),
        }
        self.controls["experiment"].observe(lambda _: self._experiment_changed(), "value")
        for name in ("label", "outcome", "radius", "norm"):
            self.controls[name].observe(lambda _: self._filters_changed(), "value")
        self._experiment_changed(image)

    # ------------------------------------------------------------------ cached data

    def entry(self, key: str | None = None) -> Entry:
        return self.found.entries[key or self.controls["experiment"].value]

    def table(self, key: str) -> pd.DataFrame:
        """The experiment's certify table (read once per file version)."""
        path = layout.table_paths(self.entry(key).results, layout.CERTIFY_TABLE)[0]
        return self._memo(("table", str(path), path.stat().st_mtime_ns), lambda: certify_stage.read_table(path))

    def _memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        return self._cache[key] if key in self._cache else self._cache.setdefault(key, make())

    def model(self, key: str) -> torch.nn.Module:
        return self._memo(("model", key), lambda: checkpoints.load(checkpoint_of(self.entry(key))))

    def image(self, key: str, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Test image ``idx`` of the experiment's dataset as a batch of one (CPU)."""
        data = self.entry(key).experiment.data
        dataset = self._memo(("dataset", data.dataset, str(data.data_dir), self.entry(key).experiment.seed),
                             lambda: load_dataset(data.dataset, "test", data_dir=data.data_dir,
                                                  seed=self.entry(key).experiment.seed))
        return batch_of(dataset, [idx], "cpu")

    # ------------------------------------------------------------------ keeping the controls consistent

    def _experiment_changed(self, image: int = -1) -> None:
        entry = self.entry()
        attacks = entry.attacks()
        with self._quiet():
            self.controls["attack"].options = [("none", f"{entry.key}|"), *((a, f"{entry.key}|{a}") for a in attacks)]
            self.controls["attack"].value = f"{entry.key}|{'ddn' if 'ddn' in attacks else next(iter(attacks), '')}"
            self.controls["target"].value = entry.experiment.attack.target if attacks else "base"
            self._filters_changed(image, reset_radius=True)

    def _filters_changed(self, image: int = -1, reset_radius: bool = False) -> None:
        """Fit the radius slider to the experiment and norm, and the image choices to the filtered rows
        (keeping the chosen image when it still matches); then redraw the image and attack views once."""
        entry, values = self.entry(), {k: c.value for k, c in self.controls.items()}
        with self._quiet():
            table, radius = self.table(entry.key), self.controls["radius"]
            top = float(table[f"radius_{values['norm']}"].max()) if len(table) else 0.0
            top = top if math.isfinite(top) and top > 0 else 1.0
            if reset_radius or radius.max != top:
                with radius.hold_trait_notifications():
                    radius.max, radius.step, radius.value = top, top / 100, (0.0, top)
            rows = self._filtered(entry.key, values["label"], values["outcome"], radius.value, values["norm"])
            outcome, norm = outcome_of(rows), values["norm"]
            options = [(f"idx {r.idx}: label {r.label}, {outcome[i]}, {norm} radius "
                        f"{getattr(r, 'radius_' + norm):.3g}", f"{entry.key}|{r.idx}")
                       for i, r in zip(rows.index, rows.itertuples(), strict=True)]
            values_now = [value for _, value in options]
            wanted = f"{entry.key}|{image}" if image >= 0 and f"{entry.key}|{image}" in values_now else None
            if wanted is None and self.controls["image"].value in values_now:
                wanted = self.controls["image"].value
            if wanted is None and options:
                wanted = self._interesting(entry, rows, values_now)
            self.controls["image"].options = options
            self.controls["image"].value = wanted

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """Change controls without redrawing on every step; the image and attack views redraw once after."""
        if self._busy:
            yield
            return
        self._busy = True
        try:
            yield
        finally:
            self._busy = False
        self._refresh("image", "attack")

    def _refresh(self, *sections: str) -> None:
        values = {k: c.value for k, c in self.controls.items()}
        for section in sections:
            if section in self._outputs:
                with self._outputs[section]:
                    clear_output(wait=True)
                    self.view(section)(**values)

    def _interesting(self, entry: Entry, rows: pd.DataFrame, values: list[str]) -> str:
        """The default image: the first correct one that the attack stage also attacked, else the first."""
        attacks = entry.attacks()
        attacked = set(attack_stage.read_table(attack_stage.result_path(entry.results, attacks[0]))["idx"]) \
            if attacks else set()
        for value, idx, ok in zip(values, rows["idx"], outcome_of(rows) == "correct", strict=True):
            if ok and (idx in attacked or not attacked):
                return value
        return values[0]

    def _filtered(self, key: str, label: int, outcome: str, radius: tuple[float, float], norm: str) -> pd.DataFrame:
        return filter_rows(self.table(key), None if label < 0 else label, outcome, radius, norm)

    # ------------------------------------------------------------------ sections

    def render(self, section: str, **values: Any) -> list[Any]:
        """The display objects of ``section`` for control ``values`` (memoized)."""
        if not self.found.entries:
            return [Markdown(nothing_yet(self.found.root))] if section == self.SECTIONS[0] else []
        key = (section, *(_hashable(values[k]) for k in self._NEEDS[section]))
        if key not in self._cache:
            draw = {"curves": self._curves, "table": self._table, "image": self._image, "attack": self._attack}
            try:
                with single_thread():
                    self._cache[key] = draw[section](values)
            except (OSError, ValueError, RuntimeError) as err:
                return [Markdown(f"**Cannot show this {section}:** {err}")]
        return self._cache[key]

    def show(self, section: str) -> None:
        """Display ``section`` at the current selection (static output)."""
        for item in self.render(section, **{k: c.value for k, c in self.controls.items()}):
            display(item)

    def _curves(self, values: Mapping[str, Any]) -> list[Any]:
        keys = list(dict.fromkeys([values["experiment"], *values["compare"]]))
        entries = [self.entry(k) for k in keys]
        notes: list[str] = []
        curves = overlay_curves({k: self.table(k) for k in keys}, values["norm"])
        reference = published(entries, notes.append)
        labels = {e.key: e.key if e.exp.label == e.name else f"{e.key} ({e.exp.label[:24]})" for e in entries}
        text = (f"**{len(keys)} experiments**, certified accuracy = fraction of all certified test images that "
                "are correct with a radius at least r" + (" ; dotted markers: the study's published numbers"
                                                          if not reference.empty and values["norm"] == "l2" else ""))
        return [Markdown("  \n".join([text, *notes])),
                png(curves_figure(curves, reference, values["norm"], labels))]

    def _table(self, values: Mapping[str, Any]) -> list[Any]:
        entry, norm = self.entry(values["experiment"]), values["norm"]
        table = self.table(entry.key)
        rows = self._filtered(entry.key, values["label"], values["outcome"], values["radius"], norm)
        summary = metrics.certify_summary(table, [norm]).round(4)
        columns = [c for c in TABLE_COLUMNS if c in rows] + [f"radius_{norm}"]
        text = (f"**{entry.describe()}**: {len(rows)} of {len(table)} certified images match (class "
                f"{'any' if values['label'] < 0 else values['label']}, {values['outcome']}, {norm} radius in "
                f"[{values['radius'][0]:.3g}, {values['radius'][1]:.3g}]); the first {SHOWN_ROWS}:")
        return [summary, Markdown(text), rows[columns].head(SHOWN_ROWS).set_index("idx")]

    def _image(self, values: Mapping[str, Any]) -> list[Any]:
        if not values["image"]:
            return [Markdown("No image matches the filters.")]
        key, idx = _split(values["image"])
        entry = self.entry(key)
        row = self.table(key).set_index("idx").loc[idx]
        x, y = self.image(key, idx)
        draws = noisy_draws(entry, x, idx)
        with torch.no_grad():
            predicted = self.model(key)(draws).argmax(1).tolist()
        fig = Figure(figsize=(10.0, 2.3))
        ax = fig.subplots()
        fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=0.86)
        show_mosaic(ax, [x[0], *draws], ["clean", *(f"f(x+d) = {p}" for p in predicted)], DRAWS + 1)
        ax.set_title(f"{entry.key}: test image {idx}, label {int(y[0])}", fontsize="medium")
        noise = inputs.experiment_noise(entry.experiment)
        text = (f"Recorded by the certify stage: top class **{int(row.get('selected', row['prediction']))}** in "
                f"**{int(row['count_top'])} of n = {int(row['n'])}** draws (runner-up {int(row['count_second'])}; "
                f"selected from n0 = {int(row['n0'])}), p_A lower bound **{row['prob_lb']:.4f}** at alpha = "
                f"{row['alpha']:g}, prediction {int(row['prediction'])} "
                f"({'abstain' if row['prediction'] == -1 else 'correct' if row['correct'] else 'wrong'}); "
                f"certified radius {_radii_text(row)}.  \nThe {DRAWS} draws above are fresh samples of "
                f"{noise!r} with the model's prediction on each.")
        return [png(fig), Markdown(text)]

    def _attack(self, values: Mapping[str, Any]) -> list[Any]:
        if not values["image"] or not values["attack"]:
            return []
        (key, idx), (attack_key, attack) = _split(values["image"]), values["attack"].rsplit("|", 1)
        if attack_key != key or not attack:
            return [Markdown("No attack chosen.")] if attack_key == key else []
        entry, target = self.entry(key), values["target"]
        x, y = self.image(key, idx)
        result = adversarial(entry, self.model(key), x, y, idx, attack, target)
        row = self.table(key).set_index("idx").loc[idx]
        radius = float(row[f"radius_{result.norm}"])
        delta = result.x_adv - x
        scale = float(delta.abs().max()) or 1.0
        fig = Figure(figsize=(5.0, 2.3))
        ax = fig.subplots()
        fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=0.86)
        with torch.no_grad():
            label = int(self.model(key)(result.x_adv).argmax(1)[0])
        show_mosaic(ax, [x[0], result.x_adv[0], (delta[0] / (2 * scale) + 0.5)],
                    ["clean", f"adversarial: f = {label}", f"perturbation (x{0.5 / scale:.2g})"], 3)
        ax.set_title(f"{attack} against the {target} classifier", fontsize="medium")
        stage = recorded_attack(entry, attack, idx)
        recorded = ("not attacked by the attack stage (it attacks every attack.skip-th image)" if stage is None else
                    f"the attack stage recorded {'success' if stage['success'] else 'failure'} at {result.norm} "
                    f"distance {stage[result.norm]:.4g} (target {entry.experiment.attack.target})")
        where = ("outside the certified ball, as a sound certificate requires" if result.distance >= radius else
                 "inside the certified ball, which a base-model attack may be (the base classifier is not the "
                 "smoothed one)" if target == "base" else "inside the certified ball: a certificate failure")
        verdict = (f"{result.norm} distance **{result.distance:.4g}** vs certified {result.norm} radius "
                   f"**{radius:.4g}**: {where}" if result.success else "the attack failed: nothing found")
        text = (f"**{attack}** recomputed for this image alone ({result.seconds:.2g} s) against the **{target}** "
                f"classifier with the experiment's options ({_options(entry, attack)}): {verdict}. For comparison, "
                f"{recorded}. A recomputation draws its own random numbers, so distances differ a little.")
        return [png(fig), Markdown(text)]

    # ------------------------------------------------------------------ the UI

    def view(self, section: str) -> Callable[..., None]:
        """The function ``interactive_output`` calls for ``section``."""
        def update(**values: Any) -> None:
            if self._busy:
                return
            for item in self.render(section, **values):
                display(item)
        return update

    def widget(self) -> widgets.Widget:
        """The interactive browser: each group of controls above the live output of its section."""
        if not self.found.entries:
            text = re.sub(r"`([^`]*)`", r"<code>\1</code>", nothing_yet(self.found.root).replace("**", ""))
            return widgets.HTML(f"<p>{text}</p>")
        c = self.controls
        out = {s: widgets.interactive_output(self.view(s), {k: c[k] for k in self._NEEDS[s]}) for s in self.SECTIONS}
        self._outputs.update(out)
        return widgets.VBox([c["experiment"], c["compare"], c["norm"], out["curves"],
                             widgets.HBox([c["label"], c["outcome"]]), c["radius"], out["table"],
                             c["image"], out["image"], widgets.HBox([c["attack"], c["target"]]), out["attack"]])


def _options(entry: Entry, attack: str) -> str:
    options = entry.experiment.attack.options(attack)
    return ", ".join(f"{k} = {v}" for k, v in options.items()) or "none"


def _split(value: str) -> tuple[str, int]:
    return value.rsplit("|", 1)[0], int(value.rsplit("|", 1)[1])


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value
