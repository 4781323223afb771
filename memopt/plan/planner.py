"""`plan_region`: analyses in, `MemoryPlan` out. Never mutates a graph.

Without a budget (or when the unoptimized estimate already fits) the plan keeps the
partitioner's choices. With one, a training region goes to the rematerialization
planner (`memopt.plan.remat`); its answer becomes one `TensorDecision` per value the
backward needs, with the reason, and the list of values to save that the ``remat``
pass carries out.

Where saved values wait for backward (compressed, offloaded: `memopt.plan.storage`)
is decided here too, so this is the one place the budget is enforced: without a
budget the storage options apply to every eligible value; with one, the
rematerialization planner is run again with each candidate's storage plan (once per
storage option set: both, offload alone, compression alone, the cheapest kept), and
that plan is taken when exact rematerialization cannot meet the budget or needs more
modelled time. Whether such a plan meets the budget is checked on the exact
timeline after the passes (`check_final_budget`).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch.fx as fx

from memopt._once import said_before
from memopt.analysis.cost import is_view
from memopt.analysis.timeline import MemoryTimeline
from memopt.config import MemoptConfig
from memopt.errors import MemoptBudgetError, MemoptBudgetWarning
from memopt.graph import meta
from memopt.graph.collectives import is_collective
from memopt.graph.partition import JointGraph, saved_joint_names, writes_back_input
from memopt.graph.step import StepGraphs
from memopt.plan.decisions import Action, Compress, Offload, Recompute, Save
from memopt.plan.plan import MemoryPlan, TensorDecision, decision_for_node
from memopt.plan.remat import RematSolution, plan_remat
from memopt.plan.storage import StorageOptions, StoragePlan, plan_storage
from memopt.units import format_bytes
from memopt.plan.segments import Segment, must_save_reason
from memopt.plan.step_context import StepContext, placed

__all__ = ["base_plan", "plan_region", "check_final_budget"]

log = logging.getLogger("memopt.plan")


def plan_region(
    step: StepGraphs,
    before: MemoryTimeline,
    config: MemoptConfig,
    storage: StorageOptions | None = None,
    context: StepContext | None = None,
) -> MemoryPlan:
    """The memory plan for one region (see module docstring). Raises
    `MemoptBudgetError` for an infeasible budget when ``config.strict``; otherwise
    warns and returns the plan with the smallest peak found.

    ``storage`` (given when ``compress_activations`` or ``offload`` is set) says where
    saved values may wait for backward (module docstring).

    With ``context`` (the other regions of a step split by graph breaks) the region is
    planned for the whole step: every peak, the plan's estimates included, is the
    step's with the other regions as they are planned, and a fractional budget is a
    fraction of the step's unoptimized peak."""
    in_step = placed(context, step, before)
    plan = base_plan(step, before, config, context)
    budget = plan.budget_bytes
    training = step.is_training and step.backward is not None
    use_storage = storage is not None and storage.enabled and training
    if budget is None or in_step.peak_bytes <= budget:
        if budget is not None:
            fits = f"the unoptimized estimate {format_bytes(in_step.peak_bytes)} fits the budget"
            plan = _with(plan, notes=(*plan.notes, fits))
        if budget is None and use_storage:
            stored = plan_storage(step, before, storage, None)  # type: ignore[arg-type]
            return _storage_applied(plan, stored, step.region, None, placed(context, step, stored.timeline))
        return plan
    if not step.is_training or step.joint is None:
        return _infeasible_inference(plan, in_step, budget, config, sharded=_sharded(step, context))
    limit = config.planner_time_limit
    solution = plan_remat(step, budget, time_limit=limit, context=context)
    option_sets = _option_sets(storage, exact=solution) if use_storage else []  # type: ignore[arg-type]
    if option_sets:
        stored = min((_plan_with_storage(step, budget, o, limit, context) for o in option_sets), key=_rank)
        if _prefer_stored(stored, solution):
            result = _remat_plan(plan, step, stored, budget)
            note = _storage_note(stored, solution)
            result = _storage_applied(result, stored.evaluation.storage, step.region, budget, None)
            return _with(result, notes=result.notes + (note,))
    result = _remat_plan(plan, step, solution, budget)
    if not solution.feasible:
        unoptimized = None if context is None else context.unoptimized_peak(step, before)
        _report_infeasible(
            result, config, sharded=_sharded(step, context), step_unoptimized=unoptimized,
            scope=None if context is None else context.scope(),
        )  # fmt: skip
    return result


