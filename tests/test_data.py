"""Dataset registry, on-disk readers (tiny fixtures in the real formats), loaders and subsets."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rslib.nn.data import (
    DATASETS,
    DatasetCorruptError,
    DatasetNotFoundError,
    dataset_info,
    load_dataset,
    make_loader,
    subset,
)
from rslib.nn.data.cifar10 import CIFAR10_CLASSES

CIFAR_PER_BATCH = 6  # images per tiny batch: 5 train batches -> 30 train images, 6 test images


def _cifar_batch(rng: np.random.Generator, n: int, label: str) -> dict:
    """One batch as the official pickles hold it (keys as Python 3 reads them with encoding='bytes')."""
    return {
        b"batch_label": label.encode(),
        b"labels": [int(x) for x in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_cifar10(root: Path, protocol: int = 3) -> dict[str, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": _cifar_batch(rng, CIFAR_PER_BATCH, f"training batch {i} of 5")
               for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(rng, CIFAR_PER_BATCH, "testing batch 1 of 1")
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"num_cases_per_batch": CIFAR_PER_BATCH,
            b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return batches


def _expected_images(batch: dict) -> torch.Tensor:
    return torch.from_numpy(batch[b"data"].reshape(-1, 3, 32, 32)).float() / 255


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def test_registry_and_shapes() -> None:
    assert set(DATASETS) == {"digits", "mnist", "cifar10", "imagenet"}
    assert dataset_info("digits") == ((1, 8, 8), 10)
    assert dataset_info("mnist") == ((1, 28, 28), 10)
    assert dataset_info("cifar10") == ((3, 32, 32), 10)
    assert dataset_info("imagenet") == ((3, 224, 224), 1000)
    for name, spec in DATASETS.items():
        assert (spec.shape, spec.num_classes) == (DATASETS[name].shape, DATASETS[name].num_classes) == dataset_info(name)
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_info("svhn")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("svhn", "train")


def test_digits_through_load_dataset() -> None:
    ds = load_dataset("digits", "test", seed=2, data_dir="/nonexistent")  # data_dir is ignored
    image, label = ds[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    assert torch.equal(load_dataset("digits", "val", seed=2).tensors[0], ds.tensors[0])


@pytest.mark.parametrize("kwargs", [{"split": "valid"}, {"split": "train", "augment": "yes"}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        load_dataset("digits", **kwargs)


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


def test_cifar10_reads_the_standard_batches(tmp_path: Path) -> None:
    batches = write_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", data_dir=tmp_path, augment=False)
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert len(train) == 5 * CIFAR_PER_BATCH and len(test) == CIFAR_PER_BATCH
    assert train.classes == CIFAR10_CLASSES
    expected_train = torch.cat([_expected_images(batches[f"data_batch_{i}"]) for i in range(1, 6)])
    expected_labels = [lab for i in range(1, 6) for lab in batches[f"data_batch_{i}"][b"labels"]]
    for i in range(len(train)):
        image, label = train[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert label.dtype == torch.int64 and label.ndim == 0
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert torch.equal(image, expected_train[i])
        assert int(label) == expected_labels[i]
    stacked = torch.stack([test[i][0] for i in range(len(test))])
    assert torch.equal(stacked, _expected_images(batches["test_batch"]))
    assert [int(test[i][1]) for i in range(len(test))] == batches["test_batch"][b"labels"]
    # The folder itself may be given too.
    direct = load_dataset("cifar10", "test", data_dir=tmp_path / "cifar-10-batches-py")
    assert torch.equal(direct[3][0], test[3][0])


def test_cifar10_augments_train_only(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    plain = load_dataset("cifar10", "train", data_dir=tmp_path, augment=False)
    augmented = load_dataset("cifar10", "train", data_dir=tmp_path)  # augment=None: default on
    test = load_dataset("cifar10", "test", data_dir=tmp_path, augment=True)  # never on test
    torch.manual_seed(0)
    draws = [augmented[0][0] for _ in range(20)]
    assert all(d.shape == (3, 32, 32) and d.dtype == torch.float32 for d in draws)
    assert all(0.0 <= d.min() and d.max() <= 1.0 for d in draws)
    assert any(not torch.equal(d, plain[0][0]) for d in draws)  # crops/flips change the image
    assert len({d.numpy().tobytes() for d in draws}) > 1
    torch.manual_seed(0)
    assert all(torch.equal(d, augmented[0][0]) for d in draws)  # seeded: reproducible
    # Every draw is a translate (<= 4 pixels, zero fill) of the image or of its mirror.
    original = plain[0][0]
    padded = torch.nn.functional.pad(original, (4, 4, 4, 4))
    padded_flipped = torch.nn.functional.pad(original.flip(-1), (4, 4, 4, 4))
    crops = {p[:, y:y + 32, x:x + 32].numpy().tobytes()
             for p in (padded, padded_flipped) for y in range(9) for x in range(9)}
    assert all(d.numpy().tobytes() in crops for d in draws)
    assert all(torch.equal(test[1][0], test[1][0]) for _ in range(5))


def test_cifar10_python2_style_pickles(tmp_path: Path) -> None:
    """Protocol 2 with NumPy 1.x module names, as in the official files, loads too."""
    batches = write_cifar10(tmp_path, protocol=2)
    for path in (tmp_path / "cifar-10-batches-py").iterdir():
        path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert torch.equal(test[0][0], _expected_images(batches["test_batch"])[0])


def test_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py") as info:
        load_dataset("cifar10", "train", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert "cifar10" in message and str(tmp_path / "nowhere") in message
    assert "data.download: true" in message
    assert isinstance(info.value, FileNotFoundError)
    # One batch missing: named.
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    load_dataset("cifar10", "test", data_dir=tmp_path)  # the test split does not need it


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagenet"])
def test_missing_default_data_root_names_the_fix(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RSLIB_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # the default root ./data does not exist here
    with pytest.raises(DatasetNotFoundError, match="data_dir") as info:
        load_dataset(name, "test")
    assert name in str(info.value)


def test_cifar10_corrupt_batch(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:500])  # a truncated download
    with pytest.raises(DatasetCorruptError, match="data_batch_2"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "3072"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "labels"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, "0..9"),
        ({b"labels": [0]}, "data"),
        ([1, 2, 3], "dict"),
        (Path("x"), "refusing"),  # arbitrary objects are not unpickled
    ],
)
def test_cifar10_malformed_batch(tmp_path: Path, content: object, why: str) -> None:
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps(content))
    with pytest.raises(DatasetCorruptError, match="test_batch") as info:
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert why in str(info.value)


# ---------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------


def write_mnist(root: Path, n: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """The four uncompressed idx files in torchvision's layout (root/MNIST/raw)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">iiii", 0x0803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 0x0801, n) + labels.tobytes())
    return images, labels


