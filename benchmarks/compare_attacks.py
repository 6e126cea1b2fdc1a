"""rslib's minimal-norm l2 attacks against adv-lib's DDN, ALMA and FMN on the demo's models.

Every model of the demo study folder (baseline, Cohen and averaged/heat, all attacked as base,
deterministic classifiers) is attacked on the same inputs: every ``--every``-th digit of the test
split that the model classifies correctly. rslib: DDN (100 steps), minimal-distance PGD (the demo's
settings), ALMA (defaults: 2 runs of 500 steps) and ``best``, the per-input minimum over these three
(its time is their sum). adv-lib 0.2.8 (the DDN and ALMA authors' library): DDN, ALMA and FMN,
1000 steps each, no quantization. Every success is re-checked with the model; failures count as
``inf`` in the medians. Times are process CPU seconds on one thread (a shared machine's wall time
is noisy; it is recorded too). Target: ``best``'s median within 1% of (or below) the smallest adv-lib
median, in at most twice the CPU time of that adv-lib attack.

    echo "setuptools<81" > /tmp/build-constraints.txt   # visdom's setup.py imports pkg_resources
    pip install -c constraints.txt --build-constraint /tmp/build-constraints.txt adv-lib==0.2.8 visdom==0.2.4
    python benchmarks/compare_attacks.py [outputs/demo] [--every 4]

Writes ``benchmarks/results/compare_attacks.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from rslib.core.attacks import alma, ddn, pgd_minimal
from rslib.nn.checkpoints import load
from rslib.nn.data import load_dataset
from rslib.pipeline.layout import FINAL_CHECKPOINT, checkpoints_dir
from rslib.util.files import atomic_write_json
from rslib.util.provenance import provenance

MODELS = {"baseline": "Baseline", "cohen": "Cohen (as a base model)", "heat": "Averaged (heat smoothing)"}
RSLIB = ("rslib ddn", "rslib pgd", "rslib alma")
Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def rslib_attacks() -> dict[str, Attack]:
    """rslib's attacks as ``(model, x, y) -> x_adv``; PGD with the demo's attack settings."""
    return {
        "rslib ddn": lambda m, x, y: ddn(m, x, y, steps=100).x_adv,
        "rslib pgd": lambda m, x, y: pgd_minimal(m, x, y, 2, eps_max=4.0, steps=10, search_steps=6).x_adv,
        "rslib alma": lambda m, x, y: alma(m, x, y, generator=torch.Generator().manual_seed(0)).x_adv,
    }


def adv_lib_attacks() -> dict[str, Attack]:
    """adv-lib's attacks with their defaults, 1000 steps each, no quantization."""
    try:
        from adv_lib.attacks import alma as adv_alma
        from adv_lib.attacks import ddn as adv_ddn
        from adv_lib.attacks import fmn as adv_fmn
    except ImportError as e:
        sys.exit(f"adv-lib is missing ({e}); install the bench extra: see this script's docstring")
    return {
        "adv-lib ddn": lambda m, x, y: adv_ddn(m, x, y, steps=1000, levels=None),
        "adv-lib alma": lambda m, x, y: adv_alma(m, x, y, num_steps=1000),
        "adv-lib fmn": lambda m, x, y: adv_fmn(m, x, y, norm=2, steps=1000),
    }


def inputs(model: nn.Module, every: int, seed: int) -> tuple[Tensor, Tensor]:
    """Every ``every``-th test digit (the demo's split seed) that ``model`` classifies correctly."""
    x, y = load_dataset("digits", "test", seed=seed).tensors
    x, y = x[::every], y[::every]
    with torch.no_grad():
        right = model(x).argmax(1) == y
    return x[right], y[right]


