"""Running a study: its experiments through the runner (in lanes or shards), then its plot stages."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rslib.pipeline import layout, params, runner
from rslib.pipeline.locks import LockHeld
from rslib.pipeline.params import ParamsError
from rslib.pipeline.study.schedule import schedule_lanes, shard_of, threads_per_job
from rslib.pipeline.study.spec import Study, StudyExperiment
from rslib.util.digest import digest
from rslib.util.files import atomic_write_json, atomic_write_text
from rslib.util.provenance import provenance


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
    return all(p.action == "skip" for e in study.experiments
               for p in runner.plan(e.experiment, None, False, out, notebooks_dir, study.salts[e.name]))


def _plots_digest(study: Study, out: Path) -> str:
    """Changes when the report settings or any experiment's finished results change."""
    results = {}
    for e in study.experiments:
        for stage in e.experiment.stages:
            marker = runner.read_marker(out / e.name, stage) or {}
            results[f"{e.name}:{stage}"] = [marker.get("digest"), marker.get("finished_at")]
    return digest({"study": study.to_dict(), "results": results}, spaced=True)


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


def run_study(study: Study, only: Sequence[str] | None = None, force: bool = False,
              output_root: str | os.PathLike[str] = "outputs", notebooks_dir: str | os.PathLike[str] | None = None,
              shard: tuple[int, int] = (1, 1), log: Callable[[str], None] = print, progress: bool = False,
              lock: runner.LockPolicy = runner.REFUSE, jobs: int = 1) -> StudyReport:
    """Run the study's experiments (those of ``shard``) in dependency order, then its plots.

    A failed experiment does not stop the others; experiments that need its model, when its training
    did not finish, are reported as blocked. An experiment another run holds (``rslib.pipeline.locks``) is
    left to that run and reported in ``held`` (``lock.wait``: waited for, then its finished stages
    are skipped). The plot notebooks run, under the study folder's lock, when this call covers the
    whole study (no shard) or when every experiment of the study has finished (the last shard to
    finish draws them; a shard that finds another one drawing them leaves it to that one).

    ``jobs > 1`` runs that many experiments at once, each as soon as its dependencies have run (see
    :func:`schedule_lanes`), each stage notebook with ``torch`` limited to ``cpu_count // jobs`` threads
    (``OMP_NUM_THREADS``, unless set): on a CPU, kernel start-up and imports of one experiment overlap the
    computation of the other without the two oversubscribing the cores."""
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
        with threads_per_job(workers):
            schedule_lanes(selected, workers, run)
    if not study.plots or (only is not None and "plots" not in only and not set(only) & set(study.plots)):
        return report
    try:
        with lock.lock(out, log):
            _draw_plots(study, report, only, force, notebooks_dir, shard, params_file, log, progress)
    except LockHeld as held:
        report.plots_note = f"the plots are left to another run, which is drawing them: {held.holder.describe()}"
        log(report.plots_note)
    return report


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
