"""Importing released checkpoints (Cohen et al., SmoothAdv, rs4a, HeatSmoothing) as rslib checkpoints.

Each source gets a small random model laid out exactly as its codebase builds it (the reference
modules below, written from the public code: module names, parameter vs attribute, wrappers), saved
the way its training script saves it. The file is imported, loaded with ``rslib.nn.architectures.load`` and
its logits compared with the reference's on the same input in [0, 1] (eval mode, batch norms with
non-trivial running statistics).
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from rslib.nn import checkpoints
from rslib.nn.checkpoint_import import (
    CheckpointImportError,
    import_checkpoint,
)
from rslib.nn.releases import foreign_checkpoint_hint
from rslib.util.files import file_sha256

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOLERANCE = 1e-5  # max |rslib - reference| / max |reference| over the logits


# ---------------------------------------------------------------- Cohen et al. / SmoothAdv layouts


class CohenNormalizeLayer(nn.Module):
    """datasets.NormalizeLayer: means and sds are plain tensor attributes, so not in the state dict."""

    def __init__(self, means: tuple[float, ...], sds: tuple[float, ...]) -> None:
        super().__init__()
        self.means, self.sds = torch.tensor(means), torch.tensor(sds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.means.view(1, -1, 1, 1)) / self.sds.view(1, -1, 1, 1)


class SmoothAdvInputCenterLayer(nn.Module):
    """SmoothAdv's datasets.InputCenterLayer: subtracts the means only."""

    def __init__(self, means: tuple[float, ...]) -> None:
        super().__init__()
        self.means = torch.tensor(means)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.means.view(1, -1, 1, 1)


class CohenBasicBlock(nn.Module):
    """archs/cifar_resnet.py BasicBlock: the projection shortcut is named ``downsample``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class CohenCifarResNet(nn.Module):
    """archs/cifar_resnet.py ResNet(depth, BasicBlock): conv1, bn1, layer1-3, AvgPool2d(8), fc."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        cin, stages = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(
                nn.Sequential(
                    *[
                        CohenBasicBlock(cin if j == 0 else planes, planes, stride if j == 0 else 1)
                        for j in range(n)
                    ]
                )
            )
            cin = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.avgpool(x).view(x.size(0), -1))


def cohen_model(arch: str, input_layer: nn.Module) -> nn.Sequential:
    """architectures.get_architecture: Sequential(input layer, net); ImageNet's net in DataParallel."""
    if arch == "resnet50":
        return nn.Sequential(
            input_layer, nn.DataParallel(torchvision.models.resnet50(weights=None))
        )
    return nn.Sequential(input_layer, CohenCifarResNet(int(arch.removeprefix("cifar_resnet"))))


def save_cohen(model: nn.Module, arch: str, path, **save_kwargs) -> None:
    """train.py / train_pgd.py: {epoch, arch, state_dict, optimizer}."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ckpt = {
        "epoch": 90,
        "arch": arch,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    torch.save(ckpt, path, **save_kwargs)


# ---------------------------------------------------------------- rs4a layouts


class Rs4aNormalizeLayer(nn.Module):
    """src/architectures.py NormalizeLayer: mu and log_sig are frozen Parameters of shape (C, 1, 1)."""

    def __init__(self, mu: tuple[float, ...], sigma: tuple[float, ...]) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu).reshape(-1, 1, 1), requires_grad=False)
        self.log_sig = nn.Parameter(
            torch.log(torch.tensor(sigma)).reshape(-1, 1, 1), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mu) / torch.exp(self.log_sig)


class Rs4aWideBlock(nn.Module):
    """lib/wide_resnet.py BasicBlock: pre-activation; ``convShortcut`` reads the activated input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal_in_out = cin == cout
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return (x if self.equal_in_out else self.convShortcut(activated)) + out


