"""notebooks/*.py (jupytext percent) and notebooks/*.ipynb stay paired and in sync."""

from __future__ import annotations

import ast
from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PARAMETERS = {"params_file", "output_dir"}


def _parameters_problems(nb: jupytext.NotebookNode, label: str) -> list[str]:
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not code:
        return [f"{label}: has no code cell"]
    first = code[0]
    problems = []
    if "parameters" not in first.metadata.get("tags", []):
        problems.append(f"{label}: the first code cell is not tagged 'parameters'")
    try:
        tree = ast.parse(first.source)
    except SyntaxError as err:
        return [*problems, f"{label}: the parameters cell is not valid Python ({err})"]
    assigned = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    missing = sorted(PARAMETERS - assigned)
    if missing:
        problems.append(f"{label}: the parameters cell does not define {', '.join(missing)}")
    return problems


def pair_problems(directory: Path) -> list[str]:
    """Everything wrong with the .py/.ipynb pairs in ``directory`` (empty list when all is well)."""
    py = {p.stem for p in directory.glob("*.py")}
    ipynb = {p.stem for p in directory.glob("*.ipynb")}
    problems = [f"{s}.py has no {s}.ipynb (run make sync)" for s in sorted(py - ipynb)]
    problems += [f"{s}.ipynb has no {s}.py (run make sync)" for s in sorted(ipynb - py)]
    for stem in sorted(py & ipynb):
        pair = {ext: jupytext.read(directory / f"{stem}.{ext}") for ext in ("py", "ipynb")}
        cells = {ext: [(c.cell_type, c.source.strip()) for c in nb.cells] for ext, nb in pair.items()}
        if cells["py"] != cells["ipynb"]:
            index = next(
                (i for i, (a, b) in enumerate(zip(cells["py"], cells["ipynb"], strict=False)) if a != b),
                min(len(cells["py"]), len(cells["ipynb"])),
            )
            problems.append(f"{stem}: .py and .ipynb differ from cell {index} (run make sync)")
        for ext, nb in pair.items():
            problems += _parameters_problems(nb, f"{stem}.{ext}")
    return problems


def test_repository_notebooks_are_paired() -> None:
    assert pair_problems(NOTEBOOKS) == []


GOOD_PY = """\
# %% [markdown]
# # A tiny notebook

# %% tags=["parameters"]
params_file = ""
output_dir = ""

# %%
print(params_file, output_dir)
"""


@pytest.fixture
def pair(tmp_path: Path) -> Path:
    """An in-sync pair toy.py / toy.ipynb in tmp_path."""
    (tmp_path / "toy.py").write_text(GOOD_PY)
    jupytext.write(jupytext.read(tmp_path / "toy.py"), tmp_path / "toy.ipynb")
    return tmp_path


def test_checker_accepts_a_synced_pair(pair: Path) -> None:
    assert pair_problems(pair) == []


def test_checker_detects_edits_on_one_side(pair: Path) -> None:
    (pair / "toy.py").write_text(GOOD_PY.replace("print(params_file", "print(1, params_file"))
    assert pair_problems(pair) == ["toy: .py and .ipynb differ from cell 2 (run make sync)"]


@pytest.mark.parametrize("missing", ["py", "ipynb"])
def test_checker_detects_a_missing_partner(pair: Path, missing: str) -> None:
    (pair / f"toy.{missing}").unlink()
    present = "ipynb" if missing == "py" else "py"
    assert pair_problems(pair) == [f"toy.{present} has no toy.{missing} (run make sync)"]


def test_checker_detects_a_bad_parameters_cell(pair: Path) -> None:
    text = GOOD_PY.replace(' tags=["parameters"]', "").replace('output_dir = ""\n', "")
    (pair / "toy.py").write_text(text)
    jupytext.write(jupytext.read(pair / "toy.py"), pair / "toy.ipynb")
    problems = pair_problems(pair)
    for ext in ("py", "ipynb"):
        assert f"toy.{ext}: the first code cell is not tagged 'parameters'" in problems
        assert f"toy.{ext}: the parameters cell does not define output_dir" in problems