def test_mnist_reads_idx_files(tmp_path: Path) -> None:
    images, labels = write_mnist(tmp_path)
    for split in ("train", "test"):
        ds = load_dataset("mnist", split, data_dir=tmp_path)
        assert len(ds) == len(images)
        image, label = ds[2]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32
        assert label.dtype == torch.int64 and int(label) == labels[2]
        assert torch.allclose(image[0], torch.from_numpy(images[2]).float() / 255)


def test_mnist_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", "train", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "mnist" in message
    assert "train-images-idx3-ubyte" in message and "data.download: true" in message
    write_mnist(tmp_path)
    image_file = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    image_file.write_bytes(image_file.read_bytes()[:100])
    with pytest.raises(DatasetCorruptError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", "test", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# ImageNet (ImageFolder)
# ---------------------------------------------------------------------------------------------


def write_image_folder(folder: Path, classes=("n01440764", "n01443537"), per_class: int = 2) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for wnid in classes:
        (folder / wnid).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / wnid / f"{wnid}_{i}.png")


def test_imagenet_image_folder(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "val")
    write_image_folder(tmp_path / "train")
    val = load_dataset("imagenet", "val", data_dir=tmp_path)
    assert len(val) == 4 and val.classes == ["n01440764", "n01443537"]
    for i in range(len(val)):
        image, label = val[i]
        assert image.shape == (3, 224, 224) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert label.dtype == torch.int64 and int(label) == i // 2
    assert torch.equal(val[1][0], load_dataset("imagenet", "test", data_dir=tmp_path)[1][0])
    train = load_dataset("imagenet", "train", data_dir=tmp_path)
    assert train[0][0].shape == (3, 224, 224)


