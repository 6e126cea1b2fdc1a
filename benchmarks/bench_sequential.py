"""Sequential vs fixed-n certification: estimation draws per image and certified accuracy at the radii of interest.

For a trained checkpoint and its test set, ``Smooth.certify`` runs once with fixed ``n`` at ``alpha``
and once per number of looks K with ``radii_of_interest`` (doubling looks up to ``n``, level
``alpha / K`` each). The fixed-n table is also recertified at ``alpha / K`` from its own counts (same
draws), which separates the cost of the smaller per-look level from the effect of stopping early.
Gaussian noise; results go to ``benchmarks/results/sequential_<dataset>.json`` (or ``--output``).
``--fixed-table`` reuses a certify stage's ``results/certify.csv`` of the same checkpoint, seed and images
as the fixed-n run (rslib's draws depend only on seed and image index, so the rows are the ones this
script would compute).

    python benchmarks/bench_sequential.py --checkpoint /tmp/demo_before/outputs/demo/cohen/checkpoints/model.pt \\
        --dataset digits --sigma 0.25 --n 10000 --looks 4,6,8 --radii 0,0.1,0.2,0.3,0.4,0.5,0.6
    python benchmarks/bench_sequential.py --dataset mnist --skip 20 --sigma 0.5 --looks 6 \\
        --radii 0,0.25,0.5,0.75 --checkpoint outputs/mnist_cohen_cpu/cohen_0.50/checkpoints/model.pt \\
        --fixed-table outputs/mnist_cohen_cpu/cohen_0.50/results/certify.csv \\
        --output benchmarks/results/sequential_mnist_0.50.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from rslib.core.certify import Smooth, look_sizes, recertify
from rslib.core.metrics import certified_accuracy
from rslib.core.noises import make_noise, norm_label, parse_norm
from rslib.nn import checkpoints
from rslib.nn.data import batch_of, load_dataset, subset
from rslib.pipeline.stages.certify import read_table
from rslib.util.files import atomic_write_json
from rslib.util.provenance import provenance


def _numbers(text: str, kind: type) -> list[Any]:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s; got {text!r}") from exc


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="an rslib checkpoint (.pt) trained with Gaussian noise")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--n", type=int, default=10_000, help="estimation draws (the maximum, for sequential)")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--looks", type=lambda t: _numbers(t, int), default=[4, 6, 8], help="e.g. 4,6,8")
    parser.add_argument("--radii", type=lambda t: _numbers(t, float), default=[0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    parser.add_argument("--norm", default="l2", help="norm of the radii of interest: l1, l2 or linf")
    parser.add_argument("--skip", type=int, default=1, help="every skip-th test image (the certify stage's skip)")
    parser.add_argument("--max-images", type=int, default=None, help="at most this many images (default all)")
    parser.add_argument("--images-per-batch", type=int, default=50)
    parser.add_argument("--batch-size", default="auto", help="noisy samples per model call (default: measured)")
    parser.add_argument("--fixed-table", type=Path, default=None,
                        help="a certify stage's certify.csv for this checkpoint, seed and images: the fixed-n rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON report (default benchmarks/results/sequential_<dataset>.json)")
    args = parser.parse_args()
    args.norm = norm_label(parse_norm(args.norm))
    args.batch_size = "auto" if args.batch_size == "auto" else int(args.batch_size)
    if not Path(args.checkpoint).is_file():
        parser.error(f"no checkpoint at {args.checkpoint}")
    return args


def certify_all(smooth: Smooth, dataset, selection: list[int], args: argparse.Namespace,
                **sequential: Any) -> tuple[pd.DataFrame, float]:
    """Rows for the selected images and the wall seconds they took."""
    frames, tic = [], time.perf_counter()
    for start in range(0, len(selection), args.images_per_batch):
        chunk = selection[start:start + args.images_per_batch]
        x, y = batch_of(dataset, chunk, args.device)
        cert = smooth.certify(x, y, args.n0, args.n, args.alpha, args.batch_size, indices=chunk, **sequential)
        frames.append(cert.to_frame())
    return pd.concat(frames, ignore_index=True), time.perf_counter() - tic


def saved_fixed(path: Path, selection: list[int], args: argparse.Namespace) -> tuple[pd.DataFrame, float]:
    """The fixed-n rows of a certify stage's table (checked against the selection and settings) and
    their recorded seconds."""
    frame = read_table(path).set_index("idx", drop=False).loc[selection].reset_index(drop=True)
    settings = (frame["n0"] == args.n0) & (frame["n"] == args.n) & (frame["alpha"] == args.alpha)
    if not settings.all():
        raise SystemExit(f"{path} was certified with other n0 / n / alpha than --n0 {args.n0} --n {args.n} "
                         f"--alpha {args.alpha}")
    return frame, float(frame["seconds_predict"].sum() + frame["seconds_certify"].sum())


def accuracy(frame: pd.DataFrame, args: argparse.Namespace) -> list[float]:
    return [float(a) for a in certified_accuracy(frame, args.radii, args.norm)]


def compare(fixed: pd.DataFrame, fixed_seconds: float, looks: int, run: tuple[pd.DataFrame, float],
            level_only: pd.DataFrame, args: argparse.Namespace) -> dict[str, Any]:
    """One row of the report: draws, time and certified accuracy of K looks against fixed n."""
    frame, seconds = run
    sequential, at_alpha = accuracy(frame, args), accuracy(fixed, args)
    return {
        "looks": looks, "look_sizes": look_sizes(args.n, looks),
        "mean_draws": float(frame["n"].mean()), "draw_ratio": float(frame["n"].mean() / args.n),
        "mean_draws_with_selection": float(frame["n"].mean() + args.n0),
        "seconds": seconds, "fixed_seconds": fixed_seconds, "time_ratio": seconds / fixed_seconds,
        "stop_look_counts": np.bincount(frame["stop_look"], minlength=looks + 1)[1:].tolist(),
        "accuracy_sequential": sequential, "accuracy_fixed_alpha": at_alpha,
        "accuracy_fixed_alpha_over_k": accuracy(level_only, args),
        "max_accuracy_drop": max(a - s for a, s in zip(at_alpha, sequential, strict=True)),
    }


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, images: int) -> None:
    radii = " | ".join(f"r={r:g}" for r in args.radii)
    print(f"\n{images} {args.dataset} test images, n={args.n}, n0={args.n0}, alpha={args.alpha}, sigma={args.sigma}, "
          f"{args.norm} radii of interest {args.radii}")
    print(f"| method | draws/image | ratio | time ratio | {radii} |")
    print("|---" * (4 + len(args.radii)) + "|")
    fmt = " | ".join
    print(f"| fixed n, alpha | {args.n} | 1 | 1 | {fmt(f'{a:.3f}' for a in rows[0]['accuracy_fixed_alpha'])} |")
    for row in rows:
        k = row["looks"]
        print(f"| fixed n, alpha/{k} | {args.n} | 1 | 1 | {fmt(f'{a:.3f}' for a in row['accuracy_fixed_alpha_over_k'])} |")
        print(f"| sequential K={k} | {row['mean_draws']:.0f} | {row['draw_ratio']:.3f} | {row['time_ratio']:.3f} | "
              f"{fmt(f'{a:.3f}' for a in row['accuracy_sequential'])} |")


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    model = checkpoints.load(args.checkpoint, device=args.device)
    dataset = load_dataset(args.dataset, "test", seed=args.seed)
    _, selection = subset(dataset, args.skip, args.max_images)
    images = len(selection)
    smooth = Smooth(model, make_noise("Gaussian", math.prod(model.input_shape), sigma=args.sigma), model.num_classes,
                    seed=args.seed)
    if args.fixed_table is None:
        fixed, fixed_seconds = certify_all(smooth, dataset, selection, args)
    else:
        fixed, fixed_seconds = saved_fixed(args.fixed_table, selection, args)
    rows = []
    for looks in args.looks:
        run = certify_all(smooth, dataset, selection, args, radii_of_interest={args.norm: args.radii}, looks=looks)
        level_only = recertify(fixed, smooth.noise, alpha=args.alpha / looks)
        rows.append(compare(fixed, fixed_seconds, looks, run, level_only, args))
    print_table(rows, args, images)
    out = args.output or Path(__file__).resolve().parent / "results" / f"sequential_{args.dataset}.json"
    report = {"args": {**vars(args), "output": str(out), "fixed_table": args.fixed_table and str(args.fixed_table)},
              "images": images, "rows": rows, "provenance": provenance()}
    atomic_write_json(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
