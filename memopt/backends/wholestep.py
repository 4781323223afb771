"""Whole-step planning across graph breaks under a memory budget: the decision, when a
step of tracking regions completes, to re-plan its regions for the whole step, to wait,
or to stop watching; and the step's budget warnings, said once for its regions.

A graph break splits a training step into regions. Dynamo compiles each the first
time it runs, so when the first region is planned the later ones are unknown; yet its
saved values stay live while they run, and its outputs (say, the logits) are handed
to them. memopt plans such a step in four moves:

1. A region compiled while earlier regions of the step wait for their backward (their
   forward ran, their backward has not started) is planned with them in place
   (`memopt.plan.step_context.StepContext.earlier`): their saved values, as planned,
   are live throughout it.
2. A region with no waiting predecessor is planned alone, assuming the caller keeps
   its outputs through its backward: safe, but it may recompute more than the budget
   requires.
3. `TRACKER`, a `StepTracker`, observes the regions run, forwards in order, then
   each backward (`memopt.backends.steptracker`, "Observing a call"): which of a region's outputs the caller
   keeps, and which inputs of a region are an earlier region's outputs. When a step
   completes (every region's backward has started) with more than one region, the
   non-final regions are compiled once more, at their next call, planned for the
   whole step (`StepContext.later`, with the kept outputs and input sources
   observed): their plan keeps room for the later regions' peak on top of their
   saved values, and counts the outputs the caller keeps as live after the step and
   the others as handed on. The final region keeps its plan, which the re-planned
   regions take as given, unless it was planned (move 1) without outputs the step
   shows the caller keeps: it assumed them handed on, so its budget was a fraction
   of another step peak, and it is compiled again too, after the others (its next
   call comes after theirs), so that every region plans against the same step.

4. A step planned so stays watched: the plan assumed the outputs the caller did not
   keep handed on, and holds as long as the caller keeps no more. When a later step
   keeps an output the plan assumed handed on (a loop whose first step ran
   ``loss = model(**x).loss`` and whose later steps run ``out = model(**x)``), the
   regions are compiled again as in move 3, planned for the outputs either step kept,
   at most `MAX_REPLANS` compiles per region; past that they keep their plan and
   warn once (`MemoptWarning`, at the first region's next call). A step that keeps
   fewer outputs changes nothing, and so does a change in the final region's kept
   outputs (they are live after the step either way).

A region compiled while it may still be planned again (moves 1 and 2) holds its
`MemoptBudgetWarning`s until it keeps its plan (a provisional plan may judge a budget
infeasible that its step meets); a region compiled again for its step holds them too.
When a step completes with no re-plan to come, its regions emit what they hold, the
budget warnings of several regions as one for the step (`_settle_step`): planned as a
whole, they state the same budget and step peak.

Re-planning happens only under a memory budget, and only for graphs with static shapes
(it traces the Dynamo graph again on fake copies of the example inputs). A step that
does not follow the forward-in-order, backward-in-reverse pattern (a forward with no
backward) is not used (a step that runs its regions again before one backward, in the
same order, is that pattern: planned for its calls, `Observed.repeats`): before a decision its regions
stay planned alone, after one it changes nothing. Nor is a step that mixes regions
planned for another step with others (a branch after a graph break that runs another
loss region): the planned regions keep the plan for their step. A step in which the caller keeps
outputs is used from the second step on: during the compile step Dynamo's tracing
state may still hold a region's outputs.

Layout. The regions (`memopt.backends.watched`: `WatchedRegion`, `CompiledRegion`)
are compiled, compiled again and hold their warnings; the tracker
(`memopt.backends.steptracker`) observes their calls and, when a step completes, calls
the decision here, which it is given as a callback (``TRACKER``'s ``step_done``): the
tracker imports neither the regions nor this module, and the regions are handed the
tracker that observes them, so no module imports one that imports it.
"""

from __future__ import annotations

import logging
import warnings

from memopt.backends.steptracker import Run, StepTracker, round_length
from memopt.backends.watched import (
    OBSERVED_STEPS,
    CompiledRegion,
    Observed,
    compiled_regions,
    emit,
)
from memopt.errors import MemoptBudgetWarning
from memopt.units import format_bytes

__all__ = ["TRACKER"]

log = logging.getLogger("memopt")