def _sharded(step: StepGraphs, context: StepContext | None = None) -> bool:
    """Whether the step's parameters are sharded already (the region's graphs, or those
    of another region of its step, run collectives: the region after a graph break may
    hold none): the advice for an infeasible budget is then more ranks or a higher
    stage, not sharding."""
    others = () if context is None else (r.step for r in (*context.earlier, *context.later))
    return any(is_collective(n) for s in (step, *others) for _, gm in s.graphs() for n in gm.graph.nodes)


def base_plan(
    step: StepGraphs, before: MemoryTimeline, config: MemoptConfig, context: StepContext | None = None
) -> MemoryPlan:
    """The plan that keeps the partitioner's choices (every saved value saved), with
    the region's budget in bytes and, for a region planned in a step (``context``),
    the step's estimates. `plan_region` starts from it; a region's pipeline also runs
    it to see whether the passes alone meet the budget (`memopt.backends.region`)."""
    reference = before.peak_bytes if context is None else context.unoptimized_peak(step, before)
    plan = MemoryPlan.unplanned(step.region, before, config.budget_bytes(reference))
    if context is None:
        return plan
    in_step = placed(context, step, before)
    return _with(
        plan,
        estimated_peak_before=in_step.peak_bytes,
        estimated_peak_after=in_step.peak_bytes,
        peak_breakdown_before=in_step.peak_breakdown,
        peak_breakdown_after=in_step.peak_breakdown,
        notes=(context.describe(),),
    )


_STORAGE = "storage"
"""``MemoryPlan.solver`` key of a plan that holds saved values elsewhere."""
_STORAGE_REPORT = "storage_considered"
"""The same summary, for a plan that considered it and kept every value."""


def _option_sets(options: StorageOptions, exact: RematSolution) -> list[StorageOptions]:
    """The storage options to plan with, each set searched on its own: both
    (compression and offload) and then each alone when both are enabled. One search
    cannot stand in for the three: the rematerialization planner builds its option
    tables from evaluations that each carry their storage plan, so enabling
    compression changes which saved sets the MILP proposes, and a plan the
    offload-only search finds may never be evaluated by the combined one.

    When the exact plan fits recomputing no FLOPs (copies and views only), only
    lossless storage (offload) may replace it: compression would round gradients to
    save microseconds. Even such a plan costs time, so offload is still tried."""
    sets = [options]
    if options.compress is not None and options.offload is not None:
        sets += [dataclasses.replace(options, compress=None), dataclasses.replace(options, offload=None)]
    if exact.feasible and exact.evaluation.recompute_flops == 0:
        sets = [s for s in sets if s.compress is None]
    return sets


def _plan_with_storage(
    step: StepGraphs, budget: int, options: StorageOptions, limit: float, context: StepContext | None
) -> RematSolution:
    """The rematerialization planner's answer when every candidate's saved values may
    be held as ``options`` allow (`plan_storage` on the candidate's timeline)."""

    def storage_plan(candidate: StepGraphs, timeline: MemoryTimeline) -> StoragePlan:
        return plan_storage(candidate, timeline, options, budget, place=lambda t: placed(context, candidate, t))

    return plan_remat(step, budget, time_limit=limit, storage=storage_plan, context=context)


def _rank(solution: RematSolution) -> tuple[bool, float]:
    """Order of preference among plans: feasible first, then the least modelled time;
    among infeasible ones the smallest peak."""
    evaluation = solution.evaluation
    return (not solution.feasible, evaluation.seconds if solution.feasible else evaluation.timeline.peak_bytes)


def _prefer_stored(stored: RematSolution, exact: RematSolution) -> bool:
    """Storing saved values elsewhere costs time (and compression numerics), so it
    must buy something: a budget exact remat cannot meet, less modelled time, or (both
    infeasible) a smaller peak."""
    if stored.evaluation.storage is None or not stored.evaluation.storage.chosen:
        return False
    return _rank(stored) < _rank(exact)


def _storage_note(stored: RematSolution, exact: RematSolution) -> str:
    kinds = sorted({c.kind for c in stored.evaluation.storage.chosen})  # type: ignore[union-attr]
    how = " and ".join({"compress": "compressed", "offload": "offloaded"}[k] for k in kinds)
    if not exact.feasible:
        return f"rematerialization alone cannot meet the budget: planned with saved values {how}"
    return (
        f"planned with saved values {how}: modelled {stored.evaluation.seconds * 1e3:.2f} ms "
        f"against {exact.evaluation.seconds * 1e3:.2f} ms of recomputation for exact remat"
    )


