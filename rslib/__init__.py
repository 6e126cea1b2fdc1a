"""rslib: certified robustness by smoothing — noises, certificates and reproducible notebooks."""

__version__ = "0.1.0"
