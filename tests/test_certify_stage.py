"""Dataset-level certification: rows on disk, resume, torn partial files, 2-process gloo, stale partials."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, set_rank_env
from scipy.stats import norm

from rslib.core import metrics
from rslib.core.certify import Smooth
from rslib.core.lbound import LBOUND_COLUMNS
from rslib.core.metrics import certified_accuracy
from rslib.nn.data import load_dataset, subset
from rslib.pipeline.params import ParamsError, validate
from rslib.pipeline.stages import certify as certify_stage
from rslib.pipeline.stages import train

SKIP = 15                     # digits test split: 450 images -> 30 selected
IMAGES_PER_BATCH = 8          # -> batches of 8, 8, 8, 6
BASE = {
    "experiment": "certify_test",
    "seed": 0,
    "device": "cpu",
    "stages": ["train", "certify"],
    "data": {"dataset": "digits", "batch_size": 64},
    "model": {"arch": "small_cnn"},
    "noise": {"name": "Gaussian", "sigma": 0.25},
    "train": {"mode": "noise", "epochs": 2, "lr": 0.1},
    "certify": {"n0": 100, "n": 500, "alpha": 0.001, "batch_size": 1024, "images_per_batch": IMAGES_PER_BATCH,
                "skip": SKIP},
}
TIMING = ["seconds_predict", "seconds_certify"]


def quiet(*_):
    pass


def experiment(name: str = "certify_test", **certify):
    raw = {**BASE, "experiment": name, "certify": {**BASE["certify"], **certify}}
    return validate(raw)


def selection() -> list[int]:
    return subset(load_dataset("digits", "test"), SKIP)[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A 2-epoch noise-trained digits model, certified once without interruption (the reference)."""
    folder = tmp_path_factory.mktemp("certify") / "reference"
    exp = experiment("reference")
    train.fit(exp, folder, progress=False, log=quiet)
    csv = certify_stage.certify_experiment(exp, folder, progress=False, log=quiet)
    return folder / "checkpoints" / "model.pt", csv


def with_checkpoint(trained, name: str = "certify_test", **certify):
    return experiment(name, checkpoint=str(trained[0]), **certify)


def comparable(path) -> pd.DataFrame:
    return pd.read_csv(path).drop(columns=TIMING)


class Counting:
    """Replaces Smooth.certify: records the indices of every call, optionally fails on call ``fail_on``."""

    def __init__(self, monkeypatch, fail_on: int | None = None):
        self.real = Smooth.certify
        self.calls: list[list[int]] = []
        self.fail_on = fail_on
        monkeypatch.setattr(Smooth, "certify", self)

    def __get__(self, smooth, owner):
        return lambda *args, **kwargs: self(smooth, *args, **kwargs)

    def __call__(self, smooth, *args, indices=None, **kwargs):
        if self.fail_on is not None and len(self.calls) + 1 == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append(list(indices))
        return self.real(smooth, *args, indices=indices, **kwargs)

    @property
    def indices(self) -> list[int]:
        return [i for call in self.calls for i in call]


