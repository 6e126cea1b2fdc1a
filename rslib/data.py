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
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset


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


#: The registry of datasets: every other module takes names, shapes, classes and normalization from here.
#: digits: all 1797 scikit-learn digits divided by 16: pixel mean 0.30526, population std 0.37605.
#: MNIST: the usual 0.1307 / 0.3081. CIFAR-10: the papers' constants (Cohen et al., SmoothAdv).
#: ImageNet: torchvision's constants.
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", (1, 8, 8), 10, (0.30526,), (0.37605,), True, False,
                          "scikit-learn's 8x8 handwritten digits (embedded, 1797 images)"),
    "mnist": DatasetSpec("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), False, False,
                         "MNIST 28x28 handwritten digits (torchvision layout under data_dir)"),
    "cifar10": DatasetSpec("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                           False, True, "CIFAR-10 32x32 colour images (cifar-10-batches-py under data_dir)"),
    "imagenet": DatasetSpec("imagenet", (3, 224, 224), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                            False, True, "ImageNet ILSVRC-2012 (ImageFolder trees data_dir/train, data_dir/val)"),
}
#: dataset name -> ((C, H, W), number of classes), derived from :data:`DATASETS`.
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    name: (spec.shape, spec.num_classes) for name, spec in DATASETS.items()
}
DIGITS_SHAPE, DIGITS_CLASSES = DATASET_SHAPES["digits"]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_META_FILE = "batches.meta"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

#: The environment variable naming the data root when ``data_dir`` is not given.
DATA_DIR_ENV = "RSLIB_DATA_DIR"
#: The data root when neither ``data_dir`` nor ``RSLIB_DATA_DIR`` is given (relative to the current directory).
DEFAULT_DATA_DIR = "data"

MNIST_RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Extensions ImageFolder accepts (torchvision.datasets.folder.IMG_EXTENSIONS), lower case.
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetNotFoundError(FileNotFoundError):
    """The data for a dataset is not where it was looked for (or no folder was given)."""


class DatasetCorruptError(ValueError):
    """A data file exists but cannot be read as the dataset's format."""


