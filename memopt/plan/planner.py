"""`plan_region`: analyses in, `MemoryPlan` out. Never mutates a graph.

Without a budget (or when the unoptimized estimate already fits) the plan keeps the
partitioner's choices. With one, a training region goes to the rematerialization
planner (`memopt.plan.remat`); its answer becomes one `TensorDecision` per value the
backward needs, with the reason, and the list of values to save that the ``remat``
pass carries out.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.fx as fx

from memopt.analysis.cost import is_view
from memopt.analysis.memory import MemoryTimeline
from memopt.config import MemoptConfig
from memopt.errors import MemoptBudgetError, MemoptWarning
from memopt.graph.partition import JointGraph, saved_names
from memopt.graph.step import StepGraphs
from memopt.plan.plan import MemoryPlan, TensorDecision, decision_for_node
from memopt.plan.remat import RematSolution, Shrink, plan_remat
from memopt.plan.report import format_bytes
from memopt.plan.segments import Segment, must_save, value_bytes
from memopt.plan.step_context import StepContext, placed

__all__ = ["plan_region", "check_final_budget"]


def plan_region(
    step: StepGraphs,
    before: MemoryTimeline,
    config: MemoptConfig,
    shrink: Shrink | None = None,
    context: StepContext | None = None,
) -> MemoryPlan:
    """The memory plan for one region (see module docstring). Raises
    `MemoptBudgetError` for an infeasible budget when ``config.strict``; otherwise
    warns and returns the plan with the smallest peak found.

    ``shrink`` (given when ``compress_activations`` is set) compresses a candidate's
    saved values: the planner then also plans with compression and takes that plan
    when exact rematerialization cannot meet the budget, or needs more modelled time
    than compression does. Whether such a plan's budget is met is checked after the
    pipeline (`check_final_budget`), once the values are compressed.

    With ``context`` (the other regions of a step split by graph breaks) the region is
    planned for the whole step: every peak, the plan's estimates included, is the
    step's with the other regions as they are planned, and a fractional budget is a
    fraction of the step's unoptimized peak."""
    in_step = placed(context, step, before)
    reference = before.peak_bytes if context is None else context.unoptimized_peak(step, before)
    budget = config.budget_bytes(reference)
    plan = MemoryPlan.unplanned(step.region, before, budget)
    if context is not None:
        plan = _with(
            plan,
            estimated_peak_before=in_step.peak_bytes,
            estimated_peak_after=in_step.peak_bytes,
            peak_breakdown_before=in_step.peak_breakdown,
            peak_breakdown_after=in_step.peak_breakdown,
            notes=(context.describe(),),
        )
    if budget is None:
        return plan
    if in_step.peak_bytes <= budget:
        fits = f"the unoptimized estimate {format_bytes(in_step.peak_bytes)} fits the budget"
        return _with(plan, notes=(*plan.notes, fits))
    if not step.is_training or step.joint is None:
        return _infeasible_inference(plan, in_step, budget, config)
    limit = config.planner_time_limit
    solution = plan_remat(step, budget, time_limit=limit, context=context)
    exact_needs_work = not solution.feasible or solution.evaluation.recompute_flops > 0
    if shrink is not None and exact_needs_work:
        compressed = plan_remat(step, budget, time_limit=limit, shrink=shrink, context=context)
        if _prefer_compressed(compressed, solution):
            result = _remat_plan(plan, step, compressed, budget)
            note = _compression_note(compressed, solution, config)
            return _with(result, notes=result.notes + (note,), solver={**result.solver, _COMPRESSED: True})
    result = _remat_plan(plan, step, solution, budget)
    if not solution.feasible:
        _report_infeasible(result, config)
    return result


_COMPRESSED = "with_compression"


def _prefer_compressed(compressed: RematSolution, exact: RematSolution) -> bool:
    """Compression changes numerics, so it must buy something: a budget exact remat
    cannot meet, less modelled time, or (both infeasible) a smaller peak."""
    if compressed.feasible != exact.feasible:
        return compressed.feasible
    if compressed.feasible:
        return compressed.evaluation.seconds < exact.evaluation.seconds
    return compressed.evaluation.timeline.peak_bytes < exact.evaluation.timeline.peak_bytes


def _compression_note(compressed: RematSolution, exact: RematSolution, config: MemoptConfig) -> str:
    fmt = config.compress_activations
    if not exact.feasible:
        return f"rematerialization alone cannot meet the budget: planned with saved values compressed ({fmt})"
    return (
        f"planned with saved values compressed ({fmt}): modelled {compressed.evaluation.seconds * 1e3:.2f} ms "
        f"of kernels against {exact.evaluation.seconds * 1e3:.2f} ms of recomputation for exact remat"
    )


def check_final_budget(plan: MemoryPlan, config: MemoptConfig) -> MemoryPlan:
    """After the pipeline: for a plan made with compression, report (warn, or raise
    when strict) if the final estimate exceeds the budget. Returns ``plan`` with
    ``feasible`` set from the final estimate."""
    if not plan.solver.get(_COMPRESSED) or plan.budget_bytes is None:
        return plan
    if plan.estimated_peak_after <= plan.budget_bytes:
        return _with(plan, feasible=True)
    result = _with(plan, feasible=False, min_feasible_peak=plan.estimated_peak_after, blockers=dict(plan.peak_breakdown_after))
    _report_infeasible(result, config, by="rematerialization and compression")
    return result


