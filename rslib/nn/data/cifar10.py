"""CIFAR-10 from the python-pickle batches, read through an allow-list unpickler (no code can run)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_META_FILE = "batches.meta"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The globals a CIFAR batch pickle may name: NumPy's array reconstruction (NumPy 1.x and 2.x
# module names) and the codec Python 3 uses for ``bytes`` under pickle protocol 2.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR batch)")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR batch pickle as a dict with ``str`` keys (Python 2 and 3 pickles alike)."""
    with open(path, "rb") as f:
        # latin1 turns Python 2 byte strings (and NumPy 1.x array buffers) back into what they were.
        obj = _BatchUnpickler(f, encoding="latin1").load()
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _read_pickle(path)
        data, labels = batch.get("data"), batch.get("labels")
        if data is None or labels is None:
            raise ValueError(f"keys 'data' and 'labels' are required; found {sorted(batch)}")
        data, labels = np.asarray(data), np.asarray(labels)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"'data' must be uint8 of shape (N, 3072); found {data.dtype} {data.shape}")
        if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"'labels' must be {len(data)} integers; found {labels.dtype} {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
            raise ValueError(f"labels must lie in 0..9; found {labels.min()}..{labels.max()}")
    except Exception as exc:
        raise DatasetCorruptError(
            f"dataset 'cifar10': {path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}); "
            f"replace the '{CIFAR10_FOLDER}' folder with a fresh copy (or delete it and pass data.download: true)"
        ) from exc
    # Rows are 1024 red, 1024 green then 1024 blue values of a 32x32 image: (N, C, H, W) directly.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_cifar_classes(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        return CIFAR10_CLASSES
    try:
        names = _read_pickle(path)["label_names"]
        names = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
        if len(names) != len(CIFAR10_CLASSES):
            raise ValueError(f"expected 10 label names; found {len(names)}")
    except Exception as exc:
        raise DatasetCorruptError(
            f"dataset 'cifar10': {path} is not a readable CIFAR-10 meta file "
            f"({type(exc).__name__}: {exc}); replace the '{CIFAR10_FOLDER}' folder with a fresh copy"
        ) from exc
    return names


class CIFAR10Batches(UInt8Images):
    """CIFAR-10 from the standard ``cifar-10-batches-py`` pickles, held in memory as uint8.

    Items are ``(image, label)``: float32 (3, 32, 32) in [0, 1] after ``transform`` (a callable
    on that tensor), and a 0-dim int64 label. ``data`` (N, 3, 32, 32) uint8 and ``targets`` (N,)
    int64 hold the raw arrays; ``classes`` the ten class names.
    """

    def __init__(self, folder: str | os.PathLike[str], train: bool,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        folder = Path(folder)
        files = CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES
        parts = [_read_cifar_batch(folder / name) for name in files]
        super().__init__(torch.from_numpy(np.concatenate([d for d, _ in parts])),
                         torch.from_numpy(np.concatenate([t for _, t in parts])), transform)
        self.folder = folder
        self.train = train
        self.classes = _read_cifar_classes(folder / CIFAR10_META_FILE)


def _cifar_how(root: Path) -> str:
    return (f"pass data.download: true on a machine with internet access, or copy the extracted "
            f"'{CIFAR10_FOLDER}' folder (from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) "
            f"into {root}; {root_hint(root)}")


def _cifar_folder(root: Path) -> Path:
    """``root/cifar-10-batches-py``, or ``root`` itself when it already is that folder."""
    nested = root / CIFAR10_FOLDER
    if not nested.is_dir() and (root / CIFAR10_TEST_FILES[0]).is_file():
        return root
    return nested


def _load_cifar10(root: Path, split: str, download: bool, augment: bool) -> Dataset:
    folder = _cifar_folder(root)
    files = CIFAR10_TRAIN_FILES if split == "train" else CIFAR10_TEST_FILES
    if download and not all((folder / f).is_file() for f in files):
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(CIFAR10.url, download_root=str(root),
                                         filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        except Exception as exc:  # network errors come in many types (URLError, HTTPError, ...)
            raise DatasetNotFoundError(f"dataset 'cifar10': downloading into {root} failed ({type(exc).__name__}: "
                                       f"{exc}); {_cifar_how(root)}") from exc
        folder = root / CIFAR10_FOLDER
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(f"dataset 'cifar10' ({split}) not found: searched {folder}, missing "
                                   f"{', '.join(missing)}; {_cifar_how(root)}")
    transform = None
    if augment:
        from torchvision import transforms

        # Cohen et al. / rs4a / HeatSmoothing training augmentation (on the [0, 1] tensor; the
        # zero padding matches PIL's black fill).
        transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()])
    return CIFAR10Batches(folder, train=split == "train", transform=transform)


DATASETS.register("cifar10", DatasetSpec(
    "cifar10", (3, 32, 32), 10, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), embedded=False,
    has_augmentation=True, description="CIFAR-10 32x32 colour images (cifar-10-batches-py under data_dir)",
    load=lambda root, split, download, augment, seed: _load_cifar10(root, split, download, augment)))