def interrupt_after_two_batches(exp, folder, monkeypatch) -> list[int]:
    counting = Counting(monkeypatch, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        certify_stage.certify_experiment(exp, folder, progress=False, log=quiet)
    monkeypatch.setattr(Smooth, "certify", counting.real)
    assert not (folder / "results" / "certify.csv").exists()
    return counting.indices


# --- 1: rows on disk -----------------------------------------------------------------------------

def test_certify_writes_one_row_per_selected_image(trained):
    csv = trained[1]
    table = pd.read_csv(csv)
    assert list(table.columns) == certify_stage.ROW_COLUMNS
    assert table["idx"].tolist() == selection()
    assert (table["n"] == 500).all() and (table["n0"] == 100).all() and (table["alpha"] == 0.001).all()
    assert table["correct"].mean() > 0.5  # a 2-epoch model is far better than chance (0.1)
    radius = np.where(table["prob_lb"] > 0.5, 0.25 * norm.ppf(table["prob_lb"]), 0.0)
    np.testing.assert_allclose(table["radius_l2"], radius, rtol=1e-9, atol=1e-12)
    results = csv.parent
    assert sorted(p.name for p in results.iterdir() if p.name.startswith(".certify")) == []
    meta = json.loads((results / "certify.json").read_text())
    assert meta["guard"]["digest"] == experiment("reference").stage_digest("certify")
    assert meta["selection"]["images"] == 30 and meta["world_size"] == 1
    assert meta["noise"]["name"] == "Gaussian" and meta["seed"] == 0
    assert meta["provenance"]["torch_version"] == torch.__version__
    assert meta["timing"]["seconds_per_image"] > 0 and meta["lbound"] is None
    assert meta["checkpoint"]["train_mode"] == "noise"
    # batch_size 1024 was given, the memory format measured (certify.channels_last: auto)
    assert meta["autotune"]["batch_size"] == 1024 and meta["autotune"]["key"]["formats"] == [False, True]
    l2 = next(s for s in meta["summary"] if s["norm"] == "l2")
    assert l2["certified_accuracy_r0"] == pytest.approx(table["correct"].mean())


def test_finished_certification_is_not_repeated(trained, monkeypatch):
    folder = trained[1].parent.parent
    stamp = trained[1].stat().st_mtime_ns
    counting = Counting(monkeypatch)
    exp = validate({**experiment("reference").to_dict(), "description": "edited text does not invalidate"})
    assert certify_stage.certify_experiment(exp, folder, progress=False, log=quiet) == trained[1]
    assert counting.calls == [] and trained[1].stat().st_mtime_ns == stamp


# --- 2: resume -----------------------------------------------------------------------------------

def test_interrupted_certification_resumes_without_redoing_rows(trained, tmp_path, monkeypatch):
    exp = with_checkpoint(trained)
    first = interrupt_after_two_batches(exp, tmp_path, monkeypatch)
    assert first == selection()[:2 * IMAGES_PER_BATCH]
    partial = tmp_path / "results" / ".certify.rank0.partial.csv"
    assert len(pd.read_csv(partial)) == 2 * IMAGES_PER_BATCH
    counting = Counting(monkeypatch)
    csv = certify_stage.certify_experiment(exp, tmp_path, progress=False, log=quiet)
    assert counting.indices == selection()[2 * IMAGES_PER_BATCH:]
    pd.testing.assert_frame_equal(comparable(csv), comparable(trained[1]))
    assert not partial.exists()


def test_resume_with_another_number_of_processes(trained, tmp_path, monkeypatch):
    """Rows written by rank 1 of an earlier 2-process run count as done for a 1-process resume."""
    exp = with_checkpoint(trained)
    interrupt_after_two_batches(exp, tmp_path, monkeypatch)
    results = tmp_path / "results"
    (results / ".certify.rank0.partial.csv").rename(results / ".certify.rank1.partial.csv")
    counting = Counting(monkeypatch)
    csv = certify_stage.certify_experiment(exp, tmp_path, progress=False, log=quiet)
    assert counting.indices == selection()[2 * IMAGES_PER_BATCH:]
    pd.testing.assert_frame_equal(comparable(csv), comparable(trained[1]))
    assert not list(results.glob(".certify*"))


# --- 3: torn / corrupt partial lines -------------------------------------------------------------

def test_torn_and_corrupt_partial_lines_are_recertified(trained, tmp_path, monkeypatch):
    exp = with_checkpoint(trained)
    interrupt_after_two_batches(exp, tmp_path, monkeypatch)
    partial = tmp_path / "results" / ".certify.rank0.partial.csv"
    lines = partial.read_text().split("\n")  # header, 16 rows, ""
    lines[4] = lines[4].replace(",True,", ",Maybe,", 1)   # row 3: a value that does not parse
    lines[6] = lines[6].rsplit(",", 3)[0]                # row 5: missing fields
    text = "\n".join(lines)
    partial.write_text(text[:-8])                        # row 15: torn mid-write (no newline)
    damaged = [selection()[i] for i in (3, 5, 15)]
    logs: list[str] = []
    counting = Counting(monkeypatch)
    csv = certify_stage.certify_experiment(exp, tmp_path, progress=False, log=logs.append)
    assert sorted(counting.indices) == sorted(damaged + selection()[2 * IMAGES_PER_BATCH:])
    assert any("torn or unreadable" in line for line in logs)
    pd.testing.assert_frame_equal(comparable(csv), comparable(trained[1]))


def test_read_partial_tolerates_garbage(tmp_path):
    path = tmp_path / "p.csv"
    assert certify_stage.certify_table(tmp_path).read_partial(path)[0].empty
    path.write_text("idx,lab")
    rows, clean = certify_stage.certify_table(tmp_path).read_partial(path)
    assert rows.empty and not clean
    path.write_bytes(b"\x00\xff garbage\n1,2,3\n")
    rows, clean = certify_stage.certify_table(tmp_path).read_partial(path)
    assert rows.empty and not clean


# --- 4: two processes on gloo --------------------------------------------------------------------

def _worker(rank: int, world: int, port: int, raw: dict, out: str) -> None:
    set_rank_env(rank, world, port)
    certify_stage.certify_experiment(validate(raw), out, progress=False, log=quiet)
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_give_the_rows_of_one(trained, tmp_path):
    raw = with_checkpoint(trained, "ddp").to_dict()
    mp.start_processes(_worker, args=(2, free_port(), raw, str(tmp_path)), nprocs=2, start_method="spawn")
    csv = tmp_path / "results" / "certify.csv"
    pd.testing.assert_frame_equal(comparable(csv), comparable(trained[1]))
    assert json.loads((tmp_path / "results" / "certify.json").read_text())["world_size"] == 2
    assert not list((tmp_path / "results").glob(".certify*"))


# --- 5: stale partial files ----------------------------------------------------------------------

def test_changed_parameters_discard_stale_partials(trained, tmp_path, monkeypatch):
    interrupt_after_two_batches(with_checkpoint(trained), tmp_path, monkeypatch)
    logs: list[str] = []
    counting = Counting(monkeypatch)
    csv = certify_stage.certify_experiment(with_checkpoint(trained, n=400), tmp_path, progress=False,
                                         log=logs.append)
    assert counting.indices == selection()
    assert any("discarding 1 partial" in line for line in logs)
    table = pd.read_csv(csv)
    assert len(table) == 30 and (table["n"] == 400).all()


def test_changed_parameters_recertify_a_finished_result(trained, tmp_path, monkeypatch):
    certify_stage.certify_experiment(with_checkpoint(trained, n=300), tmp_path, progress=False, log=quiet)
    counting = Counting(monkeypatch)
    csv = certify_stage.certify_experiment(with_checkpoint(trained, n=200), tmp_path, progress=False, log=quiet)
    assert counting.indices == selection() and (pd.read_csv(csv)["n"] == 200).all()


# --- deterministic models: the approximate L-bound -----------------------------------------------

def test_deterministic_model_gets_the_approximate_lbound(trained, tmp_path):
    exp = with_checkpoint(trained, deterministic=True, n=100)
    certify_stage.certify_experiment(exp, tmp_path, progress=False, log=quiet)
    table, meta, lbound = certify_stage.read_results(tmp_path)
    assert list(lbound.columns) == LBOUND_COLUMNS
    assert lbound["idx"].tolist() == selection() and lbound["approximate"].all() and (lbound["norm"] == "l2").all()
    np.testing.assert_allclose(lbound["radius"], 0.25 * math.sqrt(math.pi / 2) * lbound["margin"], rtol=1e-6)
    assert ((lbound["margin"] >= 0) & (lbound["margin"] <= 1)).all()
    info = meta["lbound"]
    assert info["approximate"] is True and "APPROXIMATE" in info["note"]
    assert info["seconds_per_image_one_pass"] > 0 and info["monte_carlo_n0"] == 100
    assert info["speedup_one_pass_vs_monte_carlo"] == pytest.approx(
        info["seconds_per_image_monte_carlo_prediction"] / info["seconds_per_image_one_pass"])
    assert len(table) == 30


def test_lbound_needs_gaussian_noise(trained, tmp_path):
    raw = {**with_checkpoint(trained, deterministic=True).to_dict(), "noise": {"name": "Laplace", "sigma": 0.25}}
    with pytest.raises(ValueError, match="certify.deterministic"):
        certify_stage.certify_experiment(validate(raw), tmp_path, progress=False, log=quiet)


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="train the model first"):
        certify_stage.certify_experiment(experiment(), tmp_path, progress=False, log=quiet)


