"""The default pipeline, as data: the ordered list of passes memopt runs on a region.

Ordering constraints (each pass's docstring states its own):

1. ``remat`` first: it replaces both graphs with the split the plan chose.
2. ``dce``: nothing after it should pay for values nobody reads.
3. ``schedule`` last: it reorders what the other passes produced to lower the peak.

Later passes (scheduling, rematerialization, precision, offload) are added here in the
order their docstrings require.
"""

from __future__ import annotations

from memopt.config import MemoptConfig
from memopt.passes.base import Pass
from memopt.passes.dce import DeadCodeElimination
from memopt.passes.remat import Rematerialize
from memopt.passes.schedule import MemoryAwareSchedule

__all__ = ["default_pipeline", "pass_names"]


def default_pipeline(config: MemoptConfig) -> list[Pass]:
    """The passes memopt runs on every region for ``config``, in order."""
    return [Rematerialize(), DeadCodeElimination(), MemoryAwareSchedule()]


def pass_names(config: MemoptConfig | None = None) -> list[str]:
    """Names of the default pipeline's passes (valid values of ``disable_passes``)."""
    return [p.name for p in default_pipeline(config or MemoptConfig())]
