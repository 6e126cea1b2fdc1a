"""One experiment, one writer: concurrent `rslib run`s, a killed holder, two shards at once, `rslib status`.

Real processes race here (the lock is between processes). Stage notebooks are toys that append one
line per execution to ``runs.log`` (so work done twice shows) and sleep a little, so that the runs
overlap; kernel start-up makes each stage take a few seconds anyway.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from helpers import toy_stage_notebooks

from rslib import cli
from rslib.pipeline import locks
from rslib.pipeline.locks import LOCK_NAME
from rslib.pipeline.status import experiment_status

TOY = """\
import os, pathlib, time
line = f"{NAME} {os.getppid()}\\n"
with open(pathlib.Path(output_dir) / "runs.log", "a") as f:
    f.write(line)
time.sleep(SLEEP)
(pathlib.Path(output_dir) / "results" / f"{NAME}.json").write_text("{}")
"""


def _notebooks(folder: Path, sleep: float = 1.5) -> Path:
    toy_stage_notebooks(folder, lambda name: f"NAME = {name!r}\nSLEEP = {sleep}\n" + TOY)
    return folder


def _rslib(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rslib", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _runs(folder: Path) -> list[str]:
    path = folder / "runs.log"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture()
def experiment(tmp_path: Path) -> dict[str, Path]:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"experiment": "race", "stages": ["train", "certify"], "device": "cpu",
                                    "train": {"epochs": 1}}))
    return {"params": path, "out": tmp_path / "outputs", "nb": _notebooks(tmp_path / "nb")}


def test_a_second_run_refuses_naming_the_holder_and_nothing_is_done_twice(experiment) -> None:
    e = experiment
    args = ("run", e["params"], "--output-root", e["out"], "--notebooks-dir", e["nb"])
    first = _rslib(*args)
    _wait_for(e["out"] / "race" / LOCK_NAME)
    second = _rslib(*args)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    assert f"pid {first.pid}" in err and "--wait" in err and "rslib status" in err
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    folder = e["out"] / "race"
    assert _runs(folder) == ["train", "certify"]
    notebooks = sorted(p.name for p in (folder / "notebooks").iterdir())
    assert notebooks == ["certify.done.json", "certify.ipynb", "train.done.json", "train.ipynb"]
    assert not (folder / LOCK_NAME).exists()


def test_a_waiting_run_skips_what_the_holder_finished(experiment) -> None:
    e = experiment
    args = ("run", e["params"], "--output-root", e["out"], "--notebooks-dir", e["nb"])
    first = _rslib(*args)
    _wait_for(e["out"] / "race" / LOCK_NAME)
    second = _rslib(*args, "--wait")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert f"pid {first.pid}" in out + err  # the progress line names the holder
    assert "train: skipped" in out and "certify: skipped" in out
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert _runs(e["out"] / "race") == ["train", "certify"]


def test_two_shards_of_a_study_at_the_same_instant_run_everything_once(tmp_path: Path) -> None:
    raw = {"study": "pair", "defaults": {"seed": 0, "device": "cpu", "train": {"epochs": 1}},
           "experiments": [{"name": name, "stages": ["train", "certify"]} for name in ("a", "b", "c")],
           "report": {"groups": [{"name": "all", "experiments": ["a", "b", "c"], "radii": {"l2": [0, 0.5]}}]}}
    path = tmp_path / "pair.yaml"
    path.write_text(yaml.safe_dump(raw))
    nb, out = _notebooks(tmp_path / "nb", sleep=0.5), tmp_path / "outputs"
    runs = [_rslib("run", path, "--output-root", out, "--notebooks-dir", nb, "--wait") for _ in range(2)]
    results = [run.communicate(timeout=600) for run in runs]
    assert all(run.returncode == 0 for run in runs), results
    for name in ("a", "b", "c"):
        assert _runs(out / "pair" / name) == ["train", "certify"], name
    assert sorted(_runs(out / "pair")) == ["cert_plots"]  # drawn once


def test_a_killed_holder_is_taken_over_and_certification_resumes_from_its_rows(tmp_path: Path) -> None:
    raw = {"experiment": "killed", "seed": 0, "device": "cpu", "stages": ["train", "certify"],
           "data": {"dataset": "digits", "batch_size": 64}, "model": {"arch": "small_cnn"},
           "noise": {"name": "Gaussian", "sigma": 0.25}, "train": {"mode": "noise", "epochs": 2},
           "certify": {"n0": 50, "n": 4000, "skip": 30, "images_per_batch": 2, "batch_size": 1000}}
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(raw))
    folder, reference = tmp_path / "run", tmp_path / "reference"
    for target in (folder, reference):
        assert cli.main(["stage", "train", str(path), "--output-dir", str(target), "--no-progress"]) == 0
    assert cli.main(["stage", "certify", str(path), "--output-dir", str(reference), "--no-progress"]) == 0
    holder = _rslib("stage", "certify", path, "--output-dir", folder, "--no-progress")
    partial = folder / "results" / ".certify.rank0.partial.csv"
    deadline = time.monotonic() + 120
    while not (partial.exists() and len(partial.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and holder.poll() is None, holder.communicate()
        time.sleep(0.05)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (folder / LOCK_NAME).exists()
    assert not locks.read_holder(folder).alive
    (killed,) = experiment_status("killed", folder, ["certify"])
    assert killed.state == "interrupted" and "row(s) on disk" in killed.detail and "its run is gone" in killed.detail
    resumed = _rslib("stage", "certify", path, "--output-dir", folder, "--no-progress")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"pid {holder.pid}" in err and "no longer exists" in err  # the takeover message
    assert "certify: resuming from 1 partial file" in out
    timing = ["seconds_predict", "seconds_certify"]
    ours = pd.read_csv(folder / "results" / "certify.csv").drop(columns=timing)
    pd.testing.assert_frame_equal(ours, pd.read_csv(reference / "results" / "certify.csv").drop(columns=timing))
    assert not list((folder / "results").glob(".certify*partial*")) and not (folder / LOCK_NAME).exists()


def test_status_reports_running_finished_failed_and_not_started(experiment, capsys) -> None:
    e = experiment
    args = ["--output-root", str(e["out"])]
    assert cli.main(["status", str(e["params"]), *args]) == 0
    assert "train: not started" in capsys.readouterr().out
    holder = _rslib("run", e["params"], "--output-root", e["out"], "--notebooks-dir", e["nb"])
    _wait_for(e["out"] / "race" / "runs.log")
    assert cli.main(["status", str(e["params"]), *args]) == 0
    assert f"train: running (by pid {holder.pid}" in capsys.readouterr().out
    holder.communicate(timeout=300)
    assert cli.main(["status", *args]) == 0  # every folder found under the root
    shown = capsys.readouterr().out
    assert "experiment 'race'" in shown and "train: finished" in shown and "certify: finished" in shown
    (e["nb"] / "certify.ipynb").write_text(nbformat.writes(_failing()))
    assert cli.main(["run", str(e["params"]), *args, "--notebooks-dir", str(e["nb"]), "--force",
                     "--only", "certify"]) == 1
    capsys.readouterr()
    assert cli.main(["status", str(e["params"]), *args]) == 0
    assert "certify: failed (RuntimeError: planned failure" in capsys.readouterr().out
    assert not (e["out"] / "race" / "notebooks" / "certify.done.json").exists()


def _failing() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    first = nbformat.v4.new_code_cell('params_file = ""\noutput_dir = ""')
    first.metadata["tags"] = ["parameters"]
    nb.cells = [first, nbformat.v4.new_code_cell("raise RuntimeError('planned failure')")]
    return nb


def test_a_read_only_output_folder_is_a_clear_error_and_nothing_is_written(experiment, monkeypatch, capsys):
    e = experiment
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):  # root ignores permission bits: refuse the lock file instead
        if str(path).endswith(LOCK_NAME):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    assert cli.main(["run", str(e["params"]), "--output-root", str(e["out"]), "--notebooks-dir", str(e["nb"])]) == 2
    err = capsys.readouterr().err
    assert "must be writable" in err and "race" in err
    assert not any(p.is_file() for p in e["out"].rglob("*"))
