"""The stages, one module each; importing them registers them in ``rslib.pipeline.stage.STAGES`` (in this
order: the tutorial, train, certify, attack, then the study-level plot notebooks)."""

from rslib.pipeline.stages import tutorial, train, certify, attack, plots  # noqa: F401, I001 -- listing order
