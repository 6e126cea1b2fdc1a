"""The train notebook runs every mode for a few steps on digits through the papermill runner."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from rslib.pipeline.runner import run_file as run

PARAMS = Path(__file__).resolve().parents[1] / "params" / "demo" / "experiment.yaml"
TINY = {"train.epochs": 1, "train.max_batches": 2, "train.noise_draws": 2}


@pytest.fixture(scope="module")
def output_root(tmp_path_factory):
    return tmp_path_factory.mktemp("train-notebook")


def _run(output_root: Path, name: str, **overrides) -> Path:
    report = run(PARAMS, only=["train"], overrides={"experiment": name, **TINY, **overrides},
                 output_root=output_root, log=lambda *_: None)
    assert report.ok, [(s.name, s.status, s.error) for s in report.stages]
    return output_root / name


@pytest.mark.parametrize("mode", ["standard", "noise", "stability", "smoothadv", "direct"])
def test_train_notebook_every_mode(output_root, mode):
    folder = _run(output_root, f"nb_{mode}", **{"train.mode": mode})
    assert (folder / "checkpoints" / "model.pt").exists()
    assert (folder / "notebooks" / "train.ipynb").exists()
    assert (folder / "figures" / "train_curves.png").exists() and (folder / "figures" / "train_curves.pdf").exists()
    assert len(pd.read_csv(folder / "results" / "train_metrics.csv")) == 1


def test_train_notebook_heat_from_a_base(output_root):
    _run(output_root, "nb_base", **{"train.mode": "standard"})
    folder = _run(output_root, "nb_heat", **{"train.mode": "heat", "train.heat_base": "nb_base",
                                             "train.heat_steps": 2, "train.heat_draws": 2})
    metrics = pd.read_csv(folder / "results" / "train_metrics.csv")
    assert list(metrics["phase"]) == [0, 1]
