"""Options that a registered entry (an attack, say) reads from its YAML section, declared next to its code.

The parameter schema (``rslib.pipeline.params``) turns each :class:`Option` into a validated field of
the section: its key, type (``int``, ``float``, ``bool``, ``str``, a ``Literal`` or a union with
``None``), default and bounds. ``neutral`` options stay out of stage digests while they hold their
default, so registering a new entry never makes finished work stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    """One YAML key of a section: type, default, bounds (``ge``/``gt``/``le``/``lt``) and a description."""

    key: str
    type: Any
    default: Any
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    help: str = ""
    neutral: bool = True

    def bounds(self) -> dict[str, float]:
        """The bounds that are set, by name."""
        return {name: value for name in ("ge", "gt", "le", "lt") if (value := getattr(self, name)) is not None}
