"""The stage notebooks chain by hand with their DEFAULT parameters, as a new user runs them in JupyterLab:
train, certify, attack, cert_plots and adv_plots executed in that order from ``notebooks/`` of a fresh copy
(empty ``outputs/``), with nothing injected; each reads what the previous one wrote in
``outputs/demo_experiment``; no error, no stderr and no warning text in any output; each executed notebook
is under 1 MB. Before train has run, certify says which notebook to run (no placeholder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import papermill
import pytest
from papermill.exceptions import PapermillExecutionError

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ("train", "certify", "attack", "cert_plots", "adv_plots")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clone")
    for folder in ("notebooks", "params"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("*.py", "figures"))
    return root


def _run(root: Path, name: str) -> dict:
    out = root / f"{name}.executed.ipynb"
    papermill.execute_notebook(str(root / "notebooks" / f"{name}.ipynb"), str(out), cwd=str(root / "notebooks"),
                               kernel_name="python3", progress_bar=False, log_output=False)
    assert out.stat().st_size < 1_000_000, f"{name}: executed notebook is {out.stat().st_size} bytes"
    return json.loads(out.read_text())


def _texts(nb: dict, stream: str) -> list[str]:
    return ["".join(o.get("text", "")) for cell in nb["cells"] for o in cell.get("outputs", [])
            if o.get("output_type") == "stream" and o.get("name") == stream]


def test_certify_before_train_names_the_notebook_to_run(fresh_clone):
    with pytest.raises(PapermillExecutionError) as failure:
        _run(fresh_clone, "certify")
    message = str(failure.value.evalue)
    assert "notebooks/train.ipynb" in message and "demo_experiment" in message and "<" not in message


def test_the_stage_notebooks_chain_with_their_defaults(fresh_clone):
    for name in CHAIN:
        nb = _run(fresh_clone, name)
        assert not _texts(nb, "stderr"), (name, _texts(nb, "stderr")[:2])
        assert not [t for t in _texts(nb, "stdout") if "Warning" in t], name
    results = fresh_clone / "outputs" / "demo_experiment" / "results"
    for table in ("train_metrics", "certify", "attack_ddn", "attack_pgd", "cert_curves_all", "adv_cdf_all"):
        assert (results / f"{table}.csv").is_file(), table
    assert (fresh_clone / "outputs" / "demo_experiment" / "figures" / "cert_accuracy_all.png").is_file()


def test_the_plot_notebooks_default_folder(fresh_clone, monkeypatch):
    from rslib.pipeline.study import load_experiment_folder
    from rslib.report import results

    monkeypatch.chdir(fresh_clone / "notebooks")
    single = (fresh_clone / "outputs" / "demo_experiment").resolve()
    if not (single / "results" / "certify.json").is_file():
        with pytest.raises(FileNotFoundError, match=r"Open and run notebooks/train.ipynb.*make demo"):
            results.results_folder("")
        return
    assert results.results_folder("") == single
    study = load_experiment_folder(single)
    assert [e.name for e in study.experiments] == ["demo_experiment"] and study.report_dir == single
    assert study.get("demo_experiment").experiment.attack.attacks == ["ddn", "pgd"]
