"""One plan for every rank of a sharded step.

A region whose graphs hold collectives runs on every rank of a process group, and
the ranks must issue the same collectives in the same order: if one rank's plan
gathered a parameter again in backward and another's kept it, the step would hang.
The planner is deterministic given the same graphs, except where a solver's time
limit cuts its search at a point that depends on the machine's speed. So rank 0's
plan is the plan: every other rank takes it (as JSON: `MemoryPlan.to_dict`) before any
pass runs, and so each choice the region makes between plans (`rank0_value`: whether
the passes alone meet the budget). They agree through the process group's store, not
its collectives (`memopt.backends.agreement`).

Only a region under a budget agrees (`memopt.backends.region`): without one there is
no solver and no time limit, each rank's plan of its own graph is the same, and a rank
that compiles alone (its batch changed shape, the others' did not) must not wait for
ranks that never compile that graph. Under a budget every rank must compile the same
regions in the same order (the same program, inputs of the same shapes); a rank that
compiles a region alone waits for the others a bounded time, then raises
`MemoptRanksError`. A fake process group (tracing without processes) and a world of
one rank have nothing to agree with.
"""

from __future__ import annotations

import logging
from typing import TypeVar

import torch.distributed as dist
import torch.fx as fx

from memopt.backends.agreement import Channel, default_wait_seconds
from memopt.graph import meta
from memopt.graph.step import StepGraphs
from memopt.plan.plan import MemoryPlan

__all__ = ["RanksCompiledOtherGraphs", "agree_across_ranks", "has_collectives", "rank0_value", "signature"]

T = TypeVar("T")

log = logging.getLogger("memopt")


def has_collectives(step: StepGraphs) -> bool:
    """Whether any graph of ``step`` calls a functional collective."""
    return any(_collective(n) for _, gm in step.graphs() for n in gm.graph.nodes)


def _collective(node: fx.Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith("_c10d_functional.")


def agree_across_ranks(plan: MemoryPlan, step: StepGraphs, wait_s: float | None = None) -> MemoryPlan:
    """``plan`` on rank 0; rank 0's plan on every other rank, when ``step`` holds
    collectives and the default process group has several real ranks (`rank0_value`)."""
    mine = plan.to_dict()
    agreed = rank0_value(mine, step, "the plan", wait_s)
    return plan if agreed is mine else MemoryPlan.from_dict(agreed)


def rank0_value(value: T, step: StepGraphs, topic: str, wait_s: float | None = None) -> T:
    """Rank 0's ``value`` (JSON-able) on every rank when ``step`` holds collectives and
    the default process group has several real ranks; ``value`` itself otherwise (and on
    rank 0). ``topic`` names what is agreed (``"the plan"``). Every rank must call it at
    the same point of the compile, in the same order: the n-th call on one rank pairs
    with the n-th on every other.

    Waits at most ``wait_s`` seconds (None: `default_wait_seconds`) for the other ranks
    to call it too, then raises `MemoptRanksError` (no fallback: a rank that ran another
    plan than the others would mismatch their collectives).

    Raises `RanksCompiledOtherGraphs` on every rank when the ranks' graphs differ (their
    inputs' shapes or dtypes, or the region) or they ask for other topics: one plan
    cannot serve them, and their choices under the budget (which values to re-gather,
    bucket sizes) would differ, so their collectives would not pair up. memopt's
    fail-soft then runs the region unoptimized on every rank (the same collectives, in
    traced order) with a warning."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    if dist.get_backend() == "fake" or not has_collectives(step):
        return value
    channel = Channel.current()
    mine = signature(step)
    verdict = channel.agree(step.region, mine, topic, value, default_wait_seconds() if wait_s is None else wait_s)
    arrivals = verdict["arrivals"]
    _check_same_graphs(step, [a["signature"] for a in arrivals])
    _check_same_topics(step, [a["topic"] for a in arrivals])
    channel.remember(step.region, mine)
    if channel.rank != 0:
        log.debug("region %s: using rank 0's choice of %s", step.region, topic)
        return verdict["value"]  # type: ignore[no-any-return]
    return value


class RanksCompiledOtherGraphs(RuntimeError):
    """The ranks of a sharded step compiled graphs of different shapes under a budget."""


def signature(step: StepGraphs) -> list[str]:
    """The region and each forward input's shape and dtype, parameters' dtypes only:
    what makes two ranks' graphs differ when they run the same program. (A parameter's
    shard has its own rows on each rank: 13 rows over 2 ranks are 7 and 6.)"""
    inputs = []
    for i, node in enumerate(step.forward.graph.find_nodes(op="placeholder")):
        value = meta.tensor_value(node)
        if value is not None and step.input_kind(i) == "parameter":
            inputs.append(f"{node.name}: {value.dtype}")
            continue
        inputs.append(f"{node.name}: {'-' if value is None else f'{value.dtype} {tuple(value.shape)}'}")
    return [f"region {step.region}", *inputs]


def _check_same_topics(step: StepGraphs, topics: list[str]) -> None:
    """The ranks' graphs are the same, but not what they ask for: their estimates (their
    shards differ in size) fell on either side of a byte budget in `RegionCompiler`'s
    choice between plans."""
    for rank, topic in enumerate(topics):
        if topic != topics[0]:
            raise RanksCompiledOtherGraphs(
                f"region {step.region}: rank {rank} asked for {topic} where rank 0 gave {topics[0]}: the ranks' "
                "estimates of the region (their shards differ in size) fell on either side of the budget. Give "
                "memory_budget as a fraction (0.8) rather than bytes, so that it scales with each rank's "
                "estimate, or drop memory_budget"
            )


def _check_same_graphs(step: StepGraphs, signatures: list[list[str]]) -> None:
    first = signatures[0]
    for rank, other in enumerate(signatures):
        if other != first:
            where = next((a, b) for a, b in zip([*first, "-"], [*other, "-"]) if a != b)
            raise RanksCompiledOtherGraphs(
                f"region {step.region}: rank {rank} compiled another graph than rank 0 (rank 0 {where[0]!r}, rank "
                f"{rank} {where[1]!r}); under a memory_budget every rank must compile the same graphs, so that one "
                f"plan serves them and their collectives pair up. {_fix(first, other)}, or drop memory_budget "
                "(each rank then plans its own)"
            )


_NOT_A_TENSOR = ": -"
"""How `signature` writes an input that is no tensor (a SymInt, an opaque object)."""


def _fix(first: list[str], other: list[str]) -> str:
    """What to change so that two ranks compile the same graph. Graphs that take another
    number of symbolic inputs have one rank's sizes, strides or storage offsets dynamic
    where the other's are static: Dynamo decides that per rank, from what each rank's
    inputs did across steps. A slice of the global batch (rank r's ``batch[r*n:(r+1)*n]``)
    moves its storage offset when ``n`` changes (a short last batch) on every rank but
    rank 0, whose slice starts at 0, so only those ranks compile a dynamic offset."""
    symbolic = [sum(entry.endswith(_NOT_A_TENSOR) for entry in sig) for sig in (first, other)]
    if symbolic[0] != symbolic[1]:
        return (
            f"These graphs take {symbolic[0]} and {symbolic[1]} symbolic inputs: Dynamo made a size, stride or "
            "storage offset dynamic on one rank only, e.g. for an input that is a slice of a larger tensor at "
            "another offset on each rank (batch[rank * n:(rank + 1) * n]) whose length changed (a short last "
            "batch). Give each rank a tensor of its own (.clone() the slice, or load only the rank's rows)"
        )
    return "Give every rank inputs of the same shapes (pad to one length, drop the last short batch)"
