"""Clean and noisy test accuracy of every training mode on the embedded digits, with wall time.

    python benchmarks/train_modes_digits.py

Writes ``benchmarks/results/train_modes_digits.json``. Heat smoothing starts from the standard model.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rslib.nn import checkpoints
from rslib.pipeline.params import validate
from rslib.pipeline.stages import train
from rslib.util.files import atomic_write_json
from rslib.util.provenance import provenance

MODES = [
    ("standard", {}),
    ("noise", {}),
    ("stability", {}),
    ("smoothadv", {"noise_draws": 2, "adv_steps": 2, "adv_eps": 0.25, "adv_warmup_epochs": 5}),
    ("direct", {"noise_draws": 4}),
    ("heat", {"heat_base": "standard", "heat_steps": 2, "heat_draws": 4, "heat_fidelity": "softmax",
              "epochs": 10, "lr": 0.05}),
]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for mode, extra in MODES:
            experiment = validate({
                "experiment": mode, "seed": 0, "device": "cpu", "stages": ["train"],
                "data": {"dataset": "digits", "batch_size": 64}, "model": {"arch": "small_cnn"},
                "noise": {"name": "Gaussian", "sigma": 0.25},
                "train": {"mode": mode, "epochs": 15, "lr": 0.1, **extra},
            })
            start = time.perf_counter()
            checkpoint = train.fit(experiment, Path(root) / mode, progress=False, log=lambda *_: None)
            seconds = time.perf_counter() - start
            last = checkpoints.load_checkpoint(checkpoint)["extra"]["metrics"][-1]
            rows.append({"mode": mode, "test_acc": last["test_acc"], "test_noisy_acc": last.get("test_noisy_acc"),
                         "seconds": seconds})
            noisy = last.get("test_noisy_acc")
            print(f"{mode:10s} clean {last['test_acc']:.3f}  noisy {noisy if noisy is None else f'{noisy:.3f}'}"
                  f"  {seconds:.1f} s")
    out = Path(__file__).resolve().parent / "results" / "train_modes_digits.json"
    atomic_write_json(out, {"rows": rows, "provenance": provenance()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
