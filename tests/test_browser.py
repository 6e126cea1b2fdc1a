"""The notebooks in a real JupyterLab, in headless Chromium (selenium), started with the README's `rslib lab`.

On a copy of notebooks/ and params/ with an empty outputs/ (its own git repository; the developer's
outputs/ is untouched), for each notebook in the order a person runs them (train, certify, attack,
cert_plots, adv_plots, then tutorial_noise_radii, noise_explorer, results_browser when present): open it;
it must not show modified once its kernel is idle; Run All Cells; every cell must get an execution count,
with no error output, no traceback or warning on stderr, and rendered ipywidgets in the explorer notebooks;
save it. Afterwards `git status` in the copy must show no change: the pairs stay clean.

Screenshots (one per notebook, `<name>-failed.png` on failure), Lab's log and timings.json (wall seconds
per notebook and in total) go to outputs/browser/. Environment: RSLIB_BROWSER_NOTEBOOKS=a,b (only these),
RSLIB_BROWSER_RUN=a,b|all|none (run these, only open the others; default all), RSLIB_BROWSER_TIMEOUT
(seconds per notebook's run, default 900). Without Chromium, chromedriver or a working Lab this FAILS and
says how to fix it (apt-get install chromium chromium-driver); it never skips.

The module also checks, quickly, what keeps the pairs clean: the pinned notebook metadata, header-less
.py files, notebooks the output filter leaves as they are, and rslib.lab's filter, settings and save hook.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jupytext
import lab_driver
import nbformat
import pytest
from lab_driver import ARTIFACTS, REPO, LabBrowser, LabServer, NotebookReport, SetupError

from rslib import lab

pytestmark = pytest.mark.slow

NOTEBOOKS = REPO / "notebooks"


def _names(variable: str, default: list[str]) -> list[str]:
    value = os.environ.get(variable, "").strip()
    if not value or value == "all":
        return default
    return [] if value == "none" else [v.strip() for v in value.split(",") if v.strip()]


ALL = lab_driver.notebook_order(NOTEBOOKS)
SELECTED = [n for n in ALL if n in _names("RSLIB_BROWSER_NOTEBOOKS", ALL)]
RUN = set(_names("RSLIB_BROWSER_RUN", ALL))
TIMEOUT = float(os.environ.get("RSLIB_BROWSER_TIMEOUT", "900"))


# -- what keeps the pairs clean (fast) -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_notebook_pins_what_lab_writes(name: str) -> None:
    """The stored metadata equal what Lab and jupytext write on open and save, so neither dirties it."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=nbformat.NO_CONVERT)
    expected = lab.notebook_metadata()
    stored = {key: nb.metadata.get(key) for key in expected}
    fix = ('re-pin: .venv/bin/jupytext --sync --update-metadata "$(.venv/bin/python -m rslib.lab '
           '--notebook-metadata)" notebooks/*.py')
    assert stored == expected, f"{name}.ipynb metadata differ from what JupyterLab writes; {fix}"
    assert (nb.nbformat, nb.nbformat_minor) == (4, 5), f"{name}.ipynb is not nbformat 4.5 (Lab saves 4.5); {fix}"
    assert all(cell.get("id") for cell in nb.cells), f"{name}.ipynb has cells without ids; {fix}"
    assert not (NOTEBOOKS / f"{name}.py").read_text().startswith("# ---"), (
        f"{name}.py has a YAML header (jupytext.toml keeps .py files header-less); {fix}")


@pytest.mark.parametrize("name", ALL)
def test_notebook_is_what_the_output_filter_commits(name: str) -> None:
    """The clean filter leaves the stored notebook unchanged (no outputs, counts or widget state)."""
    path = NOTEBOOKS / f"{name}.ipynb"
    command = [sys.executable, "-m", "nbstripout", "--keep-id", "--textconv", str(path)]
    stripped = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert stripped == path.read_text(), f"{name}.ipynb holds outputs or metadata the git filter strips"


def _repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    return tmp_path


