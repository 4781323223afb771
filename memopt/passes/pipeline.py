"""The default pipeline, as data: the ordered list of passes memopt runs on a region.

Ordering constraints (each pass's docstring states its own):

1. ``remat`` first: it replaces both graphs with the split the plan chose.
2. ``dce``: nothing after it should pay for values nobody reads.
3. ``recompute_saved_casts`` then ``compress_activations`` (below).
4. ``schedule``: it reorders what the other passes produced to lower the peak.
5. ``offload`` after it: the prefetch distance is counted in the final order.
6. ``optimizer_in_backward`` last: each update sits right after its gradient's last
   accumulation in the final backward order.

Collectives of a sharded model (docs/sharding.md):

* ``dedupe_collectives`` then ``bucket_collectives`` after the passes that decide
  what is saved (a re-gathered parameter's all-gather in backward is bucketed like the
  forward's) and before ``schedule``, which orders the bucketed graphs;
* ``overlap_collectives`` after ``offload``, on the final order (``schedule`` would
  sink every prefetched all-gather back to its wait), and before
  ``optimizer_in_backward`` (an update follows its gradient's moved wait).

Precision (docs/precision.md):

* ``recompute_saved_casts`` then ``compress_activations`` run after every pass that
  changes which values are saved (rematerialization): they shrink what is still saved,
  exactly first (saved dtype copies are recomputed from their source), then lossily.
* ``pre_autograd_pipeline`` is a second stage, run on the Dynamo-level graph before
  AOTAutograd traces it (a `StepGraphs` with one graph named ``dynamo``): rewrites
  that must be differentiated like user code, i.e. ``precision`` (casts whose
  derivatives bring gradients back to fp32 masters), then ``blocked_cross_entropy``
  (the loss over logits computed a block of rows at a time, saving the logits instead
  of the log-probabilities; after ``precision``, which recognizes ``F.cross_entropy``).
"""

from __future__ import annotations

from collections.abc import Sequence

from memopt.config import MemoptConfig
from memopt.passes.base import Pass
from memopt.passes.blocked_cross_entropy import BlockedCrossEntropy
from memopt.passes.collectives_bucket import BucketCollectives
from memopt.passes.collectives_dedupe import DedupeCollectives
from memopt.passes.collectives_overlap import OverlapCollectives
from memopt.passes.compress import CompressSavedActivations
from memopt.passes.dce import DeadCodeElimination
from memopt.passes.offload import OffloadSavedActivations
from memopt.passes.optimizer_in_backward import UpdateInBackward
from memopt.passes.precision import PrecisionLowering
from memopt.passes.remat import Rematerialize
from memopt.passes.saved_casts import RecomputeSavedCasts
from memopt.passes.schedule import MemoryAwareSchedule

__all__ = ["default_pipeline", "pass_names", "pre_autograd_pipeline", "disabled_in", "numerics_changing"]


def default_pipeline(config: MemoptConfig) -> list[Pass]:
    """The passes memopt runs on every region for ``config``, in order."""
    return [
        Rematerialize(),
        DeadCodeElimination(),
        RecomputeSavedCasts(),
        CompressSavedActivations(),
        DedupeCollectives(),
        BucketCollectives(),
        MemoryAwareSchedule(),
        OffloadSavedActivations(),
        OverlapCollectives(),
        UpdateInBackward(),
    ]


def pass_names(config: MemoptConfig | None = None) -> list[str]:
    """Names of both pipelines' passes, pre-autograd first (valid values of
    ``disable_passes``)."""
    config = config or MemoptConfig()
    return [p.name for p in pre_autograd_pipeline(config) + default_pipeline(config)]


def numerics_changing(config: MemoptConfig | None = None) -> frozenset[str]:
    """Names of the passes (of both pipelines) that change numbers (opt-in)."""
    config = config or MemoptConfig()
    return frozenset(p.name for p in pre_autograd_pipeline(config) + default_pipeline(config) if not p.numerics_preserving)


# -- the pre-autograd stage (precision lowering, the blocked loss) -----------------


def pre_autograd_pipeline(config: MemoptConfig) -> list[Pass]:
    """The passes memopt runs on a region's Dynamo graph before AOTAutograd, in order."""
    return [PrecisionLowering(), BlockedCrossEntropy()]


def disabled_in(passes: Sequence[Pass], config: MemoptConfig) -> tuple[str, ...]:
    """The names of ``config.disable_passes`` that belong to ``passes`` (one stage).
    Unknown names are refused where the options are read (`MemoptConfig.from_options`)."""
    names = {p.name for p in passes}
    return tuple(n for n in config.disable_passes if n in names)
