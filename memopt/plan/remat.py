"""The rematerialization planner: which forward values to save so that the step's
estimated peak stays within a budget, at the least recompute time.

The problem (the forward's segments, the options each may take, their effects measured
on the exact timeline, and the MILP over them) is `memopt.plan.remat_problem`'s; this
module searches it. Every chosen plan is then split and its exact timeline checked; if
the exact peak exceeds the budget (the per-segment attribution is a model), the MILP is
re-solved with the budget lowered by the excess. A greedy heuristic replaces the MILP
when scipy is missing or the time limit is hit. `plan_remat` says which other plans are
judged, and how the answer is chosen among them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from memopt.analysis.schedule import scheduled_timeline
from memopt.graph.step import StepGraphs
from memopt.plan.remat_problem import (
    OPTIONS, Evaluation, RematProblem, Storage, build_problem, evaluate, evaluate_torch_partition,
)
from memopt.plan.segments import Segment, must_save
from memopt.plan.step_context import StepContext, placed

__all__ = ["RematSolution", "plan_remat"]

log = logging.getLogger("memopt.plan")
_PROBES = (0.03, 0.08)  # budget slack of the extra MILP solves after the main loop


@dataclass
class RematSolution:
    """The planner's answer: a choice per segment, verified against the budget."""

    choice: list[str]
    evaluation: Evaluation
    feasible: bool
    solver: str
    iterations: int
    solve_seconds: float
    tradeoff: list[dict[str, float]]
    min_peak: Evaluation | None = None
    segments: list[Segment] = field(default_factory=list)


def _solve(
    problem: RematProblem, budget: float, time_limit: float, gap: float = 1e-4
) -> tuple[list[str] | None, str]:
    from memopt.plan.milp import solve_greedy, solve_milp

    try:
        idx, how = solve_milp(problem.S, problem.F, problem.P, problem.C, budget, time_limit, gap)
    except ImportError:
        idx, how = None, "scipy missing"
    if idx is None and how != "milp":
        if "infeasible" in str(how).lower():
            return None, "milp"
        idx, how = solve_greedy(problem.S, problem.F, problem.P, problem.C, budget), "greedy"
        if problem.predicted_peak([OPTIONS[o] for o in idx]) > budget:
            return None, how
    return (None if idx is None else [OPTIONS[o] for o in idx]), how


def _tradeoff(
    problem: RematProblem, low: float, high: float, points: int, time_limit: float
) -> list[tuple[list[str], dict[str, float]]]:
    """The modelled (peak, recompute cost) curve for budgets from ``low`` to ``high``,
    with the choice behind each point."""
    curve: list[tuple[list[str], dict[str, float]]] = []
    seen: set[tuple[str, ...]] = set()
    for budget in np.linspace(high, low, points):  # a sketch of the curve: quick, coarse solves
        choice, _ = _solve(problem, float(budget), min(time_limit, 0.5), gap=0.02)
        if choice is None or tuple(choice) in seen:
            continue
        seen.add(tuple(choice))
        curve.append((choice, {
                "budget_bytes": float(budget),
                "predicted_peak_bytes": problem.predicted_peak(choice),
                "recompute_seconds": problem.predicted_seconds(choice),
                "recompute_flops": problem.predicted_flops(choice),
                "segments_recomputed": float(sum(o != "save" for o in choice)),
            }))  # fmt: skip
    return curve


def _neighbours(problem: RematProblem, centres: list[list[str]]) -> list[list[str]]:
    """The plans that differ from one of ``centres`` in one segment's option, the ones
    the model predicts smallest first. The MILP's per-segment attribution is a model:
    near the floor it can miss a plan one option away from its smallest-peak plan or
    from the smallest plan found, which the exact timeline shows is smaller (the zoo
    GPT at 0.5: 5.80 MiB one option away from 6.05 MiB)."""
    seen = {tuple(c) for c in centres}
    out = []
    for centre in centres:
        for k, option in ((k, o) for k in range(len(centre)) for o in OPTIONS if o != centre[k]):
            choice = centre[:k] + [option] + centre[k + 1 :]
            if tuple(choice) not in seen:
                seen.add(tuple(choice))
                out.append(choice)
    return sorted(out, key=problem.predicted_peak)


def _merged_segments(problem: RematProblem, choice: list[str], saved: frozenset[str]) -> list[frozenset[str]]:
    """Saved sets below the per-segment floor: ``saved`` without the outputs of every
    other segment whose successor is recomputed, so pairs of segments are recomputed
    together from the first one's input (one checkpoint per transformer block when
    segments are half-blocks). Segments are independent in the MILP only because their
    boundaries are saved, so these plans lie outside it; each is judged exactly."""
    K = len(problem.segments)
    out = []
    for parity in (0, 1):
        drop = {
            n.name
            for k in range(parity, K - 1, 2)
            if choice[k + 1] == "recompute"
            for n in problem.segments[k].crossers
            if n.name not in problem.always and not must_save(n)
        }
        if drop & saved:
            out.append(saved - drop)
    return out