def _config(repo: Path) -> dict[str, str]:
    out = subprocess.run(["git", "-C", str(repo), "config", "--local", "--list"], capture_output=True,
                         text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_install_output_filter_is_idempotent(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    said: list[str] = []
    assert lab.install_output_filter(repo, say=said.append)
    assert {k: v for k, v in _config(repo).items() if k in lab.output_filter_config()} == lab.output_filter_config()
    assert len(said) == 1 and "installed" in said[0]
    config = _config(repo)
    assert lab.install_output_filter(repo, say=said.append)
    assert _config(repo) == config and len(said) == 1  # second run: nothing written, nothing said


def test_install_output_filter_outside_git_or_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    if shutil.which("git"):
        monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
        assert not lab.install_output_filter(tmp_path, say=said.append)
        assert "not a git checkout" in said[-1]
    monkeypatch.setattr(lab.shutil, "which", lambda name: None)
    assert not lab.install_output_filter(tmp_path, say=said.append)
    assert "git not found" in said[-1]


def test_settings_overrides_are_merged(tmp_path: Path) -> None:
    path = tmp_path / "settings" / "overrides.json"
    assert lab.write_settings_overrides(path, say=print)
    assert json.loads(path.read_text()) == lab.LAB_SETTINGS
    plugin = "@jupyterlab/apputils-extension:notification"
    path.write_text(json.dumps({"other:plugin": {"a": 1}, plugin: {"doNotDisturbMode": True, "fetchNews": "true"}}))
    assert lab.write_settings_overrides(path, say=print)
    assert json.loads(path.read_text()) == {
        "other:plugin": {"a": 1}, plugin: {"doNotDisturbMode": True, **lab.LAB_SETTINGS[plugin]}}
    path.write_text("// not JSON\n")
    said: list[str] = []
    assert not lab.write_settings_overrides(path, say=said.append)
    assert path.read_text() == "// not JSON\n" and "left" in said[0]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_save_hook_refreshes_only_unchanged_notebooks(tmp_path: Path) -> None:
    """After outputs are added, git status is quiet once the hook ran; a real edit still shows."""
    repo = _repo(tmp_path)
    assert lab.install_output_filter(repo, say=lambda _: None)
    (repo / ".gitattributes").write_text("*.ipynb filter=nbstripout diff=ipynb\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    nb.cells[0].id = "a1"
    path = repo / "toy.ipynb"
    nbformat.write(nb, path)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "toy"], check=True)

    def status() -> str:
        return subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True).stdout

    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[0].execution_count = 1
    nbformat.write(nb, path)
    assert status() == " M toy.ipynb\n"  # git's size check: why the hook exists
    assert lab.refresh_git_index(os_path=str(path))
    assert status() == ""
    assert not lab.refresh_git_index(os_path=str(path))  # nothing to do any more
    nb.cells[0].source = "print(2)"
    nbformat.write(nb, path)
    assert not lab.refresh_git_index(os_path=str(path))
    assert status() == " M toy.ipynb\n"
    assert not lab.refresh_git_index(os_path=str(repo / "toy.py"))


def test_pairs_have_no_header_and_sync_without_one(tmp_path: Path) -> None:
    """make sync works on header-less .py files: jupytext.toml declares the pairing."""
    shutil.copy2(REPO / "jupytext.toml", tmp_path / "jupytext.toml")
    (tmp_path / "notebooks").mkdir()
    text = "# %% tags=[\"parameters\"]\nparams_file = \"\"\noutput_dir = \"\"\n\n# %%\nprint(1)\n"
    (tmp_path / "notebooks" / "toy.py").write_text(text)
    subprocess.run([Path(sys.executable).with_name("jupytext"), "--sync", "-q", str(tmp_path / "notebooks" / "toy.py")],
                   check=True)
    nb = jupytext.read(tmp_path / "notebooks" / "toy.ipynb")
    assert [c.source for c in nb.cells] == ['params_file = ""\noutput_dir = ""', "print(1)"]
    assert (tmp_path / "notebooks" / "toy.py").read_text() == text


# -- the browser session ---------------------------------------------------------------------------------------
class Session:
    def __init__(self, sandbox: Path, server: LabServer, browser: LabBrowser) -> None:
        self.sandbox, self.server, self.browser = sandbox, server, browser
        self.reports: list[NotebookReport] = []


@pytest.fixture(scope="module")
def lab_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    start = time.perf_counter()
    server: LabServer | None = None
    try:
        sandbox = lab_driver.make_sandbox(tmp_path_factory.mktemp("lab") / "repo")
        server = LabServer(sandbox, ARTIFACTS / "lab.log").start()
        browser = LabBrowser(server, ARTIFACTS)
        failure = None
    except SetupError as err:
        failure = str(err)
    if failure is not None:
        if server is not None:
            server.stop()
        pytest.fail(f"the browser test cannot start: {failure}", pytrace=False)
    session = Session(sandbox, server, browser)
    try:
        yield session
    finally:
        lab_driver.write_timings(session.reports, ARTIFACTS / "timings.json", time.perf_counter() - start)
        browser.quit()
        server.stop()


@pytest.mark.parametrize("name", SELECTED)
def test_notebook_in_lab(lab_session: Session, name: str) -> None:
    report = lab_driver.check_notebook(lab_session.browser, name, run=name in RUN, timeout=TIMEOUT)
    lab_session.reports.append(report)
    lab_session.browser.blank()
    lab_session.server.shutdown_kernels()
    assert not report.problems, "\n".join([*report.problems, f"screenshots: {', '.join(report.screenshots)}",
                                           f"Lab's log: {ARTIFACTS / 'lab.log'}"])


def test_git_status_clean_after_lab(lab_session: Session) -> None:
    """Opened, run and saved in Lab: `git status` in the copy shows no change to tracked files."""
    assert lab_session.reports, "no notebook was checked"
    out = subprocess.run(["git", "-C", str(lab_session.sandbox), "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True, check=True).stdout
    diff = subprocess.run(["git", "-C", str(lab_session.sandbox), "diff"], capture_output=True, text=True).stdout
    assert out == "", f"tracked files changed by the Lab session:\n{out}\n{diff[:3000]}"
