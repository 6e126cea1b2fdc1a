"""Import the checkpoints released with published randomized-smoothing papers as rslib checkpoints.

:func:`import_checkpoint` reads a released file with ``torch.load(weights_only=True)`` (nothing is
ever unpickled), recognises its layout from the keys, renames the tensors onto an rslib
architecture, loads them strictly, sets the model's input normalization to the one the source
codebase applied, and writes an ordinary rslib checkpoint (:func:`rslib.nn.save_checkpoint`)
whose ``extra["imported_from"]`` records the source file's sha256, the codebase, its architecture
name and input layer. The result works wherever a checkpoint does (``certify.checkpoint``,
``attack.checkpoint``, ``train.heat_base``).

Sources (``source=``; ``None`` recognises it from the keys where the file can tell):

- ``cohen`` -- Cohen et al. (github.com/locuslab/smoothing): ``{epoch, arch, state_dict,
  optimizer}`` of ``Sequential(NormalizeLayer, net)``, keys ``1.*`` (CIFAR ResNet-20/110, shortcut
  named ``downsample``) or ``1.module.*`` (torchvision ResNet-50). The normalization is not in the
  file: the papers' CIFAR-10 or ImageNet mean and std.
- ``smoothadv`` -- Salman et al. (github.com/Hadisalman/smoothing-adversarial): files identical to
  Cohen's; the input layer is not in the file and differs by model folder, so ``input_layer`` is
  required: ``normalize`` (mean, std) or ``center`` (mean, std 1).
- ``rs4a`` -- Yang et al. (github.com/tonyduan/rs4a): a bare state dict ``norm.[module.]mu``,
  ``norm.[module.]log_sig`` (std = exp(log_sig)) and ``model.[module.]*``: WideResNet
  (``wrn<depth>_<widen>``, blocks ``blockN.layer.J``, ``convShortcut``), torchvision ResNet-50,
  LeNet (MNIST).
- ``heatsmoothing`` -- Campbell et al. (github.com/ryancampbell514/HeatSmoothing):
  ``{'state_dict': ...}`` (plus trainer entries; ``module.`` prefixes allowed). Their CIFAR-10
  ``ResNet34`` ([5, 5, 5] blocks, raw pixels: mean 0, std 1) becomes ``heat_resnet``; their ImageNet
  ResNet-50 (torchvision names) is normalized outside the model by ``BatchNorm2d(3, affine=False)``,
  so its std becomes sqrt(std^2 + 1e-5).

Refused, with an error naming what to pass or what was and was not recognised: a Cohen-layout file
without ``source`` (Cohen and SmoothAdv write the same file), SmoothAdv without ``input_layer``, a
``source`` the layout contradicts, a layout of no known source, a network rslib lacks (rs4a's CIFAR
ResNet-110 with zero-padding shortcuts, SmoothAdv's 1000-class ImageNet32 ResNet-110, torchvision
ResNets other than ResNet-50, HeatSmoothing ResNets other than ``ResNet34``), and files that need
unpickling. Not visible in the keys, hence not refused: a HeatSmoothing ImageNet ResNet-50 trained
with ``--nonlinearity c2relu`` (rslib's resnet50 uses ReLU; the released models use ReLU).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rslib.nn.architectures import NormalizedModel, build_model
from rslib.nn.checkpoints import save_checkpoint, state_dict_problems
from rslib.nn.data import DATASETS
from rslib.nn.releases import CheckpointImportError, Release, StateDict, read_release, sample_keys
from rslib.util.files import file_sha256

__all__ = ["CODEBASES", "INPUT_LAYERS", "SOURCES", "CheckpointImportError", "import_checkpoint"]

SOURCES = ("cohen", "smoothadv", "rs4a", "heatsmoothing")
INPUT_LAYERS = ("normalize", "center")
CODEBASES = {
    "cohen": "Cohen, Rosenfeld, Kolter 2019; github.com/locuslab/smoothing",
    "smoothadv": "Salman et al. 2019 (SmoothAdv); github.com/Hadisalman/smoothing-adversarial",
    "rs4a": "Yang et al. 2020 (rs4a); github.com/tonyduan/rs4a",
    "heatsmoothing": "Campbell, Finlay, Oberman 2020; github.com/ryancampbell514/HeatSmoothing",
}

# Cohen et al.'s datasets.py constants (also SmoothAdv's; HeatSmoothing's ImageNet ones).
_PAPER_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_BATCHNORM_EPS = 1e-5  # torch's BatchNorm2d default: HeatSmoothing's ImageNet input layer


# --------------------------------------------------------------------------- the network: its rslib architecture


@dataclass(frozen=True)
class _Network:
    """A released network mapped onto an rslib architecture."""

    name: str  # the codebase's name for it
    arch: str  # the rslib architecture with the same tensors
    dataset: str  # the rslib dataset it classifies
    num_classes: int
    state: StateDict  # rslib ``net.*`` keys, without the ``net.`` prefix


_Reader = Callable[[StateDict], _Network | None]  # None: not this network


def _rename(state: StateDict, rules: list[tuple[str, str]]) -> StateDict:
    """Apply every (regex, replacement) rule, in order, to every key."""
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def _block_count(state: StateDict, prefix: str, suffix: str = "") -> int:
    """How many numbered blocks ``<prefix><i>.<suffix>`` the keys hold."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\." + re.escape(suffix))
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def _classes(state: StateDict, key: str) -> int:
    return int(state[key].shape[0])


