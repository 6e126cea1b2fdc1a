"""Released checkpoints of published papers: recognise a file's layout from its keys, and the errors of
reading checkpoints (shared by ``rslib.nn.checkpoints`` and ``rslib.nn.checkpoint_import``)."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]
_IMPORT_COMMAND = "rslib import-checkpoint SRC DST --source cohen|smoothadv|rs4a|heatsmoothing"


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, not an rslib checkpoint, or does not fit its architecture."""


class CheckpointImportError(CheckpointError):
    """A released checkpoint that cannot be imported; the message says what was recognised and what to pass."""


def strip_state_dict_prefixes(state_dict: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Drop DDP's leading ``module.`` (when every key has it) and every ``_orig_mod.`` segment."""
    out: OrderedDict[str, Any] = OrderedDict((k.replace("_orig_mod.", ""), v) for k, v in state_dict.items())
    while out and all(k.startswith("module.") for k in out):
        out = OrderedDict((k[len("module.") :], v) for k, v in out.items())
        out = OrderedDict((k.replace("_orig_mod.", ""), v) for k, v in out.items())
    return out


def key_sample(keys: Iterable[Any], limit: int = 20, show: Callable[[Any], str] = str) -> str:
    """The first ``limit`` keys, comma-separated (each through ``show``), and how many more there are."""
    keys = list(keys)
    shown = ", ".join(show(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------- which codebase wrote a file


@dataclass(frozen=True)
class Release:
    """What a released file's container says, before its network is recognised."""

    layout: str  # how the file is laid out, for messages
    sources: tuple[str, ...]  # the codebases that write this layout
    net_state: StateDict  # the network's tensors, wrapper prefixes removed
    file_info: dict[str, Any]  # plain values saved beside the weights (epoch, arch, ...)
    mean_std: tuple[list[float], list[float]] | None = None  # a normalization stored in the file


_COHEN_LAYOUT = "Cohen et al. / SmoothAdv ({epoch, arch, state_dict, optimizer}, keys '1.*')"
_HEAT_LAYOUT = "HeatSmoothing ({'state_dict': ...} without the '1.' prefix of Cohen's files)"
_RS4A_LAYOUT = "rs4a (a bare state dict 'norm.*' + 'model.*')"
_KNOWN_LAYOUTS = (
    "Cohen et al. / SmoothAdv {'state_dict'} with '1.'-prefixed keys; rs4a bare state dict of "
    "'norm.mu', 'norm.log_sig', 'model.*'; HeatSmoothing {'state_dict'} with 'layer0.*'/'layers.*' "
    "(CIFAR-10) or torchvision ResNet-50 keys (ImageNet)"
)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """The entries under ``prefix``, renamed without it, then without wrapper prefixes."""
    inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(strip_state_dict_prefixes(inner))


def _file_info(container: Mapping[str, Any]) -> dict[str, Any]:
    """The plain values stored beside the weights (epoch, arch, model, pct_err, ...)."""
    info: dict[str, Any] = {}
    for key, value in container.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(key, str) and isinstance(value, str | int | float | bool):
            info[key] = value
    return info


def sample_keys(keys: Any) -> str:
    return key_sample(keys, 8, repr)


def _unknown_layout(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        found = f"a {type(obj).__name__}, not a dict"
    elif "format_version" in obj and "state_dict" in obj:
        return "this is already an rslib checkpoint: use it as it is, no import needed"
    elif _is_state_dict(obj):
        found = f"a state dict of {len(obj)} tensors with keys {sample_keys(obj)}"
    else:
        found = f"a dict with keys {sample_keys(obj)} and no 'state_dict' of tensors"
    return f"recognised: {found}; not recognised: the layout of any known release ({_KNOWN_LAYOUTS})"


def _read_rs4a(state: Mapping[str, torch.Tensor]) -> Release:
    norm = _strip(state, "norm.")
    if not {"mu", "log_sig"} <= norm.keys():
        raise CheckpointImportError(f"recognised: {_RS4A_LAYOUT}; not recognised: its normalization, which needs "
                                    f"'norm.mu' and 'norm.log_sig' (found {sample_keys('norm.' + k for k in norm)})")
    mean_std = (norm["mu"].flatten().tolist(), torch.exp(norm["log_sig"]).flatten().tolist())
    return Release(_RS4A_LAYOUT, ("rs4a",), _strip(state, "model."), {}, mean_std)


def read_release(obj: Any) -> Release:
    """Recognise the codebase from the file's container and key prefixes."""
    if isinstance(obj, Mapping) and "format_version" not in obj and _is_state_dict(obj.get("state_dict")):
        state = dict(strip_state_dict_prefixes(obj["state_dict"]))
        info = _file_info(obj)
        if all(k.startswith("1.") for k in state):
            return Release(_COHEN_LAYOUT, ("cohen", "smoothadv"), _strip(state, "1."), info)
        return Release(_HEAT_LAYOUT, ("heatsmoothing",), state, info)
    if _is_state_dict(obj) and all(k.startswith(("norm.", "model.")) for k in obj):
        return _read_rs4a(obj)
    raise CheckpointImportError(_unknown_layout(obj))


def foreign_checkpoint_hint(path: str | os.PathLike[str], ckpt: Any) -> str | None:
    """What :func:`rslib.nn.architectures.load_checkpoint` should say when ``ckpt`` (read from ``path``) is a
    foreign PyTorch checkpoint rather than an rslib one: how to import it. None when it is neither
    a released layout nor a dict of tensors (then the usual corrupt-file message applies)."""
    if not isinstance(ckpt, Mapping) or "format_version" in ckpt:
        return None
    try:
        release = read_release(ckpt)
    except CheckpointImportError:
        if not (_is_state_dict(ckpt) or isinstance(ckpt.get("state_dict"), Mapping)):
            return None
        return (f"{path} is a PyTorch checkpoint, not an rslib one, and matches no release rslib imports; "
                f"released models of Cohen et al., SmoothAdv, rs4a and HeatSmoothing convert with "
                f"`{_IMPORT_COMMAND}` (README, 'Published models')")
    flags = " or ".join(
        "--source smoothadv --input-layer normalize|center" if s == "smoothadv" else f"--source {s}"
        for s in release.sources
    )
    return (f"{path} is not an rslib checkpoint but a released one ({release.layout}); convert it once "
            f"with `rslib import-checkpoint {path} OUT.pt {flags}` and use OUT.pt")