def _storage_applied(
    plan: MemoryPlan, stored: StoragePlan | None, region: str, budget: int | None, in_step: MemoryTimeline | None
) -> MemoryPlan:
    """``plan`` with the storage plan's actions in its decisions and, given the
    modelled timeline of the whole step ``in_step``, its estimate."""
    if stored is None:
        return plan
    counts = {k: len([c for c in stored.chosen if c.kind == k]) for k in ("compress", "offload")}
    summary = {**counts, "modelled_seconds": stored.seconds, "skipped": dict(stored.skipped)}
    if not stored.chosen:
        return _with(plan, solver={**plan.solver, _STORAGE_REPORT: summary})
    why = "to meet the budget" if budget is not None else "the option is set"
    by_name = {d.node_name: i for i, d in enumerate(plan.decisions)}
    decisions = list(plan.decisions)
    for c in stored.chosen:
        action: Action = Compress(c.how) if c.kind == "compress" else Offload(c.how, reload_lead=c.reload_lead)
        reason = _storage_reason(c, why)
        details = {
            "stored_bytes": c.kept_bytes, "modelled_seconds": c.seconds, "transfer_seconds": c.transfer_seconds,
            "hidden_seconds": c.hidden_seconds, "copy_seconds": c.copy_seconds, "values": list(c.names),
        }  # fmt: skip
        names = [*c.names, c.group.base.name if c.group.base is not None else ""]
        at = next((by_name[n] for n in names if n in by_name), None)
        if at is None:
            decisions.append(
                decision_for_node(c.group.base, f"forward:{c.names[0]}", region, c.full_bytes, action, reason, **details)
            )
        else:
            decisions[at] = dataclasses.replace(decisions[at], action=action, reason=reason, details={**decisions[at].details, **details})
    solver = {**plan.solver, _STORAGE: summary}
    result = _with(plan, decisions=tuple(sorted(decisions, key=lambda d: -d.bytes)), solver=solver)
    if in_step is not None:
        result = _with(result, estimated_peak_after=in_step.peak_bytes, peak_breakdown_after=in_step.peak_breakdown)
    return result


def _storage_reason(c: Any, why: str) -> str:
    if c.kind == "compress":
        return f"saved, stored as {c.how} ({c.full_bytes} -> {c.kept_bytes} bytes) between its forward and backward uses, {why}"
    hidden = 1.0 if c.transfer_seconds == 0 else c.hidden_seconds / c.transfer_seconds
    copying = f", plus {c.copy_seconds * 1e3:.2f} ms of copying on the step's cores" if c.copy_seconds else ""
    return (
        f"offloaded to {c.how} after its last forward use, reloaded {c.reload_lead} op(s) before its first "
        f"backward use; modelled transfer {c.transfer_seconds * 1e3:.2f} ms, {hidden:.0%} hidden{copying}, {why}"
    )


def check_final_budget(plan: MemoryPlan, config: MemoptConfig, step: StepGraphs | None = None) -> MemoryPlan:
    """After the pipeline: for a plan that holds saved values elsewhere (compressed,
    offloaded: modelled, not measured on rewritten graphs), report (warn, or raise
    when strict) if the final estimate exceeds the budget. Returns ``plan`` with
    ``feasible`` set from the final estimate. ``step``: the region's graphs (whether
    they are sharded shapes the advice)."""
    if not plan.solver.get(_STORAGE) or plan.budget_bytes is None:
        return plan
    if plan.estimated_peak_after <= plan.budget_bytes:
        return _with(plan, feasible=True)
    result = _with(plan, feasible=False, min_feasible_peak=plan.estimated_peak_after, blockers=dict(plan.peak_breakdown_after))
    used = ["rematerialization"] + ["compression"] * bool(config.compress_activations) + ["offload"] * bool(config.offload)
    sharded = step is not None and _sharded(step)
    _report_infeasible(result, config, by=", ".join(used[:-1]) + " and " + used[-1], sharded=sharded)
    return result


def _with(plan: MemoryPlan, **changes: Any) -> MemoryPlan:
    return dataclasses.replace(plan, **changes)