# --- curves and parameters -----------------------------------------------------------------------

def test_accuracy_curves_are_the_exact_step_function(trained):
    table = pd.read_csv(trained[1])
    curves = metrics.accuracy_curves(table)
    for label, part in curves.groupby("norm"):
        assert part["radius"].iloc[0] == 0 and part["certified_accuracy"].iloc[0] == table["correct"].mean()
        assert part["certified_accuracy"].iloc[-1] == 0 and part["certified_accuracy"].is_monotonic_decreasing
        # between two grid points the accuracy is that of the right one (steps-pre)
        middle = (part["radius"].to_numpy()[:-1] + part["radius"].to_numpy()[1:]) / 2
        np.testing.assert_allclose(certified_accuracy(table, middle, label), part["certified_accuracy"].to_numpy()[1:])
    assert set(curves["source"]) == {"l2"}  # Gaussian: every norm from the l2 certificate


def test_certify_params_defaults_and_errors():
    exp = validate({"experiment": "x", "stages": ["certify"]})
    spec = exp.certify
    assert (spec.n0, spec.n, spec.alpha, spec.batch_size, spec.skip, spec.max, spec.topk) == (
        100, 100_000, 0.001, "auto", 1, None, 1)
    assert exp.data is not None and exp.noise is not None
    for key, value in [("alpha", 1.0), ("n", 0), ("skip", 0), ("max", 0), ("autocast", "fp8"), ("typo", 1),
                       ("batch_size", 0), ("channels_last", "yes")]:
        with pytest.raises(ParamsError, match=f"certify\\.{key}"):
            validate({"experiment": "x", "stages": ["certify"], "certify": {key: value}})


