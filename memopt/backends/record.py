"""What the backend remembers about each compiled region, for `memopt.explain`.

The backend appends a `RegionRecord` to every active recorder (a stack managed by
`recording`); with no recorder active it keeps nothing and skips the costly parts
(readable-code snapshots).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from memopt.analysis.timeline import MemoryTimeline
from memopt.config import MemoptConfig
from memopt.graph.step import StepGraphs
from memopt.passes.instruments import GraphSnapshot
from memopt.failsoft import Fallback
from memopt.passes.manager import PassRecord
from memopt.plan.plan import MemoryPlan

__all__ = ["EarlierCall", "RegionRecord", "recording", "active_recorders"]


@dataclass(frozen=True)
class EarlierCall:
    """A call of a region whose backward had not started when the region ran again
    (`RegionRecord.earlier_calls`)."""

    forward: int | None
    """When it ran, on the clock of `RegionRecord.last_forward`; None: not observed."""
    same_parameters: bool
    """Whether it ran on the parameters of the later call (the model called again
    before one backward: a DPO or contrastive loss), or on others (a layer's frame
    that an eager loop calls once per layer: a graph break in the layer loop)."""
    input_sources: dict[int, tuple[str, int]] = field(default_factory=dict)
    """Its inputs that were an earlier region's outputs, as `RegionRecord.input_sources`
    (the first layer's input is the region before the loop's output, a later layer's
    the layer before it's)."""


@dataclass
class RegionRecord:
    """One compiled region (one Dynamo graph): its graphs after each pass, the passes
    run, fallbacks, and the final graphs handed to codegen."""

    region: str
    config: MemoptConfig
    kind: str = "inference"  # "training" | "inference"
    passes: list[PassRecord] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    snapshots: list[GraphSnapshot] = field(default_factory=list)
    step: StepGraphs | None = None
    step_before: StepGraphs | None = None
    """The graphs before memopt's pipeline (``timeline_before`` is theirs)."""
    example_inputs: tuple[Any, ...] = ()
    pipeline_seconds: float = 0.0
    compiled_graphs: list[str] = field(default_factory=list)
    plan: MemoryPlan | None = None
    timeline_before: MemoryTimeline | None = None
    timeline_after: MemoryTimeline | None = None
    timelines_by_update: dict[bool, MemoryTimeline] = field(default_factory=dict)
    """With an optimizer known: the timeline of the graphs before the pipeline with a
    separate ``opt.step()`` (key False) and with each update in backward (True), for
    the report's modelled saving of the fused update."""
    kept_outputs: frozenset[int] | None = None
    """Positions of the region's outputs the caller still held when its backward
    started, in the latest step observed (`memopt.backends.steptracker`); None: not
    observed."""
    input_sources: dict[int, tuple[str, int]] = field(default_factory=dict)
    """Inputs that were an earlier region's outputs in the latest step observed:
    input position -> (that region's name, its output position). A later region that
    saves such an input for backward holds the producer's storage, not a new one."""
    last_forward: int | None = None
    """When its latest observed call ran, on the process's one clock of observed
    events (`memopt.backends.steptracker.StepTracker.serials`); None: not observed."""
    last_backward: int | None = None
    """When the backward of its latest observed call with one started, on that clock."""
    repeats: int = 0
    """Earlier calls of the region whose backward had not started when it ran: its step
    is that many calls and one more before one backward. Under a budget, what its plan
    counts (`memopt.plan.step_context.StepContext.repeats`); without one, observed (the
    step estimate counts them)."""
    earlier_calls: tuple[EarlierCall, ...] = ()
    """The earlier calls pending when its latest call with a backward ran, in the order
    they ran (observed while recording, without a budget): where the step estimate
    places them among the other regions' calls, and whether each ran on the same
    parameters."""

    def graph_code(self, graph: str, after: str | None = None) -> str:
        """Readable code of ``graph`` ("forward", "backward", "inference" or "dynamo")
        after pass ``after``: "input" (before the passes), the name of a pass of the
        pipeline (the graph as that pass left it, also when it changed nothing), or
        "fallback"; default: the graph as the region runs it.

        Raises KeyError naming the graphs and pass names there are when ``graph`` was not
        kept or ``after`` names no pass of this region's pipeline."""
        ofgraph = [s for s in self.snapshots if s.graph == graph]
        if not ofgraph:
            graphs = sorted({s.graph for s in self.snapshots})
            raise KeyError(f"graph {graph!r} was not kept for this region; it has {graphs}")
        if after is None:
            return ofgraph[-1].code
        latest = _last_pipeline(ofgraph)
        exact = [s for s in latest if s.after == after]
        if exact:
            return exact[-1].code
        order = [p.name for p in self.passes]
        if after in order:
            # A pass that changed nothing left the graph as the last one that did.
            ran_before = set(order[: order.index(after) + 1]) | {"input"}
            return [s for s in latest if s.after in ran_before][-1].code
        names = ["input", *order, *(["fallback"] if any(s.after == "fallback" for s in latest) else [])]
        raise KeyError(f"after={after!r} names no pass of this region's pipeline; pass one of {names}")


def _last_pipeline(snapshots: list[GraphSnapshot]) -> list[GraphSnapshot]:
    """The snapshots of one graph taken by the region's latest pipeline run (a region
    compiled again keeps every run's, each starting with its "input")."""
    starts = [i for i, s in enumerate(snapshots) if s.after == "input"]
    return snapshots[starts[-1]:] if starts else snapshots


_local = threading.local()


def active_recorders() -> list[list[RegionRecord]]:
    """The record lists of every active `recording` context (innermost last)."""
    stack: list[list[RegionRecord]] = getattr(_local, "stack", [])
    return stack


@contextlib.contextmanager
def recording() -> Iterator[list[RegionRecord]]:
    """Collect a `RegionRecord` for every region compiled inside the context."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    records: list[RegionRecord] = []
    stack.append(records)
    try:
        yield records
    finally:
        stack.remove(records)
