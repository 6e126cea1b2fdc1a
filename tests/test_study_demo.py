"""A miniature study end to end through papermill on digits: train -> certify -> attack for a
baseline, a Gaussian-augmented (smoothed) and a heat-averaged model, a two-noise x two-sigma sweep,
then cert_plots and adv_plots. Checks every figure and table exists, that the numbers in the tables
agree with the per-experiment CSVs, the provenance files, and that a second run redoes nothing.

About 19 notebook executions (kernel start-up dominates): the slowest test of the suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from rslib import cli
from rslib.core.metrics import certified_accuracy

STUDY = {
    "study": "mini",
    "defaults": {
        "seed": 0, "device": "cpu",
        "data": {"dataset": "digits", "batch_size": 64},
        "model": {"arch": "small_cnn"},
        "noise": {"name": "Gaussian", "sigma": 0.25},
        "train": {"mode": "noise", "epochs": 2, "lr": 0.1},
        "certify": {"n0": 20, "n": 100, "alpha": 0.01, "skip": 45, "batch_size": 1024},
        "attack": {"attacks": ["ddn", "pgd"], "ddn_steps": 8, "pgd_steps": 4, "search_steps": 3, "draws": 2,
                   "judge_n": 50, "judge_alpha": 0.01, "skip": 90, "batch_size": 1024},
    },
    "experiments": [
        {"name": "baseline", "label": "Baseline", "stages": ["train", "certify", "attack"],
         "train": {"mode": "standard"}, "attack": {"target": "base"}},
        {"name": "cohen", "label": "Cohen", "stages": ["train", "certify", "attack"],
         "attack": {"target": "smoothed"}},
        {"name": "heat", "label": "Averaged", "stages": ["train", "certify", "attack"],
         "train": {"mode": "heat", "heat_base": "baseline", "heat_steps": 1, "heat_draws": 2, "epochs": 1},
         "certify": {"deterministic": True}, "attack": {"target": "base"}},
    ],
    "sweeps": [{"name": "n_{noise.name}_{noise.sigma}", "label": "{noise.name}",
                "over": {"noise.name": ["Uniform", "Laplace"], "noise.sigma": [0.25, 0.5]},
                "base": {"stages": ["train", "certify"], "train": {"epochs": 1}}}],
    "report": {"groups": [
        {"name": "models", "title": "models", "experiments": ["baseline", "cohen", "heat"],
         "radii": {"l2": [0.0, 0.1, 0.2]}},
        {"name": "noises", "title": "noises", "experiments": ["n_*"],
         "radii": {"l1": [0.0, 0.1, 0.3], "l2": [0.0, 0.1]}},
    ]},
}

FIGURES = ["cert_accuracy_models", "cert_accuracy_noises", "cert_sigma_l1_noises", "cert_sigma_l2_noises",
           "cert_envelope_noises", "adv_cdf_models", "adv_lbound_models"]
TABLES = ["cert_accuracy_at_radii_models", "cert_accuracy_at_radii_noises", "cert_acr_models", "cert_timing_models",
          "cert_envelope_noises", "adv_summary_models", "adv_cdf_models", "adv_not_certified_models",
          "lbound_models"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("study")
    path = root / "mini.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    assert cli.main(["run", str(path), "--output-root", str(root / "outputs")]) == 0
    return path, root / "outputs" / "mini"


def test_every_figure_and_table_exists(mini: tuple[Path, Path]) -> None:
    _, out = mini
    for name in FIGURES:
        for suffix in ("png", "pdf"):
            assert (out / "figures" / f"{name}.{suffix}").stat().st_size > 1000, name
    for name in TABLES:
        assert len(pd.read_csv(out / "results" / f"{name}.csv")) > 0, name
    for notebook in ("cert_plots", "adv_plots"):
        assert (out / "notebooks" / f"{notebook}.ipynb").exists()


def test_provenance_of_the_study_and_its_experiments(mini: tuple[Path, Path]) -> None:
    _, out = mini
    meta = json.loads((out / "study.json").read_text())
    assert meta["provenance"]["torch_version"] and meta["provenance"]["rslib_version"]
    assert [e["name"] for e in meta["experiments"]][:3] == ["baseline", "cohen", "heat"]
    for e in meta["experiments"]:
        folder = out / e["dir"]
        assert yaml.safe_load((folder / "params.yaml").read_text())["experiment"] == e["name"]
        assert json.loads((folder / "provenance.json").read_text())["device"]
        for stage in e["stages"]:
            marker = json.loads((folder / "notebooks" / f"{stage}.done.json").read_text())
            assert marker["seconds"] > 0 and (folder / "notebooks" / f"{stage}.ipynb").exists()
    certify_meta = json.loads((out / "cohen" / "results" / "certify.json").read_text())
    assert certify_meta["seed"] == 0 and "git_commit" in json.dumps(certify_meta)


def test_certified_accuracy_tables_match_the_csvs(mini: tuple[Path, Path]) -> None:
    _, out = mini
    table = pd.read_csv(out / "results" / "cert_accuracy_at_radii_models.csv")
    for _, row in table.iterrows():
        certify = pd.read_csv(out / row["experiment"] / "results" / "certify.csv")
        expected = certified_accuracy(certify, [row["radius"]], row["norm"])[0]
        assert row["certified_accuracy"] == pytest.approx(expected)
    # The rs4a table keeps, per noise and radius, the best sigma: no sigma of that noise does better.
    best = pd.read_csv(out / "results" / "cert_accuracy_at_radii_noises.csv")
    for _, row in best.iterrows():
        accuracies = [certified_accuracy(pd.read_csv(out / f"n_{row['noise']}_{s}" / "results" / "certify.csv"),
                                         [row["radius"]], row["norm"])[0] for s in (0.25, 0.5)]
        assert row["certified_accuracy"] == pytest.approx(max(accuracies))
    acr = pd.read_csv(out / "results" / "cert_acr_models.csv").set_index("experiment")
    cohen = pd.read_csv(out / "cohen" / "results" / "certify.csv")
    radius = np.where(cohen["correct"].fillna(False).astype(bool), cohen["radius_l2"], 0.0)
    assert acr.loc["cohen", "acr"] == pytest.approx(radius.mean())
    timing = pd.read_csv(out / "results" / "cert_timing_models.csv").set_index("experiment")
    assert timing.loc["heat", "deterministic_s_per_image"] > 0  # the averaged model's one-pass time
    assert np.isnan(timing.loc["cohen", "deterministic_s_per_image"])


def test_attack_tables_match_the_csvs(mini: tuple[Path, Path]) -> None:
    _, out = mini
    summary = pd.read_csv(out / "results" / "adv_summary_models.csv")
    assert set(summary["experiment"]) == {"baseline", "cohen", "heat"}
    assert set(summary["attack"]) == {"ddn", "pgd", "best"}  # best: the per-input minimum over the attacks
    for _, row in summary.iterrows():
        rows = pd.read_csv(out / row["experiment"] / "results" / f"attack_{row['attack']}.csv")
        assert row["images"] == len(rows)
        assert row["success_rate"] == pytest.approx(rows["success"].mean())
        distances = rows["l2"].to_numpy(dtype=float)  # failures are inf, so they push the median up
        assert row["median_l2"] == pytest.approx(np.median(distances))
        assert np.isinf(distances[~rows["success"].to_numpy(dtype=bool)]).all()


def test_a_second_run_redoes_nothing(mini: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path, out = mini
    capsys.readouterr()
    assert cli.main(["run", str(path), "--output-root", str(out.parent)]) == 0
    text = capsys.readouterr().out
    assert "running" not in text and "all stages finished" in text
