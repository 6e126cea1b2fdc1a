"""Architectures, in-model normalization and checkpoints (CPU, small depths where full ones are slow)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from rslib.nn import architectures, checkpoints
from rslib.nn.architectures import Normalize, build_model, count_parameters
from rslib.nn.checkpoints import CheckpointError, load, load_checkpoint, save_checkpoint
from rslib.nn.data import DATASETS
from rslib.nn.releases import strip_state_dict_prefixes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _pixels(batch: int, dataset: str, size: int | None = None) -> torch.Tensor:
    c, h, w = DATASETS[dataset].shape
    if size is not None:
        h = w = size
    return torch.rand(batch, c, h, w)


# ---------------------------------------------------------------- building and forward passes


@pytest.mark.parametrize(
    "arch, dataset",
    [
        ("small_cnn", "digits"),
        ("small_cnn", "mnist"),
        ("lenet", "digits"),
        ("lenet", "mnist"),
        ("cifar_resnet20", "cifar10"),
        ("wrn16_2", "cifar10"),
        ("heat_resnet", "cifar10"),
        # mismatched but supported pairs: the CIFAR nets adapt to one channel and small images
        ("cifar_resnet20", "digits"),
        ("heat_resnet", "digits"),
        ("small_cnn", "cifar10"),
    ],
)
def test_logits_shape_and_finite(arch, dataset):
    model = build_model(arch, dataset).eval()
    x = _pixels(2, dataset)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, DATASETS[dataset].num_classes)
    assert torch.isfinite(y).all()


def test_training_mode_forward_backward_on_digits():
    for arch in ("small_cnn", "lenet"):
        model = build_model(arch, "digits").train()
        x = _pixels(4, "digits")
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("size", [8, 12, 28, 32])
def test_small_cnn_any_square_size(size):
    model = build_model("small_cnn", "mnist").eval()
    assert model(torch.rand(3, 1, size, size)).shape == (3, 10)


def test_lenet_is_classic_lenet5_on_mnist():
    net = build_model("lenet", "mnist").net
    assert net.conv2.padding == (0, 0)  # 14x14 -> 10x10 -> exact 2x2 max pool to 5x5
    x = torch.rand(2, 6, 14, 14)
    a = net.pool2(torch.relu(net.conv2(x)))
    b = nn.functional.max_pool2d(torch.relu(net.conv2(x)), 2)
    torch.testing.assert_close(a, b)
    # 6*(1*25+1) + 16*(6*25+1) + 120*(400+1) + 84*(120+1) + 10*(84+1) = 61,706 (LeNet-5)
    assert count_parameters(net) == 61_706
    assert count_parameters(build_model("lenet", "digits")) == 61_706


@pytest.fixture(scope="module")
def resnet50_imagenet():
    """Built once: ResNet-50's initialisation takes about a second on CPU."""
    torch.manual_seed(0)
    return build_model("resnet50", "imagenet").eval()


def test_resnet50_imagenet_small_forward(resnet50_imagenet):
    with torch.no_grad():
        y = resnet50_imagenet(torch.rand(1, 3, 64, 64))
    assert y.shape == (1, 1000)


def test_channels_last_gives_same_logits():
    model = build_model("cifar_resnet20", "cifar10").eval()
    x = _pixels(2, "cifar10")
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_double_backward_through_heat_resnet():
    # HeatSmoothing regularises the input gradient, which needs a gradient of a gradient.
    model = build_model("heat_resnet", "cifar10").train()
    x = _pixels(2, "cifar10").requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    assert model.net.stem.conv.weight.grad is not None
    assert torch.isfinite(model.net.stem.conv.weight.grad).all()


# ---------------------------------------------------------------- parameter counts


def _cifar_resnet_params(depth: int, classes: int = 10, cin: int = 3) -> int:
    """Closed form for Cohen's CIFAR ResNet: 3x3 convs without bias, BN (2 per channel)."""
    n = (depth - 2) // 6
    total = cin * 16 * 9 + 2 * 16  # stem conv + BN
    c_prev = 16
    for c in (16, 32, 64):
        for j in range(n):
            c_in = c_prev if j == 0 else c
            total += c_in * c * 9 + 2 * c + c * c * 9 + 2 * c  # two conv+BN
            if c_in != c:
                total += c_in * c + 2 * c  # 1x1 projection + BN
        c_prev = c
    return total + 64 * classes + classes