def verified_l2(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
    """l2 distances (float64) of the examples the model really misclassifies inside [0, 1]; else inf."""
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    flat = x_adv.flatten(1)
    fooled &= (flat.amin(1) >= 0) & (flat.amax(1) <= 1)
    size = (x_adv.double() - x.double()).flatten(1).norm(dim=1)
    return torch.where(fooled, size, torch.full_like(size, math.inf))


def run(attack: Attack, model: nn.Module, x: Tensor, y: Tensor) -> dict:
    """Time one attack (CPU and wall seconds) and verify its examples."""
    torch.manual_seed(0)
    cpu, wall = time.process_time(), time.perf_counter()
    x_adv = attack(model, x, y)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return summary(verified_l2(model, x, y, x_adv.detach()), cpu, wall)


def summary(l2: Tensor, cpu: float, wall: float) -> dict:
    """Median (failures count as inf), success rate, seconds and the per-input distances."""
    return {"median_l2": float(l2.median()), "success_rate": float(torch.isfinite(l2).double().mean()),
            "cpu_s": cpu, "wall_s": wall, "l2": [float(v) for v in l2]}


def compare(model: nn.Module, x: Tensor, y: Tensor) -> dict:
    """Every attack on (x, y), ``best`` over rslib's, and the verdict against adv-lib's best."""
    attacks = {**rslib_attacks(), **adv_lib_attacks()}
    rows = {name: run(attack, model, x, y) for name, attack in attacks.items()}
    theirs = [name for name in rows if name.startswith("adv-lib")]
    best = torch.tensor([rows[name]["l2"] for name in RSLIB], dtype=torch.float64).amin(0)
    rows["rslib best"] = summary(best, sum(rows[n]["cpu_s"] for n in RSLIB),
                                 sum(rows[n]["wall_s"] for n in RSLIB))
    reference = min(theirs, key=lambda n: rows[n]["median_l2"])
    adv_min = torch.tensor([rows[n]["l2"] for n in theirs], dtype=torch.float64).amin(0)
    ratio = rows["rslib best"]["median_l2"] / rows[reference]["median_l2"]
    time_ratio = rows["rslib best"]["cpu_s"] / rows[reference]["cpu_s"]
    return {"inputs": len(x), "attacks": rows, "adv_lib_best": reference, "median_ratio": ratio,
            "cpu_ratio": time_ratio, "target_met": ratio <= 1.01 and time_ratio <= 2.0,
            "per_input_vs_adv_lib_min": per_input(best, adv_min)}


def per_input(ours: Tensor, theirs: Tensor) -> dict:
    """How ``best`` compares input by input with the smallest distance any adv-lib attack found."""
    both = torch.isfinite(ours) & torch.isfinite(theirs)
    ratio = ours[both] / theirs[both]
    return {"worse_by_over_1pct": int((ratio > 1.01).sum()), "better_by_over_1pct": int((ratio < 0.99).sum()),
            "geometric_mean_ratio": float(ratio.log().mean().exp()), "max_ratio": float(ratio.max())}


def table(results: dict) -> str:
    """Markdown: every attack per model, then the verdict per model."""
    lines = ["| model | inputs | attack | median l2 | success | CPU s | wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for attack, row in res["attacks"].items():
            lines.append(f"| {MODELS.get(name, name)} | {res['inputs']} | {attack} | {row['median_l2']:.4f} | "
                         f"{row['success_rate']:.3f} | {row['cpu_s']:.1f} | {row['wall_s']:.1f} |")
    lines += ["", "| model | adv-lib best | best / it (median) | CPU ratio | target met |",
              "|---|---|---|---|---|"]
    for name, res in results.items():
        lines.append(f"| {MODELS.get(name, name)} | {res['adv_lib_best']} | {res['median_ratio']:.4f} | "
                     f"{res['cpu_ratio']:.2f} | {res['target_met']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default="outputs/demo", help="the demo's study folder")
    parser.add_argument("--every", type=int, default=4, help="attack every n-th test digit")
    parser.add_argument("--seed", type=int, default=0, help="the digits split seed (the demo's seed)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated experiment names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name in args.models.split(","):
        model = load(checkpoints_dir(Path(args.study) / name) / FINAL_CHECKPOINT)
        x, y = inputs(model, args.every, args.seed)
        results[name] = compare(model, x, y)
        print(f"{name}: {len(x)} inputs, best/adv-lib best {results[name]['median_ratio']:.4f}, "
              f"CPU ratio {results[name]['cpu_ratio']:.2f}", flush=True)
    print(table(results))
    out = Path(__file__).resolve().parent / "results" / "compare_attacks.json"
    atomic_write_json(out, {"study": str(args.study), "every": args.every, "seed": args.seed, "threads": 1,
                            "results": results, "provenance": provenance()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