def _infeasible_inference(
    plan: MemoryPlan, before: MemoryTimeline, budget: int, config: MemoptConfig, *, sharded: bool
) -> MemoryPlan:
    """An inference region over its budget: nothing it saves can go, so its peak is its
    floor. A budget in bytes is the user's hard number: warned (raised when strict). A
    fraction is of the region's own peak, which no plan can lower, so every fraction
    would warn at every evaluation compile of a training loop: the region is planned
    without a budget (``budget_bytes`` None), which its notes say, and logged."""
    if isinstance(config.memory_budget, float):
        log.info("region %s: %s; the fractional memory_budget is not applied to it", plan.region, _INFERENCE)
        return _with(plan, budget_bytes=None, notes=(*plan.notes, _INFERENCE, _FRACTION_NOT_APPLIED))
    result = _with(
        plan,
        feasible=False,
        min_feasible_peak=before.peak_bytes,
        blockers=before.peak_breakdown,
        notes=(_INFERENCE,),
    )
    _report_infeasible(result, config, by="memopt", sharded=sharded)
    return result


_INFERENCE = "inference regions keep nothing for backward: rematerialization cannot lower their peak"
_FRACTION_NOT_APPLIED = "a fractional memory_budget is not applied to an inference region (a budget in bytes is)"


def _shrinking_advice(blockers: dict[str, int], config: MemoptConfig, sharded: bool = False) -> str:
    """What could shrink the peak's contributors, among what the options do not do yet
    (``sharded``: the step's parameters are sharded already)."""
    at_peak = {k for k, v in blockers.items() if v}
    ways = ["a smaller batch or sequence"]
    if config.precision is None and at_peak & {"saved_activations", "temporaries", "outputs"}:
        ways.append("precision='bf16' (activations in half the bytes; parameters stay fp32)")
    if not config.compress_activations and "saved_activations" in at_peak:
        ways.append("compress_activations='fp8' (saved activations in a quarter of the bytes)")
    if config.offload is None and "saved_activations" in at_peak:
        ways.append("offload='auto' (saved activations wait in host memory or on disk)")
    elif "saved_activations" in at_peak and config.offload_min_bytes > 0:
        ways.append(f"offload_min_bytes below {format_bytes(config.offload_min_bytes)} (offload={config.offload!r} "
                    "moves only saved values at least that large)")
    model_state = [k.replace("_", " ") for k in ("parameters", "gradients", "optimizer_state") if k in at_peak]
    if model_state and sharded:
        ways.append(f"more ranks, or a higher stage of memopt.distributed.shard for the {_listing(model_state)} "
                    "(stage 3 shards them all; these figures are one rank's)")
    elif model_state:
        ways.append(f"sharding the {_listing(model_state)} over devices (memopt.distributed.shard)")
    return "; ".join(ways)


def _listing(words: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _report_infeasible(
    plan: MemoryPlan,
    config: MemoptConfig,
    by: str = "rematerialization",
    *,
    sharded: bool = False,
    step_unoptimized: int | None = None,
    scope: str | None = None,
) -> None:
    """Warn (raise when strict) that ``plan`` misses its budget. ``step_unoptimized``:
    the region was planned in its step (graph breaks, or repeated calls: ``scope``,
    `StepContext.scope`), whose unoptimized peak the message states (the plan's peaks
    are the step's too)."""
    blockers = sorted(((v, k) for k, v in plan.blockers.items() if v), reverse=True)[:4]
    listed = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for v, k in blockers)
    why = f" ({_INFERENCE})" if _INFERENCE in plan.notes else ""
    unoptimized = plan.estimated_peak_before if step_unoptimized is None else step_unoptimized
    in_step = f" ({scope or 'planned in its step'}: the peaks are the step's)"
    where = f"region {plan.region}" + ("" if step_unoptimized is None else in_step)
    statement = (
        f"the smallest peak memopt can reach is {format_bytes(plan.min_feasible_peak)} "
        f"(unoptimized {format_bytes(unoptimized)}){why}. At that peak the largest "
        f"contributors {by} cannot remove are: {listed}. Raise the budget to at least "
        f"{format_bytes(plan.min_feasible_peak)}, or shrink them: {_shrinking_advice(plan.blockers, config, sharded)}."
    )
    if plan.blockers.get("gradients") and plan.blockers.get("optimizer_state") and sharded:
        statement += (  # optimizer_in_backward and low-rank state at stages 1-3 refuse sharded models
            " Gradients are live with the optimizer's state at that peak: 8-bit optimizer state (AdamW8bit, "
            "which steps on shards) shrinks the state (docs/optimizers.md); optimizer_in_backward, which frees "
            "each gradient at its update, does not support sharded models yet."
        )
    elif plan.blockers.get("gradients") and plan.blockers.get("optimizer_state") and config.optimizer_in_backward is None:
        statement += (
            " Gradients are live with the optimizer's state at that peak: optimizer_in_backward=opt frees "
            "each gradient at its update (docs/whole_step.md); 8-bit or low-rank optimizer state shrinks the "
            "state (docs/optimizers.md)."
        )
    message = f"memory_budget {format_bytes(plan.budget_bytes)} is infeasible for {where}: {statement}"
    if config.strict:
        raise MemoptBudgetError(message)
    if said_before(plan.region, f"{plan.budget_bytes} {step_unoptimized is None} {statement}"):
        log.info("region %s: %s (warned for an earlier compile of this frame)", plan.region, message)
        return
    warning = MemoptBudgetWarning(message + " Using the plan with the smallest peak.")
    warning.region, warning.budget_bytes, warning.min_feasible_peak = plan.region, plan.budget_bytes, plan.min_feasible_peak
    warning.statement = statement + " Using the plan with the smallest peak."
    warnings.warn(warning, stacklevel=3)


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
        torch_partition=ev.torch_budget,
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
            "storage_seconds_model": ev.storage_seconds,
        },
    )


