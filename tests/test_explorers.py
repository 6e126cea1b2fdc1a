"""The noise explorer and the results browser: their compute functions, discovery over an outputs root built
by rslib's real stages on tiny settings, and both notebooks run through papermill."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from rslib.core import metrics  # noqa: E402
from rslib.core.noises import make_noise, noise_from_params  # noqa: E402
from rslib.core.noises.curves import radius_curves, spec_label  # noqa: E402
from rslib.pipeline import layout  # noqa: E402
from rslib.pipeline import study as study_mod  # noqa: E402
from rslib.pipeline.params import validate  # noqa: E402
from rslib.pipeline.stages import attack as attack_stage  # noqa: E402
from rslib.pipeline.stages import certify as certify_stage  # noqa: E402
from rslib.pipeline.stages import train  # noqa: E402
from rslib.report import explore_noise, explore_results  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
RHO = explore_noise.RHO


def quiet(*_):
    pass


# --------------------------------------------------------------------------- noise explorer


def test_noise_spec_turns_offsets_into_parameters() -> None:
    assert explore_noise.noise_spec("PowInf", 64) == {"name": "PowInf", "a": 74.0}
    assert explore_noise.noise_spec("PowInf", 3072, {"a": 3}) == {"name": "PowInf", "a": 3075.0}
    assert explore_noise.noise_spec("Pow2", 64, {"k": 4, "a": 10}) == {"name": "Pow2", "k": 4.0, "a": 26.0}
    assert explore_noise.noise_spec("Gaussian", 64, {"a": 3}) == {"name": "Gaussian"}  # no such parameter
    specs = explore_noise.all_specs(64, {"ExpInf": {"k": 10.0}})
    assert [s["name"] for s in specs] == explore_noise.noise_names() and len(specs) == 11
    assert next(s for s in specs if s["name"] == "ExpInf") == {"name": "ExpInf", "k": 10.0, "j": 0.0}


@pytest.mark.parametrize("dim", list(explore_noise.DIMS.values()))
def test_every_grid_choice_is_a_valid_noise_with_finite_sigma(dim: int) -> None:
    for spec in explore_noise.grid_specs(dim):
        noise = noise_from_params(spec, dim, 0.5)
        assert noise.sigma == 0.5 and math.isfinite(noise.lambd), spec


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_radius_curves_are_rslibs(norm: str) -> None:
    specs = explore_noise.all_specs(64, {"Pareto": {"a": 4.0}})
    frame = explore_noise.curves(specs, 64, 0.75, norm)
    pd.testing.assert_frame_equal(frame, radius_curves(specs, 64, 0.75, RHO, norm))
    assert spec_label({"name": "Pareto", "a": 4.0}) in set(frame["noise"])
    assert explore_noise.curves(specs, 64, 0.75, norm) is frame  # memoized


def test_lambda_scale_matches_the_chosen_noise_and_sets_the_common_sigma() -> None:
    setting = explore_noise.resolve("Laplace", {"Pareto": {"a": 6.0}}, "lambda", 0.5, 64, "l1")
    assert {"name": "Pareto", "a": 6.0} in setting.specs()  # every noise keeps its own parameters
    assert setting.sigma == pytest.approx(0.5 * math.sqrt(2)) and setting.lambd == 0.5
    frame = explore_noise.curves(setting.specs(), 64, setting.sigma, "l1")
    direct = make_noise("Laplace", 64, lambd=0.5).certify(RHO, 1)
    np.testing.assert_allclose(frame.loc[frame["noise"] == "Laplace", "radius"], direct, rtol=1e-12)
    uniform = frame.loc[frame["noise"] == "Uniform", "radius"].to_numpy()  # the others at the same sigma
    np.testing.assert_allclose(uniform, 2 * math.sqrt(3) * setting.sigma * np.maximum(RHO - 0.5, 0), rtol=1e-12)
    with pytest.raises(ValueError, match="scale"):
        explore_noise.resolve("Laplace", {}, "volume", 0.5, 64, "l1")


def test_matched_variance_samples_have_the_stated_rms() -> None:
    """At d = 64 and 2**18 coordinates (seed 0) every noise's sample RMS is within 1.5% of sigma (observed
    worst over seeds 0-5: 0.95%, PowInf); Pareto(a=3) within 5%: x**2 has tail index 3/2, so its sample
    mean has infinite variance and converges slowly (observed -3% at seed 0)."""
    specs = explore_noise.all_specs(64)
    samples = explore_noise.sample_coordinates(specs, 64, 0.5, seed=0, coordinates=2**18)
    table = explore_noise.matched_variance(specs, 64, 0.5, "l2", samples).set_index("noise")
    for spec in specs:
        label = spec_label(spec)
        rms = float(np.sqrt(np.mean(samples[label] ** 2)))
        assert samples[label].size == 2**18
        assert table.loc[label, "empirical_rms"] == pytest.approx(rms)
        assert table.loc[label, "lambd"] == pytest.approx(noise_from_params(spec, 64, 0.5).lambd)
        assert abs(rms / 0.5 - 1) < (0.05 if spec["name"] == "Pareto" else 0.015), label
    # samples scale with sigma (same draws), the radius columns are rslib's at those exact rho
    double = explore_noise.sample_coordinates(specs, 64, 1.0, seed=0, coordinates=2**18)
    np.testing.assert_allclose(double["Gaussian"], 2 * samples["Gaussian"])
    assert table.loc["Gaussian", "R at rho=0.9"] == pytest.approx(make_noise("Gaussian", 64, sigma=0.5).certify(0.9, 2))
    assert table.loc["Laplace", "certificate"] == "from l1" and table.loc["Gaussian", "certificate"] == "direct"


def test_noise_explorer_renders_every_section_and_reports_bad_choices() -> None:
    explorer = explore_noise.NoiseExplorer(noise="ExpInf", values={"k": 2.0}, norm="linf")
    values = explorer.values()
    assert explorer.parameters["ExpInf_k"].value == 2.0 and explorer.parameters["ExpInf_k"].layout.display == ""
    assert explorer.parameters["Pareto_a"].layout.display == "none"
    for section in explorer.SECTIONS:
        # as interactive_output calls it: with the values of the section's controls only
        own = {k: v for k, v in values.items() if k in explorer._NEEDS[section] or k in explorer.parameters}
        items = explorer.render(section, **own)
        images = [i for i in items if type(i).__name__ == "Image"]
        assert images, section
        again = [i for i in explorer.render(section, **own) if type(i).__name__ == "Image"]
        assert all(a is b for a, b in zip(images, again, strict=True))  # memoized figures
    # sigma redraws the draws, never the law of one coordinate (drawn in units of sigma)
    other = [i for i in explorer.render("image", **{**values, "value": 0.8}) if type(i).__name__ == "Image"]
    first = [i for i in explorer.render("image", **values) if type(i).__name__ == "Image"]
    assert other[0] is not first[0] and other[1] is first[1]
    bad = explorer.render("curves", **{**values, "scale": "volume"})
    assert "no noise to show" in bad[0].data


def test_start_from_an_experiment(tmp_path: Path) -> None:
    raw = {"experiment": "e", "stages": ["train"], "data": {"dataset": "digits"}, "model": {"arch": "small_cnn"},
           "noise": {"name": "powinf", "sigma": 0.3, "params": {"a": 84}}, "train": {"mode": "noise"}}
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(raw))
    start = explore_noise.start_from(path)
    assert start == {"noise": "PowInf", "values": {"a": 20.0}, "value": 0.3, "dim": 64}
    assert explore_noise.NoiseExplorer(**start).setting(explore_noise.NoiseExplorer(**start).values()).spec() == {
        "name": "PowInf", "a": 84.0}


# --------------------------------------------------------------------------- a tiny outputs root


def _experiment(name: str, stages: list[str], **sections) -> object:
    raw = {"experiment": name, "seed": 0, "device": "cpu", "stages": stages,
           "data": {"dataset": "digits", "batch_size": 64}, "model": {"arch": "small_cnn"},
           "noise": {"name": "Gaussian", "sigma": 0.25},
           "train": {"mode": "noise", "epochs": 2, "lr": 0.1},
           "certify": {"n0": 20, "n": 200, "alpha": 0.001, "batch_size": 512, "skip": 30},
           "attack": {"attacks": ["ddn"], "target": "base", "ddn_steps": 20, "skip": 60, "max": 4}}
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return validate({k: v for k, v in raw.items() if k not in ("attack",) or "attack" in stages})


@pytest.fixture(scope="module")
def outputs_root(tmp_path_factory, one_thread) -> Path:
    """``solo`` (train, certify, attack), the study ``tiny`` (``a`` and ``b`` certified with solo's model,
    ``c`` never run; a published reference for ``a``), ``half`` (trained, never certified) and a folder of notes."""
    root = tmp_path_factory.mktemp("outputs")
    solo = _experiment("solo", ["train", "certify", "attack"])
    train.fit(solo, root / "solo", progress=False, log=quiet)
    certify_stage.certify_experiment(solo, root / "solo", progress=False, log=quiet)
    attack_stage.attack_experiment(solo, root / "solo", progress=False, log=quiet)
    (root / "solo" / layout.PARAMS_FILE).write_text(yaml.safe_dump(solo.to_dict()))
    model = root / "solo" / "checkpoints" / "model.pt"
    (root / "published.csv").write_text("experiment,radius,accuracy,source\nA,0.0,0.9,paper\nA,0.25,0.6,paper\n")
    defaults = {k: v for k, v in solo.to_dict().items() if k not in ("experiment", "attack")}
    defaults["stages"] = ["certify"]
    defaults["certify"]["checkpoint"] = str(model)
    raw = {"study": "tiny", "defaults": defaults,
           "experiments": [{"name": "a", "label": "A"}, {"name": "b", "noise": {"name": "Laplace", "sigma": 0.5}},
                           {"name": "c"}],
           "report": {"groups": [{"name": "all", "experiments": ["*"]}], "reference": "published.csv"}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(raw))
    study = study_mod.load(root / "tiny.yaml")
    for name in ("a", "b"):
        certify_stage.certify_experiment(study.get(name).experiment, root / "tiny" / name, progress=False, log=quiet)
    (root / "tiny" / "c" / "results").mkdir(parents=True)
    (root / "tiny" / layout.STUDY_FILE).write_text(json.dumps(study.to_dict()))
    half = _experiment("half", ["train", "certify"])
    (root / "half" / "results").mkdir(parents=True)
    (root / "half" / layout.PARAMS_FILE).write_text(yaml.safe_dump(half.to_dict()))
    (root / "notes").mkdir()
    (root / "notes" / "README.txt").write_text("not an experiment")
    return root


def test_discovery_finds_experiments_and_studies_and_ignores_unfinished(outputs_root: Path) -> None:
    found = explore_results.discover(outputs_root)
    assert sorted(found.entries) == ["solo", "tiny/a", "tiny/b"]
    assert list(found.studies) == ["tiny"]
    assert sorted(p.name for p in found.unfinished) == ["c", "half"]
    assert found.entries["solo"].attacks() == ["ddn"] and found.entries["tiny/a"].attacks() == []
    assert found.entries["tiny/b"].exp.noise_label == "Laplace" and found.entries["tiny/a"].exp.label == "A"
    assert found.entries["solo"].study.dir is None and found.entries["tiny/a"].study.dir == outputs_root / "tiny"
    assert "3 finished experiments (1 on their own" in found.summary() and "2 unfinished" in found.summary()
    # the root itself may be a study folder or one experiment's folder
    assert sorted(explore_results.discover(outputs_root / "tiny").entries) == ["a", "b"]
    assert list(explore_results.discover(outputs_root / "solo").entries) == ["solo"]
    assert explore_results.discover(outputs_root / "nowhere").entries == {}


def test_filters_partition_the_table_and_curves_are_rslibs(outputs_root: Path) -> None:
    found = explore_results.discover(outputs_root)
    table = certify_stage.read_table(outputs_root / "solo" / "results" / "certify.csv")
    parts = {o: explore_results.filter_rows(table, outcome=o) for o in explore_results.OUTCOMES}
    assert sum(len(parts[o]) for o in ("correct", "wrong", "abstain")) == len(parts["all"]) == len(table) == 15
    assert (parts["abstain"]["prediction"] == -1).all() and parts["correct"]["correct"].all()
    assert len(parts["correct"]) == int(table["correct"].sum()) > 0
    label = int(table["label"].iloc[0])
    assert (explore_results.filter_rows(table, label=label)["label"] == label).all()
    high = explore_results.filter_rows(table, radius=(0.2, 10.0), norm="l2")
    assert len(high) == int(((table["radius_l2"] >= 0.2)).sum())
    with pytest.raises(ValueError, match="outcome"):
        explore_results.filter_rows(table, outcome="lucky")
    curves = explore_results.overlay_curves({"solo": table}, "l2")
    pd.testing.assert_frame_equal(curves.drop(columns="experiment"), metrics.accuracy_curves(table, ["l2"]))
    reference = explore_results.published([found.entries["tiny/a"], found.entries["solo"]], quiet)
    assert reference["experiment"].tolist() == ["tiny/a", "tiny/a"] and reference["accuracy"].tolist() == [0.9, 0.6]


def test_one_image_draws_and_its_adversarial_example(outputs_root: Path) -> None:
    found = explore_results.discover(outputs_root)
    browser = explore_results.ResultsBrowser(found)
    assert browser.controls["experiment"].value == "solo"  # the first with an attack
    assert browser.controls["target"].value == "base"  # what its attack stage attacked
    entry = found.entries["solo"]
    key, idx = browser.controls["image"].value.split("|")
    table = browser.table("solo").set_index("idx")
    attacked = set(attack_stage.read_table(outputs_root / "solo" / "results" / "attack_ddn.csv")["idx"])
    assert key == "solo" and bool(table.loc[int(idx), "correct"]) and int(idx) in attacked
    x, y = browser.image("solo", int(idx))
    draws = explore_results.noisy_draws(entry, x, int(idx))
    assert torch.equal(draws, explore_results.noisy_draws(entry, x, int(idx))) and draws.shape == (6, 1, 8, 8)
    assert not torch.equal(draws, explore_results.noisy_draws(entry, x, int(idx) + 1))
    model = browser.model("solo")
    result = explore_results.adversarial(entry, model, x, y, int(idx), "ddn")
    assert result.norm == "l2" and result.target == "base"
    if result.success:
        assert int(model(result.x_adv).argmax(1)[0]) != int(y[0])
        assert result.distance == pytest.approx(float((result.x_adv - x).flatten().norm()), rel=1e-5)
    else:
        assert result.distance == math.inf
    values = {k: c.value for k, c in browser.controls.items()}
    image = browser.render("image", **values)
    text = image[1].data
    row = table.loc[int(idx)]
    assert f"{int(row['count_top'])} of n = 200" in text and f"{row['prob_lb']:.4f}" in text
    attack = browser.render("attack", **values)
    assert "ddn** recomputed" in attack[1].data and "attack stage recorded" in attack[1].data
    for section in browser.SECTIONS:  # as interactive_output calls it: the section's controls only
        own = {k: v for k, v in values.items() if k in browser._NEEDS[section]}
        assert not any("Cannot show" in str(getattr(i, "data", "")) for i in browser.render(section, **own))
    # changing the filters keeps the image choices consistent with the table
    browser.controls["outcome"].value = "abstain"
    chosen = [v for _, v in browser.controls["image"].options]
    assert chosen == [f"solo|{i}" for i in table.index[table["prediction"] == -1]]


def test_an_empty_root_says_what_to_run(tmp_path: Path) -> None:
    browser = explore_results.ResultsBrowser(explore_results.discover(tmp_path))
    text = browser.render("curves")[0].data
    assert "notebooks/train.ipynb" in text and "certify.ipynb" in text and "make demo" in text
    assert browser.render("image") == [] and "make demo" in browser.widget().value


# --------------------------------------------------------------------------- the notebooks


def _execute(notebook: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **parameters) -> dict:
    import papermill

    from rslib.pipeline.runner import kernel_for_current_python

    kernel, jupyter_dir = kernel_for_current_python(tmp_path)
    if jupyter_dir is not None:
        monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    out = tmp_path / f"{notebook}.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{notebook}.ipynb"), str(out), kernel_name=kernel,
                               parameters=parameters, cwd=str(NOTEBOOKS), progress_bar=False, log_output=False)
    assert out.stat().st_size < 1_000_000
    nb = json.loads(out.read_text())
    outputs = [o for cell in nb["cells"] if cell["cell_type"] == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert not [o for o in outputs if o["output_type"] == "stream" and o["name"] == "stderr"]
    texts = ["".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/markdown", "")) for o in outputs]
    assert not [t for t in texts if "warning" in t.lower()], texts
    return {"text": "\n".join(texts), "images": sum("image/png" in o.get("data", {}) for o in outputs)}


@pytest.mark.slow
def test_noise_explorer_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _execute("noise_explorer", tmp_path, monkeypatch)
    assert run["images"] == 5 and "11 noises at matched variance" in run["text"]
    assert "Largest certified l2 radius" in run["text"]


@pytest.mark.slow
def test_results_browser_notebook(outputs_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _execute("results_browser", tmp_path, monkeypatch, output_dir=str(outputs_root))
    assert run["images"] == 3 and "3 finished experiments" in run["text"]
    assert "solo" in run["text"] and "ddn** recomputed" in run["text"]


def test_results_browser_notebook_without_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "outputs"
    empty.mkdir()
    run = _execute("results_browser", tmp_path, monkeypatch, output_dir=str(empty))
    assert "Nothing to browse yet" in run["text"] and "make demo" in run["text"] and run["images"] == 0
