"""Cost of one training epoch per mode, relative to standard training, on the same data and model.

Runs ``rslib.pipeline.stages.train.fit`` for a few epochs of each mode on the embedded digits (or CIFAR-shaped data
with --dataset cifar10 --data-dir ...) and compares the median per-epoch seconds of the training
loop (evaluation excluded). Targets: noise augmentation < 1.15 x standard. Results go to
``benchmarks/results/train_epoch_<dataset>.json``.

    python benchmarks/bench_train_epoch.py [--epochs 3] [--arch small_cnn]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import pandas as pd

from rslib.pipeline.params import validate
from rslib.pipeline.stages import train
from rslib.util.files import atomic_write_json
from rslib.util.provenance import provenance

MODES = ["standard", "noise", "stability", "direct", "smoothadv"]


def experiment(args: argparse.Namespace, name: str, **train_overrides) -> object:
    return validate({
        "experiment": name, "seed": 0, "device": args.device, "stages": ["train"],
        "data": {"dataset": args.dataset, "data_dir": args.data_dir, "batch_size": args.batch_size},
        "model": {"arch": args.arch}, "noise": {"name": "Gaussian", "sigma": 0.25},
        "train": {"epochs": args.epochs, "lr": 0.05, **train_overrides},
    })


def epoch_seconds(exp, folder: Path) -> float:
    train.fit(exp, folder, progress=False, log=lambda *_: None)
    seconds = pd.read_csv(folder / "results" / "train_metrics.csv")["seconds"]
    return statistics.median(seconds.iloc[1:] if len(seconds) > 1 else seconds)  # skip warm-up epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        base = epoch_seconds(experiment(args, "base"), root / "base")
        rows.append({"mode": "standard", "epoch_s": base, "ratio_to_standard": 1.0})
        for mode in MODES[1:]:
            seconds = epoch_seconds(experiment(args, mode, mode=mode, noise_draws=2), root / mode)
            rows.append({"mode": mode, "epoch_s": seconds, "ratio_to_standard": seconds / base})
        heat = experiment(args, "heat", mode="heat", heat_base="base", heat_steps=1, heat_draws=10)
        seconds = epoch_seconds(heat, root / "heat")
        rows.append({"mode": "heat (R=10, per implicit-step epoch)", "epoch_s": seconds,
                     "ratio_to_standard": seconds / base})
    for row in rows:
        print(f"{row['mode']:40s} {row['epoch_s']:.3f} s/epoch   x{row['ratio_to_standard']:.2f} standard")
    out = Path(__file__).resolve().parent / "results" / f"train_epoch_{args.dataset}.json"
    atomic_write_json(out, {"args": vars(args), "rows": rows, "provenance": provenance()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
