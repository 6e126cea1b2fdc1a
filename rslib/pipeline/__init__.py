"""The pipeline layer: parameters, paths, stages, the notebook runner, studies, locks and status.

Importing any of it registers the stages (``rslib.pipeline.stages``), so validation always knows them.
"""

from rslib.pipeline import stages  # noqa: F401 -- registers the stages
