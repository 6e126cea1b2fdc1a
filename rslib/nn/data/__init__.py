"""Datasets of ``(image, label)`` pairs in [0, 1] pixel space, loaders and evaluation subsets.

The datasets (``DATASETS``) are registered by their modules here (digits, mnist, cifar10, imagenet);
see ``rslib.nn.data.registry`` for the conventions and how to add one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from rslib.nn.data import cifar10, digits, imagenet, mnist  # noqa: F401 -- importing them registers the datasets
from rslib.nn.data.registry import (
    DATA_DIR_ENV,
    DATASETS,
    DatasetCorruptError,
    DatasetNotFoundError,
    DatasetSpec,
    UInt8Images,
    default_data_dir,
)

__all__ = ["DATASETS", "DATA_DIR_ENV", "DatasetCorruptError", "DatasetNotFoundError", "DatasetSpec", "UInt8Images",
           "batch_of", "dataset_info", "default_data_dir", "load_dataset", "make_loader", "subset"]


def dataset_info(name: str) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), num_classes)`` of a dataset's items, without loading it."""
    spec = DATASETS[name]
    return spec.shape, spec.num_classes


def load_dataset(name: str, split: str, *, data_dir: str | os.PathLike[str] | None = None, download: bool = False,
                 augment: bool | None = None, seed: int = 0) -> Dataset:
    """A dataset of ``(image float32 (C, H, W) in [0, 1], label int64)`` pairs.

    ``split`` is ``"train"`` or the held-out split, ``"test"`` (``"val"`` is accepted as its
    synonym: ImageNet's held-out split is its validation set, ``data_dir/val``).
    ``augment``: ``None`` (default) or ``True`` apply the dataset's training augmentation to the
    train split -- CIFAR-10 RandomCrop(32, padding=4) + horizontal flip, ImageNet
    RandomResizedCrop(224) + flip; ``False`` turns it off. The held-out split is never augmented
    (ImageNet: Resize(256) + CenterCrop(224)), and digits/MNIST have no augmentation.
    ``data_dir`` is the data root (MNIST in ``data_dir/MNIST/raw``); ``None`` means
    :func:`default_data_dir` (``$RSLIB_DATA_DIR``, else ``./data``). ``download`` fetches the files
    where the dataset allows it. Both are ignored for the embedded digits, whose train/test split is
    fixed by ``seed`` (the other datasets have fixed splits and ignore it).
    """
    spec = DATASETS[name]
    if split == "val":
        split = "test"
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' (or 'val'); got {split!r}")
    if augment is not None and not isinstance(augment, bool):
        raise ValueError(f"augment must be None, True or False; got {augment!r}")
    use_augmentation = split == "train" and augment is not False and spec.has_augmentation
    root = (default_data_dir() if data_dir is None else Path(data_dir).expanduser()).absolute()
    return spec.load(root, split, bool(download), use_augmentation, seed)


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                drop_last: bool = False, distributed: bool = False, num_replicas: int | None = None,
                rank: int | None = None) -> DataLoader:
    """A ``DataLoader`` whose order depends only on ``seed`` (and, distributed, on the epoch).

    Single process: shuffling draws from a ``torch.Generator`` seeded with ``seed``; successive
    epochs of one loader give different, reproducible orders. Worker processes get their seeds
    from the same generator, so random augmentation in workers is reproducible too (with
    ``num_workers=0`` augmentation draws from torch's global RNG: seed it).
    ``distributed=True`` uses a ``DistributedSampler(dataset, shuffle=shuffle, seed=seed,
    drop_last=drop_last)``, available as ``loader.sampler``: call ``loader.sampler.set_epoch(epoch)``
    before each epoch. Its ``num_replicas`` and ``rank`` come from the initialized
    ``torch.distributed`` process group unless given (giving both needs no process group; the
    sampler's order for one seed and epoch is then the same whatever the number of ranks).
    ``drop_last`` also drops the last incomplete batch. Memory is pinned when CUDA is available.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer; got {num_workers!r}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    sampler = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                     seed=int(seed), drop_last=drop_last)
    elif num_replicas is not None or rank is not None:
        raise ValueError("num_replicas and rank apply only with distributed=True")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
                      num_workers=num_workers, drop_last=drop_last, generator=generator,
                      pin_memory=torch.cuda.is_available())


def batch_of(dataset: Dataset, indices: Sequence[int], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The items ``indices`` of ``dataset`` stacked into a batch: images ``(B, C, H, W)`` and int64 labels."""
    items = [dataset[i] for i in indices]
    x = torch.stack([item[0] for item in items]).to(device)
    y = torch.stack([torch.as_tensor(item[1]) for item in items]).long().to(device)
    return x, y


def subset(dataset: Dataset, skip: int = 1, max_items: int | None = None) -> tuple[Subset, list[int]]:
    """Every ``skip``-th item (indices 0, skip, 2*skip, ...), at most ``max_items`` of them.

    Returns the ``Subset`` and the original indices, so result rows can carry them. Note that
    ``max_items`` counts items, whereas Cohen et al.'s ``certify.py --max`` bounds the index.
    """
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 1:
        raise ValueError(f"skip must be a positive integer; got {skip!r}")
    if max_items is not None and (isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 0):
        raise ValueError(f"max_items must be None or a non-negative integer; got {max_items!r}")
    chosen = list(range(0, len(dataset), skip)[:max_items])  # type: ignore[arg-type]
    return Subset(dataset, chosen), chosen