def _step_done(runs: list[Run], order: list[Run]) -> None:
    """A step completed. If it had several regions, in the clean pattern (and, when the
    caller kept outputs, it was not the compile step), re-plan the non-final ones (the
    final one too if it assumed kept outputs handed on) and go on watching them (move
    4); else stop watching regions seen in `OBSERVED_STEPS` steps (or in a one-region
    step). Regions that keep their plan emit the warnings they held.

    ``runs`` may be several calls of the step's regions before one backward (A, B, A,
    B: `memopt.backends.steptracker.round_length`): the regions are planned for that
    many calls (`Observed.repeats`), as observed in the latest."""
    regions = _regions(runs[: round_length(runs)])
    try:
        _decide(runs, order, regions)
    finally:
        if not any(region.replan_pending for region in regions):  # else they wait for the re-planned step
            _settle_step([r for r in regions if not r.tracking or r.decided is not None])


def _settle_step(regions: list[CompiledRegion]) -> None:
    """The regions of one step (in forward order) keep their plans: emit the warnings
    they held, the `MemoptBudgetWarning`s of several regions once for the step.
    Planned as a whole, every region states the same budget and the same step peak
    (a region compiled before another's re-plan restates its estimates for the step
    as now planned, `RegionCompiler.place_in`); that is said once, with what holds the
    peak and the advice of the region compiled last (it saw the others' plans as they
    are). Regions whose figures differ are named with theirs, in one warning; each
    region once, with its latest warning. A region whose plan, as its step is planned
    now, meets its budget drops its held budget warning (logged instead)."""
    held = [(r, w) for r in regions for w in r.take_held()]
    stated = [(r, w) for r, w in held if isinstance(w.message, MemoptBudgetWarning) and w.message.statement]
    emit([w for r, w in held if all(w is not v for _, v in stated)])
    latest = {r.name: (r, w) for r, w in stated}  # a region that held two (a re-plan's too) is named once
    budget = [(r, w) for r, w in latest.values() if not _meets_budget(r, w.message)]  # type: ignore[arg-type]
    for r, _ in latest.values():
        if all(r is not kept for kept, _ in budget):
            log.info("region %s: its budget warning is dropped: the step, planned as a whole, meets the budget", r.name)
    if len(budget) < 2:
        emit([w for _, w in budget])
        return
    last = max(budget, key=lambda rw: rw[0].held_at)[1]
    figures = [(r.name, *_planned_figures(r, w.message)) for r, w in budget]  # type: ignore[arg-type]
    warning = _step_budget_warning(figures, last.message)  # type: ignore[arg-type]
    warnings.warn_explicit(warning, MemoptBudgetWarning, last.filename, last.lineno, source=last.source)


def _meets_budget(region: CompiledRegion, held: MemoptBudgetWarning) -> bool:
    """Whether the region's plan, as its step is planned now, is within its budget: a
    warning it held from a compile before another region of its step was planned again
    (the loss region after a graph break, planned on the first region's plan alone) is
    then stale, its figures no longer the step's."""
    budget, peak = _planned_figures(region, held)
    return region.compiler.record.plan is not None and budget is not None and peak is not None and peak <= budget


def _planned_figures(region: CompiledRegion, held: MemoptBudgetWarning) -> tuple[int | None, int | None]:
    """The region's budget and peak as its step is planned now (its record's plan),
    else as its warning stated them."""
    plan = region.compiler.record.plan
    if plan is None:
        return held.budget_bytes, held.min_feasible_peak
    return plan.budget_bytes, plan.estimated_peak_after


def _step_budget_warning(
    figures: list[tuple[str, int | None, int | None]], last: MemoptBudgetWarning
) -> MemoptBudgetWarning:
    """One warning for the budget warnings of a step's regions: ``figures`` (region,
    budget, peak as planned), in forward order; ``last``: the warning of the region
    compiled last."""
    names = [name for name, _, _ in figures]
    regions = f"{', '.join(names[:-1])} and {names[-1]}"
    if len({(b, p) for _, b, p in figures}) == 1:
        message = (
            f"memory_budget {format_bytes(last.budget_bytes)} is infeasible for the step of regions {regions} "
            f"(compiled apart, planned as a whole: each region states this budget and this peak, the step's): "
            f"{last.statement}"
        )
    else:
        stated = "; ".join(f"region {n}: budget {format_bytes(b)}, peak {format_bytes(p)}" for n, b, p in figures)
        message = (
            f"memory_budget is infeasible for the step of regions {regions} (compiled apart), whose plans "
            f"state different budgets or peaks: {stated}. For region {last.region}, compiled last: {last.statement}"
        )
    warning = MemoptBudgetWarning(message)
    warning.region, warning.statement = regions, last.statement
    warning.budget_bytes, warning.min_feasible_peak = last.budget_bytes, last.min_feasible_peak
    return warning


