"""MNIST from its original idx files (torchvision's ``MNIST/raw`` layout), decoded once into memory."""

from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from rslib.nn.data.registry import (
    DATASETS,
    DatasetCorruptError,
    DatasetNotFoundError,
    DatasetSpec,
    UInt8Images,
    root_hint,
)

MNIST_RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_MNIST_LEGACY = {"train": "training.pt", "test": "test.pt"}  # torchvision < 0.9's MNIST/processed


def _mnist_how(raw: Path) -> str:
    files = MNIST_RAW_FILES["train"] + MNIST_RAW_FILES["test"]
    return (f"pass data.download: true (it downloads the four MNIST files on a machine with internet "
            f"access, or checks and extracts the original {', '.join(f + '.gz' for f in files)} already "
            f"in {raw} without network access), or copy the four uncompressed files into {raw}; "
            f"{root_hint(raw.parent.parent)}")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes (magic 0x08 0x<ndim>) as a uint8 array of its stated shape."""
    with open(path, "rb") as f:
        header = f.read(4 * (ndim + 1))
        body = np.fromfile(f, dtype=np.uint8)
    if len(header) < 4 * (ndim + 1):
        raise ValueError(f"the file is shorter than the {4 * (ndim + 1)}-byte header")
    magic, *shape = struct.unpack(f">{ndim + 1}i", header)
    if magic != 0x0800 + ndim:
        raise ValueError(f"magic number {magic:#06x}, expected {0x0800 + ndim:#06x} (uint8, {ndim} dimensions)")
    if body.size != int(np.prod(shape)):
        raise ValueError(f"header says {shape} = {int(np.prod(shape))} bytes, the file holds {body.size}")
    return body.reshape(shape)


def _decode_mnist_idx(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, digits = _read_idx(images, 3), _read_idx(labels, 1)
    if pixels.shape[1:] != (28, 28):
        raise ValueError(f"{images.name} holds {pixels.shape[1]}x{pixels.shape[2]} images, expected 28x28")
    if len(digits) != len(pixels):
        raise ValueError(f"{images.name} holds {len(pixels)} images but {labels.name} {len(digits)} labels")
    return torch.from_numpy(pixels), torch.from_numpy(digits.astype(np.int64))


def _decode_mnist_legacy(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, digits = torch.load(path, weights_only=True)
    if pixels.dtype != torch.uint8 or pixels.shape[1:] != (28, 28) or digits.shape != (len(pixels),):
        raise ValueError(f"expected uint8 images (N, 28, 28) and N labels; got {pixels.dtype} "
                         f"{tuple(pixels.shape)} and {tuple(digits.shape)}")
    return pixels, digits.to(torch.int64)


@lru_cache(maxsize=4)
def _decode_mnist(files: tuple[Path, ...], stamp: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images (N, 1, 28, 28) uint8 and labels (N,) int64, decoded once per process.

    ``files``: the split's (images, labels) idx files, or torchvision's legacy ``.pt`` file;
    ``stamp`` (their sizes and modification times) is part of the cache key, so a replaced file
    is decoded again.
    """
    try:
        pixels, digits = _decode_mnist_idx(*files) if len(files) == 2 else _decode_mnist_legacy(files[0])
        if len(digits) and (int(digits.min()) < 0 or int(digits.max()) > 9):
            raise ValueError(f"labels must lie in 0..9; found {int(digits.min())}..{int(digits.max())}")
    except Exception as exc:
        raise DatasetCorruptError(f"dataset 'mnist': cannot read {', '.join(map(str, files))} as MNIST "
                                  f"({type(exc).__name__}: {exc}); delete them and pass data.download: true") from exc
    return pixels.unsqueeze(1), digits


def _mnist_files(root: Path, split: str) -> tuple[Path, ...] | None:
    """The files holding ``split``: the raw idx pair, else torchvision's legacy ``.pt``; None if neither."""
    raw = tuple(root / "MNIST" / "raw" / name for name in MNIST_RAW_FILES[split])
    if all(p.is_file() for p in raw):
        return raw
    legacy = root / "MNIST" / "processed"
    if all((legacy / name).is_file() for name in _MNIST_LEGACY.values()):  # torchvision's own condition
        return (legacy / _MNIST_LEGACY[split],)
    return None


def _download_mnist(root: Path) -> None:
    """torchvision's md5-checked download into ``root/MNIST/raw`` (offline when the .gz files are there)."""
    from torchvision import datasets

    try:
        datasets.MNIST(str(root), train=True, download=True)
    except Exception as exc:  # network errors come in many types (URLError, HTTPError, ...)
        raw = root / "MNIST" / "raw"
        raise DatasetNotFoundError(
            f"dataset 'mnist': downloading into {raw} failed ({type(exc).__name__}: {exc}); {_mnist_how(raw)}"
        ) from exc


def _load_mnist(root: Path, split: str, download: bool, augment: bool) -> Dataset:
    files = _mnist_files(root, split)
    if files is None and download:
        _download_mnist(root)
        files = _mnist_files(root, split)
    if files is None:
        raw = root / "MNIST" / "raw"
        missing = [name for name in MNIST_RAW_FILES[split] if not (raw / name).is_file()]
        raise DatasetNotFoundError(f"dataset 'mnist' ({split}) not found: searched {raw}, missing "
                                   f"{', '.join(missing)}; {_mnist_how(raw)}")
    stamp = tuple(v for p in files for v in (p.stat().st_size, p.stat().st_mtime_ns))
    return UInt8Images(*_decode_mnist(files, stamp))


DATASETS.register("mnist", DatasetSpec(
    "mnist", (1, 28, 28), 10, mean=(0.1307,), std=(0.3081,), embedded=False, has_augmentation=False,
    description="MNIST 28x28 handwritten digits (torchvision layout under data_dir)",
    load=lambda root, split, download, augment, seed: _load_mnist(root, split, download, augment)))
