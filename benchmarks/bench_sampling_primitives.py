"""Time the elementwise samplers of ``rslib.core.noises.sampling`` against ``torch.randn_like``.

Usage: ``python benchmarks/bench_sampling_primitives.py [--shape 1024 3072] [--repeats 15]
[--device cpu] [--dtype float32]``. Prints the median time of each primitive (after warm-up, cases interleaved) and its
ratio to ``randn_like`` on the same tensor. A seeded ``torch.Generator`` is passed to every sampler,
as in real use.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rslib.core.noises import sampling


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_ms(cases: dict, device: torch.device, repeats: int, warmup: int = 3) -> dict:
    """Per-case list of wall times (ms). Cases run round-robin, so that a slow spell of a shared
    machine hits every case alike and the per-repeat ratios to the baseline stay meaningful."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(1e3 * (time.perf_counter() - t0))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[1024, 3072])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: leave torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    out = torch.empty(args.shape, device=device, dtype=dtype)
    cases = {
        "randn_like (baseline)": lambda: torch.randn_like(out),
        "laplace_": lambda: sampling.laplace_(out, generator=gen),
        "symmetric_pareto_(a=3)": lambda: sampling.symmetric_pareto_(out, 3.0, generator=gen),
    }
    for p in (0.1, 0.5, 1.0, 1.5, 2.0, 4.0, 10.0):
        cases[f"symmetric_generalized_gamma_(p={p:g})"] = (
            lambda p=p: sampling.symmetric_generalized_gamma_(out, p, generator=gen))
    if out.dim() == 2:
        cases["linf_sphere_"] = lambda: sampling.linf_sphere_(out, generator=gen)
        cases["l2_sphere_"] = lambda: sampling.l2_sphere_(out, generator=gen)
        cases["l1_sphere_"] = lambda: sampling.l1_sphere_(out, generator=gen)

    print(f"shape={tuple(args.shape)} dtype={args.dtype} device={device} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    times = interleaved_ms(cases, device, args.repeats)
    base_name = next(iter(cases))
    base = times[base_name]
    print(f"{'sampler':40s} {'median ms':>10s} {'min ms':>8s} {'x randn_like':>13s}")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        print(f"{name:40s} {statistics.median(ts):10.2f} {min(ts):8.2f} {ratio:13.2f}")
    print("x randn_like: median over repeats of (time / randn_like time in the same repeat)")

if __name__ == "__main__":
    main()
