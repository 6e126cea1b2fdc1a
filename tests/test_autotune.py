"""Automatic batch size and memory format: cache round trip, corruption, keys, overrides, invariance, and
the Monte-Carlo loops that use it by default."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from rslib.core import autotune
from rslib.core.attacks import majority_vote_judge
from rslib.core.certify import Smooth, _generator, perturb_with, soft_average, vote_counts
from rslib.core.noises import make_noise


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """An empty disk cache under tmp_path and an empty memory cache, for every test."""
    monkeypatch.setenv("RSLIB_CACHE_DIR", str(tmp_path))
    autotune.clear_memory_cache()
    yield
    autotune.clear_memory_cache()


@pytest.fixture
def counted(monkeypatch):
    """Replace the measurement by a fake one (64 rows, channels_last fastest) that counts its calls."""
    calls = []

    def fake(model, example, sizes, formats, **kwargs):
        calls.append((tuple(sizes), tuple(formats)))
        return [(size, last, 2000.0 if (size, last) == (64, True) else 1000.0) for size in sizes for last in formats]
    monkeypatch.setattr(autotune, "measure", fake)
    return calls


def conv_net(channels: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, channels, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * channels, 3))


def tiny_cnn() -> nn.Module:
    """Two input channels: a 1-channel weight is both contiguous and channels_last, so nothing to convert."""
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_second_call_reads_the_cache(counted):
    model, x = tiny_cnn(), torch.rand(2, 2, 6, 6)
    first = autotune.choose(model, x)
    assert (first.batch_size, first.channels_last, first.source, first.measured) == (64, True, "measured", True)
    again = autotune.choose(model, x)
    autotune.clear_memory_cache()
    from_disk = autotune.choose(tiny_cnn(), x)   # same architecture, other weights: same key
    assert len(counted) == 1
    assert again.source == from_disk.source == "cache"
    assert (from_disk.batch_size, from_disk.channels_last, from_disk.key) == (64, True, first.key)
    assert json.dumps(from_disk.metadata())   # JSON-ready for a certificate's metadata


def test_corrupt_cache_file_is_measured_again(counted):
    model, x = tiny_cnn(), torch.rand(2, 2, 6, 6)
    autotune.choose(model, x)
    (path,) = autotune.cache_dir().glob("*.json")
    for garbage in ("{not json", json.dumps({"key": "another", "batch_size": 64})):
        path.write_text(garbage)
        autotune.clear_memory_cache()
        with pytest.warns(UserWarning, match="cached file unusable"):
            assert autotune.choose(model, x).source == "measured"
    assert len(counted) == 3
    assert json.loads(path.read_text())["batch_size"] == 64


def test_key_changes_with_model_input_and_candidates():
    x = torch.rand(2, 2, 6, 6)
    base = autotune.cache_key(conv_net(), x, (16, 32), (False,), None)
    assert base == autotune.cache_key(conv_net(), x, (16, 32), (False,), None)
    others = [autotune.cache_key(conv_net(8), x, (16, 32), (False,), None),
              autotune.cache_key(tiny_cnn(), x, (16, 32), (False,), None),
              autotune.cache_key(conv_net(), torch.rand(2, 2, 7, 7), (16, 32), (False,), None),
              autotune.cache_key(conv_net(), x.double(), (16, 32), (False,), None),
              autotune.cache_key(conv_net(), x, (16, 32), (False,), torch.bfloat16),
              autotune.cache_key(conv_net(), x, (16,), (False, True), None),
              autotune.cache_key(conv_net(), x, (16, 32), (False,), None, grad=True)]
    assert len({base, *others}) == 1 + len(others)


def test_integer_batch_size_wins(counted):
    model, x = tiny_cnn(), torch.rand(2, 2, 6, 6)
    given = autotune.choose(model, x, batch_size=123, channels_last=False)
    assert (given.batch_size, given.channels_last, given.source, given.key) == (123, False, "given", "")
    assert math.isnan(given.images_per_second) and not counted
    # Only the memory format left to choose: measured at the given size alone.
    assert autotune.choose(model, x, batch_size=123).batch_size == 123
    assert counted == [((123,), (False, True))]
    # No 4-D input or weight: one format, so an integer needs no measurement at all.
    assert autotune.choose(nn.Linear(5, 2), torch.rand(2, 5), batch_size=7).source == "given"
    with pytest.raises(ValueError, match="'auto' or an integer"):
        autotune.choose(model, x, batch_size=0)
    with pytest.raises(ValueError, match="'auto' or an integer"):
        autotune.choose(model, x, batch_size="big")


def test_measured_choice_is_a_candidate_and_the_model_is_left_as_it_was(one_thread):
    model, x = tiny_cnn().train(), torch.rand(2, 2, 6, 6)
    weight = model[0].weight
    data_ptr = weight.data_ptr()
    choice = autotune.choose(model, x, candidates=(8, 16, 32), time_budget=0.2)
    assert choice.measured and choice.batch_size in (8, 16, 32) and choice.images_per_second > 0
    assert model.training and model[0].weight is weight and weight.data_ptr() == data_ptr
    assert weight.is_contiguous()
    with autotune.memory_format(model, True):
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert weight.is_contiguous() and weight.data_ptr() == data_ptr
    # Timing the input gradient (attacks) leaves no gradient on the weights.
    assert autotune.choose(model, x, grad=True, candidates=(8, 16), time_budget=0.1).measured
    assert weight.grad is None


def test_counts_do_not_depend_on_the_batch_size(one_thread):
    weights = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    model = nn.Linear(16, 3)
    with torch.no_grad():
        model.weight.copy_(weights.T)
    x = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    noise = make_noise("Gaussian", 16, sigma=0.5)
    choice = autotune.choose(model, x, candidates=(16, 32, 64), time_budget=0.2)

    def counts(batch_size: int) -> torch.Tensor:
        generators = [_generator(0, i, 1, x.device) for i in range(len(x))]
        return vote_counts(model, x, 500, batch_size, perturb_with(noise, generators))
    reference = counts(choice.batch_size)
    for batch_size in (7, 500, 4096):
        assert torch.equal(counts(batch_size), reference)


def test_smooth_uses_the_measured_choice_by_default_and_restores_the_model(counted):
    model, noise = tiny_cnn(), make_noise("Gaussian", 72, sigma=0.5)
    x, y = torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2])
    smooth = Smooth(model, noise, 3)
    auto = smooth.certify(x, y, n0=20, n=300).to_frame()
    assert (smooth.choice.batch_size, smooth.choice.channels_last) == (64, True)   # the fake's fastest
    assert smooth.choice.metadata()["key"]["input"] == [2, 6, 6]   # what the certificate's metadata records
    assert smooth.predict(x, n=50, alpha=0.01).shape == (3,)
    assert smooth.choice.source == "cache" and len(counted) == 1   # measured once, by the selection draws
    assert model[0].weight.is_contiguous()   # the model is back in its own layout
    # An integer batch size wins and changes nothing but the chunking.
    given = Smooth(model, noise, 3, channels_last=True)
    rows = given.certify(x, y, n0=20, n=300, batch_size=999).to_frame()
    assert (given.choice.batch_size, given.choice.source) == (999, "given")
    timing = ["seconds_predict", "seconds_certify"]
    pd.testing.assert_frame_equal(auto.drop(columns=timing), rows.drop(columns=timing))


def test_vote_judge_and_soft_average_default_to_the_measured_choice(counted):
    model, noise = tiny_cnn(), make_noise("Gaussian", 72, sigma=0.5)
    x = torch.rand(2, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    labels = majority_vote_judge(model, noise, 40, torch.Generator().manual_seed(2))(x)
    assert labels.shape == (2,) and len(counted) == 1
    average = soft_average(model, x, noise, 40, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(average.sum(1), torch.ones(2)) and len(counted) == 1
    with pytest.raises(ValueError, match="'auto' or an integer"):
        majority_vote_judge(model, noise, 40, batch_size=0)
