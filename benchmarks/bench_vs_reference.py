"""rslib against IBM ART's ``PyTorchRandomizedSmoothing``: certification speed on the same model, inputs, n.

For each model, every variant certifies the same images with ``n0`` selection and ``n`` estimation draws
at ``alpha`` (Gaussian noise, sigma 0.25); the variants run interleaved, ``--repeats`` times:

- ``rslib_default``: ``Smooth(model, noise, K).certify(x, y, n0=, n=, alpha=)`` as users call it: no batch
  size, no memory format (both measured by ``rslib.core.autotune`` on the first call, then cached; that
  one-off measurement is timed apart, in ``autotune.seconds``);
- ``art_default``: ART's ``certify(x, n=n)`` with ``sample_size=n0``, ``scale=sigma``, ``alpha``, at
  its default ``batch_size=32``; ``art_auto_batch``: ART at the batch size and memory format rslib chose
  (tuned for it); ``art_best``: the faster of the two (the reference at its best);
- ``forward``: the model alone, forward + argmax of the same number of rows (``images * (n0 + n)``) as
  one ready random batch again and again (the ceiling of any Monte-Carlo certifier), timed like the
  other variants at two settings, the faster median counting: the batch size and memory format a short
  scan found fastest (``forward_scan_best``) and those rslib chose (``forward_at_auto``).

Same semantics: top class from ``n0`` draws, one-sided Clopper-Pearson lower bound at ``alpha``
(``proportion_confint(k, n, 2 * alpha, "beta")`` in both). Differences: ART certifies one image at a
time (its batches never span images), draws noise with numpy's global generator in float64, abstains
only when the bound is < 1/2 (rslib: <= 1/2) and returns the L2 radius alone; rslib also derives the
l1/linf radii and keeps counts. Results: medians of images/s, ratios ``rslib / ART`` and
``rslib samples/s / forward samples/s``, in ``benchmarks/results/bench_vs_reference_<device>.json``.

    pip install -c constraints.txt adversarial-robustness-toolbox==1.20.1
    python benchmarks/bench_vs_reference.py [--device cpu] [--repeats 3] [--threads T] [--images K]
        [--checkpoint small_cnn=path/to/model.pt]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rslib.core import autotune
from rslib.core.certify import Smooth
from rslib.core.noises import make_noise
from rslib.nn.architectures import build_model
from rslib.nn.checkpoints import load
from rslib.nn.data.digits import load_digits
from rslib.util.files import atomic_write_json
from rslib.util.provenance import provenance

#: (dataset, images certified per repeat): each image costs n0 + n forwards.
MODELS = {"small_cnn": ("digits", 10), "lenet_caffe": ("mnist", 4), "cifar_resnet20": ("cifar10", 1)}
SIGMA = 0.25
FORWARD_SIZES = tuple(2**k for k in range(5, 13))
FORWARD_SECONDS = 0.3
RATIOS = [("rslib_default", "art_best"), ("rslib_default", "art_default"), ("rslib_default", "forward")]
#: The targets of issue 13 at defaults: rslib / ART at its best and rslib / forward-only.
TARGETS = {"rslib_default/art_best": 1.1, "rslib_default/forward": 0.9}
ART_DEFAULT_BATCH = 32


def inputs(arch: str, dataset: str, images: int, checkpoint: str | None,
           device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (checkpoint or random weights) and ``images`` inputs with labels: digits test images for
    the digits dataset, else seeded uniform noise with label 0."""
    torch.manual_seed(0)
    model = load(checkpoint, device) if checkpoint else build_model(arch, dataset).to(device).eval()
    if dataset == "digits":
        data = load_digits("test")
        x, y = data.tensors[0][:images], data.tensors[1][:images]
    else:
        x, y = torch.rand(images, *model.input_shape), torch.zeros(images, dtype=torch.long)
    return model, x.to(device), y.to(device)


def art_classifier(model: nn.Module, x: torch.Tensor, args: argparse.Namespace):
    """ART's randomized-smoothing wrapper around the same model, noise scale, n0 and alpha."""
    from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing

    return PyTorchRandomizedSmoothing(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=model.num_classes,
        device_type="gpu" if x.device.type == "cuda" else "cpu", sample_size=args.n0, scale=SIGMA, alpha=args.alpha)


def variants(model: nn.Module, x: torch.Tensor, y: torch.Tensor, choice: autotune.Choice,
             args: argparse.Namespace) -> dict[str, Callable[[], np.ndarray]]:
    """Each variant certifies all of ``x`` once and returns its predictions (-1: abstain)."""
    noise = make_noise("Gaussian", math.prod(x.shape[1:]), sigma=SIGMA)
    default = Smooth(model, noise, model.num_classes)
    art = art_classifier(model, x, args)
    x_np = x.cpu().numpy()
    common = {"n0": args.n0, "n": args.n, "alpha": args.alpha}

    def rslib_default() -> np.ndarray:
        return default.certify(x, y, **common).prediction

    def art_default() -> np.ndarray:
        return art.certify(x_np, n=args.n)[0]

    def art_auto_batch() -> np.ndarray:
        with autotune.memory_format(model, choice.channels_last):
            return art.certify(x_np, n=args.n, batch_size=choice.batch_size)[0]
    return {"rslib_default": rslib_default, "art_default": art_default, "art_auto_batch": art_auto_batch}


