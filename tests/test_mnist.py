"""Real MNIST (the original files, copied from ../shared/data/mnist) and the lenet_caffe architecture.

The MNIST tests copy the four original ``.gz`` files into a temporary folder (the shared folder is
never written to) and skip when that folder is absent, as in a user's clone.
"""

from __future__ import annotations

import shutil
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from rslib.nn import architectures, checkpoints
from rslib.nn.data import (
    DATA_DIR_ENV,
    DatasetNotFoundError,
    default_data_dir,
    load_dataset,
    make_loader,
    subset,
)
from rslib.nn.data.mnist import MNIST_RAW_FILES

SHARED_RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "MNIST" / "raw"
GZ_FILES = [f"{name}.gz" for split in ("train", "test") for name in MNIST_RAW_FILES[split]]
# Images per class in the original splits (LeCun et al.).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
LENET_CAFFE_PARAMETERS = 20 * 1 * 25 + 20 + 50 * 20 * 25 + 50 + 800 * 500 + 500 + 500 * 10 + 10

def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("MNIST tried to use the network although the .gz files are present")


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root whose MNIST/raw holds copies of the .gz files, extracted by ``download: true``
    with the network blocked."""
    if not all((SHARED_RAW / name).is_file() for name in GZ_FILES):
        pytest.skip(f"the original MNIST files are not in {SHARED_RAW} (development and CI machines only)")
    root = tmp_path_factory.mktemp("mnist_data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in GZ_FILES:
        shutil.copyfile(SHARED_RAW / name, raw / name)  # copyfile: writable copies of read-only files
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(urllib.request, "urlopen", _no_network)
        load_dataset("mnist", "train", data_dir=root, download=True)
    return root


# ---------------------------------------------------------------------------------------------
# The data root
# ---------------------------------------------------------------------------------------------


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "root"))
    assert default_data_dir() == tmp_path / "root"
    monkeypatch.setenv(DATA_DIR_ENV, "")  # an empty variable counts as unset
    assert default_data_dir() == Path("data")
    monkeypatch.delenv(DATA_DIR_ENV)
    assert default_data_dir() == Path("data")


def test_missing_folder_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", "test")  # no data_dir, no variable: ./data
    message = str(info.value)
    assert str(tmp_path / "data" / "MNIST" / "raw") in message
    assert "t10k-images-idx3-ubyte" in message and "data.download: true" in message
    assert DATA_DIR_ENV in message and "data.data_dir" in message


def test_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch, mnist_root: Path, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(mnist_root))
    monkeypatch.chdir(tmp_path)  # the variable, not the current folder, decides
    assert len(load_dataset("mnist", "test")) == 10_000
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "elsewhere"))
    assert len(load_dataset("mnist", "test", data_dir=mnist_root)) == 10_000  # data_dir wins
    with pytest.raises(DatasetNotFoundError, match="elsewhere"):
        load_dataset("mnist", "test")


# ---------------------------------------------------------------------------------------------
# MNIST from the original files
# ---------------------------------------------------------------------------------------------


def test_download_offline_extracts_the_gz_files(mnist_root: Path) -> None:
    raw = mnist_root / "MNIST" / "raw"
    for split in ("train", "test"):
        for name in MNIST_RAW_FILES[split]:
            assert (raw / name).is_file() and (raw / f"{name}.gz").is_file()
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 60_000 * 28 * 28


@pytest.mark.parametrize(("split", "counts"), [("train", TRAIN_COUNTS), ("test", TEST_COUNTS)])
def test_splits(mnist_root: Path, split: str, counts: list[int]) -> None:
    ds = load_dataset("mnist", split, data_dir=mnist_root)
    assert len(ds) == sum(counts)
    assert ds.data.shape == (sum(counts), 1, 28, 28) and ds.data.dtype == torch.uint8
    assert torch.bincount(ds.targets, minlength=10).tolist() == counts
    assert int(ds.data.min()) == 0 and int(ds.data.max()) == 255
    image, label = ds[len(ds) - 1]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert label.shape == () and label.dtype == torch.int64


@pytest.mark.parametrize(("split", "indices"), [("train", [0, 1, 7777, 59_999]), ("test", [0, 4321, 9_999])])
def test_items_equal_torchvision(mnist_root: Path, split: str, indices: list[int]) -> None:
    from torchvision import datasets, transforms

    ours = load_dataset("mnist", split, data_dir=mnist_root)
    theirs = datasets.MNIST(str(mnist_root), train=split == "train", transform=transforms.ToTensor())
    for i in indices:
        image, label = ours[i]
        expected_image, expected_label = theirs[i]
        assert torch.equal(image, expected_image)  # bit for bit: the same byte / 255 conversion
        assert int(label) == expected_label


def test_loader_batches_equal_items(mnist_root: Path) -> None:
    ds = load_dataset("mnist", "test", data_dir=mnist_root)
    part, indices = subset(ds, skip=1000)  # Subset forwards the batched fetch
    x, y = next(iter(make_loader(part, batch_size=len(indices), shuffle=False, seed=0)))
    assert torch.equal(x, torch.stack([ds[i][0] for i in indices]))
    assert torch.equal(y, torch.stack([ds[i][1] for i in indices]))


def test_decoded_once_per_process(mnist_root: Path) -> None:
    first = load_dataset("mnist", "train", data_dir=mnist_root)
    second = load_dataset("mnist", "train", data_dir=str(mnist_root))
    assert first.data.data_ptr() == second.data.data_ptr()  # the cached tensor, not a new decode


def _write_idx(raw: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    image_name, label_name = MNIST_RAW_FILES[split]
    (raw / image_name).write_bytes(struct.pack(">iiii", 0x0803, len(images), 28, 28) + images.tobytes())
    (raw / label_name).write_bytes(struct.pack(">ii", 0x0801, len(labels)) + labels.tobytes())


def test_replaced_files_are_decoded_again(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(raw, "test", rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.arange(3, dtype=np.uint8))
    assert len(load_dataset("mnist", "test", data_dir=tmp_path)) == 3
    _write_idx(raw, "test", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.arange(5, dtype=np.uint8))
    assert len(load_dataset("mnist", "test", data_dir=tmp_path)) == 5  # the cache key holds size and mtime


# ---------------------------------------------------------------------------------------------
# lenet_caffe
# ---------------------------------------------------------------------------------------------


def test_lenet_caffe_shape_and_parameters() -> None:
    model = architectures.build_model("lenet_caffe", "mnist")
    assert architectures.count_parameters(model) == LENET_CAFFE_PARAMETERS == 431_080
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert architectures.build_model("lenet_caffe", "mnist", num_classes=4)(torch.rand(2, 1, 28, 28)).shape == (2, 4)


def test_lenet_caffe_identity_normalization() -> None:
    model = architectures.build_model("lenet_caffe", "mnist").eval()
    assert model.normalize.mean.flatten().tolist() == [0.0]
    assert model.normalize.std.flatten().tolist() == [1.0]
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(model(x), model.net(x), rtol=0, atol=0)  # raw [0, 1] pixels
    lenet = architectures.build_model("lenet", "mnist")  # other architectures keep the dataset's constants
    assert lenet.normalize.std.flatten().tolist() == pytest.approx([0.3081])


def test_lenet_caffe_is_mnist_only() -> None:
    with pytest.raises(ValueError, match="does not support dataset 'digits'.*mnist"):
        architectures.build_model("lenet_caffe", "digits")


def test_lenet_caffe_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = architectures.build_model("lenet_caffe", "mnist").eval()
    path = checkpoints.save_checkpoint(tmp_path / "model.pt", model, arch="lenet_caffe", dataset="mnist",
                                  num_classes=10)
    loaded = checkpoints.load(path)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.arch == "lenet_caffe" and loaded.normalize.std.flatten().tolist() == [1.0]


def test_lenet_caffe_is_a_valid_model_arch() -> None:
    from rslib.pipeline import params

    exp = params.validate({"experiment": "e", "stages": ["train"], "data": {"dataset": "mnist"},
                           "model": {"arch": "lenet_caffe"}})
    assert exp.model.arch == "lenet_caffe"
