"""The heat drift table: which Gaussian each heat step approximates, on a problem where the answer is known,
and the experiment-folder entry point (errors, cache of the base's averages, written files)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from rslib.nn import architectures, checkpoints
from rslib.nn.heat import HeatConfig, frozen_copy, heat_step_loss, next_student, teacher_outputs
from rslib.pipeline import heat_drift, layout
from rslib.pipeline.heat_drift import (
    distance_column,
    drift_table,
    gaussian_averages,
    verdict,
    with_sigma,
)

SIGMA = 0.3
WIDTHS = [0.2, 0.3, 0.4, 0.6, 0.8]


class _SharpBase(nn.Module):
    """Three classes in the plane with sharp boundaries: Gaussian averages at different widths differ a lot."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        third = -0.7 * (x[:, 0] + x[:, 1]) + 0.3 * torch.sin(3 * x[:, 0])
        return 6 * torch.stack([x[:, 0], x[:, 1], third], 1)


def _student() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 64), nn.Softplus(beta=5), nn.Linear(64, 64), nn.Softplus(beta=5),
                         nn.Linear(64, 3))


def _heat_steps(gamma: float, steps: int = 3, iterations: int = 500) -> list[nn.Module]:
    """Heat steps with softmax fidelity, trained on inputs spread densely over [-2, 2]^2 (so the
    continuum argument of ``rslib.nn.heat`` applies: gamma = 1/2 is one backward-Euler step over h sigma^2)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.rand(4096, 2, generator=generator) * 4 - 2
    config = HeatConfig(steps=steps, gamma=gamma, sigma=SIGMA, draws=4, eps=0.01, fidelity="softmax")
    teacher, models_after = _SharpBase(), []
    for _ in range(steps):
        student = next_student(teacher, config, _student)
        targets = teacher_outputs(teacher, inputs, "softmax")
        optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
        for _ in range(iterations):
            batch = torch.randint(0, len(inputs), (512,), generator=generator)
            loss, _ = heat_step_loss(student, targets[batch], inputs[batch], config, generator=generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        teacher = frozen_copy(student)
        models_after.append(teacher)
    return models_after


@pytest.fixture(scope="module")
def problem(one_thread):
    """Held-out points in [-1, 1]^2 (away from the training box's edges), labels and 4000-draw averages
    (standard error of each average below 0.008 per point: far below the distances compared)."""
    x = torch.rand(300, 2, generator=torch.Generator().manual_seed(2)) * 2 - 1
    base = _SharpBase()
    y = base(x).argmax(1)
    return base, x, y, gaussian_averages(base, x, WIDTHS, draws=4000, seed=3)


def _moves_away(table: pd.DataFrame) -> bool:
    """Whether some step moves the model away from the average at sigma by more than 0.01 (the
    tolerance: the step-to-step changes near convergence are a few thousandths and depend on training
    round-off; moving away, as with gamma = 5 below, costs 0.1 per step)."""
    return bool((table[distance_column(SIGMA)].diff().iloc[1:] > 0.01).any())


def test_gamma_one_half_tracks_sigma_and_the_reference_gamma_drifts_wider(problem):
    # Measured at these seeds, distance at sigma = 0.3 (base 0.143): gamma = 1/2 gives 0.080, 0.052,
    # 0.049 (closest width 0.2, 0.3, 0.3); gamma = 5 gives 0.107, 0.205, 0.255 (closest width 0.4, 0.8,
    # 0.8): T steps diffuse for 2 gamma sigma^2 = 10 sigma^2 there, sigma^2 with gamma = 1/2.
    base, x, y, averages = problem
    tracking = drift_table(base, _heat_steps(0.5), x, y, WIDTHS, averages, SIGMA)
    assert not _moves_away(tracking), tracking
    assert verdict(tracking, SIGMA)["final_ratio_to_base"] <= heat_drift.TARGET_RATIO, tracking
    assert tracking["closest_width"].iloc[-1] == SIGMA and (tracking["accuracy"] > 0.9).all()
    drifting = drift_table(base, _heat_steps(5.0), x, y, WIDTHS, averages, SIGMA)
    assert _moves_away(drifting) and not verdict(drifting, SIGMA)["tracks_sigma"], drifting
    assert drifting["closest_width"].is_monotonic_increasing and drifting["closest_width"].iloc[-1] >= 0.6
    # The steps move the model at least as far as its distance to the average shrinks (triangle inequality
    # per image, then the mean): the step changes are the actual moves, not zeros.
    at_sigma = tracking[distance_column(SIGMA)]
    assert tracking["step_change"].iloc[0] == 0.0
    assert tracking["step_change"].iloc[1:].sum() >= at_sigma.iloc[0] - at_sigma.iloc[-1] > 0.05
    # The averaged models are smoother than the base: a smaller softmax Jacobian.
    assert (tracking["jacobian_penalty"].iloc[1:] < tracking["jacobian_penalty"].iloc[0]).all()


def test_verdict_and_widths():
    table = pd.DataFrame({distance_column(SIGMA): [0.2, 0.15, 0.12, 0.09], "closest_width": [0.2, 0.3, 0.3, 0.3]})
    table["ratio_to_base"] = table[distance_column(SIGMA)] / 0.2
    assert verdict(table, SIGMA) == pytest.approx({"tracks_sigma": True, "final_ratio_to_base": 0.45,
                                                   "meets_target": True, "target_ratio": heat_drift.TARGET_RATIO})
    table.loc[2, distance_column(SIGMA)] = 0.16   # one step moves away: not tracking, whatever the end
    assert not verdict(table, SIGMA)["tracks_sigma"] and not verdict(table, SIGMA)["meets_target"]
    assert with_sigma([0.5, 0.25, 1.0], 0.3) == [0.25, 0.3, 0.5, 1.0]


def test_a_constant_model_is_its_own_average():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x = torch.rand(5, 1, 2, 2)
    averages = gaussian_averages(model, x, [0.5, 1.0], draws=7)
    assert torch.allclose(averages, torch.softmax(model[1].bias, 0).expand(2, 5, 3))
    assert torch.allclose(heat_drift.distances_to(heat_drift.softmax_of(model, x), averages), torch.zeros(2),
                          atol=1e-6)


def test_monte_carlo_floor_is_the_error_of_one_estimate():
    """Two estimates A + e1, A + e2 with independent N(0, s^2 I_K) errors: the floor recovers the mean
    ||e1|| (about s sqrt(K)). With K = 400 and 300 rows both sides concentrate within ~1%; 3% is allowed."""
    generator = torch.Generator().manual_seed(0)
    exact = torch.rand(300, 400, generator=generator)
    first = exact + 0.01 * torch.randn(300, 400, generator=generator)
    second = exact + 0.01 * torch.randn(300, 400, generator=generator)
    true_error = float((first - exact).norm(dim=-1).mean())
    assert heat_drift.monte_carlo_floor(first, second) == pytest.approx(true_error, rel=0.03)
    assert heat_drift.monte_carlo_floor(exact, exact) == 0.0


def _heat_folder(tmp_path, steps: int = 2):
    """A digits heat experiment folder with a base and ``steps`` step checkpoints (random weights)."""
    base_dir, exp_dir = tmp_path / "base", tmp_path / "heat"
    torch.manual_seed(0)
    base_path = checkpoints.save_checkpoint(layout.checkpoints_dir(base_dir) / layout.FINAL_CHECKPOINT,
                                       architectures.build_model("small_cnn", "digits"), arch="small_cnn",
                                       dataset="digits", num_classes=10)
    for k in range(1, steps + 1):
        checkpoints.save_checkpoint(layout.heat_step_checkpoint(exp_dir, k), architectures.build_model("small_cnn", "digits"),
                               arch="small_cnn", dataset="digits", num_classes=10)
    raw = {"experiment": "heat", "stages": ["train"], "data": {"dataset": "digits"}, "model": {"arch": "small_cnn"},
           "noise": {"sigma": 0.25},
           "train": {"mode": "heat", "heat_base": str(base_path), "heat_steps": steps}}
    (exp_dir / "params.yaml").write_text(yaml.safe_dump(raw))
    return exp_dir


def test_experiment_drift_writes_the_table_and_reuses_the_base_averages(tmp_path, monkeypatch, one_thread):
    exp_dir = _heat_folder(tmp_path)
    table, summary = heat_drift.experiment_drift(exp_dir, images=20, skip=5, draws=16, widths=[0.25, 0.5],
                                                 log=lambda _: None)
    assert table["step"].tolist() == [0, 1, 2] and summary["images"] == 20 and summary["sigma"] == 0.25
    written = pd.read_csv(exp_dir / "results" / "heat_drift.csv")
    pd.testing.assert_frame_equal(written, table, check_dtype=False)
    assert json.loads((exp_dir / "results" / "heat_drift.json").read_text())["widths"] == [0.25, 0.5]
    # the averages at every width, and a second independent estimate at sigma (the Monte-Carlo floor)
    assert len(list((tmp_path / "base" / "results").glob("gaussian_averages_*.pt"))) == 2
    assert summary["monte_carlo_floor"] > 0
    assert summary["floor_ratio_to_base"] == pytest.approx(summary["monte_carlo_floor"] / table["distance_s0.25"].iloc[0])
    calls = []
    monkeypatch.setattr(heat_drift, "gaussian_averages", lambda *a, **k: calls.append(a))
    again, _ = heat_drift.experiment_drift(exp_dir, images=20, skip=5, draws=16, widths=[0.25, 0.5],
                                           log=lambda _: None)
    assert calls == [] and again.equals(table)   # the base's averages came from the cache


def test_experiment_drift_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.yaml"):
        heat_drift.experiment_drift(tmp_path)
    exp_dir = _heat_folder(tmp_path, steps=2)
    layout.heat_step_checkpoint(exp_dir, 2).unlink()
    with pytest.raises(FileNotFoundError, match="heat_step_2.pt"):
        heat_drift.experiment_drift(exp_dir)
    raw = yaml.safe_load((exp_dir / "params.yaml").read_text())
    raw["train"] = {"mode": "noise"}
    (exp_dir / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="not a heat experiment"):
        heat_drift.experiment_drift(exp_dir)


def test_cli_names_the_missing_folder(tmp_path, capsys):
    from rslib.cli import main

    assert main(["heat-drift", str(tmp_path / "nowhere")]) == 2
    assert "params.yaml" in capsys.readouterr().err


class _SteepBetweenData(nn.Module):
    """Two classes split by a steep step at x0 = 0: flat at the data (x0 = +-1), steep between them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([10 * torch.tanh(5 * x[:, 0]), torch.zeros_like(x[:, 0])], 1)


def test_penalty_off_the_data_sees_what_the_penalty_at_the_data_misses():
    # At x0 = +-1 the softmax is saturated and flat (measured: mean squared Jacobian 2e-13); at x + 0.6 z
    # some points land near the step, where it is large (measured mean: 3.0). The thresholds leave orders
    # of magnitude either side, far beyond the 10-draw estimate's noise.
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]).repeat(200, 1)
    y = (x[:, 0] > 0).long().neg().add(1)   # class 0 where x0 > 0
    model = _SteepBetweenData()
    averages = gaussian_averages(model, x, [0.6], draws=64, seed=0)
    noisy = x + 0.6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    row = heat_drift.step_row(0, model, heat_drift.softmax_of(model, x), x, noisy, y, averages, [0.6])
    assert row["accuracy"] == 1.0
    assert row["jacobian_penalty"] < 1e-3 and row["jacobian_penalty_noisy"] > 1.0, row
