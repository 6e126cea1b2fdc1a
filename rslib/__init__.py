"""rslib: certified robustness by smoothing — noises, certificates and reproducible notebooks.

The public API, importable from here: ``Smooth``, ``ABSTAIN``, ``Certificate``, ``smoothed``,
``make_noise``, ``NOISES``, ``Noise``, the attacks (``ddn``, ``pgd``, ``pgd_minimal``, ``alma``,
``ATTACKS``, ``AttackResult``) and the training entry point ``fit``. The
layers below (``rslib.util`` <- ``rslib.core`` <- ``rslib.nn`` <- ``rslib.pipeline`` <- ``rslib.report``
<- ``rslib.cli``) hold the rest; see the README's "Architecture".
"""

from importlib import import_module
from typing import Any

from rslib.util.provenance import VERSION as __version__

#: Public name -> the module that defines it (imported on first use, so ``import rslib`` stays light).
_PUBLIC = {
    **dict.fromkeys(("Smooth", "ABSTAIN", "Certificate", "smoothed"), "rslib.core.certify"),
    **dict.fromkeys(("make_noise", "NOISES", "Noise"), "rslib.core.noises"),
    **dict.fromkeys(("ddn", "pgd", "pgd_minimal", "alma", "ATTACKS", "AttackResult"), "rslib.core.attacks"),
    "fit": "rslib.pipeline.stages.train",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'rslib' has no attribute {name!r}")