class Rs4aNetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                Rs4aWideBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                for j in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Rs4aWideResNet(nn.Module):
    """lib/wide_resnet.py WideResNet: conv1, block1-3, bn1, avg_pool2d(8), fc."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10) -> None:
        super().__init__()
        n, widths = (depth - 4) // 6, (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = Rs4aNetworkBlock(n, 16, widths[0], 1)
        self.block2 = Rs4aNetworkBlock(n, widths[0], widths[1], 2)
        self.block3 = Rs4aNetworkBlock(n, widths[1], widths[2], 2)
        self.bn1 = nn.BatchNorm2d(widths[2])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(F.avg_pool2d(out, 8).flatten(1))


class Rs4aLeNet(nn.Module):
    """lib/lenet.py LeNet: conv1 (padding 2), conv2, two 2x2 max pools, fc1-fc3."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = (
            nn.Linear(400, 120),
            nn.Linear(120, 84),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2))), 2).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(out)))))


class Rs4aForecaster(nn.Module):
    """src/architectures.py: ``norm`` then ``model``; WideResNet/ResNet wrap both in DataParallel, LeNet neither."""

    def __init__(self, norm: nn.Module, model: nn.Module, data_parallel: bool) -> None:
        super().__init__()
        self.norm = nn.DataParallel(norm) if data_parallel else norm
        self.model = nn.DataParallel(model) if data_parallel else model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.norm(x))


# ---------------------------------------------------------------- HeatSmoothing layouts


class HeatConv(nn.Module):
    """cvmodels/blocks.py Conv: own weight and bias, BatchNorm2d(affine=False) between them."""

    def __init__(self, cin: int, cout: int, kernel: int, relu: bool) -> None:
        super().__init__()
        bound = 1 / math.sqrt(cin * kernel * kernel)
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(cout).uniform_(-bound, bound))
        self.bn = nn.BatchNorm2d(cout, affine=False)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(F.conv2d(x, self.weight, None, 1, self.weight.shape[-1] // 2)) + self.bias.view(
            1, -1, 1, 1
        )
        return F.relu(y) if self.relu else y


class HeatLinear(nn.Module):
    """cvmodels/blocks.py Linear (last layer): weight, BatchNorm1d(affine=False), bias."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin).uniform_(-0.2, 0.2))
        self.bias = nn.Parameter(torch.empty(cout).uniform_(-0.2, 0.2))
        self.bn = nn.BatchNorm1d(cout, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.linear(x, self.weight)) + self.bias.view(1, -1)


class HeatBasicBlock(nn.Module):
    """cvmodels/blocks.py BasicBlock: relu(x + conv1(conv0(x)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = HeatConv(channels, channels, 3, relu=True)
        self.conv1 = HeatConv(channels, channels, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv1(self.conv0(x)))


class HeatResNet34(nn.Module):
    """cvmodels/cifar.py ResNet34 = resnet.py ResNet([5, 5, 5]): layer0, layers, mean pool, fc."""

    def __init__(self, blocks: tuple[int, ...] = (5, 5, 5), num_classes: int = 10) -> None:
        super().__init__()
        self.layer0 = HeatConv(3, 16, 3, relu=True)
        stages, c = [], 16
        for i, n in enumerate(blocks):
            sub: list[nn.Module] = []
            if i > 0:
                sub += [HeatConv(c, 2 * c, 1, relu=True), nn.AvgPool2d(2)]
                c *= 2
            stages.append(nn.Sequential(*sub, *[HeatBasicBlock(c) for _ in range(n)]))
        self.layers = nn.Sequential(*stages)
        self.fc = HeatLinear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.layer0(x)).flatten(2).mean(-1))


def heat_imagenet_model() -> nn.Sequential:
    """imagenet/certify/certify.py: BatchNorm2d(3, affine=False) with the ImageNet stats, then resnet50."""
    net = torchvision.models.resnet50(weights=None)
    randomize_batchnorm(net)
    input_bn = nn.BatchNorm2d(3, affine=False)
    input_bn.running_mean = torch.tensor(IMAGENET_MEAN)
    input_bn.running_var = torch.tensor(IMAGENET_STD) ** 2
    return nn.Sequential(input_bn, net)


# ---------------------------------------------------------------- helpers


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial running statistics (and affine weights) in every batch norm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(1234)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=gen) * 0.5 - 0.25)


