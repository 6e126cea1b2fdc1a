"""Certification throughput relative to the model's forward-only throughput, in one run.

For each model and noise, ``Smooth.certify`` runs at a fixed model batch size and is timed in
samples/s (n0 + n per image); the same model's forward pass on a ready batch of the same size gives
the ceiling. ratio = certify samples/s / forward samples/s (target >= 0.85 where the sampler is
memory-bound). Also: deterministic one-pass classification vs Monte-Carlo prediction with n0 = 100
draws, time per image. Results go to ``benchmarks/results/certify_<device>.json``.

    python benchmarks/bench_certify.py [--device cuda] [--batch 256] [--n 2048]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

from rslib.core.certify import Smooth
from rslib.core.lbound import deterministic_certify  # noqa: E402
from rslib.core.noises import make_noise  # noqa: E402
from rslib.nn.architectures import build_model  # noqa: E402
from rslib.util.files import atomic_write_json
from rslib.util.provenance import provenance  # noqa: E402

MODELS = [("small_cnn", "digits"), ("cifar_resnet20", "cifar10")]
NOISES = [("Gaussian", {}), ("Uniform", {}), ("Laplace", {}), ("ExpInf", {"k": 10, "j": 0})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for arch, dataset in MODELS:
        model = build_model(arch, dataset).to(device).eval()
        shape = model.input_shape
        x = torch.rand(args.images, *shape, device=device)
        batch = torch.rand(args.batch, *shape, device=device)

        def forward(model=model, batch=batch):
            with torch.inference_mode():
                model(batch).argmax(1)

        forward_rate = args.batch / median_seconds(forward, args.repeats, sync=sync)
        for name, params in NOISES:
            noise = make_noise(name, math.prod(shape), sigma=0.25, **params)
            smooth = Smooth(model, noise, model.num_classes)

            def certify(smooth=smooth, x=x):
                smooth.certify(x, None, n0=64, n=args.n, batch_size=args.batch)

            samples = args.images * (64 + args.n)
            rate = samples / median_seconds(certify, args.repeats, warmup=1, sync=sync)
            rows.append({"model": arch, "noise": name, "forward_samples_per_s": forward_rate,
                         "certify_samples_per_s": rate, "ratio": rate / forward_rate})
            print(f"{arch:15s} {name:10s} forward {forward_rate:9.0f}/s  certify {rate:9.0f}/s  "
                  f"ratio {rate / forward_rate:.2f}")
        smooth = Smooth(model, make_noise("Gaussian", math.prod(shape), sigma=0.25), model.num_classes)
        det = statistics.median(
            _time(lambda model=model, x=x: deterministic_certify(model, x, 0.25), sync) for _ in range(args.repeats))
        mc = statistics.median(
            _time(lambda smooth=smooth, x=x: smooth.predict(x, n=100, alpha=0.001, batch_size=args.batch), sync)
            for _ in range(args.repeats))
        rows.append({"model": arch, "deterministic_s_per_image": det / args.images,
                     "monte_carlo_predict_n0_100_s_per_image": mc / args.images, "mc_over_deterministic": mc / det})
        print(f"{arch:15s} deterministic {det / args.images * 1e3:.3f} ms/image, Monte-Carlo prediction (n=100) "
              f"{mc / args.images * 1e3:.3f} ms/image: x{mc / det:.1f}")
    out = Path(__file__).resolve().parent / "results" / f"certify_{device.type}.json"
    atomic_write_json(out, {"args": vars(args), "rows": rows, "provenance": provenance()})
    print(f"wrote {out}")


def _time(fn, sync) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