def forward_rate(model: nn.Module, rows: torch.Tensor, channels_last: bool, seconds: float) -> float:
    """Images/s of consecutive forwards (+ argmax) of the ready batch ``rows``, for ``seconds``."""
    with autotune.memory_format(model, channels_last), torch.inference_mode():
        model(rows)
        done, tic = 0, time.perf_counter()
        while not done or time.perf_counter() - tic < seconds:
            model(rows).argmax(1).cpu()
            done += len(rows)
        return done / (time.perf_counter() - tic)


def ready_rows(x: torch.Tensor, size: int, channels_last: bool) -> torch.Tensor:
    rows = torch.randn(size, *x.shape[1:], device=x.device)
    return rows.contiguous(memory_format=torch.channels_last) if channels_last else rows


def forward_scan(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """Forward images/s per batch size in ``FORWARD_SIZES`` and memory format (``FORWARD_SECONDS`` each);
    the scan stops at a size whose one forward would take over a second at the best rate so far."""
    scan: list[dict] = []
    for size in FORWARD_SIZES:
        if scan and size / max(row["images_per_second"] for row in scan) > 1.0:
            break
        for last in autotune.memory_formats(model, x):
            rate = forward_rate(model, ready_rows(x, size, last), last, FORWARD_SECONDS)
            scan.append({"batch_size": size, "channels_last": last, "images_per_second": rate})
    return scan


def forward_variant(model: nn.Module, x: torch.Tensor, best: dict, samples: int) -> Callable[[], None]:
    """The ceiling: ``samples`` rows through the model at its best batch size and format, ready batches."""
    rows = ready_rows(x, best["batch_size"], best["channels_last"])

    def forward() -> None:
        with autotune.memory_format(model, best["channels_last"]), torch.inference_mode():
            for _ in range(-(-samples // len(rows))):
                model(rows).argmax(1).cpu()
    return forward


def timed(fn: Callable[[], np.ndarray | None]) -> tuple[float, np.ndarray | None]:
    tic = time.perf_counter()
    out = fn()
    return time.perf_counter() - tic, out


def bench_model(arch: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Interleaved repeats of every variant on one model; medians and ratios."""
    dataset, default_images = MODELS[arch]
    images = args.images or default_images
    model, x, y = inputs(arch, dataset, images, args.checkpoints.get(arch), device)
    tic = time.perf_counter()
    choice = autotune.choose(model, x)
    choose_seconds = time.perf_counter() - tic
    scan = forward_scan(model, x)
    best = max(scan, key=lambda row: row["images_per_second"])
    samples = images * (args.n0 + args.n)
    auto = {"batch_size": choice.batch_size, "channels_last": choice.channels_last}
    runs = {**variants(model, x, y, choice, args), "forward_scan_best": forward_variant(model, x, best, samples),
            "forward_at_auto": forward_variant(model, x, auto, samples)}
    warm = variants(model, x[:1], y[:1], choice, argparse.Namespace(**{**vars(args), "n0": 32, "n": 256}))
    for fn in warm.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    predictions: dict[str, np.ndarray | None] = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            elapsed, predictions[name] = timed(fn)
            seconds[name].append(elapsed)
    return {**summary(images, seconds, predictions, args), "model": arch, "forward_scan": scan,
            "forward_best": best, "autotune": {**choice.metadata(), "seconds": choose_seconds}}


def summary(images: int, seconds: dict[str, list[float]], predictions: dict[str, np.ndarray | None],
            args: argparse.Namespace) -> dict:
    """Medians (images/s, each image costing n0 + n forwards) and the ratios of the targets."""
    rate = {name: images / statistics.median(times) for name, times in seconds.items()}
    rate["forward"] = max(rate["forward_scan_best"], rate["forward_at_auto"])
    rate["art_best"] = max(rate["art_default"], rate["art_auto_batch"])
    ratios = {f"{a}/{b}": rate[a] / rate[b] for a, b in RATIOS}
    return {
        "images": images, "n0": args.n0, "n": args.n, "alpha": args.alpha, "sigma": SIGMA,
        "seconds": seconds, "images_per_second": rate,
        "forward_samples_per_second": rate["forward"] * (args.n0 + args.n),
        "ratios": ratios, "targets_met": {name: ratios[name] >= bound for name, bound in TARGETS.items()},
        "prediction_agreement_rslib_art": float(np.mean(predictions["rslib_default"] == predictions["art_default"])),
    }


def print_row(row: dict) -> None:
    auto = row["autotune"]
    print(f"{row['model']:15s} images/s: " + "  ".join(f"{k} {v:.3g}" for k, v in row["images_per_second"].items()))
    print(f"{'':15s} auto: batch {auto['batch_size']} channels_last {auto['channels_last']} "
          f"({auto['source']}, {auto['seconds']:.2f}s); forward best at batch {row['forward_best']['batch_size']} "
          f"channels_last {row['forward_best']['channels_last']}")
    print(f"{'':15s} " + "  ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items())
          + f"  targets met: {row['targets_met']}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, among " + ", ".join(MODELS))
    parser.add_argument("--images", type=int, default=0, help="images per model (default: per model)")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="ARCH=PATH",
                        help="trained weights for an architecture (default: random weights)")
    args = parser.parse_args()
    args.checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as cache:   # an empty autotune cache: time the first call's measurement
        os.environ["RSLIB_CACHE_DIR"] = cache
        for arch in args.models.split(","):
            rows.append(bench_model(arch, args, device))
            print_row(rows[-1])
    out = Path(__file__).resolve().parent / "results" / f"bench_vs_reference_{device.type}.json"
    config = {k: v for k, v in vars(args).items() if k != "checkpoints"}
    atomic_write_json(out, {"args": config, "threads": torch.get_num_threads(), "rows": rows,
                            "provenance": provenance()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
