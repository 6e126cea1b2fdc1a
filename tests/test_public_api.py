"""The public API stays importable from ``rslib`` (lazily: ``import rslib`` loads no torch)."""

from __future__ import annotations

import subprocess
import sys

import rslib
from rslib.core.attacks import ATTACKS, alma, ddn, pgd, pgd_minimal
from rslib.core.certify import ABSTAIN, Smooth, smoothed
from rslib.core.noises import NOISES, make_noise
from rslib.pipeline.stages.train import fit


def test_public_names_are_the_layered_ones():
    assert (rslib.Smooth, rslib.ABSTAIN, rslib.smoothed, rslib.make_noise, rslib.NOISES) == (
        Smooth, ABSTAIN, smoothed, make_noise, NOISES)
    assert (rslib.ddn, rslib.pgd, rslib.pgd_minimal, rslib.alma, rslib.ATTACKS, rslib.fit) == (
        ddn, pgd, pgd_minimal, alma, ATTACKS, fit)
    assert set(rslib.__all__) >= {"Smooth", "make_noise", "ddn", "fit", "__version__"}


def test_import_rslib_is_light():
    code = "import sys, rslib; print('torch' in sys.modules, rslib.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", rslib.__version__]
