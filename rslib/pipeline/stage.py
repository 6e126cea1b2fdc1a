"""One stage mechanism: every stage is a :class:`Stage` declaration in :data:`STAGES`.

A stage declares the parameter sections it needs (their fields' ``speed_only`` / ``digest`` /
``neutral`` declarations decide what enters its digest, ``rslib.pipeline.params.section_digest``),
the stages whose outputs it reads (their sections enter its digest too), the checkpoint field it
reads (a sibling experiment named there becomes a dependency in a study), what it writes, how its
progress is counted on disk while it runs, and the function that computes it in this process
(``rslib stage NAME``; the runner executes its notebook). ``study`` stages (the plot notebooks) run
once over a whole study. The runner, studies, ``rslib status``, the CLI and the docs read
:data:`STAGES`; stages never import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rslib.util.registry import Registry


@dataclass(frozen=True)
class CheckpointField:
    """The field of a stage's section that names a checkpoint it reads (a ``.pt`` path or a sibling
    experiment), and when the stage reads it (``when(section values)``, e.g. only in mode 'heat')."""

    section: str
    key: str
    when: Callable[[Any], bool] = lambda values: True


def _nothing_on_disk(folder: Path) -> str:
    return ""


@dataclass(frozen=True)
class Stage:
    """A runnable stage: its notebook stem in ``notebooks/``, what it needs, reads, writes and runs."""

    name: str
    notebook: str
    requires: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    checkpoint: CheckpointField | None = None
    writes: tuple[str, ...] = ()
    progress: Callable[[Path], str] = _nothing_on_disk
    compute: Callable[..., Any] | None = None
    study: bool = False
    description: str = ""


#: Every stage, registered by its module (``rslib.pipeline.stages.<name>``).
STAGES: Registry[Stage] = Registry("stage")


def experiment_stages() -> list[str]:
    """The stages an experiment file may list (not the study-level plot stages)."""
    return [name for name, stage in STAGES.items() if not stage.study]


def study_stages() -> list[str]:
    """The stages that run once over a whole study (the plot notebooks)."""
    return [name for name, stage in STAGES.items() if stage.study]
