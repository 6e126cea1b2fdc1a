"""Radius-table build time from an empty cache, and lookup cost.

Builds every table the noise-radii tutorial needs (d = 3072, its default noises) in a fresh cache
folder and times each build, then times a cached reload and a 100k-point lookup. Target: all tutorial
tables together in under 10 s on a 2-core CPU. Results go to ``benchmarks/results/tables.json``.

    python benchmarks/bench_tables.py [--dim 3072]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rslib.core.noises import make_noise  # noqa: E402
from rslib.core.noises.tables import clear_memory_cache  # noqa: E402
from rslib.pipeline.params import TutorialParams  # noqa: E402
from rslib.util.files import atomic_write_json
from rslib.util.provenance import provenance  # noqa: E402

NORMS = {"l1": 1, "l2": 2, "linf": math.inf}


def tutorial_specs() -> list[tuple[dict, float]]:
    defaults = TutorialParams()
    return ([(spec, 1) for spec in defaults.l1_noises] + [(spec, 2) for spec in defaults.l2_noises]
            + [(spec, math.inf) for spec in defaults.linf_noises])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=3072)
    args = parser.parse_args()
    rho = np.linspace(0.5, 0.99999, 100_000)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["RSLIB_CACHE_DIR"] = cache
        clear_memory_cache()
        total = time.perf_counter()
        for spec, norm in tutorial_specs():
            spec = dict(spec)
            noise = make_noise(spec.pop("name"), args.dim, sigma=1.0, **spec)
            start = time.perf_counter()
            noise.certify(0.9, norm)  # builds any table behind this certificate
            build = time.perf_counter() - start
            start = time.perf_counter()
            noise.certify(rho, norm)
            lookup = time.perf_counter() - start
            rows.append({"noise": repr(noise), "norm": str(norm), "build_s": build,
                         "lookup_100k_s": lookup, "method": noise.describe_certificate(norm)})
            print(f"{repr(noise):60s} {str(norm):4s} build {build:6.3f} s  lookup(100k) {lookup:.4f} s")
        total = time.perf_counter() - total
        clear_memory_cache()
        start = time.perf_counter()
        for spec, norm in tutorial_specs():
            spec = dict(spec)
            make_noise(spec.pop("name"), args.dim, sigma=1.0, **spec).certify(0.9, norm)
        reload = time.perf_counter() - start
    print(f"all tutorial tables from an empty cache: {total:.2f} s (target < 10 s); "
          f"reload from disk cache: {reload:.3f} s")
    out = Path(__file__).resolve().parent / "results" / "tables.json"
    atomic_write_json(out, {"dim": args.dim, "total_build_s": total, "cached_reload_s": reload,
                            "rows": rows, "provenance": provenance()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