def import_and_compare(
    src, reference: nn.Module, x: torch.Tensor, dst, **kwargs
) -> tuple[float, nn.Module]:
    """Import ``src`` into ``dst`` and load it with rslib: (max relative logit difference from
    ``reference`` on ``x``, the loaded model)."""
    import_checkpoint(src, dst, **kwargs)
    torch.load(dst, weights_only=True)  # an rslib checkpoint: plain tensors and values only
    imported = checkpoints.load(dst)
    with torch.no_grad():
        expected, got = reference.eval()(x), imported(x)
    assert got.shape == expected.shape
    return ((got - expected).abs().max() / expected.abs().max()).item(), imported


def pixels(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(7))


def imported_from(path) -> dict:
    return checkpoints.load_checkpoint(path)["extra"]["imported_from"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cohen_cifar_file(tmp_path):
    model = cohen_model("cifar_resnet20", CohenNormalizeLayer(CIFAR_MEAN, CIFAR_STD))
    randomize_batchnorm(model)
    save_cohen(model, "cifar_resnet20", tmp_path / "checkpoint.pth.tar")
    return tmp_path / "checkpoint.pth.tar", model


# ---------------------------------------------------------------- logits match, per source


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy-non-zip"])
def test_cohen_cifar_resnet20(tmp_path, legacy_format):
    model = cohen_model("cifar_resnet20", CohenNormalizeLayer(CIFAR_MEAN, CIFAR_STD))
    randomize_batchnorm(model)
    src = tmp_path / "checkpoint.pth.tar"
    save_cohen(model, "cifar_resnet20", src, _use_new_zipfile_serialization=not legacy_format)
    diff, loaded = import_and_compare(
        src, model, pixels(4, 3, 32, 32), tmp_path / "out.pt", source="cohen"
    )
    assert diff < TOLERANCE
    assert (loaded.arch, loaded.dataset, loaded.num_classes) == ("cifar_resnet20", "cifar10", 10)
    provenance = imported_from(tmp_path / "out.pt")
    assert provenance["sha256"] == file_sha256(src)
    assert (provenance["source"], provenance["original_arch"]) == ("cohen", "cifar_resnet20")
    assert provenance["input_layer"] == "NormalizeLayer (mean, std)"
    assert provenance["file_info"] == {"epoch": 90, "arch": "cifar_resnet20"}


def test_cohen_imagenet_resnet50_keys_1_module(tmp_path):
    model = cohen_model("resnet50", CohenNormalizeLayer(IMAGENET_MEAN, IMAGENET_STD))
    randomize_batchnorm(model)
    src = tmp_path / "checkpoint.pth.tar"
    save_cohen(model, "resnet50", src)
    assert next(iter(torch.load(src, weights_only=True)["state_dict"])).startswith("1.module.")
    diff, loaded = import_and_compare(
        src, model, pixels(1, 3, 64, 64), tmp_path / "out.pt", source="cohen"
    )
    assert diff < TOLERANCE
    assert (loaded.arch, loaded.dataset) == ("resnet50", "imagenet")
    torch.testing.assert_close(loaded.normalize.std.flatten(), torch.tensor(IMAGENET_STD))


@pytest.mark.parametrize("input_layer", ["center", "normalize"])
def test_smoothadv_cifar_input_layers(tmp_path, input_layer):
    layer = (
        SmoothAdvInputCenterLayer(CIFAR_MEAN)
        if input_layer == "center"
        else CohenNormalizeLayer(CIFAR_MEAN, CIFAR_STD)
    )
    model = cohen_model("cifar_resnet20", layer)
    randomize_batchnorm(model)
    save_cohen(model, "cifar_resnet20", tmp_path / "checkpoint.pth.tar")
    diff, loaded = import_and_compare(
        tmp_path / "checkpoint.pth.tar",
        model,
        pixels(4, 3, 32, 32),
        tmp_path / "out.pt",
        source="smoothadv",
        input_layer=input_layer,
    )
    assert diff < TOLERANCE
    expected_std = torch.ones(3) if input_layer == "center" else torch.tensor(CIFAR_STD)
    torch.testing.assert_close(loaded.normalize.std.flatten(), expected_std)


def test_rs4a_wide_resnet_40_2(tmp_path):
    sigma = (0.25, 0.2, 0.3)  # any stored normalization is taken from the file
    model = Rs4aForecaster(
        Rs4aNormalizeLayer(CIFAR_MEAN, sigma), Rs4aWideResNet(40, 2), data_parallel=True
    )
    randomize_batchnorm(model)
    src = tmp_path / "cifar_uniform_050.pt"
    torch.save(model.state_dict(), src)  # src/train.py saves the bare state dict
    assert {"norm.module.mu", "norm.module.log_sig", "model.module.bn1.weight"} <= torch.load(
        src, weights_only=True
    ).keys()
    diff, loaded = import_and_compare(
        src, model, pixels(4, 3, 32, 32), tmp_path / "out.pt", source="rs4a"
    )
    assert diff < TOLERANCE
    assert loaded.arch == "wrn40_2"
    torch.testing.assert_close(loaded.normalize.std.flatten(), torch.tensor(sigma))


def test_rs4a_lenet_mnist_without_data_parallel(tmp_path):
    model = Rs4aForecaster(
        Rs4aNormalizeLayer((0.1307,), (0.3081,)), Rs4aLeNet(), data_parallel=False
    )
    src = tmp_path / "mnist_lenet.pt"
    torch.save(model.state_dict(), src)
    diff, loaded = import_and_compare(
        src, model, pixels(4, 1, 28, 28), tmp_path / "out.pt"
    )  # source recognised
    assert diff < TOLERANCE
    assert (imported_from(tmp_path / "out.pt")["source"], loaded.arch, loaded.dataset) == (
        "rs4a",
        "lenet",
        "mnist",
    )


@pytest.mark.parametrize("data_parallel", [False, True], ids=["single-gpu", "module-prefix"])
def test_heatsmoothing_cifar_resnet34(tmp_path, data_parallel):
    net = HeatResNet34()
    randomize_batchnorm(net)
    saved = nn.DataParallel(net) if data_parallel else net
    src = tmp_path / "best.pth.tar"
    ckpt = {
        "ix": 3,
        "epoch": 200,
        "model": "ResNet34",
        "state_dict": saved.state_dict(),
        "pct_err": 7.5,
        "loss": 0.31,
    }
    torch.save(ckpt, src)  # cifar10/train.py's format
    diff, loaded = import_and_compare(
        src, net, pixels(4, 3, 32, 32), tmp_path / "out.pt", source="heatsmoothing"
    )
    assert diff < TOLERANCE
    provenance = imported_from(tmp_path / "out.pt")
    assert (provenance["original_arch"], provenance["mean"], provenance["std"]) == (
        "ResNet34",
        [0.0] * 3,
        [1.0] * 3,
    )
    assert loaded.arch == "heat_resnet"


def test_heatsmoothing_imagenet_resnet50_batchnorm_input(tmp_path):
    model = heat_imagenet_model()
    src = tmp_path / "checkpoint.pth.tar"
    ckpt = {"epoch": 30, "state_dict": nn.DataParallel(model[1]).state_dict(), "best_top5": 93.0}
    torch.save(ckpt, src)  # imagenet/train.py's save_checkpoint (without the optimizer)
    diff, loaded = import_and_compare(
        src, model, pixels(1, 3, 64, 64), tmp_path / "out.pt", source="heatsmoothing"
    )
    assert diff < TOLERANCE
    torch.testing.assert_close(
        loaded.normalize.std.flatten(), torch.sqrt(torch.tensor(IMAGENET_STD) ** 2 + 1e-5)
    )


# ---------------------------------------------------------------- refusals


def test_smoothadv_needs_input_layer(cohen_cifar_file, tmp_path):
    src, _ = cohen_cifar_file
    with pytest.raises(
        CheckpointImportError, match="--input-layer normalize.*--input-layer center"
    ):
        import_checkpoint(src, tmp_path / "out.pt", source="smoothadv")
    assert not (tmp_path / "out.pt").exists()


def test_cohen_layout_without_source_is_ambiguous(cohen_cifar_file, tmp_path):
    src, _ = cohen_cifar_file
    with pytest.raises(CheckpointImportError, match="pass --source cohen, or --source smoothadv"):
        import_checkpoint(src, tmp_path / "out.pt")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"source": "rs4a"},
            "--source rs4a, but the file is laid out as Cohen.*pass --source cohen or --source smoothadv",
        ),
        (
            {"source": "cohen", "input_layer": "center"},
            "--input-layer is for --source smoothadv only",
        ),
        (
            {"source": "cohen", "arch": "cifar_resnet110"},
            "--arch cifar_resnet110, but the file holds cifar_resnet20",
        ),
        ({"source": "cohen", "dataset": "imagenet"}, "--dataset imagenet, but the file holds"),
        ({"source": "madry"}, "unknown source 'madry'"),
        ({"source": "smoothadv", "input_layer": "scale"}, "unknown input layer 'scale'"),
    ],
)
def test_contradicting_choices_are_refused(cohen_cifar_file, tmp_path, kwargs, message):
    src, _ = cohen_cifar_file
    with pytest.raises(CheckpointImportError, match=message):
        import_checkpoint(src, tmp_path / "out.pt", **kwargs)


