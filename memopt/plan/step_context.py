"""`StepContext`: the other regions of the training step a region runs in.

A graph break splits a training step into regions that Dynamo compiles one at a time,
and that run forwards in order, then backwards in reverse order (the step timeline of
`memopt.analysis.compose.compose_timelines`). A region planned alone does not see that
an earlier region's saved values are live throughout it, nor how much memory later
regions need while its own saved values wait for its backward; and it must assume
the caller keeps its outputs through its backward.

A `StepContext` names the other regions, with their graphs and their timelines under
their current plans. `StepContext.place` puts a timeline of the planned region (the
unoptimized one, or any candidate plan's) into the step, so that the budget is checked
on the step's peak: the planner judges every candidate that way, and a fractional
budget is a fraction of the step's unoptimized peak (`StepContext.unoptimized_peak`).
When the backend has watched the step run (`memopt.backends.wholestep`), the context
also says which outputs of each region the caller kept through the step's backward
and which region inputs were an earlier region's outputs
(`StepContext.kept_outputs`, ``input_sources``): the composition keeps those outputs
live after the step and counts each such storage once.

A region called again before the backward of its previous call (``loss =
f(model(a), model(b))``: a DPO or contrastive loss) is planned with
``StepContext.repeats``, the calls pending when it runs: the step then holds every
call's saved activations at once (`memopt.analysis.compose.compose_repeated_calls`),
and every call runs the plan being chosen.

Pure data: building or placing never mutates a graph or a timeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from memopt.analysis.compose import compose_repeated_calls, compose_timelines
from memopt.analysis.timeline import MemoryTimeline
from memopt.graph.step import StepGraphs

__all__ = ["RegionInStep", "StepContext", "placed"]


@dataclass(frozen=True)
class RegionInStep:
    """Another region of the step: its graphs before memopt's pipeline and their
    timeline, and its graphs as compiled and their timeline (under its current plan).
    Each timeline must be paired with its own graphs (the composition matches the
    region's inputs by node)."""

    step_before: StepGraphs
    before: MemoryTimeline
    step: StepGraphs
    after: MemoryTimeline

    @property
    def name(self) -> str:
        return self.step.region


@dataclass(frozen=True)
class StepContext:
    """The regions that run before (``earlier``, in forward order) and after
    (``later``) the planned one in a training step.

    Preconditions: every region is a training region (forward and backward) and the
    region names, the planned one's included, are distinct. ``kept_outputs`` and
    ``input_sources``, when given, have one entry per region of the step, in forward
    order (the planned one included), as `memopt.analysis.compose.compose_timelines`
    takes them; empty: not observed, every output but the last region's handed on."""

    earlier: tuple[RegionInStep, ...] = ()
    later: tuple[RegionInStep, ...] = ()
    kept_outputs: tuple[frozenset[int] | None, ...] = ()
    """Per region: the positions of its outputs the caller kept through the step's
    backward (observed; None: not observed)."""
    input_sources: tuple[Mapping[int, tuple[int, int]], ...] = ()
    """Per region: input position -> (index of the earlier region in the step, its
    output position), for inputs that were an earlier region's outputs (observed)."""
    repeats: int = 0
    """Earlier calls of the step's regions whose backward has not started when the
    latest call runs (observed: `memopt.backends.repeats`, `memopt.backends.wholestep`),
    each under the same plans: the step runs its regions ``repeats + 1`` times before
    one backward."""

    def __post_init__(self) -> None:
        if self.repeats < 0:
            raise ValueError(f"StepContext.repeats is {self.repeats}; it counts earlier calls, 0 or more")
        for name in ("kept_outputs", "input_sources"):
            given = getattr(self, name)
            if given and len(given) != self.num_regions:
                raise ValueError(f"StepContext.{name} has {len(given)} entries for a step of {self.num_regions} regions")

    @property
    def num_regions(self) -> int:
        return len(self.earlier) + 1 + len(self.later)

    def place(self, step: StepGraphs, timeline: MemoryTimeline) -> MemoryTimeline:
        """The step's timeline with ``timeline`` (a timeline of ``step``, the planned
        region) in its place among the other regions, as they are planned now (or
        after its earlier calls under the same plan: ``repeats``)."""
        return self._compose(
            [*((r.step, r.after) for r in self.earlier), (step, timeline), *((r.step, r.after) for r in self.later)]
        )

    def unoptimized_peak(self, step: StepGraphs, before: MemoryTimeline) -> int:
        """The step's estimated peak with no region optimized (``before``: the planned
        region's unoptimized timeline): what a fractional budget is a fraction of."""
        parts = [
            *((r.step_before, r.before) for r in self.earlier),
            (step, before),
            *((r.step_before, r.before) for r in self.later),
        ]
        return self._compose(parts).peak_bytes

    def _compose(self, parts: list[tuple[StepGraphs, MemoryTimeline]]) -> MemoryTimeline:
        if self.repeats:
            return compose_repeated_calls(parts, self.repeats, self.kept_outputs or None, self.input_sources or None)
        return compose_timelines(parts, self.kept_outputs or None, self.input_sources or None)

    def scope(self) -> str:
        """What the region was planned for, in a few words (for messages)."""
        calls = f"{self.repeats + 1} calls before one backward" if self.repeats else ""
        if self.earlier or self.later:
            return "planned in its step" + (f" of {calls}" if calls else "")
        return f"planned for {calls}" if calls else "planned in its step"

    def describe(self) -> str:
        """One line for the plan's notes."""
        again = (
            f"{self.repeats + 1} calls before one backward (the regions ran again before their previous "
            "call's backward): peaks and the budget hold every call's saved activations"
        )
        if self.repeats and not (self.earlier or self.later):
            return f"planned for {again}"
        names = ", ".join([*(r.name for r in self.earlier), "this region", *(r.name for r in self.later)])
        kept = sum(len(k) for k in self.kept_outputs[:-1] if k)
        held = f"; {kept} output(s) kept by the caller through backward" if kept else ""
        calls = f"; {again}" if self.repeats else ""
        return (
            f"planned for the whole step: {self.num_regions} regions split by graph breaks ({names}); "
            f"peaks and the budget are the step's{held}{calls}"
        )


def placed(context: StepContext | None, step: StepGraphs, timeline: MemoryTimeline) -> MemoryTimeline:
    """``timeline`` (of ``step``) as the planner judges it: in its step when the region
    has a ``context``, else as it is."""
    return timeline if context is None else context.place(step, timeline)
