"""scikit-learn's bundled 8x8 handwritten digits: embedded, no download; the split is fixed by the seed."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from rslib.nn.data.registry import DATASETS, DatasetSpec


@lru_cache(maxsize=8)
def _digits_split(seed: int, test_fraction: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = (bunch.images.astype(np.float32) / 16.0).reshape(-1, *(1, 8, 8))
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = map(np.sort, train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                                        random_state=seed, shuffle=True, stratify=labels))
    return {"train": (images[train_idx], labels[train_idx]), "test": (images[test_idx], labels[test_idx])}


def load_digits(split: Literal["train", "test"], seed: int = 0, test_fraction: float = 0.25) -> TensorDataset:
    """scikit-learn's 8x8 digits as ``(image, label)`` pairs: float32 (1, 8, 8) in [0, 1], int64.

    The split is stratified by label and fixed by ``seed``: the same arguments always give the
    same images, and the train and test splits of one seed never share an image.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    try:
        test_fraction = float(test_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"test_fraction must be a number in (0, 1); got {test_fraction!r}") from None
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    images, labels = _digits_split(int(seed), test_fraction)[split]
    # Copies, so callers may modify their tensors without touching the cached arrays.
    return TensorDataset(torch.from_numpy(images.copy()), torch.from_numpy(labels.copy()))


DATASETS.register("digits", DatasetSpec(
    "digits", (1, 8, 8), 10, mean=(0.30526,), std=(0.37605,), embedded=True, has_augmentation=False,
    description="scikit-learn's 8x8 handwritten digits (embedded, 1797 images)",
    load=lambda root, split, download, augment, seed: load_digits(split, seed=seed)))
