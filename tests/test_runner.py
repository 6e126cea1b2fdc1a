"""The papermill runner and the CLI, on tiny notebooks registered as temporary stages.

Kernel start-up dominates: the whole module executes a notebook five times.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from rslib import cli
from rslib.pipeline import params
from rslib.pipeline import runner as run_mod
from rslib.pipeline.runner import kernel_for_current_python
from rslib.pipeline.runner import run_file as run
from rslib.pipeline.stage import STAGES, Stage
from rslib.util.files import atomic_write_json, atomic_writer

TOY_CELL = """\
import json, os, pathlib, sys
import yaml
seed = yaml.safe_load(pathlib.Path(params_file).read_text())["seed"]
out = pathlib.Path(output_dir) / "results" / "out.json"
out.write_text(json.dumps({"seed": seed, "python": sys.executable, "cwd": os.getcwd()}))
"""


def _notebook(path: Path, *cells: str) -> None:
    nb = nbformat.v4.new_notebook()
    first = nbformat.v4.new_code_cell('params_file = ""\noutput_dir = ""')
    first.metadata["tags"] = ["parameters"]
    nb.cells = [first, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nbformat.write(nb, path)


@pytest.fixture
def setup(tmp_path: Path, request) -> dict[str, Path]:
    """Notebooks 'toy' (writes results/out.json) and 'boom' (raises), registered as stages."""
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    _notebook(nb_dir / "toy.ipynb", TOY_CELL)
    _notebook(nb_dir / "boom.ipynb", "raise ValueError('boom from the notebook')")
    for name in ("toy", "boom"):
        STAGES.register(name, Stage(name, notebook=name))
        request.addfinalizer(lambda name=name: STAGES.unregister(name))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"experiment": "toyexp", "seed": 1, "stages": ["toy"]}))
    bad = tmp_path / "fails.yaml"
    bad.write_text(yaml.safe_dump({"experiment": "failexp", "stages": ["boom", "toy"]}))
    return {"nb_dir": nb_dir, "out": tmp_path / "outputs", "good": good, "bad": bad}


def _cli(command: str, yaml_path: Path, s: dict[str, Path], *extra: str) -> int:
    return cli.main([command, str(yaml_path), "--output-root", str(s["out"]),
                     "--notebooks-dir", str(s["nb_dir"]), *extra])


def test_run_skip_force_and_rerun(
    setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup
    exp_dir = s["out"] / "toyexp"
    marker = exp_dir / "notebooks" / "toy.done.json"
    result = exp_dir / "results" / "out.json"

    # 1. First run, through the CLI: executes and records everything.
    assert _cli("run", s["good"], s) == 0
    assert "toy: ran" in capsys.readouterr().out
    done = json.loads(marker.read_text())
    assert done["digest"] == params.load(s["good"]).stage_digest("toy")
    assert done["stage"] == "toy" and done["provenance"]["rslib_version"]
    executed = nbformat.read(exp_dir / "notebooks" / "toy.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    out = json.loads(result.read_text())
    assert out == {"seed": 1, "python": sys.executable, "cwd": str(exp_dir.resolve())}
    assert yaml.safe_load((exp_dir / "params.yaml").read_text()) == params.load(s["good"]).to_dict()
    assert json.loads((exp_dir / "provenance.json").read_text())["python_version"]
    assert (exp_dir / "figures").is_dir()
    assert sorted(p.name for p in (exp_dir / "notebooks").iterdir()) == ["toy.done.json", "toy.ipynb"]

    # 2. Second run: skipped, nothing rewritten.
    stamp = marker.stat().st_mtime_ns
    logs: list[str] = []
    report = run(s["good"], output_root=s["out"], notebooks_dir=s["nb_dir"], log=logs.append)
    assert report.ok and [r.status for r in report.stages] == ["skipped"]
    assert marker.stat().st_mtime_ns == stamp
    assert any("toy: skipped (finished" in line for line in logs)
    assert _cli("validate", s["good"], s) == 0
    assert "toy: skip (finished" in capsys.readouterr().out

    # 3. force=True re-runs.
    report = run(s["good"], force=True, output_root=s["out"], notebooks_dir=s["nb_dir"], log=logs.append)
    assert [r.status for r in report.stages] == ["ran"]
    assert marker.stat().st_mtime_ns != stamp

    # 4. A changed parameter re-runs; also exercise the fallback kernelspec for sys.executable.
    monkeypatch.setattr(run_mod, "_launches_this_python", lambda argv: False)
    jupyter_path = os.environ.get("JUPYTER_PATH")
    logs.clear()
    report = run(s["good"], overrides={"seed": 2}, output_root=s["out"], notebooks_dir=s["nb_dir"],
                 log=logs.append)
    assert [r.status for r in report.stages] == ["ran"]
    assert any("parameters changed" in line for line in logs)
    assert json.loads(result.read_text())["seed"] == 2
    assert json.loads(result.read_text())["python"] == sys.executable
    # papermill would have failed with NoSuchKernel had the written kernelspec not been found.
    assert len(list((exp_dir / ".jupyter" / "kernels").glob("rslib-*/kernel.json"))) == 1
    assert os.environ.get("JUPYTER_PATH") == jupyter_path


def test_failing_stage(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    s = setup
    nb = s["out"] / "failexp" / "notebooks"
    report = run(s["bad"], output_root=s["out"], notebooks_dir=s["nb_dir"], log=lambda _: None)
    assert not report.ok
    assert [(r.name, r.status) for r in report.stages] == [("boom", "failed"), ("toy", "not run")]
    assert report.stages[0].error == "ValueError: boom from the notebook"
    assert report.stages[0].notebook == nb / "boom.failed.ipynb"
    assert sorted(p.name for p in nb.iterdir()) == ["boom.failed.ipynb"]

    # No marker was written, so the CLI tries again, and exits with status 1.
    assert _cli("run", s["bad"], s) == 1
    assert "boom: failed" in capsys.readouterr().out
    assert not (nb / "boom.done.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-p", "seed=-1"], "seed must be an integer >= 0, got -1"),
        (["-p", "tutorial.sigmaa=1"], "unknown key 'tutorial.sigmaa'"),
        (["-p", "seed"], "must look like key=value"),
        (["--only", "nosuch"], "stage 'nosuch' is not among the stages"),
        (["--only", ","], "no stage names given"),
    ],
)
def test_invalid_params_exit_2_and_write_nothing(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    for command in ("run", "validate"):
        assert _cli(command, setup["good"], setup, *extra) == 2
        assert message in capsys.readouterr().err
    assert not setup["out"].exists()


def test_missing_notebooks(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    s = setup
    args = ["run", str(s["good"]), "--output-root", str(s["out"])]
    assert cli.main([*args, "--notebooks-dir", str(s["nb_dir"] / "absent")]) == 2
    assert "ship with the source checkout" in capsys.readouterr().err
    (s["nb_dir"] / "toy.ipynb").unlink()
    assert cli.main([*args, "--notebooks-dir", str(s["nb_dir"])]) == 2
    assert "toy.ipynb not found" in capsys.readouterr().err
    assert not s["out"].exists()


def test_validate_prints_plan(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("validate", setup["bad"], setup, "--only", "toy") == 0
    out = capsys.readouterr().out
    assert "toy: run (not run yet)" in out and "boom" not in out
    assert not setup["out"].exists()


def test_kernel_fallback_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_mod._launches_this_python(["python", "-m", "ipykernel_launcher"])
    assert run_mod._launches_this_python([sys.executable, "-m", "ipykernel_launcher"])
    assert not run_mod._launches_this_python(["/elsewhere/bin/python3", "-m", "ipykernel_launcher"])
    monkeypatch.setattr(run_mod, "_launches_this_python", lambda argv: False)
    name, jupyter_dir = kernel_for_current_python(tmp_path)
    assert name.startswith("rslib-") and jupyter_dir == tmp_path / ".jupyter"
    spec = json.loads((jupyter_dir / "kernels" / name / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    assert kernel_for_current_python(tmp_path) == (name, jupyter_dir)  # rewriting is fine


def test_atomic_writes(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "data.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_writer(target) as f:
        f.write("half a file")
        raise RuntimeError("crash while writing")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["data.json"]
