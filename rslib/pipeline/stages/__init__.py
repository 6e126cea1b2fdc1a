"""The stages, one module each; importing them registers them in ``rslib.pipeline.stage.STAGES`` (in this
order: the tutorial, train, certify, attack, then the study-level plot notebooks)."""

from rslib.pipeline.stages import tutorial  # noqa: F401, I001 -- registration order is the listing order
from rslib.pipeline.stages import train  # noqa: F401
from rslib.pipeline.stages import certify  # noqa: F401
from rslib.pipeline.stages import attack  # noqa: F401
from rslib.pipeline.stages import plots  # noqa: F401
