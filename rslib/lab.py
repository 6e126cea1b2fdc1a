"""``rslib lab`` (``make lab``): JupyterLab rooted at the repository, so notebooks, params and outputs are
all browsable; it honours ``JUPYTER_PORT`` and ``JUPYTER_TOKEN``, runs as root in containers, prints the
URL and opens the file browser in ``notebooks/``.

It also keeps the notebook pairs clean: ``jupytext.toml`` pairs ``notebooks/<name>.ipynb`` with a header-less
``<name>.py``; the ``.ipynb`` files hold the metadata JupyterLab writes when the kernel connects
(:func:`notebook_metadata`), so opening one does not mark it modified; :func:`install_output_filter` puts
the nbstripout git filter named in ``.gitattributes`` into the repository's git config, so outputs never
reach git; and :func:`write_settings_overrides` turns off JupyterLab's news and update pop-ups.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from rslib.util.provenance import CHECKOUT

DEFAULT_PORT = 8888
#: Serve this folder instead of the checkout (a copy of it, e.g. for the browser test).
ROOT_ENV = "RSLIB_LAB_ROOT"
#: The kernel the notebooks are pinned to (the environment's ipykernel).
KERNEL_NAME = "python3"
#: JupyterLab settings ``rslib lab`` sets as defaults (a user's own settings still win): no "news" question,
#: no request to jupyter.org for updates (offline machines, reproducible screenshots).
LAB_SETTINGS: dict[str, dict[str, Any]] = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}


def _say(message: str) -> None:
    print(f"rslib lab: {message}", flush=True)


def notebook_metadata(kernel: str = KERNEL_NAME, folder: Path = CHECKOUT / "notebooks") -> dict[str, Any]:
    """The notebook metadata a JupyterLab session writes into a paired notebook of ``folder``: ``kernelspec``
    (from ``kernel``'s spec) and ``language_info`` (ipykernel's kernel_info reply, naming this Python's
    version), which Lab sets when the kernel connects, and the ``jupytext`` options jupytext's contents manager
    copies from ``jupytext.toml`` into the notebook it serves. Stored in ``notebooks/*.ipynb``, they make
    opening and saving a notebook a no-op; otherwise Lab marks it modified as soon as its kernel is up."""
    from ipykernel.ipkernel import IPythonKernel
    from jupyter_client.kernelspec import KernelSpecManager
    from jupytext.config import load_jupytext_config

    spec = KernelSpecManager().get_kernel_spec(kernel)
    metadata: dict[str, Any] = {
        "kernelspec": {"display_name": spec.display_name, "language": spec.language, "name": kernel},
        "language_info": dict(IPythonKernel.language_info)}
    config = load_jupytext_config(str(folder))
    if config is not None:
        formats = config.default_formats(str(folder / "notebook.ipynb"))
        jupytext: dict[str, Any] = {"formats": formats} if formats else {}
        config.set_default_format_options(jupytext, read=True)
        metadata["jupytext"] = jupytext
    return metadata


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def output_filter_config(python: str = sys.executable) -> dict[str, str]:
    """The git config entries of the nbstripout filter that ``.gitattributes`` names: outputs, execution
    counts and widget state are stripped when a notebook is staged (and in ``git diff``); cell ids are kept."""
    command = f'"{python}" -m nbstripout --keep-id'
    return {"filter.nbstripout.clean": command, "filter.nbstripout.smudge": "cat",
            "filter.nbstripout.required": "true", "diff.ipynb.textconv": f"{command} -t"}


def install_output_filter(root: Path = CHECKOUT, say: Callable[[str], None] = _say) -> bool:
    """Put the nbstripout filter into the git config of the repository holding ``root`` (idempotent: only
    entries that differ are written). Never raises and strips nothing itself: without git, outside a git
    checkout or without nbstripout it says so and returns False; True when the filter is in place."""
    if shutil.which("git") is None:
        say("git not found: the output-stripping filter is not installed (install git, rerun `make lab`)")
        return False
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):
        say(f"{root} is not a git checkout: no output-stripping filter to install")
        return False
    if find_spec("nbstripout") is None:
        say("nbstripout is not installed: notebook outputs would be committed (pip install -e '.[lab]')")
        return False
    try:
        changed = []
        for key, value in output_filter_config().items():
            try:
                current = _git(Path(top), "config", "--local", "--get", key)
            except subprocess.CalledProcessError:
                current = None
            if current != value:
                _git(Path(top), "config", "--local", key, value)
                changed.append(key)
    except (OSError, subprocess.SubprocessError) as err:
        say(f"could not configure the nbstripout filter in {top}: {err}")
        return False
    if changed:
        say(f"installed the nbstripout git filter in {top}/.git/config (notebook outputs never reach git)")
    return True


def refresh_git_index(model: Any = None, os_path: str = "", contents_manager: Any = None, **_: Any) -> bool:
    """Jupyter post-save hook (``rslib lab`` sets it): after Lab saves a tracked ``.ipynb`` whose filtered content
    (outputs stripped by the clean filter) is exactly the blob git's index holds, mark that index entry for a
    content check, so ``git status`` stays quiet after Run All + save. Without it git reports the notebook
    modified although ``git diff`` is empty: when a file's size differs from the size its index entry recorded,
    git does not run the clean filter to compare. The entry keeps its blob (``--cacheinfo`` with the blob the
    index already holds, checked twice): nothing is staged. Returns whether it refreshed; never raises."""
    path = Path(os_path)
    if path.suffix != ".ipynb" or shutil.which("git") is None:
        return False
    try:
        top = Path(_git(path.parent, "rev-parse", "--show-toplevel"))
        rel = path.resolve().relative_to(top.resolve()).as_posix()

        def staged() -> tuple[str, str] | None:
            entry = _git(top, "ls-files", "--stage", "--", rel)  # "<mode> <blob> <stage>\t<path>"
            fields = entry.split()
            return (fields[0], fields[1]) if entry and fields[2] == "0" else None

        if subprocess.run(["git", "-C", str(top), "diff-files", "--quiet", "--", rel], timeout=30).returncode == 0:
            return False  # git already sees it unchanged
        before = staged()
        if before is None or _git(top, "hash-object", "--path", rel, "--", rel) != before[1]:
            return False  # untracked, conflicted or really changed: git status should say so
        if staged() != before:
            return False  # the index changed meanwhile (a `git add`): leave it alone
        _git(top, "update-index", "--cacheinfo", f"{before[0]},{before[1]},{rel}")
        return True
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return False


def settings_overrides_path() -> Path:
    """JupyterLab's ``overrides.json`` for this environment (``<app dir>/settings``)."""
    app_dir = os.environ.get("JUPYTERLAB_DIR") or Path(sys.prefix) / "share" / "jupyter" / "lab"
    return Path(app_dir) / "settings" / "overrides.json"


def write_settings_overrides(path: Path | None = None, settings: dict[str, dict[str, Any]] = LAB_SETTINGS,
                             say: Callable[[str], None] = _say) -> bool:
    """Merge ``settings`` into JupyterLab's ``overrides.json`` (other plugins and keys kept; rewritten only when
    something changes). Never raises: an unreadable or unwritable file is reported and left alone."""
    path = settings_overrides_path() if path is None else path
    try:
        current = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(current, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        say(f"left {path} alone (not plain JSON: {err}); Lab may ask about news")
        return False
    merged = {**current, **{plugin: {**current.get(plugin, {}), **values} for plugin, values in settings.items()}}
    if merged == current:
        return True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(merged, indent=2) + "\n")
    except OSError as err:
        say(f"could not write {path}: {err}")
        return False
    return True


def lab_command(root: Path, port: int, token: str, ip: str = "127.0.0.1") -> list[str]:
    """The ``jupyter lab`` command line serving ``root`` on ``ip:port`` with ``token``."""
    command = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}", f"--ServerApp.ip={ip}",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--no-browser",
               f"--IdentityProvider.token={token}", "--FileContentsManager.preferred_dir=notebooks",
               "--FileContentsManager.post_save_hook=rslib.lab.refresh_git_index"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # containers run as root; Jupyter refuses root without it
    return command


def lab_url(ip: str, port: int, token: str, path: str = "lab") -> str:
    """The address to open (the token logs the browser in)."""
    host = "localhost" if ip in ("127.0.0.1", "0.0.0.0") else ip
    return f"http://{host}:{port}/{path}?token={token}"


def run_lab(ip: str = "127.0.0.1", root: Path | str | None = None) -> int:
    """Start JupyterLab at ``root`` (default: ``$RSLIB_LAB_ROOT``, else the repository) until it is stopped
    (Ctrl-C, which Jupyter itself handles, or SIGTERM, passed on); return its exit status."""
    root = Path(root or os.environ.get(ROOT_ENV) or CHECKOUT).resolve()
    if not root.is_dir():
        print(f"rslib lab: error: {root} is not a folder", file=sys.stderr)
        return 2
    port = int(os.environ.get("JUPYTER_PORT") or DEFAULT_PORT)
    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(16)
    install_output_filter(root)
    write_settings_overrides()
    print(f"JupyterLab for rslib at {root}\n  open: {lab_url(ip, port, token)}\n  stop: Ctrl-C", flush=True)
    lab = subprocess.Popen(lab_command(root, port, token, ip), cwd=root)
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: lab.terminate())
    except ValueError:  # not the main thread: nothing to pass on
        previous = None
    try:
        while True:
            try:
                return lab.wait()
            except KeyboardInterrupt:
                continue  # Jupyter got the Ctrl-C too: it asks to confirm (twice skips); wait until it stops
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # python -m rslib.lab --notebook-metadata: the JSON the notebooks are pinned to
    if sys.argv[1:] != ["--notebook-metadata"]:
        sys.exit("usage: python -m rslib.lab --notebook-metadata")
    print(json.dumps(notebook_metadata(), sort_keys=True))
