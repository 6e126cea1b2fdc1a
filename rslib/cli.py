"""The ``rslib`` command line (also ``python -m rslib``): ``run``, ``validate`` and ``resolve`` for experiments
and studies, ``stage train|certify|attack`` to run one stage directly (every rank under ``torchrun``),
``status``, ``import-checkpoint`` and ``heat-drift``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rslib.lab import run_lab
from rslib.nn import checkpoints
from rslib.nn.checkpoint_import import INPUT_LAYERS, SOURCES, import_checkpoint
from rslib.nn.data import DATASETS
from rslib.pipeline import layout, params, runner, schema, study
from rslib.pipeline.heat_drift import DEFAULT_WIDTHS, experiment_drift
from rslib.pipeline.locks import LockHeld, lock_for_rank, sigterm_as_interrupt
from rslib.pipeline.stage import STAGES
from rslib.pipeline.status import experiment_status, folder_experiments, format_status

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rslib", description="Validate and run rslib experiments and studies (YAML files -> notebooks).")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, description: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=description or text)

    def overrides(sub: argparse.ArgumentParser, text: str = "override a parameter, as for rslib run") -> None:
        sub.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        sub = command(name, text)
        sub.add_argument("params", help="experiment or study YAML file, e.g. params/demo.yaml")
        overrides(sub, "override a parameter (dotted key, YAML value), e.g. -p certify.n=1000; in a study it "
                       "applies to every experiment that has the section")
        sub.add_argument("--only", metavar="A,B",
                         help="comma-separated stages to consider (studies also: cert_plots, adv_plots, plots)")
        sub.add_argument("--shard", metavar="I/N", default="1/1", help="studies: run only the I-th of N parts of "
                         "the experiments (1-based); dependency chains stay in one part")
        sub.add_argument("--output-root", default="outputs", metavar="DIR",
                         help="where experiment and study folders go (default: outputs)")
        sub.add_argument("--notebooks-dir", metavar="DIR",
                         help="stage notebooks folder (default: the checkout's notebooks/)")
        return sub

    lab = command("lab", "start JupyterLab at the repository root (JUPYTER_PORT, JUPYTER_TOKEN), print its URL",
                  "Start JupyterLab rooted at the repository (notebooks, params and outputs browsable), on "
                  "$JUPYTER_PORT (default 8888) with $JUPYTER_TOKEN (default: a fresh one), and print the URL.")
    lab.add_argument("--ip", default="127.0.0.1", help="interface to listen on (0.0.0.0 inside a container "
                     "whose port is published; default 127.0.0.1)")
    lab.add_argument("--root", metavar="DIR", help="serve DIR instead of the repository (default: $RSLIB_LAB_ROOT, "
                     "else the checkout)")
    resolve = command("resolve", "print one experiment's resolved parameters (for torchrun -m rslib stage ...)",
                      "Print the resolved parameters of an experiment file, or of one experiment of a study, as "
                      "YAML with absolute paths: the file `torchrun ... -m rslib stage train|certify|attack` takes.")
    resolve.add_argument("params", help="experiment or study YAML file")
    resolve.add_argument("experiment", nargs="?", help="the experiment's name (studies only)")
    overrides(resolve)
    stage = command("stage", "run one stage of one experiment in this process (under torchrun: on every rank)",
                    "Run the train, certify or attack stage of one experiment directly, without notebooks: "
                    "torchrun --nproc_per_node N -m rslib stage certify EXPERIMENT.yaml")
    stage.add_argument("stage", choices=[name for name, s in STAGES.items() if s.compute is not None],
                       help="the stage to run")
    stage.add_argument("params", help="experiment YAML file (for a study: rslib resolve STUDY NAME > FILE)")
    overrides(stage)
    stage.add_argument("--output-dir", default=None, help="default: outputs/<experiment>")
    stage.add_argument("--no-progress", action="store_true", help="no progress bars")
    imported = command(
        "import-checkpoint",
        "convert a released checkpoint (Cohen et al., SmoothAdv, rs4a, HeatSmoothing) into an rslib checkpoint",
        "Convert a released checkpoint into an rslib checkpoint (normalization inside, provenance recorded) "
        "usable as certify.checkpoint, attack.checkpoint or train.heat_base.")
    imported.add_argument("src", help="the released file, e.g. models/cifar10/resnet110/noise_0.25/checkpoint.pth.tar")
    imported.add_argument("dst", help="the rslib checkpoint to write, e.g. pretrained/cohen_cifar10_0.25.pt")
    imported.add_argument("--source", choices=SOURCES,
                          help="the codebase that wrote SRC (default: recognised from the keys; Cohen and SmoothAdv "
                               "files look the same, so they need it)")
    imported.add_argument("--arch", help="stop unless SRC holds this rslib architecture")
    imported.add_argument("--dataset", choices=sorted(DATASETS), help="stop unless SRC is a model for this dataset")
    imported.add_argument("--input-layer", choices=INPUT_LAYERS,
                          help="SmoothAdv only (required): normalize (NormalizeLayer) or center (InputCenterLayer), "
                               "by model folder as the SmoothAdv README lists")
    add("validate", "check a parameter file and show which stages would run or be skipped")
    run = add("run", "execute the stage notebooks of an experiment or a study with papermill")
    run.add_argument("--force", action="store_true", help="re-run stages even if they finished")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="studies: run N experiments at once, each once its dependencies have run, "
                          "torch limited to cpu_count/N threads each (default 1)")
    run.add_argument("--wait", action="store_true",
                     help="when another run holds an experiment (or the study's plots), wait for it, then skip "
                          "what it finished (default: leave it to that run and exit with status 2)")
    run.add_argument("--force-unlock", action="store_true",
                     help="take the lock of a live run (only when you are sure it is dead, e.g. on a host that is "
                          "gone); a lock whose process is gone is taken over without it")
    status = command("status", "per experiment and stage: finished, running (by whom, since when, rows done), "
                               "failed (why) or not started",
                     "Show the state of every stage of an experiment or study file, or of every experiment folder "
                     "under --output-root when no file is given. Reads only; takes no lock.")
    status.add_argument("params", nargs="?", help="experiment or study YAML file (default: every folder found)")
    overrides(status)
    status.add_argument("--output-root", default="outputs", metavar="DIR", help="default: outputs")
    status.add_argument("--notebooks-dir", metavar="DIR", help="stage notebooks folder (default: the checkout's)")
    drift = command("heat-drift", "which Gaussian a heat experiment's averaged models approximate, step by step",
                    "For a finished heat experiment folder: distance of each step's softmax to Monte-Carlo Gaussian "
                    "averages of its base at a grid of widths, the closest width, accuracy and the Jacobian "
                    "penalty; writes results/heat_drift.csv and heat_drift.json (see rslib.pipeline.heat_drift).")
    drift.add_argument("folder", help="the heat experiment's folder, e.g. outputs/mnist_heat_cpu/heat_seed")
    drift.add_argument("--images", type=int, default=1000, help="test images (default 1000)")
    drift.add_argument("--skip", type=int, default=10, help="every skip-th test image (default 10)")
    drift.add_argument("--draws", type=int, default=512, help="Monte-Carlo draws per image and width (default 512)")
    drift.add_argument("--widths", default=",".join(f"{w:g}" for w in DEFAULT_WIDTHS),
                       help="comma-separated Gaussian widths s (the experiment's sigma is added)")
    drift.add_argument("--device", default="cpu")
    return parser


def _heat_drift(args: argparse.Namespace) -> int:
    """``rslib heat-drift FOLDER``: the drift table, printed and written."""
    try:
        widths = [float(w) for w in args.widths.split(",") if w.strip()]
        table, summary = experiment_drift(args.folder, images=args.images, skip=args.skip, draws=args.draws,
                                          widths=widths, device=args.device)
    except (ValueError, FileNotFoundError, checkpoints.CheckpointError) as err:
        print(f"rslib: error: {err}", file=sys.stderr)
        return EXIT_INVALID
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print({k: summary[k] for k in ("sigma", "tracks_sigma", "final_ratio_to_base", "meets_target",
                                   "monte_carlo_floor", "floor_ratio_to_base")})
    return EXIT_OK


def _only(text: str | None) -> list[str] | None:
    return None if text is None else [s.strip() for s in text.split(",") if s.strip()]


def _stage_lines(report: runner.RunReport, indent: str = "  ") -> list[str]:
    lines = []
    for s in report.stages:
        line = f"{indent}{s.name}: {s.status}"
        if s.status in ("ran", "failed"):
            line += f" in {s.seconds:.1f} s"
        if s.notebook is not None:
            line += f" -> {s.notebook}"
        if s.error:
            line += f"\n{indent}  {s.error}"
        lines.append(line)
    return lines


def _summary(report: runner.RunReport) -> str:
    return "\n".join([f"summary ({report.output_dir}):", *_stage_lines(report)])


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when it lies inside it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _study_summary(report: study.StudyReport) -> str:
    lines = [f"summary of study '{report.study}' ({report.output_dir}):"]
    for name, result in report.experiments.items():
        if result is not None:
            lines += [f"  {name}:", *_stage_lines(result, "    ")]
    lines += [f"  {name}: {why}" for name, why in report.blocked.items()]
    lines += [f"  {name}: left to another run: {why}" for name, why in report.held.items()]
    if report.plots is not None:
        lines += ["  plots:", *_stage_lines(report.plots, "    ")]
    if report.plots_note:
        lines.append(f"  {report.plots_note}")
    if produced := study.produced_files(report.output_dir):
        lines += ["figures and tables:", *(f"  {_shown(p)}" for p in produced)]
    if report.ok:
        lines.append("all stages finished")
    elif report.held and not report.blocked and all(r is None or r.ok for r in report.experiments.values()):
        lines.append("OTHER RUNS HOLD SOME EXPERIMENTS (see above): they finish them; `rslib status` shows them, "
                     "and `rslib run ... --wait` waits for them")
    else:
        lines.append("SOME STAGES FAILED (see above); re-run to retry them")
    return "\n".join(lines)


def _status(args: argparse.Namespace, overrides: dict) -> int:
    """``rslib status [PARAMS]``."""
    root = args.output_root
    if args.params is None:
        rows = [s for exp, folder in folder_experiments(root)
                for s in experiment_status(exp.experiment, folder, exp.stages)]
    elif study.is_study(Path(args.params)):
        loaded = study.load(args.params, **overrides)
        out = study.study_dir(loaded, root)
        rows = [s for e in loaded.experiments for s in experiment_status(
            e.name, out / e.name, e.experiment.stages,
            runner.plan(e.experiment, None, False, out, args.notebooks_dir, loaded.salts[e.name]))]
        rows += experiment_status(f"{loaded.name} (plots)", out, loaded.plots)
    else:
        exp = params.load(args.params, **overrides)
        rows = experiment_status(exp.experiment, layout.experiment_dir(exp.experiment, root), exp.stages,
                                 runner.plan(exp, None, False, root, args.notebooks_dir))
    print(format_status(rows))
    return EXIT_OK


def _run_study(args: argparse.Namespace, overrides: dict, only: list[str] | None) -> int:
    loaded = study.load(args.params, **overrides)
    index, count = study.parse_shard(args.shard)
    out = study.study_dir(loaded, args.output_root)
    if args.command == "validate":
        print(study.format_plan(loaded, out, only, False, args.notebooks_dir, count))
        return EXIT_OK
    print(study.format_plan(loaded, out, only, args.force, args.notebooks_dir, count))
    if args.jobs < 1:
        raise params.ParamsError(f"--jobs must be >= 1; got {args.jobs}")
    report = study.run_study(loaded, only, args.force, args.output_root, args.notebooks_dir, (index, count),
                             progress=sys.stderr.isatty(), lock=_lock_policy(args), jobs=args.jobs)
    print(_study_summary(report))
    if report.ok:
        return EXIT_OK
    failed = report.blocked or any(r is not None and not r.ok for r in report.experiments.values())
    return EXIT_FAILED if failed or (report.plots is not None and not report.plots.ok) else EXIT_INVALID


def _lock_policy(args: argparse.Namespace) -> runner.LockPolicy:
    return runner.LockPolicy(wait=args.wait, force=args.force_unlock)


def _resolve(path: str, name: str | None, overrides: dict) -> str:
    """Resolved YAML of an experiment file, or of experiment ``name`` of a study."""
    if study.is_study(Path(path)):
        loaded = study.load(path, **overrides)
        names = [e.name for e in loaded.experiments]
        if name not in names:
            raise params.ParamsError(f"{path}: name one experiment of the study ({', '.join(names)})")
        exp, note = loaded.get(name).experiment, f"Experiment '{name}' of study '{loaded.name}'"
    else:
        if name is not None:
            raise params.ParamsError(f"{path} is one experiment; drop the name {name!r}")
        exp, note = params.load(path, **overrides), ""
    return runner.resolved_params_text(params.with_absolute_paths(exp), note)


def _run_stage(name: str, path: str, overrides: dict, output_dir: str | None, progress: bool) -> int:
    """``rslib stage NAME PARAMS``: one stage in this process; torch.distributed is torn down afterwards."""
    import torch.distributed

    if study.is_study(Path(path)):
        raise params.ParamsError(f"{path} is a study; write one experiment's parameters with "
                                 f"`rslib resolve {path} NAME > NAME.yaml` and pass that file")
    experiment = params.load(path, **overrides)
    folder = layout.stage_output_dir(experiment.experiment, output_dir)
    with lock_for_rank(folder):  # under torchrun, rank 0 holds the experiment for all ranks
        STAGES[name].compute(experiment, folder, progress=progress)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return EXIT_OK


def _import_checkpoint(args: argparse.Namespace) -> int:
    """``rslib import-checkpoint SRC DST ...``: convert, then say what was written."""
    try:
        path = import_checkpoint(args.src, args.dst, args.source, args.arch, args.dataset, args.input_layer)
    except (checkpoints.CheckpointError, FileNotFoundError) as err:
        print(f"rslib: error: {err}", file=sys.stderr)
        return EXIT_INVALID
    ckpt = checkpoints.load_checkpoint(path)
    info = ckpt["extra"]["imported_from"]
    print(f"wrote {path}: rslib {ckpt['arch']} for {ckpt['dataset']} from {info['source']} "
          f"({info['original_arch']}; input layer: {info['input_layer']}; sha256 {info['sha256'][:12]})")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, 1 when a stage failed, 2 for invalid parameters."""
    args = _parser().parse_args(argv)
    if args.command == "import-checkpoint":
        return _import_checkpoint(args)
    if args.command == "heat-drift":
        return _heat_drift(args)
    if args.command == "lab":
        return run_lab(args.ip, args.root)
    try:
        with sigterm_as_interrupt():
            return _command(args)
    except (params.ParamsError, runner.RunError, PermissionError) as err:
        print(f"rslib: error: {err}", file=sys.stderr)
        return EXIT_INVALID
    except LockHeld as held:
        print(f"rslib: {held}", file=sys.stderr)
        return EXIT_INVALID