def test_sequential_certification_in_the_stage(trained, tmp_path):
    from rslib.core.certify import SEQUENTIAL_COLUMNS, look_sizes, recertify
    from rslib.core.noises import make_noise

    exp = with_checkpoint(trained, n=2000, radii_of_interest={"l2": [0.1, 0.2]}, looks=4)
    csv = certify_stage.certify_experiment(exp, tmp_path, progress=False, log=quiet)
    table, meta, _ = certify_stage.read_results(tmp_path)
    assert list(table.columns) == certify_stage.ROW_COLUMNS + SEQUENTIAL_COLUMNS
    sizes = look_sizes(2000, 4)
    assert [sizes[k - 1] for k in table["stop_look"]] == table["n"].tolist()
    assert (table["n_max"] == 2000).all() and table["alpha"].tolist() == pytest.approx([0.001 / 4] * len(table))
    assert table["n"].mean() < 2000  # easy inputs stop early
    seq = meta["sequential"]
    assert seq["look_sizes"] == sizes and seq["mean_draws_per_image"] == pytest.approx(table["n"].mean())
    again = recertify(pd.read_csv(csv), make_noise("Gaussian", 64, sigma=0.25))
    np.testing.assert_allclose(again["radius_l2"], table["radius_l2"])
    with pytest.raises(ParamsError, match="looks > 1 needs certify.radii_of_interest"):
        experiment(looks=3)
    with pytest.raises(ParamsError, match="radii_of_interest must map norms"):
        experiment(radii_of_interest={"l3": [0.1]})