def _read_torchvision_resnet(state: StateDict) -> _Network | None:
    if "layer4.0.conv1.weight" not in state or "fc.weight" not in state:
        return None
    blocks = tuple(_block_count(state, f"layer{i}.") for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    if blocks != (3, 4, 6, 3) or not bottleneck:
        kind = "bottleneck" if bottleneck else "basic"
        raise CheckpointImportError(f"recognised: a torchvision ResNet with {kind} blocks {blocks}; not recognised: an "
                                    "architecture rslib has (its only torchvision ResNet is resnet50: bottleneck "
                                    "blocks (3, 4, 6, 3))")
    return _Network("resnet50", "resnet50", "imagenet", _classes(state, "fc.weight"), state)


def _read_cohen_cifar_resnet(state: StateDict) -> _Network | None:
    """Cohen's archs/cifar_resnet.py (bearpaw's CIFAR ResNet): shortcuts named ``downsample``."""
    if "layer1.0.conv1.weight" not in state or "layer4.0.conv1.weight" in state or "fc.weight" not in state:
        return None
    if "layer1.0.conv3.weight" in state:
        raise CheckpointImportError(
            "recognised: Cohen's CIFAR ResNet with Bottleneck blocks; not recognised: an architecture "
            "rslib has (its cifar_resnet<depth> uses BasicBlocks, as Cohen's released models do)")
    name = f"cifar_resnet{6 * _block_count(state, 'layer1.') + 2}"
    net = _rename(state, [(r"\.downsample\.", ".shortcut.")])
    return _Network(name, name, "cifar10", _classes(state, "fc.weight"), net)


def _refuse_option_a_resnet(state: StateDict) -> None:
    """rs4a's lib/classic_resnet.py: parameter-free zero-padding shortcuts, a layer named ``linear``."""
    if "linear.weight" in state and "layer1.0.conv1.weight" in state:
        raise CheckpointImportError(
            "recognised: rs4a's CIFAR ResNet-110 (classic_resnet110: zero-padding 'option A' "
            "shortcuts, 'linear.*'); not recognised: an architecture rslib has (its cifar_resnet110 "
            "has 1x1-conv projection shortcuts, Cohen's arrangement)")


def _read_wide_resnet(state: StateDict) -> _Network | None:
    """rs4a's lib/wide_resnet.py: ``blockN.layer.J.*``, ``convShortcut``, final ``bn1``."""
    if "block1.layer.0.conv1.weight" not in state or "fc.weight" not in state:
        return None
    depth = 6 * _block_count(state, "block1.layer.") + 4
    widen = int(state["block1.layer.0.conv1.weight"].shape[0]) // 16
    net = _rename(state, [(r"^block(\d+)\.layer\.", r"block\1."), (r"\.convShortcut\.", ".shortcut."),
                          (r"^bn1\.", "bn.")])
    name = f"WideResNet(depth={depth}, widen_factor={widen})"
    return _Network(name, f"wrn{depth}_{widen}", "cifar10", _classes(state, "fc.weight"), net)


def _read_lenet(state: StateDict) -> _Network | None:
    """rs4a's lib/lenet.py: conv1, conv2, fc1, fc2, fc3 (MNIST)."""
    if not {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"} <= state.keys():
        return None
    dataset = "mnist" if state["conv1.weight"].shape[1] == 1 else "cifar10"
    return _Network("LeNet", "lenet", dataset, _classes(state, "fc3.weight"), state)


def _read_heat_resnet(state: StateDict) -> _Network | None:
    """HeatSmoothing's cvmodels ResNet: Conv modules (weight, bias, bn) named layer0, layers,
    conv0/conv1 in blocks, and fc (weight, bias, bn)."""
    if "layer0.weight" not in state or "fc.weight" not in state:
        return None
    stages = tuple(_block_count(state, f"layers.{i}.", "conv0.") for i in range(_block_count(state, "layers.")))
    channels = int(state["layer0.weight"].shape[0])
    if stages != (5, 5, 5) or channels != 16:
        raise CheckpointImportError(
            f"recognised: a HeatSmoothing ResNet with blocks {list(stages)} and {channels} base channels; "
            "not recognised: an architecture rslib has (its heat_resnet is their ResNet34: [5, 5, 5] "
            "blocks, 16 channels)")
    net = _rename(state, [
        (r"^layer0\.", "stem."), (r"^layers\.", "stages."),
        (r"\.conv1\.", ".conv2."), (r"\.conv0\.", ".conv1."),  # their block convs conv0/conv1 are rslib's conv1/conv2
        (r"^(stem|stages\.\d+\.\d+(?:\.conv[12])?)\.weight$", r"\1.conv.weight"),
        (r"^fc\.bias$", "fc_bias"), (r"^fc\.bn\.", "fc_bn."),
    ])
    return _Network("ResNet34", "heat_resnet", "cifar10", _classes(state, "fc.weight"), net)


_RESNET50: tuple[str, _Reader] = ("torchvision ResNet-50", _read_torchvision_resnet)
_COHEN_NETWORKS: tuple[tuple[str, _Reader], ...] = (("CIFAR ResNet cifar_resnet<depth>", _read_cohen_cifar_resnet),
                                                     _RESNET50)
#: source -> (description, reader) of the networks it releases that rslib imports, tried in order.
_NETWORKS: dict[str, tuple[tuple[str, _Reader], ...]] = {
    "cohen": _COHEN_NETWORKS,
    "smoothadv": _COHEN_NETWORKS,
    "rs4a": (("WideResNet", _read_wide_resnet), _RESNET50, ("LeNet", _read_lenet)),
    "heatsmoothing": (("CIFAR-10 ResNet34", _read_heat_resnet), _RESNET50),
}
#: source -> checks that raise on a network it releases which rslib lacks.
_REFUSALS: dict[str, tuple[Callable[[StateDict], None], ...]] = {"rs4a": (_refuse_option_a_resnet,)}


def _read_network(release: Release, source: str) -> _Network:
    for refuse in _REFUSALS.get(source, ()):
        refuse(release.net_state)
    for _, read in _NETWORKS[source]:
        network = read(release.net_state)
        if network is not None:
            return network
    known = ", ".join(name for name, _ in _NETWORKS[source])
    raise CheckpointImportError(
        f"recognised: the layout {release.layout}; not recognised: its network (keys "
        f"{sample_keys(release.net_state)}); the {source} networks rslib imports: {known}"
    )


# --------------------------------------------------------------------------- source and input layer


def _check_choices(source: str | None, input_layer: str | None) -> None:
    if source is not None and source not in SOURCES:
        raise CheckpointImportError(f"unknown source {source!r}; valid: --source {'|'.join(SOURCES)}")
    if input_layer is not None and input_layer not in INPUT_LAYERS:
        raise CheckpointImportError(
            f"unknown input layer {input_layer!r}; valid: --input-layer {'|'.join(INPUT_LAYERS)}"
        )


def _choose_source(release: Release, source: str | None) -> str:
    """The source asked for, checked against the layout; or the only one writing this layout."""
    if source is None:
        if len(release.sources) == 1:
            return release.sources[0]
        raise CheckpointImportError(
            f"recognised: the layout {release.layout}, which Cohen et al. and SmoothAdv both write "
            "with different input layers; rslib will not guess: pass --source cohen, or --source "
            "smoothadv --input-layer normalize|center")
    if source not in release.sources:
        raise CheckpointImportError(
            f"--source {source}, but the file is laid out as {release.layout}, which "
            f"{' and '.join(release.sources)} write: pass --source {' or --source '.join(release.sources)}")
    return source


def _check_input_layer(source: str, input_layer: str | None) -> None:
    if source == "smoothadv" and input_layer is None:
        raise CheckpointImportError(
            "SmoothAdv files do not record their input layer, and the released models differ by "
            "folder (SmoothAdv README): pass --input-layer normalize for imagenet32/, "
            "cifar10/finetune_cifar_from_imagenetPGD2steps/ and cifar10/self_training/ "
            "(NormalizeLayer), --input-layer center for imagenet/ and every other cifar10/ folder "
            "(InputCenterLayer)")
    if source != "smoothadv" and input_layer is not None:
        raise CheckpointImportError(f"--input-layer is for --source smoothadv only; {source} files fix their input "
                                    "layer: drop --input-layer")


def _input_normalization(source: str, dataset: str, input_layer: str | None,
                         release: Release) -> tuple[list[float], list[float], str]:
    """(mean, std, description) of the input layer the source applied before its network."""
    if release.mean_std is not None:
        mean, std = release.mean_std
        return mean, std, "NormalizeLayer(mu, exp(log_sig)) stored in the file"
    if source == "heatsmoothing" and dataset == "cifar10":
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], "none (raw pixels in [0, 1])"
    mean, std = (list(c) for c in _PAPER_MEAN_STD[dataset])
    if source == "heatsmoothing":
        bn_std = torch.sqrt(torch.tensor(std) ** 2 + _BATCHNORM_EPS).tolist()
        return mean, bn_std, "BatchNorm2d(3, affine=False) outside the model: std = sqrt(std^2 + 1e-5)"
    if input_layer == "center":
        return mean, [1.0] * len(mean), "InputCenterLayer (mean, std 1)"
    return mean, std, "NormalizeLayer (mean, std)"


def _check_expected(network: _Network, arch: str | None, dataset: str | None) -> None:
    """``arch``/``dataset``, when given, must be what the file holds: nothing is reinterpreted."""
    if arch is not None and arch != network.arch:
        raise CheckpointImportError(f"--arch {arch}, but the file holds {network.name}, rslib's {network.arch!r}: "
                                    f"drop --arch or pass --arch {network.arch}")
    if dataset is not None and dataset != network.dataset:
        raise CheckpointImportError(f"--dataset {dataset}, but the file holds {network.name} for {network.dataset!r}: "
                                    f"drop --dataset or pass --dataset {network.dataset}")
    classes = DATASETS[network.dataset].num_classes
    if network.num_classes != classes:
        raise CheckpointImportError(
            f"recognised: {network.name} with {network.num_classes} classes; not recognised: an rslib "
            f"dataset for it ({network.dataset} has {classes} classes; rslib has no ImageNet32 or "
            "CIFAR-100, e.g. SmoothAdv's imagenet32_resnet110)")


# --------------------------------------------------------------------------- the rslib checkpoint


def _rslib_model(network: _Network, mean: list[float], std: list[float]) -> NormalizedModel:
    """rslib's architecture holding the network's tensors (strictly) behind the given normalization."""
    model = build_model(network.arch, network.dataset, network.num_classes)
    state = {
        "normalize.mean": torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
        "normalize.std": torch.tensor(std, dtype=torch.float32).view(-1, 1, 1),
        **{f"net.{k}": v for k, v in network.state.items()},
    }
    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        raise CheckpointImportError(f"recognised: {network.name}; not recognised: a variant whose tensors fit rslib's "
                                    f"{network.arch!r} ({'; '.join(problems)})")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _load_release_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to import at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, MemoryError):
        raise
    except Exception as e:  # torch raises many kinds for unreadable or unsafe files
        first_line = str(e).splitlines()[0][:200] if str(e) else "unreadable"
        raise CheckpointImportError(
            f"{path} cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{first_line}): it is corrupt, not a torch file, or holds pickled Python objects, "
            "which rslib never unpickles (the released files of the supported sources hold none)") from e


