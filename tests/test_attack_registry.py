"""Adding an attack is one module: a small attack registered from this test module runs through the
attack stage end to end (validated YAML keys, seeded streams, digest, metadata, rows), and every
registered attack finds the known minimal l2 distance of a linear classifier.

Oracle: the two-class linear classifier with logits (0, w.x + b) has minimal l2 distance
|w.x + b| / ||w||; the inputs sit in the middle of the [0, 1] box, far enough from its faces that the
box never binds at that distance.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from helpers import Linear2
from torch import Tensor, nn

from rslib.core.attacks import ATTACKS, AttackSpec, register_attack
from rslib.core.attacks.base import (
    DEFAULT_RESCUE_SCALES,
    check_inputs,
    default_judge,
    finalize,
    is_success,
)
from rslib.pipeline.params import ParamsError, validate
from rslib.pipeline.stages import attack as attack_stage
from rslib.pipeline.stages import train
from rslib.util.options import Option

pytestmark = pytest.mark.usefixtures("one_thread")


def line_attack(model: nn.Module, x: Tensor, y: Tensor, *, steps: int, judge=None) -> object:
    """Walk along minus the input gradient of the true class's margin, doubling then bisecting the step."""
    y = check_inputs(x, y, (0.0, 1.0))
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        logits = model(xg)
        others = logits.clone()
        others[torch.arange(len(y)), y] = -math.inf
        (grad,) = torch.autograd.grad((logits.gather(1, y[:, None])[:, 0] - others.max(1).values).sum(), xg)
    direction = -grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    lo, hi = torch.zeros(len(x)), torch.full((len(x),), 4.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        with torch.no_grad():
            fooled = is_success(model((x + mid.view(-1, *[1] * (x.dim() - 1)) * direction).clamp(0, 1)).argmax(1),
                                y, False, False)
        hi, lo = torch.where(fooled, mid, hi), torch.where(fooled, lo, mid)
    x_adv = (x + hi.view(-1, *[1] * (x.dim() - 1)) * direction).clamp(0, 1)
    return finalize(x, y, x_adv, torch.ones(len(x), dtype=torch.bool), judge=judge or default_judge(model, 1),
                    targeted=False, abstain_is_success=False, rescue_scales=DEFAULT_RESCUE_SCALES, clip=(0.0, 1.0))


@pytest.fixture
def registered_line():
    spec = register_attack(AttackSpec(
        name="line", stream=90, description="gradient line search (test attack)",
        options=(Option("line_steps", int, 20, ge=1, help="bisection rounds"),),
        attack=lambda model, x, y, options, judge, generator: line_attack(model, x, y, steps=options["line_steps"],
                                                                       judge=judge)))
    yield spec
    ATTACKS.unregister("line")


def test_a_registered_attack_runs_through_the_attack_stage(tmp_path, registered_line):
    raw = {"experiment": "line_exp", "stages": ["train", "attack"], "device": "cpu",
           "data": {"dataset": "digits"}, "model": {"arch": "small_cnn"},
           "train": {"mode": "standard", "epochs": 2},
           "attack": {"attacks": ["line", "ddn"], "line_steps": 12, "ddn_steps": 30, "skip": 45,
                      "images_per_batch": 5}}
    exp = validate(raw)
    assert exp.attack.options("line") == {"line_steps": 12}
    folder = tmp_path / "line_exp"
    train.fit(exp, folder, progress=False, log=lambda *_: None)
    outputs = attack_stage.attack_experiment(exp, folder, progress=False, log=lambda *_: None)
    rows = pd.read_csv(outputs["line"])
    assert len(rows) == 10 and set(rows["attack"]) == {"line"}
    assert (rows.loc[rows["success"], "l2"] > 0).all() and rows.loc[~rows["success"], "l2"].isin([math.inf]).all()
    meta = json.loads(outputs["line"].with_suffix(".json").read_text())
    assert meta["settings"] == {"method": "gradient line search (test attack)", "norm": "l2", "line_steps": 12}
    assert meta["guard"]["digest"] == attack_stage.task_digest(exp, "line")
    best = pd.read_csv(outputs["best"])
    assert (best["l2"] <= rows["l2"] + 1e-9).all()
    # its option changes its own digest only, and an unknown option is refused with the choices named
    other = validate({**raw, "attack": {**raw["attack"], "line_steps": 13}})
    assert attack_stage.task_digest(other, "line") != attack_stage.task_digest(exp, "line")
    assert attack_stage.task_digest(other, "ddn") == attack_stage.task_digest(exp, "ddn")
    assert other.stage_digest("attack") != exp.stage_digest("attack")
    with pytest.raises(ParamsError, match=r"attack.attacks\[0\] must be one of .*line"):
        validate({**raw, "attack": {"attacks": ["lines"]}})
    with pytest.raises(ParamsError, match="line_stepz"):
        validate({**raw, "attack": {"line_stepz": 3}})


def test_a_registered_attack_leaves_other_digests_alone(registered_line):
    raw = {"experiment": "e", "stages": ["attack"], "data": {"dataset": "digits"}}
    with_line = validate(raw)
    ATTACKS.unregister("line")
    try:
        without = validate(raw)
    finally:
        ATTACKS.register("line", registered_line)
    assert with_line.stage_digest("attack") == without.stage_digest("attack")


def test_streams_and_names_are_unique(registered_line):
    with pytest.raises(ValueError, match="stream 90 is taken"):
        register_attack(AttackSpec("other", 90, "x", (), registered_line.attack))
    with pytest.raises(ValueError, match="stream 3 is taken"):  # the L-bound statistics' stream
        register_attack(AttackSpec("other", 3, "x", (), registered_line.attack))
    with pytest.raises(ValueError, match="registered twice"):
        register_attack(AttackSpec("line", 91, "x", (), registered_line.attack))


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_registered_attack_finds_the_linear_minimal_distance(name):
    gen = torch.Generator().manual_seed(0)
    d = 16
    w = torch.randn(d, generator=gen)
    x = 0.4 + 0.2 * torch.rand(48, d, generator=gen)
    b = -float((x @ w).median())
    exact = ((x @ w + b).abs() / w.norm()).double()
    keep = (exact > 0.05) & (exact < 0.3)
    x, exact = x[keep][:16], exact[keep][:16]
    model = Linear2(w, b)
    y = model(x).argmax(1)
    spec = ATTACKS[name]
    options = {option.key: option.default for option in spec.options}
    result = spec.attack(model, x, y, options, None, torch.Generator().manual_seed(1))
    assert bool(result.success.all())
    ratio = result.l2 / exact
    # never below the true minimum (1e-4: float32 rounding); within 6% + eps_max / 2**search_steps (the
    # coarsest default: PGD's bisection precision) of it
    assert float(ratio.min()) >= 1 - 1e-4, name
    assert bool((result.l2 <= 1.06 * exact + 4.0 / 2**8).all()), (name, ratio.max())
