"""The embedded digits dataset: shapes, range, a reproducible disjoint stratified split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rslib.nn.data.digits import load_digits

TOTAL = 1797  # images in scikit-learn's digits


def _rows(dataset) -> set[bytes]:
    images, _ = dataset.tensors
    return {row.numpy().tobytes() for row in images.reshape(len(images), -1)}


def test_shapes_dtypes_and_range() -> None:
    train, test = load_digits("train"), load_digits("test")
    assert len(train) + len(test) == TOTAL
    assert len(test) == pytest.approx(0.25 * TOTAL, abs=1)
    for ds in (train, test):
        images, labels = ds.tensors
        assert images.dtype == torch.float32 and images.shape[1:] == (1, 8, 8)
        assert labels.dtype == torch.int64 and labels.shape == (len(images),)
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert images.max() == 1.0  # pixel value 16 maps to 1
        assert set(labels.tolist()) == set(range(10))
    image, label = test[0]
    assert image.shape == (1, 8, 8) and label.ndim == 0


def test_train_and_test_are_disjoint_and_cover_everything() -> None:
    from sklearn.datasets import load_digits as sklearn_digits

    train, test = load_digits("train"), load_digits("test")
    # The digits set contains no exact duplicate images, so comparing pixels compares images.
    everything = sklearn_digits().images.astype(np.float32) / 16.0
    assert len({row.tobytes() for row in everything.reshape(TOTAL, -1)}) == TOTAL
    assert _rows(train).isdisjoint(_rows(test))
    assert len(_rows(train) | _rows(test)) == TOTAL


def test_split_is_deterministic_and_seeded() -> None:
    a, b = load_digits("test", seed=3), load_digits("test", seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert _rows(load_digits("test", seed=3)) != _rows(load_digits("test", seed=4))
    # Returned tensors are copies: editing one does not change the next call.
    a.tensors[0].zero_()
    assert load_digits("test", seed=3).tensors[0].max() == 1.0


def test_split_is_stratified() -> None:
    from sklearn.datasets import load_digits as sklearn_digits

    counts = np.bincount(sklearn_digits().target, minlength=10)
    fraction = 0.3
    test = load_digits("test", seed=1, test_fraction=fraction)
    test_counts = np.bincount(test.tensors[1].numpy(), minlength=10)
    # Stratification keeps every class within one image of its share of the split.
    assert np.all(np.abs(test_counts - fraction * counts) <= 1.0)
    train_counts = np.bincount(load_digits("train", seed=1, test_fraction=fraction).tensors[1].numpy(),
                               minlength=10)
    assert np.array_equal(train_counts + test_counts, counts)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "valid"}, "split"),
        ({"split": "test", "test_fraction": 1.0}, "test_fraction"),
        ({"split": "test", "test_fraction": 0.0}, "test_fraction"),
        ({"split": "test", "seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_digits(**kwargs)