def test_imagenet_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("imagenet", "val", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "val") in message and "imagenet" in message and "ImageFolder" in message
    (tmp_path / "val" / "n01440764").mkdir(parents=True)  # a class folder with no images
    with pytest.raises(DatasetNotFoundError, match="no class folder with images"):
        load_dataset("imagenet", "val", data_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="image-net.org"):
        load_dataset("imagenet", "val", data_dir=tmp_path, download=True)


# ---------------------------------------------------------------------------------------------
# loaders and subsets
# ---------------------------------------------------------------------------------------------


def _order(loader) -> list[int]:
    return [int(i) for (batch,) in loader for i in batch]


def test_make_loader_is_seeded() -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(50))
    a = make_loader(ds, batch_size=8, shuffle=True, seed=3)
    b = make_loader(ds, batch_size=8, shuffle=True, seed=3)
    first = _order(a)
    assert first == _order(b) and sorted(first) == list(range(50))
    assert first != _order(make_loader(ds, batch_size=8, shuffle=True, seed=4))
    # Epochs differ from each other, reproducibly.
    a2 = make_loader(ds, batch_size=8, shuffle=True, seed=3)
    epochs = [_order(a2) for _ in range(3)]
    b2 = make_loader(ds, batch_size=8, shuffle=True, seed=3)
    assert epochs == [_order(b2) for _ in range(3)] and epochs[0] != epochs[1]
    assert _order(make_loader(ds, batch_size=8, shuffle=False, seed=3)) == list(range(50))
    dropped = make_loader(ds, batch_size=8, shuffle=False, seed=0, drop_last=True)
    assert len(dropped) == 6 and len(_order(dropped)) == 48
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, batch_size=0, shuffle=False, seed=0)


def test_make_loader_with_workers_is_seeded(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    ds = load_dataset("cifar10", "train", data_dir=tmp_path)  # random augmentation in workers

    def images(seed: int) -> torch.Tensor:
        loader = make_loader(ds, batch_size=10, shuffle=True, seed=seed, num_workers=2)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(images(5), images(5))
    assert not torch.equal(images(5), images(6))


def test_make_loader_distributed(tmp_path: Path) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ds = torch.utils.data.TensorDataset(torch.arange(20))
        loader = make_loader(ds, batch_size=4, shuffle=True, seed=7, distributed=True)
        sampler = loader.sampler
        assert isinstance(sampler, torch.utils.data.distributed.DistributedSampler)
        sampler.set_epoch(0)
        epoch0 = _order(loader)
        sampler.set_epoch(1)
        epoch1 = _order(loader)
        assert sorted(epoch0) == sorted(epoch1) == list(range(20)) and epoch0 != epoch1
        again = make_loader(ds, batch_size=4, shuffle=True, seed=7, distributed=True)
        again.sampler.set_epoch(1)
        assert _order(again) == epoch1
    finally:
        dist.destroy_process_group()


def test_make_loader_distributed_without_process_group() -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(21))
    shards = []
    for rank in range(2):
        loader = make_loader(ds, batch_size=4, shuffle=True, seed=1, distributed=True,
                             num_replicas=2, rank=rank)
        loader.sampler.set_epoch(3)
        shards.append(_order(loader))
    whole = make_loader(ds, batch_size=4, shuffle=True, seed=1, distributed=True, num_replicas=1, rank=0)
    whole.sampler.set_epoch(3)
    order = _order(whole)
    assert sorted(order) == list(range(21))
    # Ranks take interleaved items of the one global order (padded to equal length).
    assert shards[0] == order[0::2] and shards[1] == (order + order[:1])[1::2]
    with pytest.raises(ValueError, match="distributed"):
        make_loader(ds, batch_size=4, shuffle=True, seed=1, rank=0)


def test_subset_indices() -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(100) * 10)
    sub, indices = subset(ds)
    assert indices == list(range(100)) and len(sub) == 100
    sub, indices = subset(ds, skip=20)
    assert indices == [0, 20, 40, 60, 80]
    assert [int(sub[i][0]) for i in range(len(sub))] == [10 * i for i in indices]
    sub, indices = subset(ds, skip=7, max_items=3)
    assert indices == [0, 7, 14] and len(sub) == 3
    assert subset(ds, skip=1, max_items=0)[1] == []
    assert subset(ds, skip=1000)[1] == [0]
    for bad in ({"skip": 0}, {"skip": 1.5}, {"max_items": -1}):
        with pytest.raises(ValueError):
            subset(ds, **bad)
