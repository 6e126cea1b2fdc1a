"""Minimal-norm adversarial attacks against base and smoothed classifiers, one module each.

Every attack is batched, runs on the device of ``x`` and returns an :class:`AttackResult` (per input:
success and the l0, l1, l2, linf norms of the perturbation; a failure has every distance ``inf``).
``ATTACKS`` holds the registered ones (``ddn``, ``pgd``, ``alma``); a new attack is one module that
calls :func:`register_attack` (see the README, "Extending rslib"). ``base`` holds what they share.
"""

from rslib.core.attacks.alma import alma  # importing the attack modules registers the attacks
from rslib.core.attacks.base import (
    ATTACKS,
    FRAME_COLUMNS,
    AttackResult,
    AttackSpec,
    Judge,
    distances,
    majority_vote_judge,
    project_l1_ball,
    project_lp_ball,
    register_attack,
    smooth_predict_judge,
)
from rslib.core.attacks.ddn import ddn
from rslib.core.attacks.pgd import pgd, pgd_minimal
from rslib.core.certify import ABSTAIN, SmoothedSoftClassifier, smoothed

__all__ = ["ABSTAIN", "ATTACKS", "FRAME_COLUMNS", "AttackResult", "AttackSpec", "Judge", "SmoothedSoftClassifier",
           "alma", "ddn", "distances", "majority_vote_judge", "pgd", "pgd_minimal", "project_l1_ball",
           "project_lp_ball", "register_attack", "smooth_predict_judge", "smoothed"]