def _decide(runs: list[Run], order: list[Run], regions: list[CompiledRegion]) -> None:
    """`_step_done`'s decision: stop watching, wait for another step, re-plan, or (a
    step already planned) re-plan again when the caller now keeps outputs the plan
    assumed handed on."""
    decided = _decided(regions)
    n = round_length(runs)
    for region in regions:
        region.steps_seen += 1
        # A region planned for its step is watched whatever this step was (move 4).
        region.tracking = region.decided is not None or (n > 1 and region.steps_seen < OBSERVED_STEPS)
    if n < 2:
        return  # one region: several calls of it are planned at the call that finds them (`watched`)
    if decided is None and any(r.decided is not None for r in regions):
        log.debug("a step mixes regions planned for another step with others; it is not used for planning")
        return
    if [id(r) for r in order] != [id(r) for r in reversed(runs)]:
        log.debug("backwards ran out of the reverse forward order; the step is not used for planning")
        return
    kept = [r.region.name for r in runs[:-1] if r.kept]
    if decided is None and kept and min(r.steps_seen for r in regions) < 2:
        log.debug("the outputs of region(s) %s were alive at their backward in the compile step; "
                  "waiting for the next step", ", ".join(kept))  # fmt: skip
        return
    if decided is None and any(r.in_step() is None for r in regions):
        for region in regions:
            region.tracking = False
        log.info("a region of the step has no memory plan to compose; the step's regions stay planned alone")
        return
    repeats = len(runs) // n - 1  # earlier calls of the step's regions, each pending through the latest
    runs = runs[-n:]  # the latest call: what the caller kept, where inputs came from
    index = {r.serial: i for i, r in enumerate(runs)}
    observed = Observed(
        tuple(r.kept or frozenset() for r in runs),
        tuple({pos: (index[s.run], s.output) for pos, s in r.sources.items() if s.run in index} for r in runs),
        repeats,
    )
    if decided is not None:
        if decided.covers(observed):
            return  # the plan holds for this step
        observed = decided.merged(observed)
    targets = [r for r in regions[:-1] if r.can_replan]
    if regions[-1].can_replan and (regions[-1].planned_without(observed) or regions[-1].planned_before_grads(regions)):
        targets.append(regions[-1])  # compiled after the others: it sees their new plans
    step = (tuple(regions), observed)
    for region in regions:
        region.tracking = bool(targets)  # a re-planned step stays watched (module docstring)
        region.decided = step if targets else None
    for region in targets:
        region.replan_in(regions, observed)
    if targets and decided is not None:
        log.info(
            "the caller now keeps output(s) of region(s) %s that the step's plan assumed handed on; "
            "region(s) %s will be compiled again at their next call, planned for the step as now run",
            ", ".join(runs[i].region.name for i, k in enumerate(observed.kept_outputs[:-1]) if k - decided.kept_outputs[i]),
            ", ".join(r.name for r in targets),
        )
    elif targets:
        log.info(
            "the step runs %d regions (graph breaks between %s); region(s) %s will be compiled again "
            "at their next call, planned for the whole step",
            len(regions),
            " | ".join(r.name for r in regions),
            ", ".join(r.name for r in targets),
        )
    elif decided is not None:
        regions[0].warn_at_next_call(
            f"the caller now keeps outputs of the regions {', '.join(r.name for r in regions)} that their "
            f"memory plan assumed handed on, and they were planned again {max(r.replans for r in regions)} times already: they "
            "keep their plan, which may exceed memory_budget. Keep (or drop) a model's outputs the same way "
            "in every training step."
        )


def _decided(regions: list[CompiledRegion]) -> Observed | None:
    """The observation the regions' plans are for, when they were decided together as
    this step (the same regions, in this order); else None."""
    decided = regions[0].decided
    if decided is None or len(decided[0]) != len(regions):
        return None
    if any(a is not b or b.decided is not decided for a, b in zip(decided[0], regions)):
        return None
    return decided[1]


def _regions(runs: list[Run]) -> list[CompiledRegion]:
    """The regions of ``runs``, runs of tracking regions (only a `CompiledRegion` tracks)."""
    return compiled_regions(run.region for run in runs)


TRACKER = StepTracker(_step_done)
"""The process's tracker (regions of all compiled models; runs are per step)."""