def _wrn_params(depth: int, k: int, classes: int = 10, cin: int = 3) -> int:
    n = (depth - 4) // 6
    total = cin * 16 * 9
    c_prev = 16
    for c in (16 * k, 32 * k, 64 * k):
        for j in range(n):
            c_in = c_prev if j == 0 else c
            total += 2 * c_in + c_in * c * 9 + 2 * c + c * c * 9  # BN, conv, BN, conv
            if c_in != c:
                total += c_in * c
        c_prev = c
    return total + 2 * 64 * k + 64 * k * classes + classes  # final BN + fc


def _heat_params(classes: int = 10, cin: int = 3) -> int:
    # conv weights + one learned bias per output channel (BN has no affine weights)
    total = cin * 16 * 9 + 16
    for i, c in enumerate((16, 32, 64)):
        if i:
            total += (c // 2) * c + c  # 1x1 transition
        total += 5 * 2 * (c * c * 9 + c)
    return total + 64 * classes + classes


def _n_convs(model: nn.Module, k: int) -> int:
    return sum(isinstance(m, nn.Conv2d) and m.kernel_size == (k, k) for m in model.modules())


def test_parameter_counts_match_closed_forms_and_literature(resnet50_imagenet):
    r110 = build_model("cifar_resnet110", "cifar10")
    assert count_parameters(r110) == _cifar_resnet_params(110) == 1_730_714
    assert _n_convs(r110, 3) + 1 == 110  # 109 weighted 3x3 layers + the classifier
    assert count_parameters(build_model("cifar_resnet20", "cifar10")) == _cifar_resnet_params(20)
    assert abs(count_parameters(r110) - 1.7e6) / 1.7e6 < 0.03  # He et al.: 1.7M

    wrn = build_model("wrn40_2", "cifar10")
    assert count_parameters(wrn) == _wrn_params(40, 2) == 2_243_546
    assert abs(count_parameters(wrn) - 2.2e6) / 2.2e6 < 0.03  # Zagoruyko & Komodakis: 2.2M
    # depth 40 = 6n + 4 with n = 6 blocks per stage: 1 + 3 * 6 * 2 = 37 3x3 convs
    assert [len(getattr(wrn.net, f"block{i}")) for i in (1, 2, 3)] == [6, 6, 6]
    assert _n_convs(wrn, 3) == 37 and _n_convs(wrn, 1) == 3
    assert count_parameters(build_model("wrn16_2", "cifar10")) == _wrn_params(16, 2)

    # HeatSmoothing's ResNet34 ([5,5,5], 16/32/64): 488,714 parameters. The 0.46M often quoted for
    # ResNet-32 is He et al.'s version with parameter-free shortcuts and no conv biases.
    heat = build_model("heat_resnet", "cifar10")
    assert count_parameters(heat) == _heat_params() == 488_714
    assert [sum(isinstance(m, architectures._HeatBlock) for m in s) for s in heat.net.stages] == [5, 5, 5]

    assert (
        count_parameters(resnet50_imagenet) == 25_557_032
    )  # torchvision's documented ResNet-50 size


# ---------------------------------------------------------------- normalization inside the model


@pytest.mark.parametrize("dataset", DATASETS.names())
def test_normalization_is_inside(dataset, resnet50_imagenet):
    if dataset == "imagenet":
        model = resnet50_imagenet
    else:
        model = build_model("small_cnn", dataset).eval()
    assert isinstance(model.normalize, Normalize)
    assert list(model.normalize.parameters()) == []
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())
    mean, std = DATASETS[dataset].mean, DATASETS[dataset].std
    assert model.normalize.mean.flatten().tolist() == pytest.approx(mean)
    assert model.normalize.std.flatten().tolist() == pytest.approx(std)
    x = _pixels(2, dataset, size=64 if dataset == "imagenet" else None)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - m) / s))
        torch.testing.assert_close(model(x), model.net(model.normalize(x)))


def test_digits_normalization_constants_match_data():
    from sklearn.datasets import load_digits

    pixels = load_digits().images.astype(np.float64) / 16.0
    (mean,), (std,) = DATASETS["digits"].mean, DATASETS["digits"].std
    assert mean == pytest.approx(pixels.mean(), abs=1e-4)
    assert std == pytest.approx(pixels.std(), abs=1e-4)