# ---------------------------------------------------------------------------------------------
# digits (embedded)
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _digits_split(seed: int, test_fraction: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = (bunch.images.astype(np.float32) / 16.0).reshape(-1, *DIGITS_SHAPE)
    labels = bunch.target.astype(np.int64)
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        index, test_size=test_fraction, random_state=seed, shuffle=True, stratify=labels
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return {
        "train": (images[train_idx], labels[train_idx]),
        "test": (images[test_idx], labels[test_idx]),
    }


def load_digits(
    split: Literal["train", "test"], seed: int = 0, test_fraction: float = 0.25
) -> TensorDataset:
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


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _label_tensor(label: Any) -> torch.Tensor:
    return torch.tensor(int(label), dtype=torch.int64)


def default_data_dir() -> Path:
    """The data root used when ``data_dir`` is not given: ``$RSLIB_DATA_DIR``, else ``./data``."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def _root_hint(root: Path) -> str:
    return (
        f"the data root here is {root}; set data.data_dir (or the environment variable {DATA_DIR_ENV}, "
        f"used when data_dir is not set; default ./{DEFAULT_DATA_DIR} in the folder rslib runs from) "
        f"to the folder that holds the data"
    )


class UInt8Images(Dataset):
    """Images held in memory as one uint8 tensor, served as float32 in [0, 1].

    ``data`` (N, C, H, W) uint8 and ``targets`` (N,) int64 may be shared with a per-process cache:
    treat them as read-only. Items are ``(image, label)``: float32 (C, H, W) in [0, 1] after
    ``transform`` (a callable on that tensor), and a 0-dim int64 label.
    """

    def __init__(self, data: torch.Tensor, targets: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if data.dtype != torch.uint8 or data.dim() != 4 or targets.shape != (len(data),):
            raise ValueError(
                f"UInt8Images needs uint8 data (N, C, H, W) and N targets; got {data.dtype} "
                f"{tuple(data.shape)} and targets {tuple(targets.shape)}"
            )
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


# ---------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------

_MNIST_LEGACY = {"train": "training.pt", "test": "test.pt"}  # torchvision < 0.9's MNIST/processed


def _mnist_how(raw: Path) -> str:
    files = MNIST_RAW_FILES["train"] + MNIST_RAW_FILES["test"]
    return (
        f"pass data.download: true (it downloads the four MNIST files on a machine with internet "
        f"access, or checks and extracts the original {', '.join(f + '.gz' for f in files)} already "
        f"in {raw} without network access), or copy the four uncompressed files into {raw}; "
        f"{_root_hint(raw.parent.parent)}"
    )


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
        raise DatasetCorruptError(
            f"dataset 'mnist': cannot read {', '.join(map(str, files))} as MNIST "
            f"({type(exc).__name__}: {exc}); delete them and pass data.download: true"
        ) from exc
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
        raise DatasetNotFoundError(
            f"dataset 'mnist' ({split}) not found: searched {raw}, missing {', '.join(missing)}; "
            f"{_mnist_how(raw)}"
        )
    stamp = tuple(v for p in files for v in (p.stat().st_size, p.stat().st_mtime_ns))
    return UInt8Images(*_decode_mnist(files, stamp))


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------

# The globals a CIFAR batch pickle may name: NumPy's array reconstruction (NumPy 1.x and 2.x
# module names) and the codec Python 3 uses for ``bytes`` under pickle protocol 2.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
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
        data = np.asarray(data)
        labels = np.asarray(labels)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"'data' must be uint8 of shape (N, 3072); found {data.dtype} {data.shape}")
        if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"'labels' must be {len(data)} integers; found {labels.dtype} {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
            raise ValueError(f"labels must lie in 0..9; found {labels.min()}..{labels.max()}")
    except Exception as exc:
        raise DatasetCorruptError(
            f"dataset 'cifar10': {path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}); "
            f"replace the '{CIFAR10_FOLDER}' folder with a fresh copy (or delete it and pass "
            f"data.download: true)"
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
    return (
        f"pass data.download: true on a machine with internet access, or copy the extracted "
        f"'{CIFAR10_FOLDER}' folder (from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) "
        f"into {root}; {_root_hint(root)}"
    )


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
            raise DatasetNotFoundError(
                f"dataset 'cifar10': downloading into {root} failed ({type(exc).__name__}: {exc}); "
                f"{_cifar_how(root)}"
            ) from exc
        folder = root / CIFAR10_FOLDER
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset 'cifar10' ({split}) not found: searched {folder}, missing {', '.join(missing)}; "
            f"{_cifar_how(root)}"
        )
    transform = None
    if augment:
        from torchvision import transforms

        # Cohen et al. / rs4a / HeatSmoothing training augmentation (on the [0, 1] tensor; the
        # zero padding matches PIL's black fill).
        transform = transforms.Compose(
            [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        )
    return CIFAR10Batches(folder, train=split == "train", transform=transform)


# ---------------------------------------------------------------------------------------------
# ImageNet
# ---------------------------------------------------------------------------------------------


def _imagenet_how(root: Path) -> str:
    return (
        f"expects {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG (ImageFolder layout: one "
        f"folder per class, the validation images sorted into class folders too); {_root_hint(root)}"
    )


def _has_image_class(folder: Path) -> bool:
    """True when some sub-folder of ``folder`` holds at least one image file."""
    try:
        with os.scandir(folder) as classes:
            for entry in classes:
                if not entry.is_dir():
                    continue
                with os.scandir(entry.path) as files:
                    if any(f.name.lower().endswith(_IMAGE_EXTENSIONS) for f in files):
                        return True
    except OSError:
        return False
    return False


def _load_imagenet(root: Path, split: str, download: bool, augment: bool) -> Dataset:
    from torchvision import datasets, transforms

    if download:
        raise DatasetNotFoundError(
            f"dataset 'imagenet' cannot be downloaded automatically (its licence requires "
            f"registration at https://image-net.org); {_imagenet_how(root)}"
        )
    split = "train" if split == "train" else "val"  # ImageNet's held-out split is its val set
    folder = root / split
    if not _has_image_class(folder):
        found = "does not exist" if not folder.exists() else "has no class folder with images"
        raise DatasetNotFoundError(
            f"dataset 'imagenet' ({split}) not found: searched {folder}, which {found}; "
            f"{_imagenet_how(root)}"
        )
    if augment:
        ops = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
    else:
        ops = [transforms.Resize(256), transforms.CenterCrop(224)]
    transform = transforms.Compose([*ops, transforms.ToTensor()])
    try:
        return datasets.ImageFolder(str(folder), transform=transform, target_transform=_label_tensor)
    except FileNotFoundError as exc:  # e.g. a class folder without images
        raise DatasetNotFoundError(
            f"dataset 'imagenet' ({split}): {folder} is incomplete ({exc}); {_imagenet_how(root)}"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Registry and entry points
# ---------------------------------------------------------------------------------------------


_LOADERS: dict[str, Callable[[Path, str, bool, bool], Dataset]] = {
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "imagenet": _load_imagenet,
}


def _check_name(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_info(name: str) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), num_classes)`` of a dataset's items, without loading it."""
    spec = _check_name(name)
    return spec.shape, spec.num_classes


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    augment: bool | None = None,
    seed: int = 0,
) -> Dataset:
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
    spec = _check_name(name)
    if split == "val":
        split = "test"
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' (or 'val'); got {split!r}")
    if augment is not None and not isinstance(augment, bool):
        raise ValueError(f"augment must be None, True or False; got {augment!r}")
    if spec.embedded:
        return load_digits(split, seed=seed)
    use_augmentation = split == "train" and augment is not False and spec.has_augmentation
    root = (default_data_dir() if data_dir is None else Path(data_dir).expanduser()).absolute()
    return _LOADERS[name](root, split, bool(download), use_augmentation)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    distributed: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DataLoader:
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
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


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
    if max_items is not None and (isinstance(max_items, bool) or not isinstance(max_items, int)
                                  or max_items < 0):
        raise ValueError(f"max_items must be None or a non-negative integer; got {max_items!r}")
    indices: Sequence[int] = range(0, len(dataset), skip)  # type: ignore[arg-type]
    if max_items is not None:
        indices = indices[:max_items]
    chosen = list(indices)
    return Subset(dataset, chosen), chosen
