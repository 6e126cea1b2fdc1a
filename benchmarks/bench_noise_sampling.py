"""Noise sampling throughput: every distribution's ``noise.sample(x)`` vs ``torch.randn_like(x)``.

Ratios are measured in one run on the same tensor (1024 x 3072 float32 by default), so they do not
depend on how fast the machine is. Target: every ratio <= 4. Results go to
``benchmarks/results/noise_sampling_<device>.json``.

    python benchmarks/bench_noise_sampling.py [--device cuda] [--batch 1024] [--dim 3072]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

from rslib.core.noises import make_noise  # noqa: E402
from rslib.util.files import atomic_write_json
from rslib.util.provenance import provenance  # noqa: E402

CASES = [
    ("Gaussian", {}), ("Laplace", {}), ("Uniform", {}), ("Pareto", {"a": 3}), ("UniformBall", {}),
    ("ExpInf", {"k": 10, "j": 100}), ("PowInf", {"a": 3082}), ("Exp1", {"k": 1}), ("Exp1", {"k": 3}),
    ("Exp2", {"k": 1}), ("Exp2", {"k": 4, "j": 10}), ("Pow2", {"k": 2, "a": 1546}),
    ("Expp", {"p": 0.5}), ("Expp", {"p": 1.5}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.rand(args.batch, args.dim, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    noises = []
    for name, params in CASES:
        if name == "PowInf":
            params = {"a": args.dim + 10}
        if name == "Pow2":
            params = {"k": 2, "a": args.dim / 2 + 10}
        noises.append((f"{name}{params}" if params else name, make_noise(name, args.dim, sigma=0.5, **params)))
    # Interleave: each noise is timed right after its own randn_like baseline, and the ratio is the
    # median over repeats, so a load spike on a shared machine hits both sides of a ratio alike.
    rows = []
    print(f"shape {tuple(x.shape)} float32 on {device}")
    for label, noise in noises:
        ratios, times, base_times = [], [], []
        for _ in range(args.repeats):
            base = median_seconds(lambda: torch.randn_like(x), 3, warmup=1, sync=sync)
            seconds = median_seconds(lambda noise=noise: noise.sample(x, generator=generator), 3, warmup=1,
                                     sync=sync)
            ratios.append(seconds / base)
            times.append(seconds)
            base_times.append(base)
        ratio, seconds = statistics.median(ratios), statistics.median(times)
        rows.append({"noise": label, "ms": seconds * 1e3, "randn_like_ms": statistics.median(base_times) * 1e3,
                     "ratio_to_randn_like": ratio, "samples_per_s": args.batch / seconds})
        print(f"{label:32s} {seconds * 1e3:8.2f} ms   x{ratio:5.2f} randn_like")
    worst = max(row["ratio_to_randn_like"] for row in rows)
    print(f"worst ratio: {worst:.2f} (target <= 4)")
    out = Path(__file__).resolve().parent / "results" / f"noise_sampling_{device.type}.json"
    atomic_write_json(out, {"shape": [args.batch, args.dim], "dtype": "float32", "device": str(device),
                            "threads": torch.get_num_threads(), "worst_ratio": worst, "rows": rows,
                            "provenance": provenance()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