def test_normalize_validates():
    with pytest.raises(ValueError, match="one mean and one std"):
        Normalize([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="positive"):
        Normalize([0.1], [0.0])


# ---------------------------------------------------------------- registry errors


def test_unknown_arch_and_dataset_list_valid_names():
    with pytest.raises(ValueError, match=r"unknown architecture 'vgg16'.*small_cnn.*wrn40_2"):
        build_model("vgg16", "cifar10")
    with pytest.raises(ValueError, match=r"unknown architecture 'cifar_resnet21'"):
        build_model("cifar_resnet21", "cifar10")
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'.*digits.*imagenet"):
        build_model("small_cnn", "svhn")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_cnn", "digits", num_classes=0)


def test_mismatched_arch_dataset_names_supported_datasets():
    with pytest.raises(ValueError, match=r"'resnet50' does not support dataset 'digits'.*imagenet"):
        build_model("resnet50", "digits")
    with pytest.raises(ValueError, match=r"supports: digits, mnist, cifar10"):
        build_model("cifar_resnet110", "imagenet")


def test_num_classes_override():
    model = build_model("small_cnn", "digits", num_classes=3)
    assert model(_pixels(2, "digits")).shape == (2, 3)
    assert model.num_classes == 3 and model.input_shape == (1, 8, 8)


# ---------------------------------------------------------------- checkpoints


def _trained_small(arch="small_cnn", dataset="digits"):
    model = build_model(arch, dataset)
    # move BN running statistics away from their defaults so the round trip is meaningful
    model.train()
    with torch.no_grad():
        model(_pixels(8, dataset))
    return model.eval()


def test_checkpoint_round_trip_identical_outputs(tmp_path):
    model = _trained_small()
    path = tmp_path / "ckpt" / "model.pt"
    extra = {
        "params": {"sigma": 0.25, "noise": "gaussian", "shape": (1, 8, 8)},
        "metrics": {"acc": np.float32(0.875), "loss": np.float64(0.3), "n": np.int64(7)},
        "where": tmp_path,
    }
    assert (
        save_checkpoint(
            path, model, arch="small_cnn", dataset="digits", num_classes=10, extra=extra, epoch=3
        )
        == path
    )
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format_version"] == checkpoints.CHECKPOINT_FORMAT_VERSION
    assert (raw["arch"], raw["dataset"], raw["num_classes"], raw["epoch"]) == (
        "small_cnn",
        "digits",
        10,
        3,
    )
    json.dumps(raw["extra"])  # plain JSON after the round trip
    assert raw["extra"]["params"]["shape"] == [1, 8, 8]
    assert raw["extra"]["metrics"]["acc"] == pytest.approx(0.875)
    assert raw["extra"]["where"] == os.fspath(tmp_path)

    ckpt = load_checkpoint(path)
    assert set(ckpt["state_dict"]) == set(model.state_dict())
    loaded = load(path)
    assert not loaded.training
    x = _pixels(5, "digits")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["cifar_resnet20", "wrn16_2", "heat_resnet"])
def test_checkpoint_round_trip_cifar_archs(tmp_path, arch):
    model = _trained_small(arch, "cifar10")
    path = tmp_path / f"{arch}.pt"
    save_checkpoint(path, model, arch=arch, dataset="cifar10", num_classes=10)
    x = _pixels(2, "cifar10")
    with torch.no_grad():
        torch.testing.assert_close(load(path)(x), model(x), rtol=0, atol=0)


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    model = _trained_small()
    wrapped = nn.DataParallel(model)  # on CPU a pass-through whose keys carry "module."
    assert all(k.startswith("module.") for k in wrapped.state_dict())
    path = tmp_path / "dp.pt"
    save_checkpoint(path, wrapped, arch="small_cnn", dataset="digits", num_classes=10)
    assert set(load_checkpoint(path)["state_dict"]) == set(model.state_dict())

    # A foreign checkpoint whose state dict still carries DDP / compile prefixes loads too.
    sd = model.state_dict()
    prefixed = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    assert list(strip_state_dict_prefixes(prefixed)) == list(sd)
    assert list(strip_state_dict_prefixes({f"net._orig_mod.{k}": 0 for k in "ab"})) == [
        "net.a",
        "net.b",
    ]
    raw = torch.load(path, weights_only=True)
    raw["state_dict"] = prefixed
    torch.save(raw, path)
    x = _pixels(3, "digits")
    with torch.no_grad():
        torch.testing.assert_close(load(path)(x), model(x), rtol=0, atol=0)