def _with(plan: MemoryPlan, **changes: Any) -> MemoryPlan:
    import dataclasses

    return dataclasses.replace(plan, **changes)


def _infeasible_inference(plan: MemoryPlan, before: MemoryTimeline, budget: int, config: MemoptConfig) -> MemoryPlan:
    result = _with(
        plan,
        feasible=False,
        min_feasible_peak=before.peak_bytes,
        blockers=before.peak_breakdown,
        notes=("inference regions keep nothing for backward: rematerialization cannot lower their peak",),
    )
    _report_infeasible(result, config)
    return result


def _report_infeasible(plan: MemoryPlan, config: MemoptConfig, by: str = "rematerialization") -> None:
    blockers = sorted(((v, k) for k, v in plan.blockers.items() if v), reverse=True)[:4]
    listed = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for v, k in blockers)
    message = (
        f"memory_budget {format_bytes(plan.budget_bytes)} is infeasible for region {plan.region}: "
        f"the smallest peak memopt can reach is {format_bytes(plan.min_feasible_peak)} "
        f"(unoptimized {format_bytes(plan.estimated_peak_before)}). At that peak the largest "
        f"contributors {by} cannot remove are: {listed}. Raise the budget to at least "
        f"{format_bytes(plan.min_feasible_peak)}, or shrink what remat cannot (batch size, "
        f"parameters: precision/sharding)."
    )
    if config.strict:
        raise MemoptBudgetError(message)
    warnings.warn(message + " Using the plan with the smallest peak.", MemoptWarning, stacklevel=3)


def _remat_plan(plan: MemoryPlan, step: StepGraphs, solution: RematSolution, budget: int) -> MemoryPlan:
    ev = solution.evaluation
    smallest = solution.min_peak or ev
    joint: JointGraph = step.joint.recomputable()
    decisions = _decisions(step, joint, solution)
    return _with(
        plan,
        estimated_peak_after=ev.timeline.peak_bytes,
        peak_breakdown_after=ev.timeline.peak_breakdown,
        decisions=tuple(decisions),
        saved_values=tuple(sorted(ev.saved)),
        graphs=ev.graphs,
        segment_options=tuple(solution.choice),
        tradeoff=tuple(solution.tradeoff),
        feasible=solution.feasible,
        min_feasible_peak=smallest.timeline.peak_bytes,
        blockers=_blockers(smallest.timeline),
        solver={
            "method": solution.solver,
            "iterations": solution.iterations,
            "seconds": round(solution.solve_seconds, 4),
            "segments": len(solution.choice),
            "joint_nodes": len(joint.module.graph.nodes),
            "recompute_flops": ev.recompute_flops,
            "recompute_seconds_model": ev.recompute_seconds,
            "compress_seconds_model": ev.compress_seconds,
        },
    )


def _blockers(timeline: MemoryTimeline) -> dict[str, int]:
    """What stays at the smallest peak: everything but the saved activations remat
    can still trade (those left are boundaries and random-op outputs)."""
    return {k: v for k, v in timeline.peak_breakdown.items() if v}


def _decisions(step: StepGraphs, joint: JointGraph, solution: RematSolution) -> list[TensorDecision]:
    segments = solution.segments
    owner = {n.name: s for s in segments for n in s.nodes}
    mincut = set(saved_names(step))
    saved = set(solution.evaluation.saved)
    out: list[TensorDecision] = []
    for name in sorted(mincut | saved):
        node = joint._by_name().get(name)
        if node is None or node.op == "placeholder" or value_bytes(node) == 0 or is_view(node):
            continue  # views cost no bytes of their own: their base is listed
        segment = owner.get(name)
        option = solution.choice[segment.index] if segment is not None else "save"
        policy, reason = _reason(node, segment, option, name in saved)
        out.append(decision_for_node(node, f"forward:{name}", step.region, value_bytes(node), policy, reason,
                                     segment=None if segment is None else segment.index, option=option))
    return sorted(out, key=lambda d: -d.bytes)


def _reason(node: fx.Node, segment: Segment | None, option: str, saved: bool) -> tuple[str, str]:
    where = "" if segment is None else f"segment {segment.index}"
    if not saved and segment is not None and node in segment.crossers:
        return "recompute", f"{where}'s output recomputed with the segment from its input, for the next segment's backward"
    if not saved:
        how = "recomputed with the whole segment" if option == "recompute" else "recomputed from saved matmul outputs"
        return "recompute", f"{how} in backward ({where}, option {option}) to meet the budget"
    if must_save(node):
        return "save", "random op or side effect: recomputing would change results"
    if segment is not None and node in segment.crossers:
        return "save", f"checkpoint: {where}'s output, input of later recomputation"
    if option == "selective":
        return "save", f"output of an expensive op kept; cheap ops around it recomputed ({where})"
    if option == "save":
        return "save", f"{where} keeps the partitioner's choice: cheapest under the budget"
    return "save", f"needed by backward ({where}, option {option})"

