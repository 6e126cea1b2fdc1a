"""The one digest of rslib: sha256 of canonical JSON (sorted keys)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(data: Any, *, spaced: bool = False) -> str:
    """``data`` as JSON with sorted keys, compact (``spaced``: json's default ``", "`` and ``": "``
    separators, the form the sibling salts of studies were first written in); values JSON cannot hold
    are written as their ``str``."""
    separators = None if spaced else (",", ":")
    return json.dumps(data, sort_keys=True, separators=separators, default=str)


def digest(data: Any, *, spaced: bool = False) -> str:
    """sha256 (hex) of :func:`canonical_json` of ``data``."""
    return hashlib.sha256(canonical_json(data, spaced=spaced).encode()).hexdigest()