@pytest.mark.parametrize(
    "content, message",
    [
        (
            {"state_dict": {"encoder.weight": torch.zeros(2)}},
            r"recognised: the layout HeatSmoothing.*not recognised: its network \(keys 'encoder.weight'\)",
        ),
        (
            {"features.0.weight": torch.zeros(2)},
            r"recognised: a state dict of 1 tensors.*not recognised: the layout of any known release",
        ),
        ({"weights": [1, 2]}, r"recognised: a dict with keys 'weights'.*not recognised"),
        ([torch.zeros(2)], r"recognised: a list, not a dict"),
        (
            {"norm.mean": torch.zeros(3), "model.fc.weight": torch.zeros(2)},
            r"recognised: rs4a.*not recognised: its normalization, which needs 'norm.mu' and 'norm.log_sig'",
        ),
    ],
    ids=["unknown-network", "bare-state-dict", "no-tensors", "not-a-dict", "rs4a-without-mu"],
)
def test_unknown_layouts_say_what_was_recognised(tmp_path, content, message):
    torch.save(content, tmp_path / "model.pt")
    with pytest.raises(CheckpointImportError, match=message):
        import_checkpoint(tmp_path / "model.pt", tmp_path / "out.pt")


def _fake_keys(names: list[str]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(1) for name in names}


