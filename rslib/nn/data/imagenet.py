"""ImageNet ILSVRC-2012 as ``ImageFolder`` trees ``data_dir/train`` and ``data_dir/val``."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from rslib.nn.data.registry import (
    DATASETS,
    DatasetNotFoundError,
    DatasetSpec,
    label_tensor,
    root_hint,
)

# Extensions ImageFolder accepts (torchvision.datasets.folder.IMG_EXTENSIONS), lower case.
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _imagenet_how(root: Path) -> str:
    return (f"expects {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG (ImageFolder layout: one "
            f"folder per class, the validation images sorted into class folders too); {root_hint(root)}")


def _has_image_class(folder: Path) -> bool:
    """True when some sub-folder of ``folder`` holds at least one image file."""
    try:
        with os.scandir(folder) as classes:
            for entry in classes:
                if entry.is_dir():
                    with os.scandir(entry.path) as files:
                        if any(f.name.lower().endswith(_IMAGE_EXTENSIONS) for f in files):
                            return True
    except OSError:
        return False
    return False


def _load_imagenet(root: Path, split: str, download: bool, augment: bool) -> Dataset:
    from torchvision import datasets, transforms

    if download:
        raise DatasetNotFoundError(f"dataset 'imagenet' cannot be downloaded automatically (its licence requires "
                                   f"registration at https://image-net.org); {_imagenet_how(root)}")
    split = "train" if split == "train" else "val"  # ImageNet's held-out split is its val set
    folder = root / split
    if not _has_image_class(folder):
        found = "does not exist" if not folder.exists() else "has no class folder with images"
        raise DatasetNotFoundError(f"dataset 'imagenet' ({split}) not found: searched {folder}, which {found}; "
                                   f"{_imagenet_how(root)}")
    if augment:
        ops = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
    else:
        ops = [transforms.Resize(256), transforms.CenterCrop(224)]
    transform = transforms.Compose([*ops, transforms.ToTensor()])
    try:
        return datasets.ImageFolder(str(folder), transform=transform, target_transform=label_tensor)
    except FileNotFoundError as exc:  # e.g. a class folder without images
        raise DatasetNotFoundError(
            f"dataset 'imagenet' ({split}): {folder} is incomplete ({exc}); {_imagenet_how(root)}") from exc


DATASETS.register("imagenet", DatasetSpec(
    "imagenet", (3, 224, 224), 1000, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), embedded=False,
    has_augmentation=True, description="ImageNet ILSVRC-2012 (ImageFolder trees data_dir/train, data_dir/val)",
    load=lambda root, split, download, augment, seed: _load_imagenet(root, split, download, augment)))