def _blockers(timeline: MemoryTimeline) -> dict[str, int]:
    """What stays at the smallest peak: everything but the saved activations remat
    can still trade (those left are boundaries and random-op outputs)."""
    return {k: v for k, v in timeline.peak_breakdown.items() if v}


def _decisions(step: StepGraphs, joint: JointGraph, solution: RematSolution) -> list[TensorDecision]:
    segments = solution.segments
    owner = {n.name: s for s in segments for n in s.nodes}
    by_name = joint._by_name()
    mincut = {_base_name(n, by_name) for n in saved_joint_names(step)}
    saved = {_base_name(n, by_name) for n in solution.evaluation.saved}
    out: list[TensorDecision] = []
    for name in sorted(mincut | saved):
        node = by_name.get(name)
        if node is None or node.op == "placeholder" or meta.value_bytes(node) == 0 or writes_back_input(node):
            # (a write-back is kept in forward as a side effect, never handed to backward)
            continue
        segment = owner.get(name)
        option = solution.choice[segment.index] if segment is not None else "save"
        action, reason = _reason(node, segment, option, name in saved)
        out.append(decision_for_node(node, f"forward:{name}", step.region, meta.value_bytes(node), action, reason,
                                     segment=None if segment is None else segment.index, option=option))
    return sorted(out, key=lambda d: -d.bytes)


def _base_name(name: str, by_name: dict[str, fx.Node]) -> str:
    """The value a saved view shows (views cost no bytes of their own: the decision is
    about their base)."""
    node = by_name.get(name)
    while node is not None and is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return name if node is None else node.name


_CHECKPOINT_HINT = "the model's torch.utils.checkpoint tagged it must-save, a preference the budget's plan weighs"


def _reason(node: fx.Node, segment: Segment | None, option: str, saved: bool) -> tuple[Action, str]:
    """What becomes of a forward value backward reads, and why; a value the user's
    checkpoint tagged must-save (`meta.checkpoint_must_save`) says so either way."""
    action, reason = _plain_reason(node, segment, option, saved)
    if meta.checkpoint_must_save(node) and must_save_reason(node) is None:
        reason = f"{reason} ({_CHECKPOINT_HINT})"
    return action, reason


def _plain_reason(node: fx.Node, segment: Segment | None, option: str, saved: bool) -> tuple[Action, str]:
    where = "" if segment is None else f"segment {segment.index}"
    index = None if segment is None else segment.index
    if not saved and meta.is_regatherable(node):
        return Recompute(index, option), (
            f"gathered parameter freed after its last forward use and gathered again before its first "
            f"backward use ({where}, option {option}) to meet the budget"
        )
    if not saved and segment is not None and node in segment.crossers:
        return Recompute(index, option), f"{where}'s output recomputed with the segment from its input, for the next segment's backward"
    if not saved:
        how = "recomputed with the whole segment" if option == "recompute" else "recomputed from saved matmul outputs"
        return Recompute(index, option), f"{how} in backward ({where}, option {option}) to meet the budget"
    forced = must_save_reason(node)
    if forced is not None:
        return Save(), forced
    if segment is not None and node in segment.crossers:
        return Save(), f"checkpoint: {where}'s output, input of later recomputation"
    if option == "selective":
        return Save(), f"output of an expensive op kept; cheap ops around it recomputed ({where})"
    if option == "save":
        return Save(), f"{where} keeps the partitioner's choice: cheapest under the budget"
    return Save(), f"needed by backward ({where}, option {option})"