@pytest.mark.parametrize(
    "content, source, message",
    [
        (
            {
                "state_dict": {
                    f"1.{k}": v
                    for k, v in CohenCifarResNet(8, num_classes=1000).state_dict().items()
                }
            },
            "smoothadv",
            r"cifar_resnet8 with 1000 classes.*imagenet32_resnet110",
        ),
        (
            _fake_keys(
                [
                    "norm.mu",
                    "norm.log_sig",
                    "model.conv1.weight",
                    "model.layer1.0.conv1.weight",
                    "model.linear.weight",
                ]
            ),
            "rs4a",
            r"rs4a's CIFAR ResNet-110 \(classic_resnet110",
        ),
        (
            {
                "state_dict": {
                    f"1.module.{k}": v
                    for k, v in _fake_keys(
                        [f"layer{i}.{j}.conv1.weight" for i in range(1, 5) for j in range(2)]
                        + ["fc.weight"]
                    ).items()
                }
            },
            "cohen",
            r"torchvision ResNet with basic blocks \(2, 2, 2, 2\).*only torchvision ResNet is resnet50",
        ),
        (
            {"state_dict": HeatResNet34(blocks=(2, 2, 2)).state_dict()},
            "heatsmoothing",
            r"HeatSmoothing ResNet with blocks \[2, 2, 2\]",
        ),
    ],
    ids=["smoothadv-imagenet32", "rs4a-option-a-resnet110", "cohen-resnet18", "heat-resnet-2-2-2"],
)
def test_architectures_rslib_lacks_are_refused(tmp_path, content, source, message):
    kwargs = {"input_layer": "normalize"} if source == "smoothadv" else {}
    torch.save(content, tmp_path / "model.pt")
    with pytest.raises(CheckpointImportError, match=message):
        import_checkpoint(tmp_path / "model.pt", tmp_path / "out.pt", source=source, **kwargs)


