"""Experiment YAML schema: defaults, error messages naming the key, overrides, digest."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from rslib.pipeline import params
from rslib.pipeline.params import ParamsError, load
from rslib.pipeline.schema import param, parse_override
from rslib.pipeline.stage import STAGES, Stage

ROOT = Path(__file__).resolve().parents[1]
NO_NOISES = {"l1_noises": [], "l2_noises": [], "linf_noises": []}


def base() -> dict[str, Any]:
    """A valid experiment that needs no rslib.core.noises (empty noise lists)."""
    return {
        "experiment": "unit",
        "stages": ["tutorial_noise_radii"],
        "tutorial": {"dim": 64, **NO_NOISES},
    }


def write(tmp_path: Path, raw: dict[str, Any], name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_valid_file_loads_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, base())
    exp = load(path)
    assert (exp.experiment, exp.description, exp.seed, exp.device) == ("unit", "", 0, "auto")
    assert exp.stages == ["tutorial_noise_radii"]
    assert exp.source == path
    t = exp.tutorial
    assert (t.dim, t.sigma, t.rho_min, t.rho_max, t.num_rho) == (64, 1.0, 0.5, 0.999, 200)
    assert t.sample_sigmas == [0.1, 0.25, 0.5, 1.0]
    assert isinstance(t.sigma, float)


def _set(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("colour", "red", "unknown key 'colour' (valid keys: experiment, stages,"),
        ("tutorial.sigmaa", 2.0, "unknown key 'tutorial.sigmaa' (valid keys: dim, sigma,"),
        ("tutorial.dim", "abc", "tutorial.dim must be an integer >= 1, got 'abc'"),
        ("tutorial.dim", True, "tutorial.dim must be an integer >= 1, got True"),
        ("tutorial.dim", -3, "tutorial.dim must be an integer >= 1, got -3"),
        ("tutorial.sigma", 0, "tutorial.sigma must be a number > 0, got 0"),
        ("tutorial.rho_min", 0.4, "tutorial.rho_min must be a number >= 0.5 and < 1, got 0.4"),
        ("tutorial.rho_min", 0.9995, "tutorial.rho_max must be > rho_min (0.9995), got 0.999"),
        ("tutorial.num_rho", 1, "tutorial.num_rho must be an integer >= 2, got 1"),
        ("tutorial.sample_sigmas", [0.1, -1], "tutorial.sample_sigmas[1] must be a number > 0"),
        ("tutorial.sample_sigmas", [], "tutorial.sample_sigmas must be a non-empty list"),
        ("tutorial.l1_noises", ["Gaussian"], "tutorial.l1_noises[0] must be a mapping"),
        ("tutorial", [1, 2], "'tutorial' must be a mapping"),
        ("stages", ["tutorial_noise_radii", "trian"], "stages[1] must be one of tutorial_noise_radii"),
        ("stages", ["tutorial_noise_radii"] * 2, "stages[1] repeats stage 'tutorial_noise_radii'"),
        ("stages", [], "stages must be a non-empty list"),
        ("seed", -1, "seed must be an integer >= 0, got -1"),
        ("device", "gpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        ("experiment", "../escape", "experiment must be a name of letters, digits"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, key: str, value: Any, expected: str) -> None:
    path = write(tmp_path, _set(base(), key, value))
    with pytest.raises(ParamsError) as info:
        load(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_missing_required_key(tmp_path: Path) -> None:
    raw = base()
    del raw["experiment"]
    with pytest.raises(ParamsError, match="missing required key 'experiment'"):
        load(write(tmp_path, raw))


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="no such parameter file"):
        load(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="must be a mapping"):
        load(bad)


def test_parse_override() -> None:
    assert parse_override("tutorial.dim=64") == ("tutorial.dim", 64)
    assert parse_override("tutorial.sigma=0.25") == ("tutorial.sigma", 0.25)
    assert parse_override("tutorial.sample_sigmas=[0.5, 1]") == ("tutorial.sample_sigmas", [0.5, 1])
    assert parse_override("description=two words") == ("description", "two words")
    assert parse_override(" seed = 3") == ("seed", 3)
    with pytest.raises(ParamsError, match="must look like key=value"):
        parse_override("tutorial.dim")
    with pytest.raises(ParamsError, match="not valid YAML"):
        parse_override("tutorial.sample_sigmas=[1,")


def test_overrides_apply(tmp_path: Path) -> None:
    path = write(tmp_path, base())
    texts = ["tutorial.dim=32", "tutorial.sample_sigmas=[0.5, 1]", "tutorial.sigma=1e-3", "seed=7"]
    exp = load(path, **dict(parse_override(t) for t in texts))
    assert (exp.tutorial.dim, exp.tutorial.sample_sigmas, exp.seed) == (32, [0.5, 1.0], 7)
    assert exp.tutorial.sigma == pytest.approx(1e-3)  # PyYAML reads 1e-3 as text
    assert load(path).tutorial.dim == 64  # the file itself is unchanged


def test_bad_override_keys(tmp_path: Path) -> None:
    path = write(tmp_path, base())
    with pytest.raises(ParamsError) as info:
        load(path, **{"tutorial.sigmaa": 2})
    assert "unknown key 'tutorial.sigmaa'" in str(info.value)
    assert "overrides: tutorial.sigmaa" in str(info.value)
    with pytest.raises(ParamsError, match="unknown key 'colour'"):
        load(path, colour="red")
    with pytest.raises(ParamsError, match="cannot apply override 'experiment.x': 'experiment' is not"):
        load(path, **{"experiment.x": 1})


def test_digest_tracks_values(tmp_path: Path) -> None:
    path = write(tmp_path, base())
    digest = load(path).digest()
    assert load(path).digest() == digest
    assert load(path, **{"tutorial.num_rho": 200}).digest() == digest  # same value as the default
    assert load(path, **{"tutorial.num_rho": 201}).digest() != digest
    assert load(path, seed=1).digest() != digest
    # Labels that cannot change results do not make finished stages stale.
    assert load(path, description="renamed").digest() == digest


def test_stage_digest_covers_the_stage_and_what_precedes_it(tmp_path: Path) -> None:
    raw = {"experiment": "e", "stages": ["train", "certify"], "train": {"epochs": 3}, "certify": {"n": 100}}
    path = write(tmp_path, raw)
    exp = load(path)
    train, certify = exp.stage_digest("train"), exp.stage_digest("certify")
    # Editing certification leaves a finished training valid ...
    assert load(path, **{"certify.n": 200}).stage_digest("train") == train
    assert load(path, **{"certify.n": 200}).stage_digest("certify") != certify
    # ... editing training makes both stale; so does the seed; a salt (a sibling's digest) too.
    assert load(path, **{"train.epochs": 4}).stage_digest("certify") != certify
    assert load(path, seed=3).stage_digest("train") != train
    assert exp.stage_digest("train", salt="sibling") != train
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        exp.stage_digest("nope")


def test_to_dict_round_trips(tmp_path: Path) -> None:
    exp = load(write(tmp_path, base()), seed=5, description="round trip")
    resolved = exp.to_dict()
    assert resolved["tutorial"]["num_rho"] == 200  # defaults are spelled out
    again = load(write(tmp_path, resolved, "resolved.yaml"))
    assert again.to_dict() == resolved
    assert again.digest() == exp.digest()


@dataclass(frozen=True)
class ExtraParams:
    """A section without full defaults, exercising more field types."""

    size: int = param(ge=1)
    mode: Literal["fast", "exact"] = param("fast")
    limit: float | None = param(None, gt=0)
    flag: bool = param(False)


def test_new_sections_and_stages_plug_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request) -> None:
    monkeypatch.setitem(params.SECTIONS, "extra", ExtraParams)
    STAGES.register("extra_stage", Stage("extra_stage", notebook="extra_nb", requires=("extra",)))
    request.addfinalizer(lambda: STAGES.unregister("extra_stage"))
    raw = {"experiment": "x", "stages": ["extra_stage"]}
    with pytest.raises(ParamsError, match="stage 'extra_stage' needs section 'extra', which is missing"):
        load(write(tmp_path, raw))
    raw["extra"] = {"size": 3, "limit": None, "flag": True}
    exp = load(write(tmp_path, raw))
    assert exp.extra == ExtraParams(size=3, mode="fast", limit=None, flag=True)
    assert exp.tutorial is None  # not needed and not given
    assert "tutorial" not in exp.to_dict()
    for key, value, expected in [
        ("mode", "slow", "extra.mode must be one of 'fast', 'exact', got 'slow'"),
        ("limit", -1, "extra.limit must be a number > 0 or null, got -1"),
        ("flag", "yes", "extra.flag must be true or false, got 'yes'"),
    ]:
        with pytest.raises(ParamsError, match=expected):
            load(write(tmp_path, raw), **{f"extra.{key}": value})


# ----------------------------------------------------------------- noise specs (need rslib.core.noises)


def test_repo_tutorial_file_spells_out_the_defaults() -> None:
    pytest.importorskip("rslib.core.noises")
    exp = load(ROOT / "params" / "tutorial.yaml")
    assert exp.experiment == "tutorial"
    assert exp.stages == ["tutorial_noise_radii"]
    assert exp.tutorial == params.TutorialParams()


def test_missing_tutorial_section_gets_defaults(tmp_path: Path) -> None:
    pytest.importorskip("rslib.core.noises")
    exp = load(write(tmp_path, {"experiment": "t", "stages": ["tutorial_noise_radii"]}))
    assert exp.tutorial == params.TutorialParams()
    assert exp.to_dict()["tutorial"]["l2_noises"][0] == {"name": "Gaussian"}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"name": "ExpInf", "k": 1, "j": 64}, "tutorial.l1_noises[0] is not a valid noise (ExpInf)"),
        ({"name": "NoSuchNoise"}, "tutorial.l1_noises[0] is not a valid noise (NoSuchNoise)"),
        ({"name": "Gaussian", "q": 3}, "tutorial.l1_noises[0] is not a valid noise (Gaussian)"),
        ({"k": 1}, "a noise needs a 'name'"),
        ({"name": "Gaussian", "sigma": 2}, "(Gaussian): noise parameters must not set sigma"),
    ],
)
def test_bad_noise_specs(tmp_path: Path, spec: dict[str, Any], expected: str) -> None:
    pytest.importorskip("rslib.core.noises")
    raw = base()
    raw["tutorial"]["l1_noises"] = [spec]
    with pytest.raises(ParamsError, match=re.escape(expected)):
        load(write(tmp_path, raw))


def test_good_noise_specs(tmp_path: Path) -> None:
    pytest.importorskip("rslib.core.noises")
    raw = base()
    raw["tutorial"]["linf_noises"] = [{"name": "ExpInf", "k": 10, "j": 0}, {"name": "Uniform"}]
    assert len(load(write(tmp_path, raw)).tutorial.linf_noises) == 2


def test_relative_paths_become_absolute_for_the_notebooks(tmp_path: Path) -> None:
    from rslib.pipeline.params import with_absolute_paths

    raw = {"experiment": "e", "stages": ["train", "certify"], "data": {"data_dir": "data/cifar10"},
           "train": {"mode": "heat", "heat_base": "runs/base.pt"}, "certify": {"checkpoint": "sibling"}}
    exp = with_absolute_paths(load(write(tmp_path, raw)), base=tmp_path)
    assert exp.data.data_dir == str(tmp_path / "data" / "cifar10")
    assert exp.train.heat_base == str(tmp_path / "runs" / "base.pt")
    assert exp.certify.checkpoint == "sibling"  # a sibling experiment's name is not a path
    assert with_absolute_paths(exp, base="/elsewhere").to_dict() == exp.to_dict()  # absolute stays


def test_checkpoint_files_and_heat_bases_are_tracked_by_content(tmp_path: Path, monkeypatch) -> None:
    from rslib.pipeline.params import checkpoint_files_stamp
    from rslib.pipeline.stages.train import train_digest

    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.pt"
    base.write_bytes(b"weights v1")
    raw = {"experiment": "e", "stages": ["train", "certify"],
           "train": {"mode": "heat", "heat_base": "base.pt"}, "certify": {"checkpoint": "base.pt"}}
    exp = load(write(tmp_path, raw))
    stamp, digest = checkpoint_files_stamp(exp), train_digest(exp, tmp_path / "e")
    assert str(base) in stamp
    base.write_bytes(b"weights v2, retrained")
    assert checkpoint_files_stamp(exp) != stamp  # the stages reading base.pt are stale again
    assert train_digest(exp, tmp_path / "e") != digest  # so is the heat model averaged from it
    # a data folder is where inputs live, not what they are: moving it keeps every stage finished
    assert load(write(tmp_path, raw), **{"data.data_dir": "/elsewhere"}).stage_digest("certify") == \
        exp.stage_digest("certify")


def test_fields_at_their_neutral_value_leave_stage_digests_unchanged() -> None:
    # Golden digests of a default experiment written by rslib before train.stability_divergence,
    # train.channels_last, train.eval_every and attack.alma_* existed (commit 00a6de8): adding those
    # fields must not make finished work stale. (Its default attacks were then [ddn, pgd].)
    raw = {"experiment": "neutral", "stages": ["train", "certify", "attack"], "attack": {"attacks": ["ddn", "pgd"]}}
    exp = load_raw(raw)
    assert exp.stage_digest("train") == "41485ea4ee654025502be90859ca532b00621598c64470eb368ca8eee7c55499"
    assert exp.stage_digest("certify") == "de7c47032d84ecebcb79f53a12158e3739c8a8dfec7877a8c0f1eaed4f8882fa"
    assert exp.stage_digest("attack") == "2e294e6973aa20deb5d5960796c4dda8fcc4819d27f5f5d979f994b48effe1d9"
    assert load_raw({**raw, "train": {"channels_last": True}}).stage_digest("train") != exp.stage_digest("train")
    assert load_raw({**raw, "train": {"eval_every": 5}}).stage_digest("train") == exp.stage_digest("train")


def test_speed_settings_never_make_finished_work_stale() -> None:
    # certify.batch_size / channels_last and attack.batch_size default to 'auto' (measured) since
    # the golden digests above were written with 4096 / false: any setting leaves the digests alone.
    raw = {"experiment": "speed", "stages": ["train", "certify", "attack"]}
    exp = load_raw(raw)
    assert (exp.certify.batch_size, exp.certify.channels_last, exp.attack.batch_size) == ("auto", "auto", "auto")
    fast = load_raw({**raw, "certify": {"batch_size": 1000, "channels_last": True}, "attack": {"batch_size": 64}})
    for stage in ("certify", "attack"):
        assert fast.stage_digest(stage) == exp.stage_digest(stage)
    assert load_raw({**raw, "certify": {"n": 999}}).stage_digest("certify") != exp.stage_digest("certify")
    with pytest.raises(ParamsError, match="certify.batch_size must be an integer >= 1 or one of 'auto'"):
        load_raw({**raw, "certify": {"batch_size": "fast"}})


def load_raw(raw: dict[str, Any]):
    from rslib.pipeline.params import validate

    return validate(raw)
