"""Datasets of ``(image, label)`` pairs in [0, 1] pixel space, loaders and evaluation subsets.

Every dataset yields an image as a float32 tensor of shape (C, H, W) with values in [0, 1] and
its label as a 0-dim int64 tensor. Normalization is *not* applied here: it lives inside the
models, so smoothing noise is added in pixel space.

=========  ===============  =======  ==================================================
name       image shape      classes  source
=========  ===============  =======  ==================================================
digits     (1, 8, 8)        10       scikit-learn's bundled 8x8 digits (no download)
mnist      (1, 28, 28)      10       the idx files ``data_dir/MNIST/raw`` (torchvision layout)
cifar10    (3, 32, 32)      10       the python-pickle batches under ``data_dir``
imagenet   (3, 224, 224)    1000     ``ImageFolder`` trees ``data_dir/train``, ``data_dir/val``
=========  ===============  =======  ==================================================

``data_dir`` is the data root, set once: when it is not given it is the environment variable
``RSLIB_DATA_DIR``, else ``./data`` (relative to the current directory), see :func:`default_data_dir`.

MNIST and CIFAR-10 are decoded once into uint8 tensors held in memory (:class:`UInt8Images`); items
are converted to float32 on access, with no PIL image per item. A decoded MNIST split is cached per
process, keyed by its files' paths, sizes and modification times.

Missing data raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``) naming the dataset,
the folder searched and how to obtain the data; unreadable data raises
:class:`DatasetCorruptError` naming the file.

CIFAR-10 is read by this module's own reader of the standard ``cifar-10-batches-py`` pickles rather
than by ``torchvision.datasets.CIFAR10``: torchvision verifies every batch against the md5 sums of
the official release and answers any mismatch (a missing file, a truncated download, a small test
fixture) with one generic "not found or corrupted" error. The reader here checks the structure of
each batch instead, names the file that is wrong, and unpickles through an allow-list (plain
containers and NumPy arrays only), so a batch file cannot run code. Downloading still goes through
torchvision's md5-checked download of the official archive.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from rslib.util.registry import Registry


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of :data:`DATASETS`: item shape, classes, normalization constants, how it is obtained."""

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]  # per-channel mean of the training images in [0, 1] (used inside models)
    std: tuple[float, ...]
    embedded: bool  # ships with the code: needs no data_dir
    has_augmentation: bool  # a training augmentation is defined
    description: str
    #: ``load(root, split, download, augment, seed)``: the split as a dataset (``rslib.nn.data.load_dataset``)
    load: Callable[[Path, str, bool, bool, int], Dataset]


#: Every dataset, registered by its module (``rslib.nn.data.<name>``): names, shapes, classes and
#: normalization come from here.
DATASETS: Registry[DatasetSpec] = Registry("dataset")

#: The environment variable naming the data root when ``data_dir`` is not given.
DATA_DIR_ENV = "RSLIB_DATA_DIR"
#: The data root when neither ``data_dir`` nor ``RSLIB_DATA_DIR`` is given (relative to the current directory).
DEFAULT_DATA_DIR = "data"


class DatasetNotFoundError(FileNotFoundError):
    """The data for a dataset is not where it was looked for (or no folder was given)."""


class DatasetCorruptError(ValueError):
    """A data file exists but cannot be read as the dataset's format."""


def label_tensor(label: Any) -> torch.Tensor:
    return torch.tensor(int(label), dtype=torch.int64)


def default_data_dir() -> Path:
    """The data root used when ``data_dir`` is not given: ``$RSLIB_DATA_DIR``, else ``./data``."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def root_hint(root: Path) -> str:
    return (f"the data root here is {root}; set data.data_dir (or the environment variable {DATA_DIR_ENV}, "
            f"used when data_dir is not set; default ./{DEFAULT_DATA_DIR} in the folder rslib runs from) "
            f"to the folder that holds the data")


class UInt8Images(Dataset):
    """Images held in memory as one uint8 tensor, served as float32 in [0, 1].

    ``data`` (N, C, H, W) uint8 and ``targets`` (N,) int64 may be shared with a per-process cache:
    treat them as read-only. Items are ``(image, label)``: float32 (C, H, W) in [0, 1] after
    ``transform`` (a callable on that tensor), and a 0-dim int64 label.
    """

    def __init__(self, data: torch.Tensor, targets: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if data.dtype != torch.uint8 or data.dim() != 4 or targets.shape != (len(data),):
            raise ValueError(f"UInt8Images needs uint8 data (N, C, H, W) and N targets; got {data.dtype} "
                             f"{tuple(data.shape)} and targets {tuple(targets.shape)}")
        self.data = data
        self.targets = targets.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.data[index].to(torch.float32).div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index].clone()

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The items ``indices`` (the ``DataLoader``'s batched fetch): one gather, one conversion."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        images: Sequence[torch.Tensor] = self.data[index].to(torch.float32).div_(255.0).unbind(0)
        if self.transform is not None:
            images = [self.transform(image) for image in images]
        return list(zip(images, self.targets[index].unbind(0), strict=True))
