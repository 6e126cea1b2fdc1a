"""The notebook runner behind ``rslib run``: executes an experiment's stage notebooks with papermill
into its folder (``rslib.pipeline.layout``), skipping finished stages and marking each one done or failed.

One experiment, one writer: the experiment folder is locked (``rslib.pipeline.locks.FolderLock``) before any
stage runs and released on every exit path; the stages are planned again under the lock, so a run
that waited for another one skips what that run finished. Another run holding the folder raises
``LockHeld`` naming it (``LockPolicy(wait=True)`` waits instead; ``force=True`` breaks a live lock).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from rslib.pipeline import layout, params
from rslib.pipeline.locks import FolderLock
from rslib.pipeline.stage import STAGES
from rslib.util.digest import digest
from rslib.util.files import atomic_write_json, atomic_write_text, read_json_dict
from rslib.util.progress import LOG_ENV
from rslib.util.provenance import provenance


class RunError(RuntimeError):
    """The run cannot start (e.g. a stage notebook is missing)."""


@dataclass(frozen=True)
class LockPolicy:
    """What to do when another run holds a folder: wait until it is free, or break it (``force``)."""

    wait: bool = False
    force: bool = False

    def lock(self, folder: Path, log: Callable[[str], None]) -> FolderLock:
        """The folder's lock, acquired under this policy (a context manager that releases it)."""
        return FolderLock(folder, notify=log).acquire(wait=self.wait, force=self.force)


#: Refuse at once when another run holds the folder.
REFUSE = LockPolicy()


@dataclass(frozen=True)
class PlannedStage:
    """What ``run`` will do with one stage, and why."""

    name: str
    notebook: Path
    action: Literal["run", "skip"]
    reason: str
    digest: str = ""


@dataclass(frozen=True)
class StageResult:
    """Outcome of one stage: status is 'ran', 'skipped', 'failed' or 'not run' (after a failure)."""

    name: str
    status: Literal["ran", "skipped", "failed", "not run"]
    seconds: float = 0.0
    notebook: Path | None = None
    error: str | None = None


@dataclass
class RunReport:
    """Per-stage outcomes of one ``run`` call."""

    experiment: str
    output_dir: Path
    stages: list[StageResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status in ("ran", "skipped") for s in self.stages)


def default_notebooks_dir() -> Path:
    """The source checkout's ``notebooks/`` folder."""
    import rslib

    return Path(rslib.__file__).resolve().parents[1] / "notebooks"


def read_marker(out_dir: Path, stage: str) -> dict[str, Any] | None:
    """The finished-stage marker of ``stage`` under ``out_dir/notebooks``, or None."""
    return read_json_dict(layout.marker_path(out_dir, stage))


def plan(exp: params.Experiment, only: Sequence[str] | None = None, force: bool = False,
         output_root: str | os.PathLike[str] = "outputs", notebooks_dir: str | os.PathLike[str] | None = None,
         salt: str = "") -> list[PlannedStage]:
    """Decide, without side effects, which stages run and which are skipped as finished.

    A stage is finished when its marker holds ``exp.stage_digest(stage, salt + stamp)``, the stamp
    covering checkpoint files named by path (``params.checkpoint_files_stamp``)."""
    if only is not None and not only:
        raise params.ParamsError("only: no stage names given")
    for name in only or ():
        if name not in exp.stages:
            raise params.ParamsError(f"only: stage {name!r} is not among the stages of experiment "
                                     f"'{exp.experiment}' ({', '.join(exp.stages)})")
    exp_dir = layout.experiment_dir(exp.experiment, output_root)
    salt += params.checkpoint_files_stamp(exp)
    return [plan_stage(name, stage_notebook(STAGES[name].notebook, notebooks_dir), exp_dir,
                       exp.stage_digest(name, salt), force)
            for name in exp.stages if only is None or name in only]