def test_missing_or_unexpected_key_is_an_error_naming_it(tmp_path):
    model = _trained_small()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, arch="small_cnn", dataset="digits", num_classes=10)
    raw = torch.load(path, weights_only=True)

    bad = dict(raw, state_dict={k: v for k, v in raw["state_dict"].items() if k != "net.fc.weight"})
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match=r"missing keys: net\.fc\.weight") as info:
        load(path)
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)

    extra_key = dict(raw, state_dict={**raw["state_dict"], "net.head.weight": torch.zeros(1)})
    torch.save(extra_key, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: net\.head\.weight"):
        load(path)

    # same keys, wrong architecture metadata: shapes do not fit
    torch.save(dict(raw, num_classes=3), path)
    with pytest.raises(CheckpointError, match=r"shape mismatches.*net\.fc\.weight"):
        load(path)


def test_corrupt_file_is_a_value_error_naming_the_path(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="corrupt or not an rslib checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "--force" in str(info.value)
    with pytest.raises(ValueError, match="corrupt"):
        load(path)

    # truncated real checkpoint
    good = tmp_path / "good.pt"
    save_checkpoint(good, _trained_small(), arch="small_cnn", dataset="digits", num_classes=10)
    path.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(path)


def test_not_an_rslib_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(build_model("small_cnn", "digits").state_dict(), path)  # a bare state dict
    with pytest.raises(ValueError, match=r"a PyTorch checkpoint, not an rslib one.*rslib import-checkpoint") as i:
        load_checkpoint(path)
    assert str(path) in str(i.value)
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not an rslib checkpoint"):
        load_checkpoint(path)
    # a pickle of an arbitrary object is refused by weights_only, never executed
    torch.save({"format_version": 1, "obj": nn.ReLU()}, path)
    with pytest.raises(ValueError, match="corrupt or not an rslib checkpoint"):
        load_checkpoint(path)
    torch.save(
        {
            "format_version": 99,
            "arch": "small_cnn",
            "dataset": "digits",
            "num_classes": 10,
            "state_dict": {},
        },
        path,
    )
    with pytest.raises(ValueError, match="newer than this rslib"):
        load_checkpoint(path)


def test_missing_file_mentions_train_stage(tmp_path):
    path = tmp_path / "nope" / "model.pt"
    with pytest.raises(FileNotFoundError, match="train stage") as info:
        load(path)
    assert str(path) in str(info.value)


def test_optimizer_and_scheduler_state_round_trip(tmp_path):
    model = build_model("small_cnn", "digits").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 2], gamma=0.1)
    x, y = _pixels(8, "digits"), torch.arange(8) % 10
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()
    path = tmp_path / "opt.pt"
    save_checkpoint(
        path,
        model,
        arch="small_cnn",
        dataset="digits",
        num_classes=10,
        optimizer=opt,
        scheduler=sched,
        epoch=1,
    )

    ckpt = torch.load(path, weights_only=True)
    model2 = load(path).train()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.0)
    opt2.load_state_dict(ckpt["optimizer"])
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, milestones=[7], gamma=0.5)
    sched2.load_state_dict(ckpt["scheduler"])
    assert ckpt["epoch"] == 1
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01)
    assert opt2.param_groups[0]["momentum"] == 0.9
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(
            opt.state[p]["momentum_buffer"], opt2.state[p2]["momentum_buffer"], rtol=0, atol=0
        )

    # one more identical step keeps the two models identical
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(p, p2, rtol=0, atol=0)


def test_unsafe_or_non_json_metadata_is_refused(tmp_path):
    model = build_model("small_cnn", "digits")
    path = tmp_path / "m.pt"
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(
            path, model, arch="small_cnn", dataset="digits", num_classes=10, extra={"fn": print}
        )
    with pytest.raises(ValueError, match="unknown architecture"):
        save_checkpoint(path, model, arch="nope", dataset="digits", num_classes=10)
    assert not path.exists() and not list(tmp_path.iterdir())
