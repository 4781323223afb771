"""One plan for every rank of a sharded step.

A region whose graphs hold collectives runs on every rank of a process group, and
the ranks must issue the same collectives in the same order: if one rank's plan
gathered a parameter again in backward and another's kept it, the step would hang.
The planner is deterministic given the same graphs, except where a solver's time
limit cuts its search at a point that depends on the machine's speed. So rank 0's
plan is the plan: it is broadcast (as JSON: `MemoryPlan.to_dict`) to the other ranks
of the default process group before any pass runs, and so is each choice the region
makes between plans (`rank0_value`: whether the passes alone meet the budget).

Only a region under a budget agrees (`memopt.backends.region`): without one there is
no solver and no time limit, each rank's plan of its own graph is the same, and a rank
that compiles alone (its batch changed shape, the others' did not) must not wait for
ranks that never compile that graph. Under a budget every rank must compile the same
regions in the same order (the same program, inputs of the same shapes), so the
broadcasts pair up. A fake process group (tracing without processes) has nothing to
agree with.
"""

from __future__ import annotations

import logging
from typing import TypeVar

import torch.distributed as dist
import torch.fx as fx
from torch._C import _DisablePythonDispatcher
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memopt.graph.step import StepGraphs
from memopt.plan.plan import MemoryPlan

__all__ = ["agree_across_ranks", "has_collectives", "rank0_value"]

T = TypeVar("T")

log = logging.getLogger("memopt")


def has_collectives(step: StepGraphs) -> bool:
    """Whether any graph of ``step`` calls a functional collective."""
    return any(_collective(n) for _, gm in step.graphs() for n in gm.graph.nodes)


def _collective(node: fx.Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith("_c10d_functional.")


def agree_across_ranks(plan: MemoryPlan, step: StepGraphs) -> MemoryPlan:
    """``plan`` on rank 0; rank 0's plan on every other rank, when ``step`` holds
    collectives and the default process group has several real ranks."""
    mine = plan.to_dict()
    agreed = rank0_value(mine, step)
    return plan if agreed is mine else MemoryPlan.from_dict(agreed)


def rank0_value(value: T, step: StepGraphs) -> T:
    """Rank 0's ``value`` (JSON-able) on every rank when ``step`` holds collectives and
    the default process group has several real ranks; ``value`` itself otherwise (and on
    rank 0). Every rank must call it at the same point of the compile."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    if dist.get_backend() == "fake" or not has_collectives(step):
        return value
    box = [value if dist.get_rank() == 0 else None]
    # Compiles run under a fake mode (the broadcast moves real bytes) and AOTAutograd's
    # Python dispatcher. Under the latter gloo's broadcast is dispatched through Python
    # and holds the GIL while it waits for the process group's work queue, whose thread
    # may hold that queue while it frees the previous broadcast's tensors, which needs
    # the GIL: a deadlock (seen on a loaded machine, 2 gloo ranks, many compiles).
    with unset_fake_temporarily(), _DisablePythonDispatcher():
        dist.broadcast_object_list(box, src=0)
    if dist.get_rank() != 0:
        log.debug("region %s: using rank 0's choice", step.region)
    return box[0]  # type: ignore[return-value]