def test_tensors_that_do_not_fit_are_listed(tmp_path):
    state = {
        k: v for k, v in HeatResNet34().state_dict().items() if not k.endswith(".bias")
    }  # trained without bias
    torch.save({"state_dict": state}, tmp_path / "model.pt")
    with pytest.raises(
        CheckpointImportError,
        match=r"ResNet34; not recognised: a variant .* 'heat_resnet' \(missing keys: net.fc_bias, net.stem.bias",
    ):
        import_checkpoint(tmp_path / "model.pt", tmp_path / "out.pt")


class Pickled:
    """Not loadable with weights_only=True."""


def test_pickled_objects_are_never_loaded(tmp_path):
    torch.save({"state_dict": {}, "args": Pickled()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointImportError, match=r"weights_only=True.*never unpickles"):
        import_checkpoint(tmp_path / "model.pt", tmp_path / "out.pt", source="cohen")


def test_source_file_is_never_overwritten(cohen_cifar_file):
    src, _ = cohen_cifar_file
    with pytest.raises(CheckpointImportError, match="DST must differ from SRC"):
        import_checkpoint(src, src, source="cohen")


def test_missing_source_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to import"):
        import_checkpoint(tmp_path / "absent.pth.tar", tmp_path / "out.pt", source="cohen")


# ---------------------------------------------------------------- the hint for checkpoints.load


def test_foreign_checkpoint_hint(cohen_cifar_file, tmp_path):
    src, _ = cohen_cifar_file
    hint = foreign_checkpoint_hint(src, torch.load(src, weights_only=True))
    assert (
        f"rslib import-checkpoint {src} OUT.pt --source cohen or --source smoothadv --input-layer"
        in hint
    )
    rs4a = {
        "norm.mu": torch.zeros(1, 1, 1),
        "norm.log_sig": torch.zeros(1, 1, 1),
        "model.fc3.weight": torch.zeros(1),
    }
    assert "--source rs4a" in foreign_checkpoint_hint("m.pt", rs4a)
    assert "matches no release rslib imports" in foreign_checkpoint_hint(
        "m.pt", {"w": torch.zeros(1)}
    )
    import_checkpoint(src, tmp_path / "out.pt", source="cohen")
    assert foreign_checkpoint_hint("out.pt", checkpoints.load_checkpoint(tmp_path / "out.pt")) is None
    assert foreign_checkpoint_hint("x.pt", [1, 2]) is None
    assert foreign_checkpoint_hint("x.pt", {"step": 3}) is None


def test_load_on_a_released_file_says_to_import(cohen_cifar_file):
    src, _ = cohen_cifar_file
    with pytest.raises(checkpoints.CheckpointError, match="rslib import-checkpoint"):
        checkpoints.load(src)


def test_command_line_import(cohen_cifar_file, tmp_path, capsys):
    from rslib import cli

    src, _ = cohen_cifar_file
    out = tmp_path / "imported.pt"
    assert cli.main(["import-checkpoint", str(src), str(out), "--source", "cohen"]) == cli.EXIT_OK
    assert "wrote" in capsys.readouterr().out and checkpoints.load(out).arch.startswith("cifar_resnet")
    assert cli.main(["import-checkpoint", str(src), str(tmp_path / "x.pt")]) == cli.EXIT_INVALID
    assert "--source" in capsys.readouterr().err