def import_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], source: str | None = None,
                      arch: str | None = None, dataset: str | None = None, input_layer: str | None = None) -> Path:
    """Convert the released checkpoint ``src`` into the rslib checkpoint ``dst``; return ``dst``.

    ``source``: ``cohen``, ``smoothadv``, ``rs4a`` or ``heatsmoothing`` (None: recognised from the
    layout, refused where Cohen and SmoothAdv files cannot be told apart). ``input_layer``
    (``normalize`` or ``center``): SmoothAdv's input layer, required for it and refused for the
    others. ``arch``/``dataset``: when given, must equal what the file holds (a safeguard; nothing is
    reinterpreted). Raises :class:`CheckpointImportError` saying what was recognised and what to pass.
    """
    src_path, dst_path = Path(src), Path(dst)
    _check_choices(source, input_layer)
    if dst_path.resolve() == src_path.resolve():
        raise CheckpointImportError(f"DST must differ from SRC ({src_path}): the released file is kept")
    release = read_release(_load_release_file(src_path))
    source = _choose_source(release, source)
    _check_input_layer(source, input_layer)
    network = _read_network(release, source)
    _check_expected(network, arch, dataset)
    mean, std, layer = _input_normalization(source, network.dataset, input_layer, release)
    model = _rslib_model(network, mean, std)
    provenance = {
        "source": source, "codebase": CODEBASES[source], "file": src_path.name, "sha256": file_sha256(src_path),
        "original_arch": str(release.file_info.get("arch") or release.file_info.get("model") or network.name),
        "input_layer": layer, "mean": mean, "std": std, "file_info": release.file_info,
    }
    return save_checkpoint(dst_path, model, arch=network.arch, dataset=network.dataset,
                           num_classes=network.num_classes, extra={"imported_from": provenance})

