"""What ``rslib status`` reports: per experiment and stage, finished / running / failed / interrupted / not started.

Read-only: it looks at the stage markers, the failed notebooks, the folder's lock
(``rslib.pipeline.locks.read_holder``) and the rows already on disk, and takes no lock itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rslib.pipeline import layout, locks, params, runner
from rslib.pipeline.stage import STAGES

State = Literal["finished", "outdated", "running", "failed", "interrupted", "not started"]


@dataclass(frozen=True)
class StageStatus:
    """One stage of one experiment: its state and a line saying why (who runs it, the error, rows done)."""

    experiment: str
    folder: Path
    stage: str
    state: State
    detail: str = ""


def failure_message(notebook: Path) -> str:
    """The error a failed stage notebook ended with (``ename: evalue``), or why it cannot be read."""
    try:
        cells = json.loads(notebook.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError) as err:
        return f"see {notebook} (unreadable: {err})"
    for cell in cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"{output.get('ename')}: {output.get('evalue')} (see {notebook})"
    return f"see {notebook}"


def last_line(path: Path) -> str:
    """The last line of a stage's progress log (its bar as of the last update), or ''."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def experiment_status(name: str, exp_dir: Path, stages: Sequence[str],
                      planned: Sequence[runner.PlannedStage] | None = None) -> list[StageStatus]:
    """The state of every stage of one experiment folder. ``planned`` (from ``runner.plan``) tells whether a
    finished stage is still valid for the current parameters; without it a marker counts as finished."""
    holder = locks.read_holder(exp_dir)
    current = {p.name: p for p in planned or []}
    out, first_open = [], True
    for stage in stages:
        marker = runner.read_marker(exp_dir, stage)
        failed = layout.notebook_paths(exp_dir, stage)["failed"]
        if marker is not None and (stage not in current or current[stage].action == "skip"):
            out.append(StageStatus(name, exp_dir, stage, "finished", str(marker.get("finished_at", ""))))
            continue
        progress = STAGES[stage].progress(exp_dir) if first_open else ""  # only the first open stage has rows
        if holder is not None and holder.alive and first_open:
            state, detail = "running", f"by {holder.describe()}"
            progress = "; ".join(p for p in (progress, last_line(layout.notebook_paths(exp_dir, stage)["log"])) if p)
        elif failed.exists():
            state, detail = "failed", failure_message(failed)
        elif marker is not None:
            state, detail = "outdated", "finished for other parameters; runs again on the next `rslib run`"
        elif progress:
            state, detail = "interrupted", "resumes on the next `rslib run`"
            if holder is not None:
                detail += f" (its run is gone: {holder.reason})"
        else:
            state, detail = "not started", ""
        out.append(StageStatus(name, exp_dir, stage, state, "; ".join(p for p in (detail, progress) if p)))
        first_open = False
    return out


def folder_experiments(output_root: str | os.PathLike[str]) -> Iterator[tuple[params.Experiment, Path]]:
    """Every experiment folder below ``output_root`` (one or two levels: experiments and study members),
    with the resolved parameters ``rslib run`` wrote into it."""
    root = Path(output_root)
    for path in sorted([*root.glob(f"*/{layout.PARAMS_FILE}"), *root.glob(f"*/*/{layout.PARAMS_FILE}")]):
        try:
            yield params.load(path), path.parent
        except params.ParamsError:
            continue


def format_status(statuses: Sequence[StageStatus]) -> str:
    """Lines grouped by experiment: ``  stage: state (detail)``."""
    lines, folder = [], None
    for s in statuses:
        if s.folder != folder:
            folder = s.folder
            lines.append(f"experiment '{s.experiment}' ({s.folder})")
        lines.append(f"  {s.stage}: {s.state}" + (f" ({s.detail})" if s.detail else ""))
    return "\n".join(lines) if lines else "no experiment folders found"
