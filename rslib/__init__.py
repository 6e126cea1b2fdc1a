"""rslib: certified robustness by smoothing — noises, certificates and reproducible notebooks.

The public API, importable from here: ``Smooth``, ``ABSTAIN``, ``make_noise``, ``NOISES``, the attacks
(``ddn``, ``pgd``, ``pgd_minimal``, ``alma``, ``ATTACKS``) and the training entry point ``fit``. The
layers below (``rslib.util`` <- ``rslib.core`` <- ``rslib.nn`` <- ``rslib.pipeline`` <- ``rslib.report``
<- ``rslib.cli``) hold the rest; see the README's "Architecture".
"""

from importlib import import_module
from typing import Any

from rslib.util.provenance import VERSION as __version__

#: Public name -> the module that defines it (imported on first use, so ``import rslib`` stays light).
_PUBLIC = {
    "Smooth": "rslib.core.certify", "ABSTAIN": "rslib.core.certify", "Certificate": "rslib.core.certify",
    "make_noise": "rslib.core.noises", "NOISES": "rslib.core.noises", "Noise": "rslib.core.noises",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'rslib' has no attribute {name!r}")
