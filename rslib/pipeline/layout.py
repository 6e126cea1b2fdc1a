"""The experiment folder: where every stage reads and writes, which checkpoint a stage uses, its noise.

An experiment's folder is ``<output_root>/<experiment>``; a study's is ``<output_root>/<study>`` with
one experiment folder inside per experiment. Inside an experiment folder::

    params.yaml, provenance.json        the resolved parameters (written by the runner)
    notebooks/<stage>.ipynb             executed stage notebooks; <stage>.done.json marks a finished stage,
                                        <stage>.failed.ipynb a failed one
    checkpoints/model.pt                the final model (last.pt: resumable state; heat_step_<t>.pt)
    results/                            certify.csv / certify.json / lbound_certify.csv,
                                        attack_<name>.csv / .json, attack.json, lbound.csv / .json,
                                        train_metrics.csv; .<table>.rank<r>.partial.csv while running
    figures/                            PNG and PDF figures

Stages import this module for every path and for the file a ``checkpoint`` / ``heat_base`` field
names; nothing else spells these names. It knows paths only: no parameters, models or data.
"""

from __future__ import annotations

import os
from pathlib import Path

NOTEBOOKS = "notebooks"
RESULTS = "results"
FIGURES = "figures"
CHECKPOINTS = "checkpoints"
SUBFOLDERS = (NOTEBOOKS, RESULTS, FIGURES)
PARAMS_FILE = "params.yaml"
PROVENANCE_FILE = "provenance.json"
STUDY_FILE = "study.json"
STUDY_PARAMS_FILE = "study.yaml"

FINAL_CHECKPOINT = "model.pt"
LAST_CHECKPOINT = "last.pt"

TRAIN_METRICS = "train_metrics.csv"
CERTIFY_TABLE = "certify"  # results/certify.csv and certify.json
CERTIFY_CURVES = "certified_accuracy.csv"
LBOUND_CERTIFY = "lbound_certify.csv"
ATTACK_SUMMARY = "attack.json"
ATTACK_CDF = "attack_cdf.csv"
ATTACK_FIGURE = "attack_cdf"
LBOUND_TABLE = "lbound"  # results/lbound.csv and lbound.json


def experiment_dir(name: str, output_root: str | os.PathLike[str] = "outputs") -> Path:
    """Absolute ``<output_root>/<experiment>`` folder."""
    return Path(output_root).resolve() / name


def study_dir(name: str, output_root: str | os.PathLike[str] = "outputs") -> Path:
    """Absolute ``<output_root>/<study>`` folder."""
    return Path(output_root).resolve() / name


def stage_output_dir(name: str, output_dir: str | os.PathLike[str] | None) -> Path:
    """The folder a stage of experiment ``name`` writes into: ``output_dir`` if given, else
    ``outputs/<experiment>`` (absolute)."""
    return (Path(output_dir) if output_dir is not None else experiment_dir(name)).resolve()


def results_dir(exp_dir: Path) -> Path:
    return exp_dir / RESULTS


def checkpoints_dir(exp_dir: Path) -> Path:
    return exp_dir / CHECKPOINTS


def heat_step_checkpoint(exp_dir: Path, step: int) -> Path:
    """The averaged model after heat step ``step`` (1-based)."""
    return checkpoints_dir(exp_dir) / f"heat_step_{step}.pt"


def marker_path(exp_dir: Path, stage: str) -> Path:
    """``notebooks/<stage>.done.json``: the finished-stage marker."""
    return exp_dir / NOTEBOOKS / f"{stage}.done.json"


def notebook_paths(exp_dir: Path, stage: str) -> dict[str, Path]:
    """The executed notebook of a stage: ``final``, ``failed``, the in-progress ``partial`` file and the
    ``log`` its progress bars write to in a batch run."""
    folder = exp_dir / NOTEBOOKS
    return {"final": folder / f"{stage}.ipynb", "failed": folder / f"{stage}.failed.ipynb",
            "partial": folder / f".{stage}.partial.ipynb", "log": folder / f"{stage}.log"}


def table_paths(results: Path, table: str) -> tuple[Path, Path]:
    """``results/<table>.csv`` and its metadata ``results/<table>.json``."""
    return results / f"{table}.csv", results / f"{table}.json"


def attack_table(name: str) -> str:
    return f"attack_{name}"


def partial_path(results: Path, table: str, rank: int) -> Path:
    """The append-only row file of one rank while ``table`` is being computed."""
    return results / f".{table}.rank{rank}.partial.csv"


def partial_files(results: Path, table: str) -> list[Path]:
    """Every rank's partial row file of ``table``."""
    return sorted(results.glob(f".{table}.rank*.partial.csv"))


def partial_guard_path(results: Path, table: str) -> Path:
    """``results/.<table>.partial.json``: which parameters the partial row files of ``table`` belong to."""
    return results / f".{table}.partial.json"


def is_checkpoint_path(reference: str) -> bool:
    """Whether a checkpoint field holds a file path (``.pt``, with a folder, or an existing file)
    rather than the name of a sibling experiment."""
    return reference.endswith(".pt") or os.sep in reference or "/" in reference or Path(reference).is_file()


def resolve_checkpoint(reference: str | None, output_dir: Path) -> Path:
    """The checkpoint a ``checkpoint`` / ``heat_base`` field names: a file path, the final model of the
    sibling experiment named ``reference``, or (None) the final model of the experiment in ``output_dir``."""
    if reference is None:
        return checkpoints_dir(output_dir) / FINAL_CHECKPOINT
    path = Path(reference)
    if is_checkpoint_path(reference) or path.exists():
        return path
    return checkpoints_dir(output_dir.parent / reference) / FINAL_CHECKPOINT
