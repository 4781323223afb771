"""Which saved values to compress when a memory budget is set.

With ``compress_activations`` and no budget, every eligible saved value is compressed
(`memopt.passes.compress.compress_every_eligible`). With a budget, compression is a
per-value planning choice: rematerialization (exact) has already done what it can,
and this module picks the fewest, largest compressions that bring the estimated peak
within the budget. Each compression costs one quantize and one dequantize kernel over
the value and adds rounding error to the gradients; it saves bytes only while the
value is live at the peak. So candidates are ranked by the bytes they save *at the
peak* (kernel time and error grow with elements, which is the same ratio for every
value of one format), and a value that is not live at the peak is never chosen.

The peak moves as values shrink, so the choice is made in rounds, each measured on a
trial copy of the graphs with memopt's memory timeline: a round adds the candidates
live at the current peak, largest first, until their savings cover the excess.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch.fx as fx

from memopt.analysis.memory import MemoryTimeline, build_timeline
from memopt.graph.step import StepGraphs
from memopt.plan.step_context import StepContext, placed

__all__ = ["BudgetCompression", "choose_for_budget"]

MAX_ROUNDS = 16


@dataclass(frozen=True)
class BudgetCompression:
    """The outcome: the decisions to carry out (a subset of the candidates), the
    estimated peak before and after them, and whether the budget is met."""

    decisions: dict[fx.Node, object]
    peak_before: int
    peak_after: int
    budget: int
    rounds: int

    @property
    def feasible(self) -> bool:
        return self.peak_after <= self.budget


Apply = Callable[[StepGraphs, Mapping[fx.Node, object]], object]
Storages = list[tuple[tuple[fx.Node, ...], tuple[fx.Node, ...], int]]
"""Per candidate storage: its saved values, every forward node aliasing it, and the
bytes compression saves (stored bytes before minus after)."""


def choose_for_budget(
    step: StepGraphs,
    candidates: Mapping[fx.Node, object],
    storages: Storages,
    budget: int,
    apply: Apply,
    context: StepContext | None = None,
) -> BudgetCompression:
    """Pick the candidates (saved forward node -> choice) to compress so the estimated
    peak of ``step`` fits ``budget``.

    ``storages`` groups the candidates by storage (they are decided together), and
    ``apply(trial_step, decisions)`` carries decisions out on a copy of the graphs.
    Never mutates ``step``. If even every candidate does not fit, returns them all
    (the smallest peak compression reaches) with ``feasible`` False. With ``context``
    the peak is the whole step's (`memopt.plan.step_context`).
    """
    timeline = placed(context, step, build_timeline(step))
    peak_before = timeline.peak_bytes
    chosen: set[int] = set()
    rounds = 0
    while timeline.peak_bytes > budget and rounds < MAX_ROUNDS:
        live = _live_at_peak(timeline, step.region)
        fresh = sorted(
            (i for i, (_, aliases, _) in enumerate(storages) if i not in chosen and live & {a.name for a in aliases}),
            key=lambda i: -storages[i][2],
        )
        if not fresh:
            break  # nothing left to compress is live at the peak
        excess = timeline.peak_bytes - budget
        for i in fresh:
            chosen.add(i)
            excess -= storages[i][2]
            if excess <= 0:
                break
        rounds += 1
        timeline = _trial(step, _decisions(candidates, storages, chosen), apply, context)
    return BudgetCompression(_decisions(candidates, storages, chosen), peak_before, timeline.peak_bytes, budget, rounds)


def _live_at_peak(timeline: MemoryTimeline, region: str) -> set[str]:
    """Names of ``region``'s saved values live at the peak."""
    return {
        iv.node.name for iv in timeline.saved_activations() if iv.region == region and iv.live_at(timeline.peak_index)
    }


def _decisions(candidates: Mapping[fx.Node, object], storages: Storages, chosen: set[int]) -> dict[fx.Node, object]:
    return {v: candidates[v] for i in sorted(chosen) for v in storages[i][0]}


def _trial(
    step: StepGraphs, decisions: Mapping[fx.Node, object], apply: Apply, context: StepContext | None
) -> MemoryTimeline:
    trial = step.clone()
    by_name = {n.name: n for n in trial.forward.graph.nodes}
    apply(trial, {by_name[n.name]: c for n, c in decisions.items()})
    return placed(context, trial, build_timeline(trial))
