"""The schema machinery of parameter files: fields with validation metadata (:func:`param`), the checks
that turn a YAML mapping into a frozen dataclass with errors naming the dotted key, the file's value
and what is valid, dotted overrides, and reading a YAML mapping.

A section is a frozen dataclass whose fields are declared with :func:`param`; the validator is driven
by the fields, their type hints and their metadata (``rslib.pipeline.params`` holds the sections).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ParamsError(ValueError):
    """Invalid experiment parameters; the message names the file, the dotted key and the fix."""


_UNSET = object()


def param(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None, pattern: str | None = None, nonempty: bool = False,
          expect: str | None = None, digest: bool = True, neutral: Any = _UNSET, speed_only: Any = _UNSET) -> Any:
    """A dataclass field with validation metadata and its place in stage digests.

    Bounds (``ge``/``gt``/``le``/``lt``) apply to numbers and to every number of a list;
    ``pattern`` is a full-match regex for strings; ``expect`` replaces the generated
    description of valid values in error messages. Mutable defaults are copied per instance.

    Digests (:func:`section_digest`): ``digest=False`` leaves the field out (it only says where inputs
    live or how fast they load); ``speed_only=v`` makes every value count as ``v`` (the field sets how
    fast a stage runs, not what it computes; ``v`` is what it counted as before it was declared so);
    ``neutral=v`` leaves it out while it holds ``v`` (a field added after digests were first written,
    at the value that reproduces what rslib did before it existed)."""
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt, "pattern": pattern, "expect": expect}
    meta = {k: v for k, v in bounds.items() if v is not None}
    if nonempty:
        meta["nonempty"] = True
    if not digest:
        meta["digest"] = False
    if neutral is not _UNSET:
        meta["neutral"] = neutral
    if speed_only is not _UNSET:
        meta["speed_only"] = speed_only
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


_BAD = object()
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def yaml_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _bounds_text(meta: Mapping[str, Any]) -> str:
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [f"{op} {meta[k]}" for k, op in ops.items() if k in meta]
    return (" " + " and ".join(parts)) if parts else ""


def describe(tp: Any, meta: Mapping[str, Any]) -> str:
    """Human description of the values a field accepts."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        inner = " or ".join(describe(a, meta) for a in args if a is not type(None))
        return f"{inner} or null" if type(None) in args else inner
    if origin is list:
        head = "a non-empty list" if meta.get("nonempty") else "a list"
        return f"{head}, each item {describe(args[0], meta)}"
    if "expect" in meta:
        return meta["expect"]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is dict or origin is dict:
        return "a mapping"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + _bounds_text(meta)
    if tp is float:
        return "a number" + _bounds_text(meta)
    if tp is str:
        return "a string" + (f" matching {meta['pattern']}" if "pattern" in meta else "")
    raise TypeError(f"unsupported parameter type {tp!r}")


def _in_bounds(value: float, meta: Mapping[str, Any]) -> bool:
    return (("ge" not in meta or value >= meta["ge"]) and ("gt" not in meta or value > meta["gt"])
            and ("le" not in meta or value <= meta["le"]) and ("lt" not in meta or value < meta["lt"]))


def _coerce(value: Any, tp: Any, meta: Mapping[str, Any], key: str, source: str) -> Any:
    """Converted value, or _BAD when it does not fit ``tp`` and ``meta``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _BAD
        for inner in (a for a in args if a is not type(None)):
            result = _coerce(value, inner, meta, key, source)
            if result is not _BAD:
                return result
        return _BAD
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _BAD
    if origin is list:
        if not isinstance(value, list) or (meta.get("nonempty") and not value):
            return _BAD
        return [_value(v, args[0], meta, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        ok = isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
        return copy.deepcopy(dict(value)) if ok else _BAD
    if tp is bool:
        return value if isinstance(value, bool) else _BAD
    if tp is str:
        ok = isinstance(value, str) and ("pattern" not in meta or re.fullmatch(meta["pattern"], value))
        return value if ok else _BAD
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        # PyYAML (YAML 1.1) reads exponent-only numbers such as 1e-3 as strings.
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
        value = float(value) if ok else value
    else:
        raise TypeError(f"unsupported parameter type {tp!r} for {key}")
    return value if ok and _in_bounds(value, meta) else _BAD


def _value(value: Any, tp: Any, meta: Mapping[str, Any], key: str, source: str) -> Any:
    """Convert and check one value; raise ParamsError naming ``key`` if it does not fit."""
    result = _coerce(value, tp, meta, key, source)
    if result is _BAD:
        raise ParamsError(f"{source}: {key} must be {describe(tp, meta)}, got {value!r}")
    return result


def check_keys(raw: Mapping[Any, Any], valid: list[str], prefix: str, source: str) -> None:
    for key in raw:
        if key not in valid:
            raise ParamsError(f"{source}: unknown key '{_dotted(prefix, str(key))}' (valid keys: {', '.join(valid)})")


def build(cls: type, raw: Any, prefix: str, source: str, **extra: Any) -> Any:
    """Validate mapping ``raw`` against dataclass ``cls``; run its ``check()`` if it has one."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        what = f"'{prefix}'" if prefix else "the file"
        raise ParamsError(f"{source}: {what} must be a mapping of keys to values, got {raw!r}")
    fields = yaml_fields(cls)
    check_keys(raw, [f.name for f in fields], prefix, source)
    hints = get_type_hints(cls)
    values = {}
    for f in fields:
        key = _dotted(prefix, f.name)
        if f.name in raw:
            values[f.name] = _value(raw[f.name], hints[f.name], f.metadata, key, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{source}: missing required key '{key}' ({describe(hints[f.name], f.metadata)})")
    obj = cls(**values, **extra)
    for sub, problem in getattr(obj, "check", lambda: ())():
        raise ParamsError(f"{source}: {_dotted(prefix, sub)} {problem}")
    return obj


def has_defaults(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in yaml_fields(cls))


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any], label: str) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = raw
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ParamsError(f"{label}: cannot apply override '{key}': '{where}' is not a mapping")
            node = child
        node[last] = value
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"tutorial.dim=64"`` into ``("tutorial.dim", 64)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ParamsError(f"override {text!r} must look like key=value, e.g. tutorial.dim=64")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ParamsError(f"override {text!r}: the value is not valid YAML ({err})") from None


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The parsed YAML mapping of a parameter file; ParamsError naming the file otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such parameter file") from None
    except OSError as err:
        raise ParamsError(f"{path}: cannot read the parameter file ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the file must be a mapping of keys to values, got {raw!r}")
    return raw
