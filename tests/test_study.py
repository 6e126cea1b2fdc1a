"""Studies: expansion of sweeps, validation, dependencies, sharding, and the runner on toy notebooks.

The runner tests replace the stage notebooks by tiny ones (``--notebooks-dir``) so that they test
the orchestration (order, failures, resume, shards, plots) in seconds; the real notebooks run in
``test_study_demo.py``.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import toy_stage_notebooks

from rslib import cli
from rslib.pipeline import study
from rslib.pipeline.params import ParamsError

#: A stage notebook that fails when the experiment's train.epochs is 13, else records that it ran.
TOY = """\
import json, os, pathlib, yaml
p = yaml.safe_load(pathlib.Path(params_file).read_text())
if p.get("train", {}).get("epochs") == 13 or (NAME == "attack" and p.get("attack", {}).get("skip") == 13):
    raise RuntimeError("planned failure")
out = pathlib.Path(output_dir) / "results" / f"{NAME}.json"
out.write_text(json.dumps({"stage": NAME, "seed": p.get("seed"), "threads": os.environ.get("OMP_NUM_THREADS")}))
"""


def _notebooks(folder: Path) -> Path:
    toy_stage_notebooks(folder, lambda name: f"NAME = {name!r}\n" + TOY)
    return folder


def _study(**extra: Any) -> dict[str, Any]:
    raw = {
        "study": "toy",
        "defaults": {"seed": 0, "device": "cpu", "train": {"epochs": 1}, "noise": {"sigma": 0.25}},
        "experiments": [
            {"name": "base", "label": "Base", "stages": ["train", "certify", "attack"],
             "train": {"mode": "standard"}},
            {"name": "avg", "stages": ["train", "certify"], "train": {"mode": "heat", "heat_base": "base"}},
        ],
        "sweeps": [{"name": "n_{noise.name}_{noise.sigma}", "label": "{noise.name}",
                    "over": {"noise.name": ["Uniform", "Laplace"], "noise.sigma": [0.25, 0.5]},
                    "base": {"stages": ["train", "certify"], "train": {"mode": "noise"}}}],
        "report": {"groups": [{"name": "all", "experiments": ["base", "avg"], "radii": {"l2": [0, 0.5]}},
                              {"name": "noises", "experiments": ["n_*"], "radii": {"l1": [0, 1]}}]},
    }
    raw.update(extra)
    return raw


def _write(tmp_path: Path, raw: dict[str, Any], name: str = "toy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --------------------------------------------------------------------------- loading


def test_sweeps_defaults_and_dependencies(tmp_path: Path) -> None:
    s = study.load(_write(tmp_path, _study()))
    names = [e.name for e in s.experiments]
    assert names == ["base", "avg", "n_Uniform_0.25", "n_Uniform_0.5", "n_Laplace_0.25", "n_Laplace_0.5"]
    avg = s.get("avg")
    assert avg.depends_on == ("base",) and avg.label == "avg"
    assert avg.experiment.train.mode == "heat" and avg.experiment.train.epochs == 1  # from the defaults
    swept = s.get("n_Laplace_0.5")
    assert swept.experiment.noise.name == "Laplace" and swept.experiment.noise.sigma == 0.5
    assert swept.label == "Laplace" and swept.experiment.experiment == "n_Laplace_0.5"
    assert [g.experiments for g in s.groups] == [("base", "avg"), tuple(names[2:])]
    assert s.plots == ("cert_plots", "adv_plots")  # certify and attack stages exist
    assert study.is_study(tmp_path / "toy.yaml")


def test_dependency_order_and_salt(tmp_path: Path) -> None:
    raw = _study()
    raw["experiments"].reverse()  # the dependent first in the file: still runs after its base
    s = study.load(_write(tmp_path, raw))
    assert [e.name for e in s.experiments][:2] == ["base", "avg"]
    # The averaged model's digests follow the base model's training, and nobody else's.
    changed = study.load(_write(tmp_path, raw), **{"train.lr": 0.05})
    assert s.salts["avg"] and s.salts["n_Uniform_0.25"] == ""
    only_base = _study()
    only_base["experiments"][0]["train"]["lr"] = 0.01
    other = study.load(_write(tmp_path, only_base, "other.yaml"))
    assert other.salts["avg"] != s.salts["avg"]
    assert other.get("avg").experiment.stage_digest("train", other.salts["avg"]) != \
        s.get("avg").experiment.stage_digest("train", s.salts["avg"])
    assert changed.get("base").experiment.train.lr == 0.05  # an override applies to every experiment


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r.update(colour=1), "unknown key 'colour'"),
    (lambda r: r.update(study="bad name"), "study must be a name"),
    (lambda r: r["experiments"].append({"name": "base", "stages": ["train"]}), "'base' is used twice"),
    (lambda r: r["experiments"][1]["train"].update(heat_base="bsae"),
     "train.heat_base 'bsae' is neither a .pt checkpoint nor an experiment"),
    (lambda r: r["experiments"][0].update(certify={"checkpoint": "avg"}) or r["experiments"][1]["train"].update(
        heat_base="base"), "depend on each other in a cycle"),
    (lambda r: r["experiments"][0]["train"].update(epochs=0), "experiments[0] ('base'): train.epochs must be"),
    (lambda r: r["sweeps"][0].update(name="n_{noise.colour}"), "cannot fill"),
    (lambda r: r["sweeps"][0].update(over={"noise.sigma": []}), "non-empty lists"),
    (lambda r: r["report"]["groups"][1].update(experiments=["x*"]), "'x*' matches no experiment"),
    (lambda r: r["report"]["groups"][1].update(radii={"l3": [1]}), "radii must map norms"),
    (lambda r: r.update(plots=["cert_plot"]), "plots must be a list of"),
    (lambda r: r["experiments"].append({"name": "c", "stages": ["certify"], "certify": {"checkpoint": "n_x"}}),
     "neither a .pt checkpoint"),
    (lambda r: r["experiments"][0].update(stages=5), "experiments[0] ('base'): stages must be a non-empty list"),
    (lambda r: r.update({1: "x"}), "unknown key '1'"),
    (lambda r: r["sweeps"][0].update(over={1: [2]}), "must map dotted keys to non-empty lists"),
    (lambda r: r["sweeps"][0]["over"].update({"noise.name.x": [1]}), "sweeps[0].over: key 'noise.name.x'"),
])
def test_bad_studies_name_the_problem(tmp_path: Path, edit, message: str) -> None:
    raw = _study()
    edit(raw)
    with pytest.raises(ParamsError, match=re.escape(message)):
        study.load(_write(tmp_path, raw))


def test_reading_a_sibling_without_training_is_an_error(tmp_path: Path) -> None:
    raw = _study()
    raw["experiments"].append({"name": "cert", "stages": ["certify"], "certify": {"checkpoint": "n_Uniform_0.25"}})
    raw["experiments"].append({"name": "again", "stages": ["certify"], "certify": {"checkpoint": "cert"}})
    with pytest.raises(ParamsError, match="'again' reads the checkpoint of 'cert', which has no train stage"):
        study.load(_write(tmp_path, raw))


def test_override_must_concern_an_experiment(tmp_path: Path) -> None:
    path = _write(tmp_path, _study())
    with pytest.raises(ParamsError, match="override 'tutorial.dim' concerns no experiment"):
        study.load(path, **{"tutorial.dim": 64})
    # certify.n reaches every experiment with a certify stage, seed reaches all.
    s = study.load(path, **{"certify.n": 500, "seed": 4})
    assert all(e.experiment.certify.n == 500 and e.experiment.seed == 4 for e in s.experiments)


def test_shards_keep_chains_together_and_cover_everything(tmp_path: Path) -> None:
    s = study.load(_write(tmp_path, _study()))
    for count in (1, 2, 3, 7):
        shard = study.shard_of(s, count)
        assert set(shard) == {e.name for e in s.experiments}
        assert shard["base"] == shard["avg"] and all(1 <= v <= count for v in shard.values())
    two = study.shard_of(s, 2)
    loads = [sum(len(s.get(n).experiment.stages) for n, k in two.items() if k == i) for i in (1, 2)]
    assert sorted(loads) == [6, 7]  # chain base+avg (5 stages) + one sweep point vs three sweep points
    assert study.parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "x", "1/0"):
        with pytest.raises(ParamsError, match="must be i/n"):
            study.parse_shard(bad)


# --------------------------------------------------------------------------- running (toy notebooks)


def _cli(*args: str, root: Path, notebooks: Path) -> int:
    return cli.main([*args, "--output-root", str(root), "--notebooks-dir", str(notebooks)])


def _ran(out: Path, name: str) -> list[str]:
    return sorted(p.stem for p in (out / name / "results").glob("*.json"))


def test_failure_continues_blocks_dependents_and_resume_finishes(tmp_path: Path, capsys) -> None:
    notebooks = _notebooks(tmp_path / "nb")
    root = tmp_path / "outputs"
    raw = _study()
    raw["experiments"][0]["train"]["epochs"] = 13  # base fails in its train stage
    path = _write(tmp_path, raw)
    assert _cli("run", str(path), root=root, notebooks=notebooks) == 1
    text = capsys.readouterr().out
    out = root / "toy"
    assert "avg: not run: it needs the model of 'base', whose training did not finish" in text
    assert (out / "base" / "notebooks" / "train.failed.ipynb").exists()
    assert _ran(out, "avg") == []
    assert _ran(out, "n_Laplace_0.5") == ["certify", "train"]  # the rest of the study went on
    assert sorted(p.stem for p in (out / "results").glob("*.json")) == ["adv_plots", "cert_plots"]
    meta = json.loads((out / "study.json").read_text())
    assert [e["name"] for e in meta["experiments"]][:2] == ["base", "avg"]
    assert meta["report"]["groups"][1]["experiments"][0] == "n_Uniform_0.25"
    assert meta["provenance"]["rslib_version"]
    # the study reads back from its folder as it was loaded from the file (dependencies, salts, report)
    back, loaded = study.load_written(out), study.load(path)
    assert back.to_dict() == loaded.to_dict() and back.salts == loaded.salts and back.dir == out.resolve()
    assert back.get("avg").depends_on == ("base",) and back.groups == loaded.groups

    # Fixed and run again: finished stages are skipped, the rest completes, plots are redrawn.
    raw["experiments"][0]["train"]["epochs"] = 1
    path = _write(tmp_path, raw)
    assert _cli("run", str(path), root=root, notebooks=notebooks) == 0
    text = capsys.readouterr().out
    assert "n_Uniform_0.25: train: skipped" in text and "base: train: running" in text
    assert "cert_plots: running" in text and "all stages finished" in text
    assert _ran(out, "avg") == ["certify", "train"]
    # Nothing changed: everything, plots included, is skipped.
    assert _cli("run", str(path), root=root, notebooks=notebooks) == 0
    text = capsys.readouterr().out
    assert "running" not in text


def test_shards_run_their_part_and_the_last_one_draws(tmp_path: Path, capsys) -> None:
    notebooks = _notebooks(tmp_path / "nb")
    root = tmp_path / "outputs"
    path = _write(tmp_path, _study())
    assert _cli("validate", str(path), "--shard", "1/2", root=root, notebooks=notebooks) == 0
    assert "[shard" in capsys.readouterr().out
    s = study.load(path)
    shard = study.shard_of(s, 2)
    assert _cli("run", str(path), "--shard", "1/2", root=root, notebooks=notebooks) == 0
    text = capsys.readouterr().out
    assert "plots wait for the other shards" in text
    out = root / "toy"
    assert all(bool(_ran(out, n)) == (k == 1) for n, k in shard.items())
    assert _cli("run", str(path), "--shard", "2/2", root=root, notebooks=notebooks) == 0
    assert "cert_plots: done" in capsys.readouterr().out
    assert all(_ran(out, n) for n in shard)


def test_jobs_run_lanes_at_once_with_a_share_of_the_threads(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    notebooks = _notebooks(tmp_path / "nb")
    root = tmp_path / "outputs"
    raw = _study()
    raw["experiments"][0]["train"]["epochs"] = 13  # base fails: its dependent in the same lane is blocked
    path = _write(tmp_path, raw)
    assert _cli("run", str(path), "--jobs", "2", root=root, notebooks=notebooks) == 1
    text = capsys.readouterr().out
    out = root / "toy"
    assert "avg: not run: it needs the model of 'base', whose training did not finish" in text
    sweep = [n for n in study.shard_of(study.load(path), 1) if n.startswith("n_")]
    assert all(_ran(out, n) == ["certify", "train"] for n in sweep)   # the other lane went on
    threads = {json.loads((out / n / "results" / "train.json").read_text())["threads"] for n in sweep}
    assert threads == {str(max(1, (os.cpu_count() or 1) // 2))} and "OMP_NUM_THREADS" not in os.environ
    assert sorted(p.stem for p in (out / "results").glob("*.json")) == ["adv_plots", "cert_plots"]
    single = _write(tmp_path, {"experiment": "one", "stages": ["train"]}, "one.yaml")
    assert _cli("run", str(single), "--jobs", "2", root=root, notebooks=notebooks) == 2
    assert "--jobs runs experiments of a study at once" in capsys.readouterr().err


def test_jobs_run_siblings_of_a_finished_dependency_side_by_side(tmp_path: Path) -> None:
    """Experiments that share a dependency start together once it has run, never before it: the two
    heat settings below each wait for the other to start (they would time out if run one after the
    other), and each sees the base finished."""
    raw = {"study": "siblings", "defaults": {"stages": ["train"]},
           "experiments": [{"name": "base"},
                           {"name": "heat_a", "train": {"mode": "heat", "heat_base": "base"}},
                           {"name": "heat_b", "train": {"mode": "heat", "heat_base": "base"}}]}
    s = study.load(_write(tmp_path, raw))
    started = {name: threading.Event() for name in ("base", "heat_a", "heat_b")}
    finished: list[str] = []
    saw_base_finished: dict[str, bool] = {}

    def run(e) -> None:
        started[e.name].set()
        if e.name != "base":
            saw_base_finished[e.name] = "base" in finished
            other = "heat_b" if e.name == "heat_a" else "heat_a"
            assert started[other].wait(timeout=30), f"{e.name} ran alone: {other} never started beside it"
        finished.append(e.name)

    study.schedule_lanes(s.experiments, 2, run)
    assert finished[0] == "base" and sorted(finished[1:]) == ["heat_a", "heat_b"]
    assert saw_base_finished == {"heat_a": True, "heat_b": True}


def test_run_when_ready_raises_a_failure_and_starts_nothing_after_it(tmp_path: Path) -> None:
    s = study.load(_write(tmp_path, {"study": "chain", "defaults": {"stages": ["train"]},
                              "experiments": [{"name": "base"},
                                              {"name": "heat", "train": {"mode": "heat", "heat_base": "base"}}]}))
    ran: list[str] = []

    def run(e) -> None:
        ran.append(e.name)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study.schedule_lanes(s.experiments, 2, run)
    assert ran == ["base"]


def test_only_selects_stages_and_plots(tmp_path: Path, capsys) -> None:
    notebooks = _notebooks(tmp_path / "nb")
    root = tmp_path / "outputs"
    path = _write(tmp_path, _study())
    assert _cli("run", str(path), "--only", "train", root=root, notebooks=notebooks) == 0
    out = root / "toy"
    assert _ran(out, "base") == ["train"] and not (out / "results" / "cert_plots.json").exists()
    assert _cli("run", str(path), "--only", "plots", root=root, notebooks=notebooks) == 0
    assert (out / "results" / "cert_plots.json").exists() and _ran(out, "base") == ["train"]
    assert _cli("run", str(path), "--only", "tutorial_noise_radii", root=root, notebooks=notebooks) == 2
    assert "is not a stage of study 'toy'" in capsys.readouterr().err


def test_resolve_prints_one_experiment_with_absolute_paths(tmp_path: Path, monkeypatch, capsys) -> None:
    raw = _study()
    raw["defaults"]["data"] = {"data_dir": "data/digits_copy"}
    path = _write(tmp_path, raw)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["resolve", str(path), "avg", "-p", "certify.n=300"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["experiment"] == "avg" and resolved["certify"]["n"] == 300
    assert resolved["data"]["data_dir"] == str(tmp_path / "data" / "digits_copy")
    assert resolved["train"]["heat_base"] == "base"  # a sibling's name, found by the runner
    assert cli.main(["resolve", str(path)]) == 2
    assert "name one experiment of the study (base, avg, n_Uniform_0.25" in capsys.readouterr().err


def test_overrides_may_not_replace_a_sweep(tmp_path: Path) -> None:
    path = _write(tmp_path, _study())
    for key in ("noise.sigma", "noise"):
        with pytest.raises(ParamsError, match=f"override '{key}' would replace the sweep over 'noise."):
            study.load(path, **{key: 0.5 if key == "noise.sigma" else {"name": "Gaussian"}})


def test_a_failed_attack_does_not_block_the_models_trained_from_it(tmp_path: Path, capsys) -> None:
    notebooks = _notebooks(tmp_path / "nb")
    raw = _study()
    raw["experiments"][0]["attack"] = {"skip": 13}  # base trains and certifies, its attack fails
    raw["sweeps"] = []
    raw["report"] = {"groups": [{"name": "all", "experiments": ["base", "avg"]}]}
    root = tmp_path / "outputs"
    assert _cli("run", str(_write(tmp_path, raw)), root=root, notebooks=notebooks) == 1
    assert "base: attack: FAILED" in capsys.readouterr().out
    assert _ran(root / "toy", "avg") == ["certify", "train"]


def test_stage_entry_points_point_studies_to_resolve(tmp_path: Path, capsys) -> None:
    from rslib import cli

    assert cli.main(["stage", "train", str(_write(tmp_path, _study()))]) == cli.EXIT_INVALID
    assert "is a study; write one experiment's parameters with `rslib resolve" in capsys.readouterr().err
