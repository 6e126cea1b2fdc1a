"""Drive JupyterLab in headless Chromium, the way a person does, for tests/test_browser.py.

- :func:`make_sandbox`: a copy of the repository's ``notebooks/``, ``params/`` and notebook settings in a
  fresh git repository with an empty ``outputs/`` (the developer's ``outputs/`` is never touched);
- :class:`LabServer`: JupyterLab started with the README's command, ``rslib lab`` (what ``make lab`` runs),
  serving that copy (``RSLIB_LAB_ROOT``), with its own workspace and user-settings folders;
- :class:`LabBrowser`: Chromium under selenium that opens a notebook by its ``/lab/tree`` URL, runs its
  cells and saves it through Lab's command palette (menus as a fallback), and reads only the page's DOM:
  the tab's ``jp-mod-dirty`` class, the kernel indicator, cell prompts and rendered outputs.

Chromium, chromedriver, git or Lab missing or failing raise :class:`SetupError`, whose message says why and
how to fix it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
#: Screenshots, Lab's log and timings.json (git-ignored, as all of outputs/ is).
ARTIFACTS = REPO / "outputs" / "browser"
CHROMIUM = Path(os.environ.get("RSLIB_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("RSLIB_CHROMEDRIVER", "/usr/bin/chromedriver"))
INSTALL_HINT = "install Debian's browser and its driver: apt-get install chromium chromium-driver (as root)"
#: Headless, and nothing that reaches the network on its own (without these Chromium stalls on this machine).
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1600,1100")
#: The order a person runs them in: train writes outputs/demo_experiment, certify and attack read it, the plot
#: notebooks show it; then the stand-alone ones.
ORDER = ("train", "certify", "attack", "cert_plots", "adv_plots", "tutorial_noise_radii", "noise_explorer",
         "results_browser")
#: Notebooks built from ipywidgets: their widgets must render.
WIDGET_NOTEBOOKS = frozenset({"noise_explorer", "results_browser"})
#: What the sandbox copies from the repository.
COPIED = ("notebooks", "params", "jupytext.toml", ".gitattributes", ".gitignore")

T = TypeVar("T")


class SetupError(RuntimeError):
    """Chromium, chromedriver, git or JupyterLab could not start; the message says why and how to fix it."""


def notebook_order(folder: Path = REPO / "notebooks") -> list[str]:
    """The notebooks of ``folder`` to check, in :data:`ORDER`, then any others by name."""
    present = {p.stem for p in folder.glob("*.ipynb")}
    return [n for n in ORDER if n in present] + sorted(present - set(ORDER))


def _until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll ``check`` until it returns something truthy; TimeoutError naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          timeout=120).stdout


def make_sandbox(dest: Path, repo: Path = REPO) -> Path:
    """Copy the repository's notebooks, params and notebook settings to ``dest`` (empty ``outputs/``), make it a
    git repository with the output filter of ``rslib lab`` installed, and commit everything."""
    from rslib.lab import install_output_filter

    if shutil.which("git") is None:
        raise SetupError("git is not installed (the browser test checks `git status` after a Lab session): "
                         "apt-get install git")
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = repo / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        elif source.exists():
            shutil.copy2(source, dest / name)
    (dest / "outputs").mkdir(exist_ok=True)
    _git(dest, "init", "-q")
    _git(dest, "config", "user.name", "rslib browser test")
    _git(dest, "config", "user.email", "browser-test@rslib.invalid")
    messages: list[str] = []
    if not install_output_filter(dest, say=messages.append):
        raise SetupError(f"could not install the nbstripout filter in the sandbox: {' '.join(messages)}")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "sandbox")
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """``rslib lab`` serving ``root`` on a free port with a fresh token; its output goes to ``log``."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._state = Path(tempfile.mkdtemp(prefix="rslib-lab-state-"))

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout: float = 120) -> LabServer:
        exe = Path(sys.executable).with_name("rslib")
        command = [str(exe)] if exe.exists() else [sys.executable, "-m", "rslib"]
        env = {**os.environ, "JUPYTER_PORT": str(self.port), "JUPYTER_TOKEN": self.token,
               "RSLIB_LAB_ROOT": str(self.root), "PYTHONUNBUFFERED": "1",
               "JUPYTERLAB_WORKSPACES_DIR": str(self._state / "workspaces"),
               "JUPYTERLAB_SETTINGS_DIR": str(self._state / "user-settings")}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.log.open("wb") as log:
                # its own process group, so stop() can end Lab and its kernels even if `rslib lab` dies first
                self.proc = subprocess.Popen([*command, "lab"], env=env, cwd=REPO, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:
            raise SetupError(f"cannot run {' '.join(command)} lab ({err}): make setup") from None

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise SetupError(f"`rslib lab` exited with status {self.proc.returncode} before JupyterLab "
                                 f"answered (is jupyterlab installed? `make setup`); its output ({self.log}):\n"
                                 f"{self.tail()}")
            try:
                self.api("GET", "status")
                return True
            except (OSError, urllib.error.URLError):
                return False

        try:
            _until(up, timeout, "JupyterLab", interval=0.5)
        except TimeoutError as err:
            self.stop()
            raise SetupError(f"`rslib lab` did not answer on port {self.port}: {err}; its output ({self.log}):\n"
                             f"{self.tail()}") from None
        return self

    def api(self, method: str, path: str) -> Any:
        request = urllib.request.Request(f"{self.base}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def url(self, path: str) -> str:
        return f"{self.base}/lab/tree/{path}?reset&token={self.token}"

    def shutdown_kernels(self) -> None:
        """End every session (and its kernel) the browser left behind."""
        for session in self.api("GET", "sessions") or []:
            self.api("DELETE", f"sessions/{session['id']}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.shutdown_kernels()
        except (OSError, urllib.error.URLError):
            pass
        if self.proc.poll() is None:
            self.proc.terminate()  # rslib lab passes SIGTERM on to Jupyter, which stops cleanly
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group this object started
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None
        shutil.rmtree(self._state, ignore_errors=True)


#: Run in the page: the state of the visible notebook, read from the DOM only.
_STATE_JS = r"""
const panel = [...document.querySelectorAll('.jp-NotebookPanel')].find(p => !p.classList.contains('lm-mod-hidden'));
const dialog = document.querySelector('.jp-Dialog');
const dialogText = dialog ? dialog.innerText.replace(/\s+/g, ' ').slice(0, 500) : null;
if (!panel) return {panel: false, dialog: dialogText};
const tab = document.querySelector('.lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current')
  || document.querySelector('.lm-DockPanel-tabBar .lm-TabBar-tab');
const indicator = panel.querySelector('.jp-Notebook-ExecutionIndicator');
const cells = [...panel.querySelectorAll('.jp-Notebook .jp-Cell')];
const code = cells.filter(c => c.classList.contains('jp-CodeCell')).map(c => {
  const prompt = c.querySelector('.jp-InputArea-prompt');
  const source = c.querySelector('.cm-content');
  return {prompt: prompt ? prompt.textContent.replace(/\s+/g, '') : '',
          empty: source ? source.textContent.trim() === '' : false};
});
const where = el => { const cell = el.closest('.jp-Cell'); return cells.indexOf(cell); };
const outputs = [...panel.querySelectorAll('.jp-OutputArea-output')].map(o => ({
  cell: where(o),
  mime: o.getAttribute('data-mime-type') || (o.querySelector('[data-mime-type]') || o).getAttribute('data-mime-type') || '',
  text: o.textContent.slice(0, 2000)}));
const widgets = panel.querySelectorAll('.jp-OutputArea-output .jupyter-widgets, .jp-OutputArea-output [class*="widget-"]').length;
const toasts = [...document.querySelectorAll('.Toastify__toast')].map(t => t.textContent);
return {panel: true, dialog: dialogText, toasts: toasts, dirty: !!(tab && tab.classList.contains('jp-mod-dirty')),
        tab: tab ? tab.textContent : null, status: indicator ? indicator.getAttribute('data-status') : null,
        cells: cells.length, code: code, outputs: outputs, widgets: widgets};
"""

_ERROR_MIME = "application/vnd.jupyter.error"
_STDERR_MIME = "application/vnd.jupyter.stderr"


@dataclass
class NotebookReport:
    """What happened to one notebook; ``problems`` empty when all went well."""

    name: str
    ran: bool
    seconds: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    screenshots: list[str] = field(default_factory=list)
    cells: int = 0
    widgets: int = 0
    commands: list[str] = field(default_factory=list)


def _is_error(output: dict[str, Any]) -> bool:
    """An exception's output (Lab renders tracebacks with the stderr mime type; other front ends use the error
    one): Run All stops at it."""
    return output["mime"] == _ERROR_MIME or (output["mime"] == _STDERR_MIME and "Traceback" in output["text"])


def output_problems(state: dict[str, Any]) -> list[str]:
    """Errors (error outputs, tracebacks on stderr) and warnings (stderr saying "Warning") in ``state``."""
    problems = []
    for out in state.get("outputs", []):
        text, mime = out["text"].strip(), out["mime"]
        short = re.sub(r"\s+", " ", text)[:400]
        if _is_error(out):
            problems.append(f"cell {out['cell']}: error output: {short}")
        elif mime == _STDERR_MIME and ("Error" in text or "Traceback" in text):
            problems.append(f"cell {out['cell']}: error on stderr: {short}")
        elif mime == _STDERR_MIME and "Warning" in text:
            problems.append(f"cell {out['cell']}: warning on stderr: {short}")
        elif "Error displaying widget" in text:
            problems.append(f"cell {out['cell']}: widget not displayed: {short}")
    return problems


class LabBrowser:
    """Headless Chromium (selenium) on a :class:`LabServer`; screenshots go to ``shots``."""

    def __init__(self, server: LabServer, shots: Path) -> None:
        self.server, self.shots = server, shots
        self.used: list[str] = []  # commands run and how (palette or menu), for the report
        for path, what in ((CHROMIUM, "Chromium"), (CHROMEDRIVER, "chromedriver")):
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise SetupError(f"{what} not found at {path}: {INSTALL_HINT}")
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError as err:
            raise SetupError(f"selenium is not installed ({err}): make setup (it is in the dev extra)") from None
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROME_FLAGS:
            options.add_argument(flag)
        self._profile = Path(tempfile.mkdtemp(prefix="rslib-chromium-"))
        options.add_argument(f"--user-data-dir={self._profile}")
        options.unhandled_prompt_behavior = "accept"  # "leave the page?" when moving to the next notebook
        shots.mkdir(parents=True, exist_ok=True)
        try:
            self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(shots / "chromedriver.log")),
                                           options=options)
        except Exception as err:  # selenium raises many kinds; all mean the same here
            shutil.rmtree(self._profile, ignore_errors=True)
            raise SetupError(f"chromedriver could not start Chromium ({type(err).__name__}: "
                             f"{str(err).strip()[:600]}); check `{CHROMIUM} --version` and "
                             f"`{CHROMEDRIVER} --version` match, or reinstall: {INSTALL_HINT}") from None
        self.driver.set_page_load_timeout(120)

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self._profile, ignore_errors=True)

    # -- page state -----------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return self.driver.execute_script(_STATE_JS)

    def screenshot(self, name: str) -> str:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return str(path)

    def _no_dialog(self, state: dict[str, Any]) -> dict[str, Any]:
        if state.get("dialog"):
            raise RuntimeError(f"Lab shows a dialog: {state['dialog']}")
        return state

    # -- actions --------------------------------------------------------------------------------------------
    def open(self, path: str, timeout: float = 120) -> dict[str, Any]:
        """Open ``path`` (relative to Lab's root); return the state once its kernel is idle and Lab has had
        time to write the kernel's metadata into the notebook (the moment a notebook turns dirty on open)."""
        self.driver.get(self.server.url(path))

        def ready() -> dict[str, Any] | None:
            state = self._no_dialog(self.state())
            return state if state.get("panel") and state["cells"] and state["status"] == "idle" else None

        _until(ready, timeout, f"{path} to open with an idle kernel")
        time.sleep(2.0)  # kernelspec and language_info land right after the kernel's first idle
        return self._no_dialog(self.state())

    def blank(self) -> None:
        self.driver.get("about:blank")

    def _focus_notebook(self) -> None:
        from selenium.webdriver.common.by import By

        prompts = self.driver.find_elements(
            By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell .jp-InputPrompt")
        if prompts:
            self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", prompts[0])
            prompts[0].click()  # makes the notebook Lab's current widget: its commands become enabled

    def command(self, command: str, query: str) -> str:
        """Run a Lab command from the command palette (Ctrl+Shift+C, type ``query``, pick the item whose
        ``data-command`` is ``command``); the main menu when the palette does not offer it. Returns how."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        self._focus_notebook()
        (ActionChains(self.driver).key_down(Keys.CONTROL).key_down(Keys.SHIFT).send_keys("c")
         .key_up(Keys.SHIFT).key_up(Keys.CONTROL).perform())
        try:
            box = _until(lambda: [e for e in self.driver.find_elements(By.CSS_SELECTOR, ".lm-CommandPalette-input")
                                  if e.is_displayed()], 10, "the command palette")[0]
            box.clear()
            box.send_keys(query)
            selector = f'.lm-CommandPalette-item[data-command="{command}"]:not(.lm-mod-disabled)'
            item = _until(lambda: [e for e in self.driver.find_elements(By.CSS_SELECTOR, selector)
                                   if e.is_displayed()], 10, f"'{query}' ({command}) in the palette")[0]
            item.click()
            return "palette"
        except TimeoutError:
            ActionChains(self.driver).send_keys(Keys.ESCAPE).perform()
        return self._menu(command)

    def _menu(self, command: str) -> str:
        from selenium.webdriver.common.by import By

        menus = {"notebook:run-all-cells": ("Run", "runmenu:run-all"), "docmanager:save": ("File", "docmanager:save")}
        if command not in menus:
            raise RuntimeError(f"{command}: not in the command palette and no menu fallback")
        title, menu_command = menus[command]
        self._focus_notebook()
        heading = next(e for e in self.driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item")
                       if e.text.strip() == title)
        heading.click()
        selector = f'.lm-Menu-item[data-command="{menu_command}"]:not(.lm-mod-disabled)'
        _until(lambda: self.driver.find_elements(By.CSS_SELECTOR, selector), 10, f"{title} > {menu_command}")[0].click()
        return "menu"

    def run_all(self, timeout: float) -> dict[str, Any]:
        """Run All Cells; return the state once the kernel is idle and every non-empty code cell has an
        execution count, or as soon as an error output shows (Lab stops there)."""
        self.used.append(f"notebook:run-all-cells via {self.command('notebook:run-all-cells', 'Run All Cells')}")

        def finished() -> dict[str, Any] | None:
            state = self._no_dialog(self.state())
            if state.get("status") == "dead":
                raise RuntimeError("the kernel died")
            if state.get("status") != "idle" or any(c["prompt"] == "[*]:" for c in state["code"]):
                return None  # running, or cells still queued
            counted = all(re.fullmatch(r"\[\d+\]:", c["prompt"]) for c in state["code"] if not c["empty"])
            return state if counted or any(_is_error(o) for o in state["outputs"]) else None

        time.sleep(1.0)  # the first cell is queued before the indicator leaves 'idle'
        return _until(finished, timeout, "Run All Cells to finish", interval=0.5)

    def wait_for_widgets(self, timeout: float = 30) -> int:
        try:
            return _until(lambda: self.state().get("widgets", 0), timeout, "ipywidgets to render")
        except TimeoutError:
            return 0

    def save(self, timeout: float = 60) -> None:
        self.used.append(f"docmanager:save via {self.command('docmanager:save', 'Save Notebook')}")
        _until(lambda: not self._no_dialog(self.state()).get("dirty"), timeout, "the notebook to be saved")

    def show_end(self) -> None:
        """Scroll the notebook's last cell into view (the screenshot then shows the final outputs)."""
        self.driver.execute_script(
            "const cells = document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell');"
            " if (cells.length) cells[cells.length - 1].scrollIntoView({block: 'end'});")
        time.sleep(0.5)

    def show_first_widget(self) -> bool:
        """Scroll the first rendered ipywidget into view; False when there is none."""
        found = self.driver.execute_script(
            "const w = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output "
            ".jupyter-widgets'); if (w) w.scrollIntoView({block: 'start'}); return !!w;")
        time.sleep(0.5)
        return bool(found)

    def show_first_problem(self) -> None:
        """Scroll the first error or stderr output into view (for the failure screenshot)."""
        self.driver.execute_script(
            "const o = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) "
            f"[data-mime-type=\"{_ERROR_MIME}\"], .jp-NotebookPanel:not(.lm-mod-hidden) "
            f"[data-mime-type=\"{_STDERR_MIME}\"]'); if (o) o.scrollIntoView({{block: 'center'}});")


def check_notebook(browser: LabBrowser, name: str, run: bool, timeout: float) -> NotebookReport:
    """Open ``notebooks/<name>.ipynb`` (it must not turn dirty), and with ``run`` run all its cells (no error,
    no warning, widgets rendered for :data:`WIDGET_NOTEBOOKS`) and save it. Screenshots: ``<name>.png``, and
    ``<name>-failed.png`` when something went wrong."""
    report = NotebookReport(name, run)
    browser.used = report.commands
    start = time.perf_counter()
    try:
        state = browser.open(f"notebooks/{name}.ipynb")
        report.seconds["open"] = round(time.perf_counter() - start, 2)
        report.cells = state["cells"]
        if state["dirty"]:
            report.problems.append(f"{name}.ipynb shows modified (jp-mod-dirty) right after opening, before "
                                   "anything ran: its stored metadata differ from what Lab sets when the "
                                   "kernel connects (see jupytext.toml for the command that re-pins it)")
        report.problems += [f"{name}: Lab shows a notification: {t[:200]}" for t in state["toasts"] if "news" in t]
        if run:
            t = time.perf_counter()
            state = browser.run_all(timeout)
            report.seconds["run"] = round(time.perf_counter() - t, 2)
            if name in WIDGET_NOTEBOOKS:
                report.widgets = browser.wait_for_widgets()
                state = browser.state()
                if not report.widgets:
                    report.problems.append(f"{name}: no ipywidgets rendered (.jupyter-widgets / .widget-* absent "
                                           "from the outputs): is the jupyterlab-widgets extension installed?")
            else:
                report.widgets = state["widgets"]
            report.problems += output_problems(state)
            pending = [i for i, c in enumerate(state["code"]) if not c["empty"]
                       and not re.fullmatch(r"\[\d+\]:", c["prompt"])]
            if pending and not any(_is_error(o) for o in state["outputs"]):
                report.problems.append(f"{name}: code cells without an execution count: {pending}")
            t = time.perf_counter()
            browser.save()
            report.seconds["save"] = round(time.perf_counter() - t, 2)
    except (TimeoutError, RuntimeError) as err:
        report.problems.append(f"{name}: {err}")
    except Exception as err:  # selenium errors: report them with the screenshot rather than abort the session
        report.problems.append(f"{name}: {type(err).__name__}: {str(err).strip()[:500]}")
    report.seconds["total"] = round(time.perf_counter() - start, 2)
    try:
        if run and name in WIDGET_NOTEBOOKS and browser.show_first_widget():
            report.screenshots.append(browser.screenshot(f"{name}-widgets"))
        if run:
            browser.show_end()
        report.screenshots.append(browser.screenshot(name))
        if report.problems:
            browser.show_first_problem()
            report.screenshots.append(browser.screenshot(f"{name}-failed"))
    except Exception as err:
        report.problems.append(f"{name}: no screenshot ({type(err).__name__}: {err})")
    return report


def write_timings(reports: list[NotebookReport], path: Path, total: float) -> None:
    """``timings.json``: wall seconds per notebook (open, run, save, total) and for the whole session."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "notebooks": {r.name: {**r.seconds, "ran": r.ran, "ok": not r.problems, "cells": r.cells,
                               "widgets": r.widgets, "commands": r.commands, "problems": r.problems}
                      for r in reports},
        "total_seconds": round(total, 2),
        "chromium": str(CHROMIUM), "python": sys.version.split()[0]}, indent=2) + "\n")
