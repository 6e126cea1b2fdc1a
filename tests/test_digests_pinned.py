"""Finished work stays finished: the stage digests (and attack-task digests) of the repository's
demo and MNIST parameter files are pinned, so moving code never silently makes users' outputs stale.

The pins were taken before rslib was split into layers (util / core / nn / pipeline / report). One
deliberate change since: ``attack.batch_size`` is declared speed-only, so the digests of attacks on
SMOOTHED targets count it as a fixed value instead of its setting ('auto'); those attack tables are
recomputed once when their stage runs again (README, "Changelog"). Every stage digest is unchanged.
``params/demo/experiment.yaml`` replaced the per-stage demo files (train, certify, attack) with the
same stage digests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rslib.pipeline import params, study
from rslib.pipeline.stages.attack import LBOUND, task_digest

ROOT = Path(__file__).resolve().parents[1]
PINNED = json.loads((Path(__file__).parent / "data" / "pinned_digests.json").read_text())


def digests_of(path: Path) -> dict[str, dict[str, str]]:
    """{experiment: {stage: digest, 'attack:<task>': digest}} of an experiment or study file."""
    if study.is_study(path):
        loaded = study.load(path)
        pairs = [(e.name, e.experiment, loaded.salts[e.name]) for e in loaded.experiments]
    else:
        exp = params.load(path)
        pairs = [(exp.experiment, exp, "")]
    out = {}
    for name, exp, salt in pairs:
        found = {stage: exp.stage_digest(stage, salt) for stage in exp.stages}
        if "attack" in exp.stages:
            found |= {f"attack:{task}": task_digest(exp, task) for task in [*exp.attack.attacks, LBOUND]}
        out[name] = found
    return out


@pytest.mark.parametrize("relative", sorted(PINNED))
def test_digests_are_pinned(relative):
    assert digests_of(ROOT / relative) == PINNED[relative]
