"""Graph passes and the machinery that runs them."""

from memopt.passes.base import Pass, PassContext, PassFailure, PassResult
from memopt.passes.manager import Fallback, Instrument, PassManager, PassRecord, PipelineResult
from memopt.passes.pipeline import default_pipeline, pass_names

__all__ = [
    "Pass",
    "PassContext",
    "PassFailure",
    "PassResult",
    "PassManager",
    "Instrument",
    "PassRecord",
    "Fallback",
    "PipelineResult",
    "default_pipeline",
    "pass_names",
]
