"""Radius tables: a sound lookup rule and an on-disk cache that survives crashes and corruption.

A table stores nodes ``rho_i`` (increasing, ``rho_0 = 1/2``), certified radii ``R_i`` at unit scale
(``lambd = 1``) and, at each node, a slope ``s_i`` that lower-bounds the right derivative of the
radius there. Every radius curve we tabulate is nondecreasing and convex in ``rho``, so the tangent
rule ``R(rho) >= R_i + s_i (rho - rho_i)`` for ``rho >= rho_i`` never overstates a radius; between
nodes we take the tangent of the node on the left, past the last node the tangent of the last node.
"""

from __future__ import annotations

import io
import json
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rslib.util.digest import canonical_json, digest
from rslib.util.files import atomic_write_bytes

TABLE_FORMAT_VERSION = 1
_memory_cache: dict[str, RadiusTable] = {}
_memory_lock = threading.Lock()


@dataclass(frozen=True)
class RadiusTable:
    """Nodes of a convex, nondecreasing radius curve with lower-bounding slopes (unit scale)."""

    rho: np.ndarray
    radius: np.ndarray
    slope: np.ndarray

    def __post_init__(self) -> None:
        if problems := table_problems(self.rho, self.radius, self.slope):
            raise ValueError(f"invalid radius table: {problems}")

    def lookup(self, rho: np.ndarray) -> np.ndarray:
        """Lower bound on the unit-scale radius at each ``rho`` (0 where ``rho <= 1/2``)."""
        rho = np.asarray(rho, dtype=np.float64)
        idx = np.clip(np.searchsorted(self.rho, rho, side="right") - 1, 0, len(self.rho) - 1)
        radius = self.radius[idx] + self.slope[idx] * (rho - self.rho[idx])
        return np.where(rho <= 0.5, 0.0, np.maximum(radius, 0.0))

    def to_bytes(self, key: str) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(key), rho=self.rho, radius=self.radius, slope=self.slope)
        return buffer.getvalue()


def table_problems(rho: np.ndarray, radius: np.ndarray, slope: np.ndarray) -> str:
    """Describe why arrays cannot form a sound table ('' when they can)."""
    if not (rho.ndim == radius.ndim == slope.ndim == 1 and len(rho) == len(radius) == len(slope)):
        return "arrays must be 1-D and of equal length"
    if len(rho) < 2:
        return "needs at least two nodes"
    if not (np.all(np.isfinite(rho)) and np.all(np.isfinite(radius)) and np.all(np.isfinite(slope))):
        return "non-finite values"
    if rho[0] != 0.5 or radius[0] != 0.0:
        return "first node must be (rho=1/2, radius=0)"
    if np.any(np.diff(rho) <= 0) or rho[-1] >= 1.0:
        return "rho must increase strictly inside [1/2, 1)"
    if np.any(np.diff(radius) < 0) or np.any(slope < 0):
        return "radii must be nondecreasing with nonnegative slopes"
    return ""


def cache_dir() -> Path:
    """Folder of cached tables: ``$RSLIB_CACHE_DIR`` or the user cache dir (``~/.cache/rslib``)."""
    if root := os.environ.get("RSLIB_CACHE_DIR"):
        return Path(root) / "tables"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("rslib")) / "tables"


def table_key(kind: str, **spec: object) -> str:
    """Canonical key of a table: its kind, distribution parameters, grid and the format version."""
    return canonical_json({"kind": kind, "format": TABLE_FORMAT_VERSION, **spec}, spaced=True)


def _path_for(key: str) -> Path:
    spec = json.loads(key)
    return cache_dir() / f"{spec['kind']}-{digest(spec, spaced=True)[:20]}.npz"


def _read(path: Path, key: str) -> RadiusTable | None:
    """Load a cached table; ``None`` when missing. A corrupt or foreign file is reported and ignored."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                raise ValueError("key mismatch")
            return RadiusTable(data["rho"].copy(), data["radius"].copy(), data["slope"].copy())
    except Exception as error:  # noqa: BLE001 - any unreadable file is rebuilt, never trusted
        warnings.warn(f"rebuilding radius table {path.name}: cached file unusable ({error})", stacklevel=3)
        return None


def cached_table(key: str, build: Callable[[], RadiusTable]) -> RadiusTable:
    """Return the table for ``key`` from memory, then disk, else build it and store it atomically."""
    with _memory_lock:
        if key in _memory_cache:
            return _memory_cache[key]
    path = _path_for(key)
    table = _read(path, key)
    if table is None:
        table = build()
        try:
            atomic_write_bytes(path, table.to_bytes(key))
        except OSError as error:
            warnings.warn(f"could not cache radius table at {path}: {error}", stacklevel=2)
    with _memory_lock:
        _memory_cache[key] = table
    return table


def clear_memory_cache() -> None:
    """Forget tables held in memory (the disk cache is untouched)."""
    with _memory_lock:
        _memory_cache.clear()
