"""The attack stage: the notebook through the papermill runner for three models, resume, sharding,
validation.

Models (digits, small_cnn, sigma 0.25, tiny settings): a standard model attacked as a plain
classifier, a Gaussian-augmented model attacked as a smoothed classifier (params/demo/experiment.yaml,
trained by its own train stage), and a heat-averaged model of the standard one attacked as a
(deterministic) plain classifier. Then, with direct calls: an interrupted attack resumes from its
partial rows, finished attacks are reused, two gloo ranks give the rows of one process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, set_rank_env

from rslib.core import metrics
from rslib.core.lbound import COLUMNS as LBOUND_COLUMNS
from rslib.nn.data import load_dataset, subset
from rslib.pipeline.params import ParamsError, load, validate
from rslib.pipeline.runner import run_file as run
from rslib.pipeline.stages import attack as attack_stage
from rslib.pipeline.stages import train

PARAMS = Path(__file__).resolve().parents[1] / "params" / "demo" / "experiment.yaml"
SKIP = 45                     # digits test split: 450 images -> 10 selected
TINY = {"device": "cpu", "train.epochs": 5, "attack.skip": SKIP, "attack.images_per_batch": 4,
        "attack.ddn_steps": 40, "attack.pgd_steps": 8, "attack.search_steps": 5, "attack.draws": 4,
        "attack.judge_n": 100}
BASE_TRAIN = {"train.mode": "standard"}
ATTACK_BATCH = attack_stage.attack_batch
HEAT_TRAIN = {"train.mode": "heat", "train.heat_base": "atk_base", "train.epochs": 3, "train.heat_steps": 2,
              "train.heat_draws": 2}


def quiet(*_):
    pass


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models on a shared, loaded machine: intra-op threads only add synchronisation stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def output_root(tmp_path_factory):
    return tmp_path_factory.mktemp("attack-notebook")


def _experiment(name: str, **overrides):
    return load(PARAMS, **{"experiment": name, **TINY, **overrides})


def _fit(output_root: Path, name: str, **overrides) -> Path:
    """Train with rslib.pipeline.stages.train directly (the train notebook has its own tests)."""
    return train.fit(_experiment(name, **overrides), output_root / name, progress=False, log=quiet)


def _run(output_root: Path, name: str, **kwargs) -> Path:
    overrides = {"experiment": name, **TINY, **kwargs.pop("overrides", {})}
    kwargs.setdefault("only", ["train", "attack"])
    report = run(PARAMS, overrides=overrides, output_root=output_root, log=quiet, **kwargs)
    assert report.ok, [(s.name, s.status, s.error) for s in report.stages]
    return output_root / name


@pytest.fixture(scope="module")
def base_model(output_root, one_thread) -> Path:
    return _fit(output_root, "atk_base", **BASE_TRAIN)


@pytest.fixture(scope="module")
def attacked(output_root, base_model) -> dict[str, Path]:
    """The three notebook runs (the demo one trains through its own train stage)."""
    folders = {"base": _run(output_root, "atk_base", only=["attack"],
                            overrides={**BASE_TRAIN, "attack.target": "base"})}
    folders["smoothed"] = _run(output_root, "atk_smoothed")
    _fit(output_root, "atk_heat", **HEAT_TRAIN)
    folders["heat"] = _run(output_root, "atk_heat", only=["attack"],
                           overrides={**HEAT_TRAIN, "attack.target": "base"})
    return folders


def _selection() -> tuple[list[int], list[int]]:
    dataset = load_dataset("digits", "test")
    _, chosen = subset(dataset, SKIP)
    return chosen, [int(dataset[i][1]) for i in chosen]


@pytest.mark.parametrize("model", ["base", "smoothed", "heat"])
def test_attack_notebook_writes_consistent_results(attacked, model):
    folder = attacked[model]
    results = folder / "results"
    chosen, labels = _selection()
    tables = {}
    for name in ("ddn", "pgd"):
        table = pd.read_csv(results / f"attack_{name}.csv")
        assert list(table.columns) == attack_stage.ROW_COLUMNS
        assert table["idx"].tolist() == chosen and table["label"].tolist() == labels
        assert (table["attack"] == name).all()
        ok = table["success"].to_numpy(dtype=bool)
        distances = table[list(attack_stage.DISTANCES)].to_numpy(dtype=float)
        assert np.isinf(distances[~ok]).all(), "a failure must be recorded with distance inf"
        assert np.isfinite(distances[ok]).all() and (distances[ok] >= 0).all()
        assert ok.mean() >= 0.5  # small digits models are not robust at these budgets
        tables[name] = table

    lbound = pd.read_csv(results / "lbound.csv")
    assert list(lbound.columns) == LBOUND_COLUMNS and lbound["idx"].tolist() == chosen
    assert (lbound["draws"] == (4 if model == "smoothed" else 0)).all() and (lbound["sigma"] == 0.25).all()
    if model != "smoothed":
        # the target is the model's argmax: distance 0 exactly on the images it misclassifies
        for table in tables.values():
            zero = table["success"] & (table["l2"] == 0)
            assert zero.tolist() == (~lbound["correct_top1"]).tolist()

    # the CDF figure's data: fraction of ALL images fooled at distance <= r, failures never counted
    cdf = pd.read_csv(results / "attack_cdf.csv")
    assert sorted(cdf["attack"].unique()) == ["best", "ddn", "pgd"] and (cdf["norm"] == "l2").all()
    for name, table in tables.items():
        curve = cdf[cdf["attack"] == name]
        assert (curve["images"] == len(table)).all() and curve["fraction"].is_monotonic_increasing
        ok, l2 = table["success"].to_numpy(dtype=bool), table["l2"].to_numpy(dtype=float)
        expected = [(ok & (l2 <= r)).mean() for r in curve["distance"]]
        assert curve["fraction"].tolist() == pytest.approx(expected, abs=1e-12)
        assert curve["fraction"].iloc[-1] == pytest.approx(ok.mean(), abs=1e-12)
        assert set(l2[ok]) <= set(curve["distance"])  # every success is a step of the curve
    for suffix in ("png", "pdf"):
        assert (folder / "figures" / f"attack_cdf.{suffix}").stat().st_size > 0
    assert (folder / "notebooks" / "attack.ipynb").exists()

    meta = json.loads((results / "attack.json").read_text())
    assert meta["params"]["attack"]["target"] == ("smoothed" if model == "smoothed" else "base")
    assert meta["seed"] == 0 and "torch_version" in meta["provenance"] and "git_commit" in meta["provenance"]
    assert meta["checkpoint"]["path"] == str(folder / "checkpoints" / "model.pt")
    for name in ("ddn", "pgd"):
        entry = meta["attacks"][name]
        assert entry["timing"]["seconds_per_image"] > 0 and entry["timing"]["wall_seconds_per_image"] > 0
        assert entry["summary"]["success_rate"] == pytest.approx(tables[name]["success"].mean())
        assert json.loads((results / f"attack_{name}.json").read_text())["guard"] == entry["guard"]
    assert meta["lbound"]["approximate"] is True
    text = (folder / "notebooks" / "attack.ipynb").read_text()
    assert "APPROXIMATE" in text and "success judged by" in text
    if model == "smoothed":
        assert "Smooth.predict with n = 100 draws" in meta["target"]["judge"]
        assert meta["checkpoint"]["train_mode"] == "noise"
    if model == "heat":
        assert meta["checkpoint"]["train_mode"] == "heat"


# --- resume and reuse (direct calls, base target: fast) -------------------------------------------


def _direct(base_model: Path, **attack) -> object:
    overrides = {"attack.target": "base", "attack.checkpoint": str(base_model)}
    overrides |= {f"attack.{k}": v for k, v in attack.items()}
    return _experiment("atk_direct", **overrides)


class Counting:
    """Wraps attack_stage.attack_batch: records (attack, first index) per call; raises on call ``fail_on``."""

    def __init__(self, monkeypatch, fail_on: int | None = None):
        self.real = ATTACK_BATCH
        self.calls: list[tuple[str, int]] = []
        self.fail_on = fail_on
        monkeypatch.setattr(attack_stage, "attack_batch", self)

    def __call__(self, name, model, x, y, *args, **kwargs):
        if self.fail_on is not None and len(self.calls) + 1 == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append((name, len(x)))
        return self.real(name, model, x, y, *args, **kwargs)


def test_interrupted_attack_resumes_and_finished_attacks_are_reused(tmp_path, base_model, monkeypatch):
    exp = _direct(base_model)
    reference = attack_stage.attack_experiment(exp, tmp_path / "reference", progress=False, log=quiet)
    folder = tmp_path / "resumed"
    counting = Counting(monkeypatch, fail_on=3)   # DDN: chunks of 4, 4, 2 -> dies on the third
    with pytest.raises(KeyboardInterrupt):
        attack_stage.attack_experiment(exp, folder, progress=False, log=quiet)
    assert not (folder / "results" / "attack_ddn.csv").exists()
    assert len(list((folder / "results").glob(".attack_ddn.rank0.partial.csv"))) == 1
    counting = Counting(monkeypatch)
    out = attack_stage.attack_experiment(exp, folder, progress=False, log=quiet)
    assert counting.calls == [("ddn", 2), ("pgd", 4), ("pgd", 4), ("pgd", 2)]
    assert not list((folder / "results").glob(".attack_*"))
    for name in ("ddn", "pgd"):
        pd.testing.assert_frame_equal(pd.read_csv(out[name]), pd.read_csv(reference[name]))

    # finished and unchanged: nothing is attacked again; a DDN setting re-runs DDN only
    counting = Counting(monkeypatch)
    attack_stage.attack_experiment(exp, folder, progress=False, log=quiet)
    assert counting.calls == []
    attack_stage.attack_experiment(_direct(base_model, ddn_steps=30), folder, progress=False, log=quiet)
    assert [name for name, _ in counting.calls] == ["ddn"] * 3


def _worker(rank: int, world: int, port: int, raw: dict, out: str) -> None:
    set_rank_env(rank, world, port)
    attack_stage.attack_experiment(validate(raw), out, progress=False, log=quiet)
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_give_the_rows_of_one(tmp_path, base_model):
    """Chunks are seeded by content, so 2 ranks reproduce 1 process (smoothed target, vote judge)."""
    exp = _direct(base_model, target="smoothed", judge="vote", attacks=["ddn"], ddn_steps=20)
    one = attack_stage.attack_experiment(exp, tmp_path / "one", progress=False, log=quiet)
    mp.start_processes(_worker, args=(2, free_port(), exp.to_dict(), str(tmp_path / "two")), nprocs=2,
                       start_method="spawn")
    two = tmp_path / "two" / "results"
    for name in ("attack_ddn.csv", "lbound.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(two / name), pd.read_csv(one["ddn"].parent / name))
    assert json.loads((two / "attack.json").read_text())["world_size"] == 2


def test_distance_cdf_counts_failures_as_never_fooled():
    table = pd.DataFrame({"idx": range(4), "label": 1, "attack": "x", "success": [True, False, True, True],
                          "l0": 1.0, "l1": 1.0, "l2": [0.5, math.inf, 0.0, 0.5], "linf": 1.0})
    table.loc[1, ["l0", "l1", "linf"]] = math.inf
    cdf = metrics.distance_cdf({"x": table})
    assert cdf["distance"].tolist() == [0.0, 0.5, 0.525] and cdf["fraction"].tolist() == [0.25, 0.75, 0.75]
    stats = metrics.attack_summary({"x": table})
    assert stats.loc["x", "success_rate"] == 0.75 and stats.loc["x", "median_l2"] == 0.5
    assert stats.loc["x", "misclassified_clean"] == 0.25


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [("attacks", ["ddn", "cw"]), ("target", "heat"), ("norm", "l3"),
                                            ("attacks", ["pgd", "pgd"]), ("eps_max", 0)])
def test_bad_attack_parameters_name_the_key(tmp_path, key, value):
    raw = {"experiment": "bad", "stages": ["attack"], "attack": {key: value}}
    with pytest.raises(ParamsError, match=rf"attack\.{key}"):
        validate(raw)
    with pytest.raises(ParamsError, match=rf"attack\.{key}"):  # before any output is written
        run(PARAMS, overrides={f"attack.{key}": value}, output_root=tmp_path, log=quiet)
    assert not any(tmp_path.iterdir())


def test_attack_section_defaults():
    exp = validate({"experiment": "defaults", "stages": ["attack"]})
    spec = exp.attack
    assert spec.target == "base" and spec.attacks == ["ddn", "pgd", "alma"] and spec.norm == "l2"
    assert spec.lbound_topk == 1 and spec.checkpoint is None and spec.max is None
    assert exp.data.dataset == "digits" and exp.noise.name == "Gaussian"


def test_best_is_the_per_input_minimum_over_attacks():
    inf = math.inf

    def table(name, l2, success):
        return pd.DataFrame({"idx": [0, 1, 2], "label": 1, "attack": name, "success": success,
                             "l0": 1.0, "l1": 1.0, "l2": l2, "linf": 1.0})

    best = metrics.best_over_attacks({"ddn": table("ddn", [0.5, inf, 0.3], [True, False, True]),
                                      "alma": table("alma", [0.4, inf, 0.3], [True, False, True])})
    assert best["l2"].tolist() == [0.4, inf, 0.3] and best["success"].tolist() == [True, False, True]
    assert best["found_by"].tolist() == ["alma", "none", "ddn"] and (best["attack"] == "best").all()


def test_alma_and_best_in_the_stage(tmp_path, base_model):
    exp = _direct(base_model, attacks=["ddn", "pgd", "alma"], alma_steps=30, alma_restarts=2)
    out = attack_stage.attack_experiment(exp, tmp_path, progress=False, log=quiet)
    tables = {name: attack_stage.read_table(out[name]) for name in ("ddn", "pgd", "alma")}
    best = pd.read_csv(out["best"])
    expected = np.minimum.reduce([t["l2"].to_numpy(dtype=float) for t in tables.values()])
    np.testing.assert_array_equal(best["l2"].to_numpy(dtype=float), expected)
    assert best["success"].tolist() == [any(t["success"].iloc[i] for t in tables.values()) for i in range(len(best))]
    for _, row in best[best["success"]].iterrows():
        assert tables[row["found_by"]].set_index("idx").loc[row["idx"], "l2"] == row["l2"]
    meta = json.loads((tmp_path / "results" / "attack.json").read_text())
    assert meta["attacks"]["alma"]["settings"]["alma_restarts"] == 2
    loaded, _, _ = attack_stage.read_results(tmp_path)
    assert sorted(loaded) == ["alma", "best", "ddn", "pgd"] and list(loaded)[-1] == "best"
