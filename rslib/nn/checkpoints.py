"""Safe rslib checkpoints: save with provenance, load with ``weights_only=True``, clear errors.

A checkpoint stores the architecture, dataset and number of classes beside the weights, so
:func:`load` rebuilds the model strictly (no random weight is ever kept); wrapper prefixes (DDP,
``torch.compile``) are stripped on save; a released file of a published paper gets the command
that converts it (``rslib.nn.releases``).
"""

from __future__ import annotations

import json
import os
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rslib.nn.architectures import NormalizedModel, build_model, resolve_arch
from rslib.nn.data import DATASETS
from rslib.nn.releases import (
    CheckpointError,
    foreign_checkpoint_hint,
    key_sample,
    strip_state_dict_prefixes,
)
from rslib.util.files import atomic_writer
from rslib.util.provenance import VERSION

CHECKPOINT_FORMAT_VERSION = 1
_REQUIRED_KEYS = ("format_version", "arch", "dataset", "num_classes", "state_dict")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _to_builtin(obj: Any) -> Any:
    """json.dumps fallback for numpy / torch scalars and arrays and paths."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 and obj.dim() == 0 else obj.tolist()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _plain_json(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict of JSON-able metadata; got {type(extra).__name__}")
    try:
        return json.loads(json.dumps(dict(extra), default=_to_builtin))
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra must be JSON-serialisable metadata: {e}") from None


_SAFE_LEAVES = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def _check_weights_only_safe(obj: Any, where: str) -> None:
    """Raise TypeError if ``obj`` holds anything ``torch.load(weights_only=True)`` may reject."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, nn.Parameter):
            raise TypeError(f"{where} is a tensor subclass {type(obj).__name__}; save plain tensors")
        return
    if isinstance(obj, _SAFE_LEAVES):
        return
    if type(obj) in (dict, OrderedDict, Counter):
        for k, v in obj.items():
            if not isinstance(k, str | int | float | bool | type(None) | tuple):
                raise TypeError(f"{where} has a key of type {type(k).__name__}")
            _check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_weights_only_safe(v, f"{where}[{i}]")
        return
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise TypeError(f"{where} is a {kind}, which torch.load(weights_only=True) cannot read back; store plain dicts, "
                    "lists, numbers, strings and tensors")


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, *, arch: str, dataset: str, num_classes: int,
                    extra: Mapping[str, Any] | None = None, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, epoch: int | None = None) -> Path:
    """Atomically write an rslib checkpoint that loads with ``torch.load(weights_only=True)``.

    The dict holds ``format_version``, ``rslib_version``, ``arch``, ``dataset``, ``num_classes``,
    ``state_dict`` (wrapper prefixes stripped), ``extra`` (JSON-able metadata, normalised through
    a JSON round trip: tuples become lists, numpy scalars become numbers), and, when given,
    ``optimizer`` / ``scheduler`` state dicts and ``epoch``. Returns the path.
    """
    resolve_arch(arch)  # fail now on a name load() could not rebuild
    DATASETS[dataset]  # likewise for the dataset
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise ValueError(f"epoch must be an integer or None; got {epoch!r}")
    ckpt: dict[str, Any] = {
        "format_version": CHECKPOINT_FORMAT_VERSION, "rslib_version": VERSION, "arch": arch, "dataset": dataset,
        "num_classes": int(num_classes), "state_dict": strip_state_dict_prefixes(unwrap_model(model).state_dict()),
        "extra": _plain_json(extra),
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if epoch is not None:
        ckpt["epoch"] = int(epoch)
    _check_weights_only_safe(ckpt, "checkpoint")
    path = Path(path)
    with atomic_writer(path, "wb") as f:
        torch.save(ckpt, f)
    return path


def _fix_hint(path: Path) -> str:
    return (f"delete {path} or re-run the train stage with --force "
            "(rslib run params/<experiment>.yaml --only train --force)")


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read and validate an rslib checkpoint with ``torch.load(..., weights_only=True)``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}; run the train stage first "
                                "(rslib run params/<experiment>.yaml --only train)")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not an rslib checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (PermissionError, MemoryError):
        raise
    except Exception as e:  # torch raises many kinds for unreadable files
        raise CheckpointError(f"{path} is corrupt or not an rslib checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else 'unreadable'}); {_fix_hint(path)}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not an rslib checkpoint (it holds a {type(ckpt).__name__}, not a dict); "
                              f"{_fix_hint(path)}")
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        hint = foreign_checkpoint_hint(path, ckpt)
        raise CheckpointError(hint if hint is not None else
                              f"{path} is not an rslib checkpoint: missing {', '.join(missing)}; {_fix_hint(path)}")
    version = ckpt["format_version"]
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid format_version {version!r}; {_fix_hint(path)}")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}, newer than this rslib reads "
                              f"({CHECKPOINT_FORMAT_VERSION}); upgrade rslib or {_fix_hint(path)}")
    state = ckpt["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise CheckpointError(f"{path} is not an rslib checkpoint: state_dict is not a mapping of names to tensors; "
                              f"{_fix_hint(path)}")
    return ckpt


def state_dict_problems(expected: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> list[str]:
    """Why ``state`` cannot load strictly into a model whose state dict is ``expected`` (empty: it can):
    missing keys, unexpected keys, shape mismatches (given vs model), each with a sample of the keys."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    labels = ("missing keys", "unexpected keys", "shape mismatches (given vs model)")
    return [f"{label}: {key_sample(keys)}" for label, keys in zip(labels, (missing, unexpected, mismatched),
                                                                  strict=True) if keys]


def load(checkpoint_path: str | os.PathLike[str], device: Any = "cpu") -> NormalizedModel:
    """Rebuild the model a checkpoint describes, load its weights strictly, eval mode, on device.

    Any missing, unexpected or mis-shaped key raises :class:`CheckpointError` (a ValueError)
    listing them: random weights are never silently kept.
    """
    path = Path(checkpoint_path)
    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        model = build_model(ckpt["arch"], ckpt["dataset"], ckpt["num_classes"])
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot rebuild the model it describes: {e}") from e
    state = strip_state_dict_prefixes(ckpt["state_dict"])
    parts = state_dict_problems(model.state_dict(), state)
    if parts:
        raise CheckpointError(f"{path} does not match architecture {ckpt['arch']!r} on {ckpt['dataset']!r} "
                              f"with {ckpt['num_classes']} classes: {'; '.join(parts)}. {_fix_hint(path)}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