def _command(args: argparse.Namespace) -> int:
    """Run one command whose arguments parsed; errors propagate to ``main``."""
    overrides = dict(schema.parse_override(o) for o in args.overrides)
    if args.command == "status":
        return _status(args, overrides)
    if args.command == "resolve":
        print(_resolve(args.params, args.experiment, overrides), end="")
        return EXIT_OK
    if args.command == "stage":
        return _run_stage(args.stage, args.params, overrides, args.output_dir, not args.no_progress)
    only = _only(args.only)
    if study.is_study(Path(args.params)):
        return _run_study(args, overrides, only)
    if args.shard != "1/1":
        raise params.ParamsError("--shard splits the experiments of a study; this file is one experiment")
    if getattr(args, "jobs", 1) != 1:
        raise params.ParamsError("--jobs runs experiments of a study at once; this file is one experiment, "
                                 "whose stages run in order")
    if args.command == "validate":
        exp = params.load(args.params, **overrides)
        planned = runner.plan(exp, only, False, args.output_root, args.notebooks_dir)
        print(runner.format_plan(exp, planned, layout.experiment_dir(exp.experiment, args.output_root)))
        return EXIT_OK
    report = runner.run_file(args.params, only=only, overrides=overrides, force=args.force,
                             output_root=args.output_root, notebooks_dir=args.notebooks_dir,
                             progress=sys.stderr.isatty(), lock=_lock_policy(args))
    print(_summary(report))
    return EXIT_OK if report.ok else EXIT_FAILED
