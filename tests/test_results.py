"""Study-level analysis (rslib.report.results) on a synthetic study folder with hand-computed answers, and
the cert_plots / adv_plots notebooks run through papermill on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from rslib.core import metrics  # noqa: E402
from rslib.core.lbound import COLUMNS as LBOUND_STAT_COLUMNS  # noqa: E402
from rslib.core.lbound import LBOUND_COLUMNS  # noqa: E402
from rslib.pipeline import layout
from rslib.pipeline.params import ParamsError  # noqa: E402
from rslib.pipeline.stages import attack as attack_stage
from rslib.pipeline.stages import certify as certify_stage
from rslib.pipeline.study import ReportGroup, Study, load_written  # noqa: E402
from rslib.report import plots, results

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
INF = math.inf

# --------------------------------------------------------------------------- the synthetic study
#
# Certification rows are (idx, correct, prediction, radius_l2); -1 is an abstention (radius 0).
# Radii in l1 are twice those in l2 and linf a tenth (any values do: they are data here).

CERTIFY = {
    # Gaussian at two sigmas: at r=0 sigma 0.25 wins (3/4 vs 2/4), beyond 0.3 only sigma 0.5 is left
    "gauss_0.25": [(0, True, 1, 0.30), (1, True, 2, 0.10), (2, True, 3, 0.05), (3, False, -1, 0.0)],
    "gauss_0.5": [(0, True, 1, 0.60), (1, True, 2, 0.20), (2, False, -1, 0.0), (3, False, 5, 0.40)],
    # Uniform at two sigmas
    "unif_0.25": [(0, True, 1, 0.15), (1, False, -1, 0.0), (2, False, -1, 0.0), (3, False, -1, 0.0)],
    "unif_0.5": [(0, True, 1, 0.70), (1, True, 2, 0.70), (2, False, -1, 0.0), (3, False, -1, 0.0)],
    # the HeatSmoothing group (one sigma each)
    "baseline": [(0, False, -1, 0.0), (2, True, 1, 0.05), (4, False, 7, 0.0), (6, False, -1, 0.0)],
    "cohen": [(0, True, 1, 0.30), (2, True, 2, 0.10), (4, False, -1, 0.0), (6, True, 4, 0.90)],
    "heat": [(0, True, 1, 0.50), (2, True, 2, 0.20), (4, True, 3, 0.10), (6, False, -1, 0.0)],
}
# Attacks on idx 0..4: one row per input, (success, l2); failures have l2 = inf.
ATTACKS = {
    # 3 of 5 fail: the median over all inputs is inf; idx 0 is misclassified clean (distance 0)
    ("baseline", "ddn"): [(True, 0.0), (True, 0.5), (False, INF), (False, INF), (False, INF)],
    ("baseline", "pgd"): [(True, 0.0), (True, 0.7), (True, 0.9), (False, INF), (False, INF)],
    ("cohen", "ddn"): [(True, 0.2), (True, 0.4), (True, 0.6), (True, 0.8), (True, 1.0)],
    ("cohen", "pgd"): [(True, 0.3), (False, INF), (True, 0.5), (True, 1.2), (False, INF)],
    ("heat", "ddn"): [(True, 0.6), (True, 0.1), (True, 0.3), (False, INF), (True, 0.4)],
    ("heat", "pgd"): [(True, 0.7), (False, INF), (True, 0.4), (False, INF), (True, 0.5)],
}
LBOUND_VALUES = {"heat": [0.3, 0.2, 0.5, 0.05, 0.0], "cohen": [0.1, 0.2, 0.3, 0.4, 0.5]}
SECONDS_PREDICT, SECONDS_CERTIFY, SECONDS_ONE_PASS = 0.02, 0.5, 0.001


def _params(name: str, noise: str, sigma: float, mode: str, *, attack: bool = False,
            deterministic: bool = False) -> dict:
    """A valid experiment (``params.validate``), as ``study.json`` holds it."""
    params = {"experiment": name, "stages": ["train", "certify"], "seed": 0, "data": {"dataset": "digits"},
              "model": {"arch": "small_cnn"}, "noise": {"name": noise, "sigma": sigma, "params": {}},
              "train": {"mode": mode, **({"heat_base": "baseline"} if mode == "heat" else {})},
              "certify": {"n0": 10, "n": 100, "alpha": 0.001, "deterministic": deterministic}}
    if attack:
        params["stages"].append("attack")
        params["attack"] = {"attacks": ["ddn", "pgd"], "target": "smoothed", "norm": "l2"}
    return params


EXPERIMENTS = [
    ("gauss_0.25", "Gaussian 0.25", _params("gauss_0.25", "Gaussian", 0.25, "noise")),
    ("gauss_0.5", "Gaussian 0.5", _params("gauss_0.5", "Gaussian", 0.5, "noise")),
    ("unif_0.25", "Uniform 0.25", _params("unif_0.25", "Uniform", 0.25, "noise")),
    ("unif_0.5", "Uniform 0.5", _params("unif_0.5", "Uniform", 0.5, "noise")),
    ("baseline", "Baseline", _params("baseline", "Gaussian", 0.25, "standard", attack=True)),
    ("cohen", "Cohen", _params("cohen", "Gaussian", 0.25, "noise", attack=True)),
    ("heat", "HeatSmoothing", _params("heat", "Gaussian", 0.25, "heat", attack=True, deterministic=True)),
    ("broken", "Broken", _params("broken", "Gaussian", 0.25, "noise", attack=True)),
]
GROUPS = [
    {"name": "heat_smoothing", "title": "HeatSmoothing comparison",
     "experiments": ["baseline", "cohen", "broken", "heat"], "radii": {"l2": [0.0, 0.25, 0.5]}},
    {"name": "rs4a", "title": "Noises and sigmas",
     "experiments": ["gauss_0.25", "gauss_0.5", "unif_0.25", "unif_0.5"],
     "radii": {"l1": [0.0, 0.5, 1.0], "l2": [0.0, 0.25, 0.5, 1.0]}},
    {"name": "empty", "title": "Nothing finished", "experiments": ["broken"], "radii": {"l2": [0.0]}},
]


def _certify_frame(rows: list[tuple]) -> pd.DataFrame:
    out = []
    for idx, correct, prediction, r in rows:
        source = "l2" if r > 0 else "none"
        out.append([idx, 1, prediction, correct, 90, 5, 10, 100, 0.001, 0.9 if r > 0 else 0.4, 2 * r, r, r / 10,
                    SECONDS_PREDICT, SECONDS_CERTIFY, source, source, source, max(prediction, 0), correct])
    return certify_stage.rows_frame(out)


def _attack_frame(name: str, rows: list[tuple]) -> pd.DataFrame:
    out = [[idx, 3, name, ok, d if ok else INF, d if ok else INF, d, d if ok else INF]
           for idx, (ok, d) in enumerate(rows)]
    return attack_stage.rows_frame(out, attack_stage.ROW_COLUMNS)


def _lbound_frame(values: list[float]) -> pd.DataFrame:
    frame = pd.DataFrame(0.0, index=range(len(values)), columns=LBOUND_STAT_COLUMNS)
    frame["idx"] = range(len(values))
    frame["label"] = 3
    frame["correct_top1"] = [v > 0 for v in values]
    frame["lbound"] = values
    frame["sigma"] = 0.25
    return frame


def _csv(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(frame.to_csv(index=False, lineterminator="\n"))


def build_study(root: Path) -> Path:
    """The synthetic study folder (the layout of ``Study.to_dict``); 'broken' has no results at all."""
    experiments = []
    for name, label, params in EXPERIMENTS:
        experiments.append({"name": name, "label": label, "dir": name, "stages": params["stages"], "params": params})
        (root / name).mkdir(parents=True)
    for name, rows in CERTIFY.items():
        _csv(root / name / "results" / "certify.csv", _certify_frame(rows))
    for (name, attack), rows in ATTACKS.items():
        _csv(attack_stage.result_path(root / name / "results", attack), _attack_frame(attack, rows))
    for name, values in LBOUND_VALUES.items():
        _csv(root / name / "results" / "lbound.csv", _lbound_frame(values))
    heat = _certify_frame(CERTIFY["heat"])
    lbound = pd.DataFrame({"idx": heat["idx"], "label": 1, "prediction": heat["prediction"].clip(lower=0),
                           "margin": 0.5, "radius": [0.4, 0.3, 0.0, 0.0], "correct": [True, True, False, False],
                           "seconds": SECONDS_ONE_PASS, "norm": "l2", "approximate": True})
    _csv(root / "heat" / "results" / "lbound_certify.csv", lbound[LBOUND_COLUMNS])
    study = {"study": "synthetic", "description": "hand-made results", "experiments": experiments,
             "report": {"groups": GROUPS}, "provenance": {}}
    (root / layout.STUDY_FILE).write_text(json.dumps(study))
    return root


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    return build_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def study(study_dir) -> Study:
    return load_written(study_dir)


def _group(study: Study, name: str) -> ReportGroup:
    return next(g for g in study.groups if g.name == name)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------- loading


def test_load_study(study, study_dir):
    assert study.name == "synthetic" and study.dir == study_dir.resolve()
    assert [g.name for g in study.groups] == ["heat_smoothing", "rs4a", "empty"]
    assert _group(study, "rs4a").norms == ["l1", "l2"]
    heat = study.get("heat")
    assert results.experiment_results(study, heat) == study_dir.resolve() / "heat" / "results"
    assert heat.label == "HeatSmoothing" and heat.depends_on == ("baseline",)
    assert (heat.noise_label, heat.sigma, heat.train_mode, heat.deterministic) == ("Gaussian", 0.25, "heat", True)
    assert not study.get("cohen").deterministic
    assert results.attack_names(study, study.get("cohen")) == ["ddn", "pgd"]
    assert study.reference is None  # written before report.reference existed: still loads


def test_missing_or_corrupt_study_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no study\.json in .*run the study first .*make demo"):
        load_written(tmp_path)
    (tmp_path / "study.json").write_text('{"study": "x", "experiments": [')
    with pytest.raises(ParamsError, match=r"study\.json is corrupt .*run the study first"):
        load_written(tmp_path)
    fix = r".*the file is damaged .*run the study first"
    (tmp_path / "study.json").write_text('{"study": "x", "experiments": {"a": 1}}')
    with pytest.raises(ParamsError, match=r"study\.json: experiments must be a list" + fix):
        load_written(tmp_path / "study.json")
    one = {"name": "a", "params": _params("a", "Gaussian", 0.25, "noise")}
    for report, message in [({"groups": [{"name": "g", "radii": {"l3": [0]}}]}, "radii must map norms .*'l3'"),
                            # a group member that is no experiment of the study is named
                            ({"groups": [{"name": "g", "experiments": ["a", "ghost"]}]}, "'ghost' matches no"),
                            ({"groups": [{"name": "g"}], "reference": 3}, ".reference must be the path")]:
        (tmp_path / "study.json").write_text(json.dumps({"study": "x", "experiments": [one], "report": report}))
        with pytest.raises(ParamsError, match=r"study\.json: report.*" + message + fix):
            load_written(tmp_path)
    # every experiment's parameters go through params.validate
    bad = {"name": "a", "params": {**one["params"], "train": {"mode": "noise", "epochs": 0}}}
    (tmp_path / "study.json").write_text(json.dumps({"study": "x", "experiments": [bad]}))
    with pytest.raises(ParamsError, match=r"study\.json: experiments\[0\]\.params: train\.epochs must be" + fix):
        load_written(tmp_path)


def test_missing_experiments_are_skipped_with_a_note(study):
    notes: list[str] = []
    tables = results.certify_tables(study, _group(study, "heat_smoothing"), log=notes.append)
    assert list(tables) == ["baseline", "cohen", "heat"]
    assert any("'broken'" in n and "certify.csv" in n for n in notes)
    notes.clear()
    attacks = results.attack_tables(study, _group(study, "heat_smoothing"), log=notes.append)
    assert set(attacks) == {(e, a) for e in ("baseline", "cohen", "heat") for a in ("ddn", "pgd")}
    assert any("'broken'" in n and "attack_ddn.csv" in n for n in notes)
    assert results.load_certify_group(study, _group(study, "empty"), log=notes.append) is None
    assert results.load_attack_group(study, _group(study, "empty"), log=notes.append) is None
    assert results.load_attack_group(study, _group(study, "rs4a"), log=notes.append) is None


def test_damaged_result_files_are_skipped_with_a_note(tmp_path):
    study = load_written(build_study(tmp_path))
    (tmp_path / "cohen" / "results" / "certify.csv").write_text("idx,whatever\n1,2\n")
    (tmp_path / "heat" / "results" / "certify.csv").write_text(",".join(certify_stage.ROW_COLUMNS) + "\n")
    (tmp_path / "baseline" / "results" / "attack_pgd.csv").write_bytes(b"\x00\xff garbage")
    notes: list[str] = []
    group = _group(study, "heat_smoothing")
    assert list(results.certify_tables(study, group, log=notes.append)) == ["baseline"]
    assert any("'cohen'" in n and "lacks the column(s) prediction" in n for n in notes)
    assert any("'heat'" in n and "has no rows" in n for n in notes)
    assert ("baseline", "pgd") not in results.attack_tables(study, group, log=notes.append)
    assert any("'baseline'" in n and "attack_pgd.csv is unreadable" in n for n in notes)


# --------------------------------------------------------------------------- certification


def test_curves_count_abstains_and_include_the_lbound(study):
    cert = results.load_certify_group(study, _group(study, "heat_smoothing"), log=lambda _: None)
    curves = cert.curves
    assert list(curves.columns) == results.CURVE_COLUMNS
    zero = curves[(curves["radius"] == 0) & (curves["method"] == metrics.MONTE_CARLO)]
    # baseline: 1 correct of 4 rows (two abstains and one error are in the denominator)
    assert zero.set_index("experiment")["certified_accuracy"].to_dict() == {"baseline": 0.25, "cohen": 0.75,
                                                                          "heat": 0.75}
    lbound = curves[curves["method"] == metrics.LBOUND_METHOD]
    assert set(lbound["experiment"]) == {"heat"} and set(lbound["norm"]) == {"l2"}
    assert lbound.loc[lbound["radius"] == 0, "certified_accuracy"].item() == 0.5
    # one training mode per model: no sigma sweep in this group
    assert cert.sweeps == {}


def test_envelope_is_the_max_over_sigma(study):
    cert = results.load_certify_group(study, _group(study, "rs4a"), log=lambda _: None)
    assert cert.sweeps == {"Gaussian": ["gauss_0.25", "gauss_0.5"], "Uniform": ["unif_0.25", "unif_0.5"]}
    env = metrics.envelope(cert.curves)
    gauss = env[(env["family"] == "Gaussian") & (env["norm"] == "l2")]
    radii = [0.0, 0.05, 0.1, 0.15, 0.3, 0.31, 0.5, 0.6, 0.61, 2.0]
    value = metrics.step_value(gauss["radius"], gauss["certified_accuracy"], radii)
    expected = np.max([metrics.certified_accuracy(cert.tables[n], radii, "l2")
                       for n in ("gauss_0.25", "gauss_0.5")], axis=0)
    assert value.tolist() == pytest.approx(expected.tolist())
    assert expected.tolist() == pytest.approx([0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.0, 0.0])
    at = gauss.set_index("radius")
    assert at.loc[0.0, "sigma"] == 0.25 and at.loc[0.6, "sigma"] == 0.5
    # at 0.3 both reach 0.25: the tie goes to the smaller sigma
    assert at.loc[0.3, "certified_accuracy"] == 0.25 and at.loc[0.3, "sigma"] == 0.25
    # every point of the envelope is a point of the union grid, in every norm
    for norm in ("l1", "l2"):
        for family in cert.sweeps:
            grid = cert.curves[(cert.curves["family"] == family) & (cert.curves["norm"] == norm)]["radius"]
            assert set(env[(env["family"] == family) & (env["norm"] == norm)]["radius"]) == set(grid)


def test_best_sigma_table(study):
    group = _group(study, "rs4a")
    cert = results.load_certify_group(study, group, log=lambda _: None)
    table = results.accuracy_at_radii(study, cert.tables, group.radii)
    best = table.set_index(["unit", "norm", "radius"])
    assert set(table["unit"]) == {"Gaussian", "Uniform"} and (table["candidates"] == 2).all()
    assert best.loc[("Gaussian", "l2", 0.0), ["certified_accuracy", "sigma"]].tolist() == [0.75, 0.25]
    assert best.loc[("Gaussian", "l2", 0.5), ["certified_accuracy", "sigma"]].tolist() == [0.25, 0.5]
    assert best.loc[("Gaussian", "l2", 1.0), "certified_accuracy"] == 0.0
    assert best.loc[("Uniform", "l2", 0.0), ["certified_accuracy", "sigma"]].tolist() == [0.5, 0.5]
    # l1 radii are twice the l2 ones: at 0.5 both sigmas certify 1 of 4 (the tie goes to the smaller
    # sigma); at 1.0 only sigma 0.5 does (its radius 1.2)
    assert best.loc[("Gaussian", "l1", 0.5), ["certified_accuracy", "sigma"]].tolist() == [0.25, 0.25]
    assert best.loc[("Gaussian", "l1", 1.0), ["certified_accuracy", "sigma"]].tolist() == [0.25, 0.5]
    assert best.loc[("Gaussian", "l1", 1.0), "experiment"] == "gauss_0.5"
    wide = results.accuracy_at_radii_wide(table)
    assert wide.loc["Gaussian", ("l2", "r=0")] == "75.0% (σ=0.25)"
    # single models (the HeatSmoothing group): one row each, no sigma in the cells
    group = _group(study, "heat_smoothing")
    cert = results.load_certify_group(study, group, log=lambda _: None)
    table = results.accuracy_at_radii(study, cert.tables, group.radii)
    assert list(dict.fromkeys(table["unit"])) == ["Baseline", "Cohen", "HeatSmoothing"]
    assert (table["candidates"] == 1).all()
    assert results.accuracy_at_radii_wide(table).loc["Cohen", ("l2", "r=0.25")] == "50.0%"


def test_acr_and_timing(study):
    cert = results.load_certify_group(study, _group(study, "heat_smoothing"), log=lambda _: None)
    acr = results.acr_table(study, cert.tables, ["l2"]).set_index("experiment")
    assert acr.loc["cohen", "acr"] == pytest.approx((0.3 + 0.1 + 0.9) / 4)
    assert acr.loc["baseline", "abstain_rate"] == 0.5
    timing = results.timing_table(study, cert.tables, cert.lbounds).set_index("experiment")
    assert timing.loc["cohen", "mc_prediction_s_per_image"] == pytest.approx(SECONDS_PREDICT)
    assert timing.loc["cohen", "mc_certification_s_per_image"] == pytest.approx(SECONDS_PREDICT + SECONDS_CERTIFY)
    assert math.isnan(timing.loc["cohen", "deterministic_s_per_image"])
    assert timing.loc["heat", "mc_prediction_over_deterministic"] == pytest.approx(SECONDS_PREDICT / SECONDS_ONE_PASS)
    assert (timing["n0"] == 10).all() and (timing["n"] == 100).all()


# --------------------------------------------------------------------------- attacks


def test_attack_cdf_never_counts_failures(study):
    tables = results.attack_tables(study, _group(study, "heat_smoothing"), log=lambda _: None)
    cdf = results.attack_cdf(study, tables)
    line = cdf[(cdf["experiment"] == "baseline") & (cdf["attack"] == "ddn")]
    points = line.set_index("distance")["percent_attacked"]
    assert points.loc[0.0] == 20.0  # misclassified without perturbation: attacked at distance 0
    assert points.loc[0.5] == 40.0
    assert line["percent_attacked"].max() == 40.0  # 3 failures of 5 never count
    assert (line["images"] == 5).all()
    # every curve of the group ends at the same plateau point, beyond the largest success (1.2)
    ends = cdf.groupby(["experiment", "attack"])["distance"].max()
    assert ends.tolist() == pytest.approx([1.2 * 1.05] * 6)


def test_attack_summary_median_is_inf_when_most_fail(study):
    tables = results.attack_tables(study, _group(study, "heat_smoothing"), log=lambda _: None)
    summary = results.attack_summary(study, tables).set_index(["experiment", "attack"])
    row = summary.loc[("baseline", "ddn")]
    assert row["success_rate"] == 0.4 and row["median_l2"] == INF
    assert row["median_l2_successful"] == pytest.approx(0.25) and row["mean_l2_successful"] == pytest.approx(0.25)
    assert summary.loc[("cohen", "ddn"), "median_l2"] == pytest.approx(0.6)
    assert summary.loc[("baseline", "pgd"), "median_l2"] == pytest.approx(0.9)
    assert summary.loc[("cohen", "ddn"), "search_norm"] == "l2"


def test_not_certified_overlay_on_the_intersection(study):
    adv = results.load_attack_group(study, _group(study, "heat_smoothing"), log=lambda _: None)
    overlay = results.not_certified(study, adv.cert_tables, adv.tables)
    cohen = overlay[(overlay["experiment"] == "cohen") & (overlay["attack"] == "ddn")]
    # certified idx {0, 2, 4, 6}, attacked {0..4}: the curve uses idx 0, 2, 4 only
    assert (cohen["images"] == 3).all() and cohen["basis"].iloc[0] == "certified and attacked images"
    table = adv.cert_tables["cohen"]
    common = table[table["idx"].isin([0, 2, 4])]
    radii = cohen["radius"].to_numpy()
    expected = 100 * (1 - metrics.certified_accuracy(common, radii, "l2"))
    assert cohen["percent_not_certified"].to_numpy() == pytest.approx(expected)
    values = metrics.step_value(radii, cohen["percent_not_certified"], [0.0, 0.2, 0.5], beyond=100.0)
    assert values.tolist() == pytest.approx([100 / 3, 200 / 3, 100.0])


def test_lbound_distribution(study):
    adv = results.load_attack_group(study, _group(study, "heat_smoothing"), log=lambda _: None)
    dist = adv.lbound
    assert set(dist["experiment"]) == {"heat", "cohen"}
    heat = dist[dist["experiment"] == "heat"].set_index("idx")
    assert heat["lbound"].tolist() == LBOUND_VALUES["heat"]
    # the smallest successful distance over DDN and PGD: idx 0 -> min(0.6, 0.7), idx 3 -> none
    assert heat.loc[0, "attack_l2"] == pytest.approx(0.6) and heat.loc[3, "attack_l2"] == INF
    # idx 2: L-bound 0.5 > attack 0.3 on a correct input: the approximate bound fails there
    assert heat.loc[2, "lbound_exceeds_attack"] and not heat.loc[0, "lbound_exceeds_attack"]
    summary = results.lbound_summary(dist).set_index("experiment")
    assert summary.loc["heat", "accuracy"] == 0.8 and summary.loc["heat", "lbound_exceeds_attack"] == 2


# --------------------------------------------------------------------------- plots and files


def test_plots_and_table_files(study, tmp_path):
    cert = results.load_certify_group(study, _group(study, "rs4a"), log=lambda _: None)
    env = metrics.envelope(cert.curves)
    figures = [plots.plot_study_certified_accuracy(cert.curves, "t"),
               plots.plot_sigma_facets(cert.curves, "l2", list(cert.sweeps), env, "t"),
               plots.plot_envelopes(env, "t")]
    adv = results.load_attack_group(study, _group(study, "heat_smoothing"), log=lambda _: None)
    figures += [plots.plot_study_attack_cdf(results.attack_cdf(study, adv.tables),
                                            results.not_certified(study, adv.cert_tables, adv.tables), "t"),
                plots.plot_lbound_distribution(adv.lbound, "t")]
    assert len(figures[1].axes) == 2 and len(figures[3].axes) == 2
    written = plots.save_figure(figures[0], tmp_path / "fig")
    assert [p.suffix for p in written] == [".png", ".pdf"]
    paths = results.write_tables(study, cert.group, {"cert_envelope": env, "nothing": pd.DataFrame()})
    assert paths == [study.dir / "results" / "cert_envelope_rs4a.csv"]
    assert pd.read_csv(paths[0])["certified_accuracy"].tolist() == pytest.approx(env["certified_accuracy"].tolist())
    paths[0].unlink()


# --------------------------------------------------------------------------- the notebooks


def _execute(notebook: str, study_dir: Path, tmp_path: Path, monkeypatch) -> str:
    import papermill

    from rslib.pipeline.runner import kernel_for_current_python

    kernel, jupyter_dir = kernel_for_current_python(tmp_path)
    if jupyter_dir is not None:
        monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    out = tmp_path / f"{notebook}.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{notebook}.ipynb"), str(out), kernel_name=kernel,
                               parameters={"params_file": str(study_dir / "study.yaml"),
                                           "output_dir": str(study_dir)},
                               cwd=str(tmp_path), progress_bar=False, log_output=False)
    return out.read_text()


def _assert_figures(study_dir: Path, names: list[str]) -> None:
    for name in names:
        for suffix in ("png", "pdf"):
            assert (study_dir / "figures" / f"{name}.{suffix}").stat().st_size > 0, name


def test_cert_plots_notebook(study_dir, tmp_path, monkeypatch):
    text = _execute("cert_plots", study_dir, tmp_path, monkeypatch)
    _assert_figures(study_dir, ["cert_accuracy_heat_smoothing", "cert_accuracy_rs4a", "cert_sigma_l1_rs4a",
                                "cert_sigma_l2_rs4a", "cert_envelope_rs4a"])
    assert not (study_dir / "figures" / "cert_envelope_heat_smoothing.png").exists()
    assert not list((study_dir / "figures").glob("*_empty.*"))
    tables = study_dir / "results"
    for name in ("cert_curves", "cert_accuracy_at_radii", "cert_acr", "cert_timing"):
        for group in ("heat_smoothing", "rs4a"):
            assert (tables / f"{name}_{group}.csv").exists(), (name, group)
    assert (tables / "cert_envelope_rs4a.csv").exists()
    # a number of the written table equals what the CSVs give directly
    best = pd.read_csv(tables / "cert_accuracy_at_radii_rs4a.csv").set_index(["unit", "norm", "radius"])
    direct = max(metrics.certified_accuracy(certify_stage.read_table(
        study_dir / n / "results" / "certify.csv"), [0.5], "l2")[0] for n in ("gauss_0.25", "gauss_0.5"))
    assert best.loc[("Gaussian", "l2", 0.5), "certified_accuracy"] == pytest.approx(direct) == 0.25
    assert "'broken'" in text  # the notes name the skipped experiments
    assert "figures/cert_envelope_rs4a.pdf" in text  # the list of produced files


def test_adv_plots_notebook(study_dir, tmp_path, monkeypatch):
    text = _execute("adv_plots", study_dir, tmp_path, monkeypatch)
    _assert_figures(study_dir, ["adv_cdf_heat_smoothing", "adv_lbound_heat_smoothing"])
    assert not list((study_dir / "figures").glob("adv_*_rs4a.*"))
    tables = study_dir / "results"
    for name in ("adv_cdf", "adv_not_certified", "adv_summary", "lbound"):
        assert (tables / f"{name}_heat_smoothing.csv").exists(), name
    summary = pd.read_csv(tables / "adv_summary_heat_smoothing.csv").set_index(["experiment", "attack"])
    rows = attack_stage.read_table(study_dir / "cohen" / "results" / "attack_pgd.csv")
    assert summary.loc[("cohen", "pgd"), "success_rate"] == pytest.approx(rows["success"].mean()) == 0.6
    assert summary.loc[("baseline", "ddn"), "median_l2"] == INF
    assert "'broken'" in text and "figures/adv_cdf_heat_smoothing.png" in text


def test_published_reference_rows_comparison_and_overlay(study, tmp_path):
    import dataclasses

    path = tmp_path / "published.csv"
    path.write_text("experiment,radius,accuracy,source\ncohen,0.0,0.8,paper\nCohen,0.25,0.5,paper\n"
                    "gauss_0.5,0.0,0.9,paper\n")
    with_reference = dataclasses.replace(study, reference=path)
    rows = results.reference_rows(with_reference, ["cohen", "heat"])
    assert rows["experiment"].tolist() == ["cohen", "cohen"] and rows["label"].tolist() == ["Cohen", "Cohen"]
    table = results.reference_comparison({"cohen": results.certify_tables(study, _group(study, "heat_smoothing"),
                                                                          log=lambda _: None)["cohen"]}, rows)
    # cohen is correct on 3 of 4 inputs, with radii 0.30, 0.10 and 0.90: 0.75 at r = 0, 0.5 at r = 0.25
    assert table["ours"].tolist() == [0.75, 0.5] and table["published"].tolist() == [0.8, 0.5]
    assert table["difference_points"].tolist() == pytest.approx([-5.0, 0.0])
    cert = results.load_certify_group(with_reference, _group(study, "heat_smoothing"), log=lambda _: None)
    figure = plots.plot_study_certified_accuracy(cert.curves, "t", reference=cert.reference)
    assert any(line.get_label() == "Cohen: published" for line in figure.axes[0].get_lines())
    caption = " ".join(text.get_text() for text in figure.texts)
    assert "Dotted with markers: the published numbers" in caption and "Dashed: HeatSmoothing" in caption
    plain = plots.plot_study_certified_accuracy(cert.curves[~cert.curves["method"].str.contains("approximate")], "t")
    plain_caption = " ".join(text.get_text() for text in plain.texts)
    assert "Dashed" not in plain_caption and "Dotted" not in plain_caption  # names only what is drawn
    assert results.reference_rows(study, ["cohen"]).empty  # no report.reference: nothing


def test_study_reference_is_checked_when_the_study_loads(tmp_path):
    from rslib.pipeline import study as study_mod
    from rslib.pipeline.params import ParamsError

    raw = {"study": "ref", "defaults": {"stages": ["train", "certify"]},
           "experiments": [{"name": "a"}, {"name": "b", "label": "Model B"}],
           "report": {"groups": [{"name": "g", "experiments": ["a", "b"]}], "reference": "published.csv"}}
    path = tmp_path / "ref.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(ParamsError, match="report.reference: cannot read"):
        study_mod.load(path)
    (tmp_path / "published.csv").write_text("experiment,radius,accuracy\na,0,0.9\n")
    with pytest.raises(ParamsError, match="lacks the column"):
        study_mod.load(path)
    (tmp_path / "published.csv").write_text("experiment,radius,accuracy,source\nzzz,0,0.9,x\n")
    with pytest.raises(ParamsError, match="'zzz', which is no experiment"):
        study_mod.load(path)
    (tmp_path / "published.csv").write_text("experiment,radius,accuracy,source\na,0,0.9,x\nModel B,0,0.8,x\n")
    loaded = study_mod.load(path)
    assert loaded.to_dict()["report"]["reference"] == str((tmp_path / "published.csv").resolve())


def test_draws_per_image_of_sequential_tables(study):
    tables = results.certify_tables(study, _group(study, "heat_smoothing"), log=lambda _: None)
    assert results.draws_per_image(study, tables).empty  # fixed-n tables: nothing to show
    sequential = tables["cohen"].assign(n=[313, 10000, 625, 1250], n_max=10000, stop_look=[1, 6, 2, 3])
    draws = results.draws_per_image(study, {"cohen": sequential, "heat": tables["heat"]})
    assert draws["experiment"].unique().tolist() == ["cohen"] and draws["n"].tolist() == [313, 10000, 625, 1250]
    figure = plots.plot_draws_per_image(draws, "t")
    assert "mean 3047 of 10000" in figure.axes[0].get_legend_handles_labels()[1][0]