def plan_remat(
    step: StepGraphs,
    budget_bytes: int,
    *,
    time_limit: float = 5.0,
    max_iterations: int = 6,
    storage: Storage | None = None,
    context: StepContext | None = None,
) -> RematSolution:
    """Choose per-segment options so the step's exact estimated peak fits
    ``budget_bytes`` at the least recompute time (see the module docstrings, this one's
    and `memopt.plan.remat_problem`'s).

    Every plan evaluated on the way (the MILP's answers, the all-one-option plans,
    the smallest-peak plan, torch's own choices and, when nothing fits, the
    smallest-peak plan with every other segment boundary recomputed) is a candidate;
    the answer is the fitting one with the least recompute FLOPs (with ``storage``: the
    least modelled time, recomputation plus storage). ``feasible=False`` means none
    fits; the solution then holds the plan with the smallest peak found
    (``min_peak``). With ``storage`` every plan is judged with its saved values held
    as the storage planner decides for it; with ``context``, by the peak of the whole
    step it runs in (`memopt.plan.step_context`).

    Python's cyclic garbage collector is paused while planning: the evaluations build
    and drop many FX graphs (cyclic garbage), and collections over the compile's
    large heap took up to half the planner's time, varying from run to run."""
    with _gc_paused():
        return _plan_remat(step, budget_bytes, time_limit, max_iterations, storage, context)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _plan_remat(
    step: StepGraphs,
    budget_bytes: int,
    time_limit: float,
    max_iterations: int,
    storage: Storage | None,
    context: StepContext | None,
) -> RematSolution:
    from memopt.plan.milp import solve_min_peak

    start = time.perf_counter()
    problem = build_problem(step, storage, context)
    K = len(problem.segments)
    tried: dict[frozenset[str], tuple[list[str], Evaluation]] = {
        ev.saved: ([option] * K, ev) for option, ev in problem.evaluations.items()
    }

    def consider(choice: list[str], saved: frozenset[str]) -> Evaluation:
        if saved not in tried:
            tried[saved] = (choice, evaluate(step, saved, storage, context))
        return tried[saved][1]

    for b, names in problem.torch_whole.items():  # (repeats of a budget are skipped by consider)
        consider([f"torch@{b} (whole graph)"] * K, names)
    torch_own: list[tuple[list[str], Evaluation]] = []  # torch's partitions, installed as they are
    for b in problem.torch_graphs:
        ev = evaluate_torch_partition(step, b, storage, context)
        if ev is not None:
            torch_own.append(([f"torch@{b} (torch's graphs)"] * K, ev))
    target = float(budget_bytes)
    iterations, how = 0, "milp"
    answer: Evaluation | None = None
    for iterations in range(1, max_iterations + 1):
        choice, how = _solve(problem, target, time_limit)
        if choice is None:
            break
        answer = consider(choice, problem.saved_for(choice))
        if answer.timeline.peak_bytes <= budget_bytes:
            break
        target -= answer.timeline.peak_bytes - budget_bytes
    scheduled = _ScheduledPeaks(context)
    gain = 0 if answer is None else answer.timeline.peak_bytes - scheduled(answer).timeline.peak_bytes
    slacks = [*_PROBES, *(g / budget_bytes for g in (gain / 2, gain) if g > 0)]
    for slack in slacks:  # the model errs both ways, and the schedule pass lowers peaks: cheaper plans may fit too
        choice, _ = _solve(problem, budget_bytes * (1 + slack), time_limit)
        if choice is not None:
            consider(choice, problem.saved_for(choice))
    min_choice = [OPTIONS[o] for o in solve_min_peak(problem.S, problem.F, problem.P, problem.C, time_limit)]
    consider(min_choice, problem.saved_for(min_choice))
    peaks = [ce[1].timeline.peak_bytes for ce in tried.values()]
    curve = _tradeoff(problem, min(peaks), max(peaks), 8, time_limit)
    if not any(ce[1].timeline.peak_bytes <= budget_bytes for ce in tried.values()):
        # infeasible so far: look harder for the true floor, on a finer grid
        for choice, _ in _tradeoff(problem, min(peaks) * 0.8, max(peaks), 16, time_limit):
            consider(choice, problem.saved_for(choice))
        per_segment = [ce for ce in tried.values() if all(o in OPTIONS for o in ce[0])]
        smallest_found = min(per_segment, key=lambda ce: ce[1].timeline.peak_bytes)[0]
        deadline = time.perf_counter() + time_limit
        for choice in _neighbours(problem, [smallest_found, min_choice]):
            if time.perf_counter() > deadline:
                break
            consider(choice, problem.saved_for(choice))
        _descend(problem, consider, min(ce[1].timeline.peak_bytes for ce in tried.values()), max_iterations, time_limit)
        floor_choice, floor = min(tried.values(), key=lambda ce: ce[1].timeline.peak_bytes)
        for saved in _merged_segments(problem, floor_choice, floor.saved):
            consider(floor_choice, saved)
    candidates = [*tried.values(), *torch_own]
    best, smallest = _select(candidates, budget_bytes, storage is not None, scheduled)
    elapsed = time.perf_counter() - start
    chosen = smallest if best is None else best
    points = [{**p, "chosen": float(c == chosen[0])} for c, p in curve]
    return RematSolution(
        chosen[0], chosen[1], best is not None, how, iterations, elapsed, points, smallest[1], problem.segments
    )


