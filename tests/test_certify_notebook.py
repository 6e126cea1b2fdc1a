"""The certify notebook through the papermill runner: the demo experiment with tiny settings, then a
deterministic (L-bound) certification of the same model from a sibling experiment."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from rslib.core.metrics import LBOUND_METHOD, MONTE_CARLO
from rslib.pipeline.runner import run_file as run
from rslib.pipeline.stages.certify import ROW_COLUMNS

PARAMS = Path(__file__).resolve().parents[1] / "params" / "demo" / "experiment.yaml"
TINY = {"train.epochs": 1, "train.max_batches": 4, "certify.n": 200, "certify.skip": 15,
        "certify.images_per_batch": 16}


@pytest.fixture(scope="module")
def output_root(tmp_path_factory):
    return tmp_path_factory.mktemp("certify-notebook")


def _run(output_root: Path, name: str, **kwargs) -> Path:
    overrides = {"experiment": name, **TINY, **kwargs.pop("overrides", {})}
    kwargs.setdefault("only", ["train", "certify"])
    report = run(PARAMS, overrides=overrides, output_root=output_root, log=lambda *_: None, **kwargs)
    assert report.ok, [(s.name, s.status, s.error) for s in report.stages]
    return output_root / name


def _curves_at_zero(folder: Path, method: str) -> pd.DataFrame:
    curves = pd.read_csv(folder / "results" / "certified_accuracy.csv")
    return curves[(curves["method"] == method) & (curves["radius"] == 0)]


def test_demo_certify_trains_then_certifies(output_root):
    folder = _run(output_root, "nb_certify")
    table = pd.read_csv(folder / "results" / "certify.csv")
    assert list(table.columns) == ROW_COLUMNS and len(table) == 30
    meta = json.loads((folder / "results" / "certify.json").read_text())
    assert meta["params"]["certify"]["n"] == 200 and "torch_version" in meta["provenance"]
    assert meta["timing"]["seconds_per_image"] > 0
    for suffix in ("png", "pdf"):
        assert (folder / "figures" / f"certified_accuracy.{suffix}").stat().st_size > 0
    assert (folder / "notebooks" / "certify.ipynb").exists()
    # batch progress goes to the stage's log, not into the executed notebook
    log = (folder / "notebooks" / "certify.log").read_text()
    assert "certify: 100%" in log and "30/30" in log
    executed = json.loads((folder / "notebooks" / "certify.ipynb").read_text())
    assert not [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert not [o for c in executed["cells"] for o in c.get("outputs", [])
                if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    zero = _curves_at_zero(folder, MONTE_CARLO)
    assert sorted(zero["norm"]) == ["l1", "l2", "linf"]
    # abstains are in the denominator: the value at radius 0 is the fraction of correct rows
    assert zero["certified_accuracy"].tolist() == pytest.approx([table["correct"].mean()] * 3, abs=1e-12)
    assert not (folder / "results" / "lbound_certify.csv").exists()


def test_deterministic_certification_of_a_sibling_checkpoint(output_root):
    if not (output_root / "nb_certify" / "checkpoints" / "model.pt").exists():
        _run(output_root, "nb_certify")
    folder = _run(output_root, "nb_lbound", only=["certify"],
                  overrides={"certify.checkpoint": "nb_certify", "certify.deterministic": True})
    meta = json.loads((folder / "results" / "certify.json").read_text())
    assert meta["checkpoint"]["path"] == str(output_root / "nb_certify" / "checkpoints" / "model.pt")
    assert meta["lbound"]["approximate"] is True and meta["lbound"]["speedup_one_pass_vs_monte_carlo"] > 0
    lbound = pd.read_csv(folder / "results" / "lbound_certify.csv")
    assert len(lbound) == 30 and lbound["approximate"].all()
    zero = _curves_at_zero(folder, LBOUND_METHOD)
    assert list(zero["norm"]) == ["l2"]
    assert zero["certified_accuracy"].iloc[0] == pytest.approx(lbound["correct"].mean(), abs=1e-12)
    assert meta["lbound"]["certified_accuracy_r0"] == pytest.approx(lbound["correct"].mean(), abs=1e-12)
    text = (folder / "notebooks" / "certify.ipynb").read_text()
    assert "APPROXIMATE L-bound" in text and "Monte-Carlo prediction with n0 = 100 draws" in text
