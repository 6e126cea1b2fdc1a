"""Where a result was made: versions, git commit, host, device and time."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from contextlib import suppress
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

#: rslib's version (``rslib.__version__``).
VERSION = "0.1.0"
#: The checkout rslib is imported from (its git state is recorded).
CHECKOUT = Path(__file__).resolve().parents[2]


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout rslib was imported from, or (None, None)."""
    top = _git(CHECKOUT, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != CHECKOUT:
        return None, None
    commit, status = _git(CHECKOUT, "rev-parse", "HEAD"), _git(CHECKOUT, "status", "--porcelain")
    return commit, (None if status is None else bool(status))


def cpu_name() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def provenance() -> dict[str, Any]:
    """Versions, git commit, host, device and UTC time describing where a result was made."""
    torch = sys.modules.get("torch")  # read, not imported: every caller that computes has loaded it
    commit, dirty = _git_state()
    cuda = bool(torch is not None and torch.cuda.is_available())
    return {"rslib_version": VERSION, "git_commit": commit, "git_dirty": dirty,
            "python_version": platform.python_version(), "python_executable": sys.executable,
            "torch_version": torch.__version__ if torch is not None else _installed("torch"),
            "platform": platform.platform(), "hostname": socket.gethostname(),
            "device": torch.cuda.get_device_name() if cuda else cpu_name(), "cuda_available": cuda,
            "timestamp_utc": datetime.now(UTC).isoformat(timespec="seconds")}


def _installed(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