def _descend(
    problem: RematProblem,
    consider: Callable[[list[str], frozenset[str]], Evaluation],
    floor: int,
    max_iterations: int,
    time_limit: float,
) -> None:
    """Under an infeasible budget, look for plans below the smallest exact peak found
    so far (``floor``) as a budget there would: solve the MILP just below it, judge the
    answer exactly, and lower the target by the excess (or to below the new floor) until
    the MILP finds nothing or ``max_iterations`` solves are spent.

    Without this the floor reported depended on the budget: the budget's own solves
    (at the budget, then lowered by the excess) are what find the plans near the floor,
    and a budget far below it makes the MILP infeasible at once. Hugging Face Llama
    (small, batch 4 x 64) reached 2.92 MiB under ``memory_budget=0.6`` but only 2.99
    MiB under 0.5, 0.4 and 0.3: a lower budget gave a higher peak."""
    target = float(floor - 1)
    for _ in range(max_iterations):
        choice, _ = _solve(problem, target, time_limit)
        if choice is None:
            return
        peak = consider(choice, problem.saved_for(choice)).timeline.peak_bytes
        if peak < floor:
            floor, target = peak, float(peak - 1)
        else:
            target -= peak - target


_SCHEDULE_CHECKS = 4
"""How many candidates over the budget in the partition's order `_select` judges in
memory-aware order (each costs a schedule and a timeline)."""

Candidate = tuple[list[str], Evaluation]


class _ScheduledPeaks:
    """A candidate's evaluation with its timeline in memory-aware order, as the
    ``schedule`` pass will run it (`memopt.analysis.schedule`), where that is lower;
    memoized. A candidate whose saved values are held elsewhere (a modelled timeline)
    is judged as it is."""

    def __init__(self, context: StepContext | None) -> None:
        self.context = context
        self.cache: dict[int, Evaluation] = {}

    def __call__(self, ev: Evaluation) -> Evaluation:
        if ev.storage is not None and ev.storage.chosen:
            return ev
        if id(ev) not in self.cache:
            timeline = scheduled_timeline(ev.step, lambda t: placed(self.context, ev.step, t))
            better = timeline.peak_bytes < ev.timeline.peak_bytes
            self.cache[id(ev)] = dataclasses.replace(ev, timeline=timeline) if better else ev
        return self.cache[id(ev)]


def _select(
    candidates: list[Candidate], budget: int, by_time: bool, scheduled: _ScheduledPeaks
) -> tuple[Candidate | None, Candidate]:
    """(the cheapest candidate that fits ``budget``, or None; the smallest-peak one).

    Cheapest: the fewest recompute FLOPs, then modelled time (``by_time``: storage
    plans, whose cost is time, not FLOPs: time first). A candidate fits when its peak
    does in the partition's order or, for up to `_SCHEDULE_CHECKS` candidates cheaper
    than the cheapest that does, in memory-aware order (the schedule pass runs after
    remat; it never raises a peak). With none fitting, the candidates of the smallest
    peaks are judged in memory-aware order the same way."""

    def cost(ce: Candidate) -> tuple[float, ...]:
        ev = ce[1]
        if by_time:
            return (ev.seconds, ev.recompute_flops, ev.timeline.peak_bytes)
        return (ev.recompute_flops, ev.seconds, ev.timeline.peak_bytes)

    fitting = [ce for ce in candidates if ce[1].timeline.peak_bytes <= budget]
    best = min(fitting, key=cost) if fitting else None
    if best is not None:
        pool = sorted((ce for ce in candidates if cost(ce) < cost(best)), key=cost)
    else:
        pool = sorted(candidates, key=lambda ce: ce[1].timeline.peak_bytes)
    judged = [(ce[0], scheduled(ce[1])) for ce in pool[:_SCHEDULE_CHECKS]]
    fit_scheduled = [ce for ce in judged if ce[1].timeline.peak_bytes <= budget]
    if fit_scheduled:
        best = min([*fit_scheduled, *([best] if best is not None else [])], key=cost)
    smallest = min([*candidates, *judged], key=lambda ce: ce[1].timeline.peak_bytes)
    return best, smallest
