"""What a stage reads: the experiment's noise, the checkpoint a field names, and the evaluated test images."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from rslib.core.noises import Noise, noise_from_params
from rslib.nn.checkpoints import load_checkpoint
from rslib.nn.data import DATASETS, load_dataset, subset
from rslib.pipeline import layout
from rslib.pipeline.params import Experiment
from rslib.util.files import file_sha256


def experiment_noise(exp: Experiment) -> Noise:
    """The experiment's noise (``noise`` section) at the dataset's input dimension."""
    dim = math.prod(DATASETS[exp.data.dataset].shape)
    return noise_from_params({"name": exp.noise.name, **exp.noise.params}, dim, exp.noise.sigma)


def checkpoint_summary(path: Path, sha256: str) -> dict[str, Any]:
    """What a stage records about the checkpoint it used: path, sha256, architecture and training origin."""
    ckpt = load_checkpoint(path)
    extra = ckpt.get("extra", {})
    params = extra.get("params") or {}
    return {"path": str(path), "sha256": sha256, "arch": ckpt["arch"], "dataset": ckpt["dataset"],
            "num_classes": ckpt["num_classes"], "train_experiment": params.get("experiment"),
            "train_mode": (params.get("train") or {}).get("mode"), "train_digest": extra.get("digest")}


def stage_checkpoint(exp: Experiment, section: str, output_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``<section>.checkpoint`` names (default: the experiment's own model) and its summary;
    FileNotFoundError saying how to make it, ValueError when it was trained on another dataset."""
    checkpoint = layout.resolve_checkpoint(getattr(exp, section).checkpoint, output_dir)
    if not checkpoint.exists():
        batch = f", or `rslib run {exp.source} --only train`" if exp.source is not None else ""
        raise FileNotFoundError(f"no checkpoint to {section} at {checkpoint}: train the model first (open and run "
                                f"notebooks/train.ipynb with the same params_file and output_dir{batch}), or set "
                                f"{section}.checkpoint to a .pt file or to the name of a sibling experiment")
    info = checkpoint_summary(checkpoint, file_sha256(checkpoint))
    if info["dataset"] != exp.data.dataset:
        raise ValueError(f"{checkpoint} was trained on {info['dataset']!r} but data.dataset is {exp.data.dataset!r}")
    return checkpoint, info


def test_selection(exp: Experiment, skip: int, max_items: int | None) -> tuple[Dataset, list[int]]:
    """The test split and the indices a stage evaluates: every ``skip``-th image, at most ``max_items``."""
    data = exp.data
    dataset = load_dataset(data.dataset, "test", data_dir=data.data_dir, download=data.download, seed=exp.seed)
    return dataset, subset(dataset, skip, max_items)[1]
