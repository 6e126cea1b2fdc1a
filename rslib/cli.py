"""The ``rslib`` console script: ``rslib run`` and ``rslib validate``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rslib import params
from rslib.run import RunError, RunReport, experiment_dir, format_plan, plan, run

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rslib", description="Validate and run rslib experiments (YAML files -> notebooks)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("params", help="experiment YAML file, e.g. params/tutorial.yaml")
        sub.add_argument(
            "-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a parameter (dotted key, YAML value), e.g. -p tutorial.dim=64",
        )
        sub.add_argument("--only", metavar="A,B", help="comma-separated stages to consider")
        sub.add_argument("--output-root", default="outputs", metavar="DIR",
                         help="where experiment folders go (default: outputs)")
        sub.add_argument("--notebooks-dir", metavar="DIR",
                         help="stage notebooks folder (default: the checkout's notebooks/)")
        return sub

    add("validate", "check an experiment file and show which stages would run or be skipped")
    add("run", "execute the stage notebooks of an experiment with papermill").add_argument(
        "--force", action="store_true", help="re-run stages even if they finished"
    )
    return parser


def _only(text: str | None) -> list[str] | None:
    return None if text is None else [s.strip() for s in text.split(",") if s.strip()]


def _summary(report: RunReport) -> str:
    lines = [f"summary ({report.output_dir}):"]
    for s in report.stages:
        line = f"  {s.name}: {s.status}"
        if s.status in ("ran", "failed"):
            line += f" in {s.seconds:.1f} s"
        if s.notebook is not None:
            line += f" -> {s.notebook}"
        if s.error:
            line += f"\n    {s.error}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, 1 when a stage failed, 2 for invalid parameters."""
    args = _parser().parse_args(argv)
    try:
        overrides = dict(params.parse_override(o) for o in args.overrides)
        only = _only(args.only)
        if args.command == "validate":
            exp = params.load(args.params, **overrides)
            planned = plan(exp, only, False, args.output_root, args.notebooks_dir)
            print(format_plan(exp, planned, experiment_dir(exp, args.output_root)))
            return EXIT_OK
        report = run(
            args.params, only=only, overrides=overrides, force=args.force,
            output_root=args.output_root, notebooks_dir=args.notebooks_dir,
        )
    except (params.ParamsError, RunError) as err:
        print(f"rslib: error: {err}", file=sys.stderr)
        return EXIT_INVALID
    print(_summary(report))
    return EXIT_OK if report.ok else EXIT_FAILED