def stage_notebook(stem: str, notebooks_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<notebooks_dir>/<stem>.ipynb``; RunError when the folder or the notebook is missing."""
    nb_dir = Path(notebooks_dir) if notebooks_dir is not None else default_notebooks_dir()
    if not nb_dir.is_dir():
        raise RunError(f"notebooks folder {nb_dir} not found: the stage notebooks ship with the source "
                       "checkout (git clone the repository and install it with pip install -e .), "
                       "or pass notebooks_dir / --notebooks-dir")
    notebook = nb_dir / f"{stem}.ipynb"
    if not notebook.is_file():
        raise RunError(f"stage {stem!r}: notebook {notebook} not found")
    return notebook


def plan_stage(name: str, notebook: Path, out_dir: Path, digest: str, force: bool) -> PlannedStage:
    """Run or skip one stage, from its marker under ``out_dir/notebooks`` and the expected digest."""
    marker = read_marker(out_dir, name)
    if marker is None:
        action, reason = "run", "not run yet"
    elif force:
        action, reason = "run", "forced"
    elif marker.get("digest") != digest:
        action, reason = "run", "parameters changed since it finished"
    else:
        action, reason = "skip", f"finished {marker.get('finished_at', '')}".strip()
    return PlannedStage(name, notebook, action, reason, digest)


def format_plan(exp: params.Experiment, planned: list[PlannedStage], exp_dir: Path) -> str:
    """A short human-readable plan."""
    lines = [f"  {p.name}: {p.action} ({p.reason})" for p in planned]
    return "\n".join([f"experiment '{exp.experiment}' -> {exp_dir}", *lines])


_PYTHON_ALIASES = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}


def _launches_this_python(argv: Sequence[str]) -> bool:
    """Whether a kernelspec argv starts this interpreter (jupyter_client maps 'python' to it)."""
    exe = argv[0] if argv else ""
    return exe in _PYTHON_ALIASES or os.path.abspath(exe) == os.path.abspath(sys.executable)


def kernel_for_current_python(work_dir: Path) -> tuple[str, Path | None]:
    """A kernel name that runs ``sys.executable``, and the JUPYTER_PATH entry it needs (or None): the environment's
    ``python3`` kernelspec when it launches this interpreter, else one for ``sys.executable`` written under
    ``work_dir/.jupyter``."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv = KernelSpecManager().get_kernel_spec("python3").argv
    except NoSuchKernel:
        argv = []
    if _launches_this_python(argv):
        return "python3", None
    name = "rslib-" + digest(sys.executable)[:12]
    jupyter_dir = work_dir / ".jupyter"
    spec_dir = jupyter_dir / "kernels" / name
    shutil.rmtree(spec_dir, ignore_errors=True)
    write_kernel_spec(spec_dir, overrides={"display_name": f"Python ({sys.executable})"})
    return name, jupyter_dir


@contextmanager
def _jupyter_path(extra: Path | None) -> Iterator[None]:
    """Temporarily put ``extra`` first on JUPYTER_PATH (no-op for None)."""
    if extra is None:
        yield
        return
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(extra), *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            del os.environ["JUPYTER_PATH"]
        else:
            os.environ["JUPYTER_PATH"] = old


def kernel_with_env(extra: Mapping[str, str]) -> type:
    """A kernel manager class whose kernels start with ``extra`` on top of this process's environment (one
    class per call, so experiments run side by side in threads never see each other's values)."""
    from jupyter_client.manager import AsyncKernelManager

    class StageKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:
            await super().start_kernel(**{**kw, "env": {**os.environ, **kw.get("env", {}), **extra}})

    return StageKernelManager


def _execute(stage: PlannedStage, out_dir: Path, params_file: Path, kernel: str, progress: bool) -> StageResult:
    """Run one stage notebook; write the executed notebook and, on success, the marker."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    paths = layout.notebook_paths(out_dir, stage.name)
    final, failed, partial = paths["final"], paths["failed"], paths["partial"]
    layout.marker_path(out_dir, stage.name).unlink(missing_ok=True)
    paths["log"].unlink(missing_ok=True)
    ok, error = False, None
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(stage.notebook), str(partial), parameters={"params_file": str(params_file), "output_dir": str(out_dir)},
            kernel_name=kernel, language="python", cwd=str(out_dir), log_output=False,
            progress_bar=progress and {"desc": stage.name, "unit": "cell", "leave": False},
            extra_arguments=["--IPKernelApp.log_level=ERROR"],  # not the per-kernel "TCP without encryption" notice
            kernel_manager_class=kernel_with_env({LOG_ENV: str(paths["log"])}))
        ok = True
    except PapermillExecutionError as err:
        error = f"{err.ename}: {err.evalue}"
    except Exception as err:  # kernel death, unreadable notebook, ...: still a failed stage
        error = f"{type(err).__name__}: {err}"
    finally:
        if partial.exists():
            os.replace(partial, final if ok else failed)
    seconds = time.perf_counter() - start
    if not ok:
        return StageResult(stage.name, "failed", seconds, failed if failed.exists() else None, error)
    failed.unlink(missing_ok=True)
    atomic_write_json(layout.marker_path(out_dir, stage.name), {
        "stage": stage.name, "digest": stage.digest, "notebook": final.name, "seconds": round(seconds, 3),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "provenance": provenance()})
    return StageResult(stage.name, "ran", seconds, final)


def execute_stages(planned: Sequence[PlannedStage], out_dir: Path, params_file: Path, report: RunReport,
                   log: Callable[[str], None] = print, progress: bool = False) -> None:
    """Execute the planned stages in order into ``out_dir``, appending outcomes to ``report``; the first failure
    stops the sequence (later stages: 'not run')."""
    kernel: tuple[str, Path | None] | None = None
    for i, stage in enumerate(planned):
        label = f"{report.experiment}: {stage.name}"
        if stage.action == "skip":
            log(f"{label}: skipped ({stage.reason})")
            notebook = layout.notebook_paths(out_dir, stage.name)["final"]
            report.stages.append(StageResult(stage.name, "skipped", notebook=notebook))
            continue
        if kernel is None:
            kernel = kernel_for_current_python(out_dir)
        log(f"{label}: running {stage.notebook.name} ({stage.reason})")
        with _jupyter_path(kernel[1]):
            result = _execute(stage, out_dir, params_file, kernel[0], progress)
        report.stages.append(result)
        if result.status == "failed":
            log(f"{label}: FAILED after {result.seconds:.1f} s: {result.error}")
            report.stages += [StageResult(p.name, "not run") for p in planned[i + 1 :]]
            return
        log(f"{label}: done in {result.seconds:.1f} s")


def prepare_output(out_dir: Path, params_text: str) -> Path:
    """Create ``notebooks/ results/ figures/`` and write the resolved parameters and provenance."""
    for sub in layout.SUBFOLDERS:
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    params_file = out_dir / layout.PARAMS_FILE
    atomic_write_text(params_file, params_text)
    atomic_write_json(out_dir / layout.PROVENANCE_FILE, provenance())
    return params_file


def resolved_params_text(exp: params.Experiment, note: str = "") -> str:
    """The experiment's resolved parameters as commented YAML."""
    header = f"# Resolved parameters of {exp.source}, written by rslib run.\n" + (f"# {note}\n" if note else "")
    return header + yaml.safe_dump(exp.to_dict(), sort_keys=False)


def run_experiment(exp: params.Experiment, only: Sequence[str] | None = None, force: bool = False,
                   output_root: str | os.PathLike[str] = "outputs", notebooks_dir: str | os.PathLike[str] | None = None,
                   log: Callable[[str], None] = print, salt: str = "", note: str = "", progress: bool = False,
                   lock: LockPolicy = REFUSE) -> RunReport:
    """Execute the (selected) stage notebooks of a validated experiment in order, holding its folder's lock.

    Finished stages whose marker matches the stage digest are skipped unless ``force``; the first
    failing stage stops the experiment, its notebook kept as ``<stage>.failed.ipynb``. Raises
    ``rslib.pipeline.locks.LockHeld`` when another run holds the folder (unless ``lock.wait``)."""
    exp_dir = layout.experiment_dir(exp.experiment, output_root)
    plan(exp, only, force, output_root, notebooks_dir, salt)  # invalid settings fail before anything is written
    with lock.lock(exp_dir, log):
        planned = plan(exp, only, force, output_root, notebooks_dir, salt)
        log(format_plan(exp, planned, exp_dir))
        params_file = prepare_output(exp_dir, resolved_params_text(params.with_absolute_paths(exp), note))
        report = RunReport(exp.experiment, exp_dir)
        execute_stages(planned, exp_dir, params_file, report, log, progress)
    return report


def run_file(params_path: str | os.PathLike[str], only: Sequence[str] | None = None,
             overrides: dict[str, Any] | None = None, force: bool = False,
             output_root: str | os.PathLike[str] = "outputs", notebooks_dir: str | os.PathLike[str] | None = None,
             log: Callable[[str], None] = print, progress: bool = False, lock: LockPolicy = REFUSE) -> RunReport:
    """Validate an experiment file, then execute its (selected) stage notebooks in order.

    Raises ``ParamsError`` or ``RunError`` before any output is written if the setup is invalid,
    ``LockHeld`` when another run holds the experiment."""
    exp = params.load(params_path, **(overrides or {}))
    note = ("Overrides: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())) if overrides else ""
    return run_experiment(exp, only, force, output_root, notebooks_dir, log, note=note, progress=progress, lock=lock)
