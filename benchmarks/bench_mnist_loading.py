"""MNIST loading: torchvision's PIL-per-item dataset against rslib's decoded uint8 tensor.

Measures, for both paths on the 60,000 training images (batch 256, shuffled, no workers): the time to
open the split, the images/s of the loader alone, and the images/s of one training epoch of
``lenet_caffe`` (SGD with Gaussian noise augmentation, Cohen et al.'s MNIST step; on the tensor
path also in the channels_last memory format). Also measures the forward throughput of
``lenet_caffe`` at batch 500, contiguous and channels_last. Results go to
``benchmarks/results/mnist_loading_<device>.json``.

    python benchmarks/bench_mnist_loading.py [--data-dir DIR] [--download] [--device cpu] [--threads N]

``--data-dir`` is the data root (default: $RSLIB_DATA_DIR, else ./data) holding MNIST/raw.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _timing import median_seconds
from torch.utils.data import Dataset

from rslib.nn import architectures
from rslib.nn.data import default_data_dir, load_dataset, make_loader
from rslib.util.files import atomic_write_json
from rslib.util.provenance import provenance

BATCH = 256
FORWARD_BATCH = 500
SIGMA = 0.25


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """``fn()`` and its wall time in seconds."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def torchvision_mnist(root: Path) -> Dataset:
    """The old path: torchvision's MNIST, a PIL image and ``ToTensor`` per item."""
    from torchvision import datasets, transforms

    return datasets.MNIST(str(root), train=True, transform=transforms.ToTensor())


def loader_rate(dataset: Dataset) -> float:
    """Images/s of one shuffled pass of the loader alone."""
    def one_pass() -> None:
        for _ in make_loader(dataset, batch_size=BATCH, shuffle=True, seed=0):
            pass

    _, seconds = timed(one_pass)
    return len(dataset) / seconds


def train_epoch_rate(dataset: Dataset, device: torch.device,
                     memory_format: torch.memory_format = torch.contiguous_format) -> float:
    """Images/s of one training epoch of lenet_caffe with noise augmentation, loading included."""
    torch.manual_seed(0)
    model = architectures.build_model("lenet_caffe", "mnist").to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def epoch() -> None:
        for x, y in make_loader(dataset, batch_size=BATCH, shuffle=True, seed=0):
            x, y = x.to(device).contiguous(memory_format=memory_format), y.to(device)
            loss = torch.nn.functional.cross_entropy(model(x + SIGMA * torch.randn_like(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    _, seconds = timed(epoch)
    return len(dataset) / seconds


def forward_rates(device: torch.device) -> dict[str, float]:
    """lenet_caffe forward images/s at batch 500 (inference mode), contiguous and channels_last."""
    model = architectures.build_model("lenet_caffe", "mnist").to(device).eval()
    x = torch.rand(FORWARD_BATCH, 1, 28, 28, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = {}
    for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        net, inputs = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
        with torch.inference_mode():
            seconds = median_seconds(lambda net=net, inputs=inputs: net(inputs), repeats=30, warmup=5, sync=sync)
        rates[name] = FORWARD_BATCH / seconds
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = (args.data_dir or default_data_dir()).absolute()
    device = torch.device(args.device)
    new, new_open = timed(lambda: load_dataset("mnist", "train", data_dir=root, download=args.download))
    old, old_open = timed(lambda: torchvision_mnist(root))
    rows = []
    for path, dataset, open_s, fmt in (
        ("torchvision PIL per item", old, old_open, torch.contiguous_format),
        ("rslib uint8 tensor", new, new_open, torch.contiguous_format),
        ("rslib uint8 tensor, channels_last model", new, new_open, torch.channels_last),
    ):
        rate = train_epoch_rate(dataset, device, fmt)
        rows.append({"path": path, "open_s": open_s, "loader_images_per_s": loader_rate(dataset),
                     "train_epoch_images_per_s": rate, "train_epoch_s": len(dataset) / rate})
    forward = forward_rates(device)
    for row in rows:
        print(f"{row['path']:40s} open {row['open_s']:5.2f} s  loader {row['loader_images_per_s']:8,.0f} img/s"
              f"  train epoch {row['train_epoch_s']:5.1f} s ({row['train_epoch_images_per_s']:6,.0f} img/s)")
    print(f"lenet_caffe forward at batch {FORWARD_BATCH}: "
          + ", ".join(f"{k} {v:,.0f} img/s" for k, v in forward.items()))
    out = Path(__file__).resolve().parent / "results" / f"mnist_loading_{device.type}.json"
    atomic_write_json(out, {
        "args": {"data_dir": str(root), "device": args.device, "batch_size": BATCH, "sigma": SIGMA,
                 "threads": torch.get_num_threads()},
        "rows": rows,
        "lenet_caffe_forward_images_per_s": {"batch_size": FORWARD_BATCH, **forward},
        "provenance": provenance(),
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
