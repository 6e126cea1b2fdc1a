"""What a study is: its experiments (with dependencies), report groups and plot stages, validated."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rslib.core.noises.curves import spec_label
from rslib.pipeline import params

DEFAULT_RADII = {"l2": [0.0, 0.25, 0.5, 0.75, 1.0]}


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
    out_dir: Path | None = None  # where the plot stages write, when not ``dir`` (one experiment viewed as a study)

    @property
    def report_dir(self) -> Path | None:
        """The folder the plot stages write ``results/`` and ``figures/`` into."""
        return self.out_dir or self.dir

    def get(self, name: str) -> StudyExperiment:
        """The experiment called ``name`` (KeyError naming the known ones otherwise)."""
        for e in self.experiments:
            if e.name == name:
                return e
        raise KeyError(f"study {self.name!r} has no experiment {name!r}; it has "
                       f"{', '.join(e.name for e in self.experiments)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-able resolved study (every experiment with all its parameters)."""
        experiments = [{"name": e.name, "label": e.label, "dir": e.name, "stages": list(e.experiment.stages),
                        "depends_on": list(e.depends_on), "params": e.experiment.to_dict()} for e in self.experiments]
        groups = [{"name": g.name, "title": g.title, "experiments": list(g.experiments), "radii": g.radii}
                  for g in self.groups]
        return {"study": self.name, "description": self.description, "experiments": experiments,
                "report": {"groups": groups, "reference": self.reference}, "plots": list(self.plots)}
