"""Architectures with normalization inside the model, and safe checkpoints.

Every model built here takes images in [0, 1] pixel space: the per-dataset normalization is the
first layer (:class:`Normalize`), so smoothing noise is added to pixels, as in the certificates.
``build_model(arch, dataset)`` returns a :class:`NormalizedModel` whose state-dict keys are
``normalize.*`` and ``net.*`` whatever wraps it later (DDP, ``torch.compile``): checkpoints written
by :func:`save_checkpoint` strip those wrappers' prefixes and load with ``weights_only=True``.

Architectures (names in :data:`ARCHITECTURES`, plus the parametric families ``cifar_resnet<depth>``
with depth = 6n + 2 and ``wrn<depth>_<widen>`` with depth = 6n + 4):

- ``small_cnn`` — a small conv net for digits / MNIST (any input size >= 8).
- ``lenet`` — LeNet-5 (conv 5x5 / max-pool twice, three fully connected layers), as in rs4a.
- ``lenet_caffe`` — the LeNet of the published MNIST randomized-smoothing protocol (Cohen et al.'s
  code as used by Salman et al. and Jeong & Shin): conv 5x5 to 20 and 50 channels, each followed
  by ReLU and a 2x2 max pool, fc 800 -> 500, ReLU, fc 500 -> classes; MNIST only, and fed raw
  [0, 1] pixels (identity input normalization, as that protocol).
- ``cifar_resnet110`` — Cohen et al.'s CIFAR ResNet-110 (3 stages of 18 basic blocks, 16/32/64
  channels, 1x1-conv + BN projection shortcuts).
- ``wrn40_2`` — WideResNet-40-2 (pre-activation blocks), rs4a's CIFAR model.
- ``heat_resnet`` — HeatSmoothing's CIFAR ResNet (``ResNet34`` there): [5, 5, 5] basic blocks with
  16/32/64 channels; stage transitions are a 1x1 conv followed by 2x2 average pooling; batch norm
  without affine weights followed by a learned bias; batch norm on the logits.
- ``resnet50`` — torchvision's ResNet-50 (never downloads weights).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from rslib.nn.data import DATASETS
from rslib.util.registry import Registry, UnknownName


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers (saved, never trained)."""

    def __init__(self, mean: Any, std: Any) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(f"Normalize needs one mean and one std per channel; got {mean_t.numel()} means "
                             f"and {std_t.numel()} stds")
        if not bool(torch.all(std_t > 0)):
            raise ValueError(f"Normalize std must be positive; got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(-1, 1, 1))
        self.register_buffer("std", std_t.view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Module):
    """``net(normalize(x))`` for pixel inputs in [0, 1], with the build metadata as attributes."""

    def __init__(self, normalize: Normalize, net: nn.Module, *, arch: str | None = None, dataset: str | None = None,
                 num_classes: int | None = None, input_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net
        self.arch = arch
        self.dataset = dataset
        self.num_classes = num_classes
        self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, dataset={self.dataset!r}, num_classes={self.num_classes}"


# --------------------------------------------------------------------------- architectures


def _kaiming_init(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit/zero batch norm, zero linear biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _stages(cin: int, widths: tuple[int, ...], n: int, block: Callable[[int, int, int], nn.Module]) -> list[nn.Module]:
    """One ``nn.Sequential`` of ``n`` ``block(cin, cout, stride)`` per width; later stages open with stride 2."""
    stages: list[nn.Module] = []
    for i, cout in enumerate(widths):
        blocks = []
        for j in range(n):
            blocks.append(block(cin, cout, 2 if (i > 0 and j == 0) else 1))
            cin = cout
        stages.append(nn.Sequential(*blocks))
    return stages


class SmallCNN(nn.Module):
    """Four 3x3 conv + BN + ReLU layers (two of them stride 2), global average pool, linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        plan = [(in_channels, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2)]
        layers: list[nn.Module] = []
        for cin, cout, stride in plan:
            layers += [_conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class LeNet(nn.Module):
    """LeNet-5: conv5x5(6) - maxpool - conv5x5(16) - pool to 5x5 - fc 120 - fc 84 - fc classes.

    On 28x28 inputs this is the classic network (the second pool is an exact 2x2 max pool).
    Inputs smaller than 10x10 (digits' 8x8) pad the second convolution, and the adaptive max pool
    maps whatever map remains to 5x5, so the weights have the same shapes for every input size.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__()
        if input_size < 4:
            raise ValueError(f"lenet needs inputs of at least 4x4 pixels; got {input_size}")
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        pad2 = 2 if input_size // 2 < 5 else 0
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, padding=pad2)
        self.pool2 = nn.AdaptiveMaxPool2d(5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = self.pool2(F.relu(self.conv2(x))).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNetCaffe(nn.Module):
    """conv5x5(20) - ReLU - maxpool 2 - conv5x5(50) - ReLU - maxpool 2 - fc 500 - ReLU - fc classes.

    The MNIST LeNet of the randomized-smoothing literature (28x28 inputs: 50 x 4 x 4 = 800 features
    enter the first linear layer); PyTorch's default initialization, as there.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__()
        if input_size != 28:
            raise ValueError(f"lenet_caffe takes 28x28 inputs (MNIST); got {input_size}x{input_size}")
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class _ResBlock(nn.Module):
    """Post-activation basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet as used by Cohen et al.: depth = 6n + 2, stages of 16/32/64."""

    def __init__(self, depth: int = 110, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"cifar_resnet depth must be 6n + 2 with n >= 1 (20, 56, 110); got {depth}")
        self.depth = depth
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1, self.layer2, self.layer3 = _stages(16, (16, 32, 64), (depth - 2) // 6, _ResBlock)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


class _WideBlock(nn.Module):
    """Pre-activation wide block: conv(drop(relu(bn(conv(relu(bn(x))))))) + shortcut.

    When the channel count changes, the 1x1 projection shortcut reads the pre-activated input
    (Zagoruyko & Komodakis' arrangement); otherwise the shortcut is the identity on x itself.
    """

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.dropout = dropout
        self.shortcut = (nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)
                         if (cin != cout or stride != 1) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WideResNet-depth-k (depth = 6n + 4): stages of 16k/32k/64k channels, final BN-ReLU."""

    def __init__(self, depth: int = 40, widen_factor: int = 2, dropout: float = 0.0, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"wide_resnet depth must be 6n + 4 with n >= 1 (16, 28, 40); got {depth}")
        if widen_factor < 1:
            raise ValueError(f"wide_resnet widen_factor must be >= 1; got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"wide_resnet dropout must be in [0, 1); got {dropout}")
        self.depth, self.widen_factor = depth, widen_factor
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = _conv3x3(in_channels, 16)
        self.block1, self.block2, self.block3 = _stages(
            16, widths, (depth - 4) // 6, lambda cin, cout, stride: _WideBlock(cin, cout, stride, dropout))
        self.bn = nn.BatchNorm2d(widths[-1])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(self.pool(x).flatten(1))


class _HeatConv(nn.Module):
    """conv (no bias) -> BatchNorm without affine weights -> learned per-channel bias -> ReLU?"""

    def __init__(self, cin: int, cout: int, kernel_size: int, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, affine=False)
        self.bias = nn.Parameter(torch.zeros(cout))
        self.relu = relu
        bound = 1.0 / math.sqrt(cin * kernel_size * kernel_size)
        nn.init.uniform_(self.conv.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)) + self.bias.view(1, -1, 1, 1)
        return F.relu(y) if self.relu else y


class _HeatBlock(nn.Module):
    """relu(x + conv-bn(relu(conv-bn(x)))), channels unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _HeatConv(channels, channels, 3, relu=True)
        self.conv2 = _HeatConv(channels, channels, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


class HeatResNet(nn.Module):
    """HeatSmoothing's CIFAR ResNet (their ``ResNet34`` with ``--bn``): stages of [5, 5, 5] blocks.

    Stem: 3x3 conv to 16 channels. Stage i > 0 starts with a 1x1 conv (BN, ReLU) doubling the
    channels and a 2x2 average pool; then the blocks. Global average pool, a linear layer whose
    output goes through BatchNorm1d without affine weights, then a learned bias (the logits).
    """

    def __init__(self, layers: tuple[int, ...] = (5, 5, 5), num_classes: int = 10, in_channels: int = 3,
                 base_channels: int = 16) -> None:
        super().__init__()
        if not layers or any(n < 1 for n in layers):
            raise ValueError(f"heat_resnet layers must be positive block counts; got {layers}")
        self.stem = _HeatConv(in_channels, base_channels, 3, relu=True)
        stages = []
        c = base_channels
        for i, n in enumerate(layers):
            mods: list[nn.Module] = []
            if i > 0:
                mods += [_HeatConv(c, 2 * c, 1, relu=True), nn.AvgPool2d(2)]
                c *= 2
            mods += [_HeatBlock(c) for _ in range(n)]
            stages.append(nn.Sequential(*mods))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes, bias=False)
        self.fc_bn = nn.BatchNorm1d(num_classes, affine=False)
        self.fc_bias = nn.Parameter(torch.zeros(num_classes))
        bound = 1.0 / math.sqrt(c)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.uniform_(self.fc_bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x))).flatten(1)
        return self.fc_bn(self.fc(x)) + self.fc_bias


def small_cnn(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    """A small conv net for digits and MNIST (any input size >= 8)."""
    return SmallCNN(in_channels=in_channels, num_classes=num_classes)


def lenet(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> LeNet:
    """LeNet-5 (see :class:`LeNet`)."""
    return LeNet(in_channels=in_channels, num_classes=num_classes, input_size=input_size)


def lenet_caffe(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> LeNetCaffe:
    """The published MNIST randomized-smoothing LeNet (see :class:`LeNetCaffe`)."""
    return LeNetCaffe(in_channels=in_channels, num_classes=num_classes, input_size=input_size)


def cifar_resnet(depth: int = 110, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Cohen et al.'s CIFAR ResNet of the given depth (6n + 2)."""
    return CifarResNet(depth=depth, num_classes=num_classes, in_channels=in_channels)


def wide_resnet(depth: int = 40, widen_factor: int = 2, dropout: float = 0.0, num_classes: int = 10,
                in_channels: int = 3) -> WideResNet:
    """WideResNet-depth-widen_factor (depth = 6n + 4), rs4a's CIFAR model for (40, 2)."""
    return WideResNet(depth, widen_factor, dropout, num_classes, in_channels)


def heat_resnet(num_classes: int = 10, in_channels: int = 3) -> HeatResNet:
    """HeatSmoothing's CIFAR ResNet: [5, 5, 5] blocks, 16/32/64 channels."""
    return HeatResNet((5, 5, 5), num_classes=num_classes, in_channels=in_channels)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-50 with random weights (never downloads)."""
    import torchvision

    if in_channels != 3:
        raise ValueError(f"resnet50 takes 3-channel images; got {in_channels} channels")
    return torchvision.models.resnet50(weights=None, num_classes=num_classes)


# --------------------------------------------------------------------------- registry

_SMALL = ("digits", "mnist", "cifar10")

# constructor(num_classes, in_channels, input_size)
_Ctor = Callable[[int, int, int], nn.Module]


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: its constructor, the datasets it supports and its input normalization.

    ``normalization``: ``"dataset"`` puts the dataset's mean/std (:data:`rslib.nn.data.DATASETS`) in
    front of the network; ``"identity"`` (mean 0, std 1) feeds it raw [0, 1] pixels, for
    architectures whose published protocol does so.
    """

    build: _Ctor
    datasets: tuple[str, ...]
    normalization: Literal["dataset", "identity"] = "dataset"


#: Every architecture by name (the parametric families below are resolved on top of it).
ARCHITECTURES: Registry[ArchSpec] = Registry("architecture")
ARCHITECTURES.register("small_cnn", ArchSpec(lambda k, c, s: small_cnn(k, c), _SMALL))
ARCHITECTURES.register("lenet", ArchSpec(lambda k, c, s: lenet(k, c, s), _SMALL))
ARCHITECTURES.register("lenet_caffe", ArchSpec(lambda k, c, s: lenet_caffe(k, c, s), ("mnist",), normalization="identity"))
ARCHITECTURES.register("cifar_resnet110", ArchSpec(lambda k, c, s: cifar_resnet(110, k, c), _SMALL))
ARCHITECTURES.register("wrn40_2", ArchSpec(lambda k, c, s: wide_resnet(40, 2, 0.0, k, c), _SMALL))
ARCHITECTURES.register("heat_resnet", ArchSpec(lambda k, c, s: heat_resnet(k, c), _SMALL))
ARCHITECTURES.register("resnet50", ArchSpec(lambda k, c, s: resnet50(k, c), ("cifar10", "imagenet")))
# Parametric families, parsed by regular expression (no eval): cifar_resnet20, wrn16_2, ...
_CIFAR_RESNET_RE = re.compile(r"cifar_resnet(\d+)")
_WRN_RE = re.compile(r"wrn(\d+)_(\d+)")
_FAMILIES = "cifar_resnet<depth> (depth = 6n + 2), wrn<depth>_<widen> (depth = 6n + 4)"


def resolve_arch(arch: str) -> ArchSpec:
    """The architecture called ``arch``: a registered name or a member of a parametric family."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if m := _CIFAR_RESNET_RE.fullmatch(arch):
        depth = int(m.group(1))
        if depth >= 8 and (depth - 2) % 6 == 0:
            return ArchSpec(lambda k, c, s: cifar_resnet(depth, k, c), _SMALL)
    elif m := _WRN_RE.fullmatch(arch):
        depth, widen = int(m.group(1)), int(m.group(2))
        if depth >= 10 and (depth - 4) % 6 == 0 and widen >= 1:
            return ArchSpec(lambda k, c, s: wide_resnet(depth, widen, 0.0, k, c), _SMALL)
    raise UnknownName(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}, "
                      f"or the families {_FAMILIES}")


def _input_normalization(spec: ArchSpec, dataset: str) -> Normalize:
    """The dataset's mean/std, or mean 0 / std 1 per channel for an identity-normalized architecture."""
    data = DATASETS[dataset]
    if spec.normalization == "identity":
        return Normalize([0.0] * len(data.mean), [1.0] * len(data.std))
    return Normalize(data.mean, data.std)


def build_model(arch: str, dataset: str, num_classes: int | None = None) -> NormalizedModel:
    """``NormalizedModel(Normalize(<dataset constants>), <arch>)`` for images of ``dataset``.

    The normalization is the identity (mean 0, std 1) for an architecture that declares it
    (:attr:`ArchSpec.normalization`). ``num_classes`` defaults to the dataset's. Raises ValueError naming
    the valid choices for an unknown architecture or dataset, or the supported datasets for a mismatched pair.
    """
    data = DATASETS[dataset]
    if not isinstance(arch, str):
        raise ValueError(f"architecture name must be a string; got {arch!r}")
    spec = resolve_arch(arch)
    if dataset not in spec.datasets:
        raise ValueError(f"architecture {arch!r} does not support dataset {dataset!r}; "
                         f"it supports: {', '.join(spec.datasets)}")
    if num_classes is None:
        num_classes = data.num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    net = spec.build(num_classes, data.shape[0], data.shape[1])
    return NormalizedModel(_input_normalization(spec, dataset), net, arch=arch, dataset=dataset,
                           num_classes=num_classes, input_shape=data.shape)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as Normalize's mean/std are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
