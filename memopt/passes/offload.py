"""Pass ``offload``: saved activations wait for backward in host memory or on disk.

For each saved value the plan marks `Offload` (decided by `memopt.plan.storage`), the
forward graph hands the value's storage to an offload store right after its last
forward reader and saves the returned token instead; backward starts the reload
``reload_lead`` compute nodes before the value's first use (prefetch) and waits for it
right before that use::

    forward:   token = memopt.offload(value, store_id, name)
    backward:  started = memopt.reload_start(token)      # reload_lead nodes earlier
               value = memopt.reload_wait(started, size, dtype, device)

The ops and stores are `memopt.codegen.offload` and `memopt.runtime`; values come back
bit for bit. The invariant registered with the verifier: every offload's token is
saved and reloaded exactly once in backward, the reload started before it is waited
for, and no offload op is left in the wrong graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

import memopt.codegen.offload  # noqa: F401  - registers torch.ops.memopt.offload/reload_*
from memopt.analysis.compressible import SavedStorage
from memopt.analysis.cost import copies_share_compute_cores
from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.analysis.storage_cost import Bandwidth, bandwidth_for
from memopt.config import MemoptConfig
from memopt.errors import MemoptOffloadError
from memopt.graph import meta
from memopt.graph.step import StepGraphs
from memopt.graph.verify import GraphVerificationError, register_step_invariant
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.saved_rewrite import (
    BackwardSymbols,
    erase_dead_views,
    fake_mode_of_step,
    planned_decision,
    planned_storages,
    rebuild_from_base,
    replace_saved_values,
    run_fake,
    store_after_last_reader,
)
from memopt.plan.decisions import Offload
from memopt.plan.plan import TensorDecision
from memopt.units import format_bytes

__all__ = ["OffloadSavedActivations", "resolve_target", "offload_target_and_bandwidth", "OFFLOAD_OPS"]

OFFLOAD = torch.ops.memopt.offload.default
RELOAD_START = torch.ops.memopt.reload_start.default
RELOAD_WAIT = torch.ops.memopt.reload_wait.default
OFFLOAD_OPS = frozenset({OFFLOAD, RELOAD_START, RELOAD_WAIT})


def resolve_target(option: str, device: torch.device) -> str:
    """The store for ``offload=option`` on ``device``: ``"auto"`` is host memory beside
    an accelerator, disk on a CPU. Raises `MemoptOffloadError` for host memory on a
    CPU (the values are there already)."""
    if option == "auto":
        return "disk" if device.type == "cpu" else "host"
    if option == "host" and device.type == "cpu":
        raise MemoptOffloadError(
            "offload='host' moves accelerator tensors to host memory, but this region runs on the CPU; "
            "use offload='disk' (or 'auto') to free CPU memory."
        )
    return option


def store_dir(config: MemoptConfig, target: str) -> str | None:
    """``offload_dir`` for a store of ``target``: the directory for ``"disk"``, None for
    ``"host"`` (pinned memory takes none). ``offload="auto"`` with an ``offload_dir``
    picks host beside an accelerator: the directory is for the runs that pick disk."""
    return config.offload_dir if target == "disk" else None


def offload_target_and_bandwidth(config: MemoptConfig, device: torch.device) -> tuple[str, Bandwidth]:
    """The target for ``config.offload`` on ``device`` and its bandwidth (given by
    ``offload_bandwidth``, else measured once per process), with the copies' CPU cost
    where they share the step's cores (`memopt.analysis.storage_cost.bandwidth_for`):
    measured once per process with the bandwidth, or, when ``offload_bandwidth`` is
    given, the device model's figure, so that a given bandwidth makes the plan
    independent of this machine's measurements."""
    from memopt.runtime import bandwidth, measure_copy_rate

    assert config.offload is not None
    target = resolve_target(config.offload, device)
    copy_rate = None
    with unset_fake_temporarily():  # compiles run under a fake mode; the measurement moves real bytes
        write, read = bandwidth(target, device, given=config.offload_bandwidth, offload_dir=store_dir(config, target))
        if config.offload_bandwidth is None and copies_share_compute_cores(device):
            copy_rate = measure_copy_rate(target, device, offload_dir=store_dir(config, target))
    return target, bandwidth_for(device, write, read, copy_rate)


class OffloadSavedActivations(Pass):
    """Move saved activations to host memory or disk between forward and backward, as
    the plan's `Offload` decisions say.

    Purpose: carry out the planner's offload decisions (``offload`` option).

    Preconditions: a training step from AOTAutograd with fake values on every node;
    ``ctx.plan`` names the values (a saved value, or its storage's dense base); every
    named storage is eligible for ``"raw"`` storage (`memopt.analysis.compressible`:
    an activation made in forward, not returned, one dtype; symbolic sizes reach
    backward as saved SymInts, `BackwardSymbols`).

    Guarantees: each offloaded storage is handed to the store after its last forward
    reader (AOTAutograd's trailing views of saved values do not count) and saved as a
    token; backward starts its reload ``reload_lead`` compute nodes before its first
    use and waits right before it; values come back bit for bit with their dtype,
    shape and strides (views rebuilt with ``as_strided``). The store's directory is
    checked at compile time for room for every offloaded byte, at the traced shapes
    in a dynamic-shape compile (`MemoptOffloadError` otherwise, before the first
    step). Planned values no longer saved are listed in the details and left alone.

    Ordering: after ``schedule`` (the prefetch distance is counted in the final order;
    the scheduler leaves graphs with offload ops alone), after every pass that changes
    which values are saved.
    """

    name = "offload"

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        planned = {} if ctx.plan is None else ctx.plan.actions(Offload)
        if not planned or not step.is_training:
            return PassResult.unchanged(why="the plan offloads nothing" if step.is_training else "inference")
        groups, missing = _groups_from_plan(step, planned)
        if not groups:
            return PassResult.unchanged(not_saved=missing)
        from memopt.runtime import get_store, register_store

        targets = {action.target for _, action in groups}
        if len(targets) != 1:
            raise ValueError(f"one store per region: the plan offloads to {sorted(targets)}")
        target = targets.pop()
        device = meta.tensor_value(groups[0][0].base).device  # type: ignore[union-attr]
        total = sum(group.nbytes for group, _ in groups)
        with unset_fake_temporarily():  # compiles run under a fake mode; the store checks real files
            store_id = register_store(target, store_dir(ctx.config, target), device=device)
            get_store(store_id).preflight(total)
        fake_mode = fake_mode_of_step(step)
        symbols = BackwardSymbols(step)
        applied, placed = [], []
        for group, action in groups:
            lead = _offload(step, group, action, store_id, fake_mode, symbols)
            placed.append({"value": group.base.name, "bytes": group.nbytes, "reload_lead": lead})  # type: ignore[union-attr]
            applied.append(_applied(ctx, group, store_id, lead))
        details = {"store": store_id, "offloaded": placed, "bytes": total, "not_saved": missing}
        summary = (f"offload: {len(placed)} saved tensors ({format_bytes(total)}) to {store_id}",)
        return PassResult(True, PreservedAnalyses.none(), details, applied=tuple(applied), summary=summary)


def _groups_from_plan(step: StepGraphs, planned: Mapping[str, Offload]) -> tuple[list[tuple[SavedStorage, Offload]], list[str]]:
    """The saved storages the plan offloads, each with its action, and the planned
    names no saved storage answers to. Raises ``ValueError`` for a planned storage
    that cannot be offloaded."""
    groups, missing = planned_storages(step, planned, lambda action: "raw")
    for group, _ in groups:
        if not group.eligible:
            raise ValueError(f"cannot offload saved value(s) {[v.name for v in group.values]}: {group.reason}")
    return groups, missing


def _offload(
    step: StepGraphs, group: SavedStorage, action: Offload, store_id: str, fake_mode: Any, symbols: BackwardSymbols
) -> int:
    """Rewrite one storage (module docstring); returns the prefetch distance placed.
    Symbolic sizes reach ``reload_wait`` (and the views rebuilt) through ``symbols``."""
    base = group.base
    assert base is not None
    value = meta.tensor_value(base)
    assert value is not None
    name = f"{step.region}:{base.name}"

    def encode(graph: fx.Graph, source: fx.Node) -> fx.Node:
        return graph.call_function(OFFLOAD, (source, store_id, name))

    (token,) = store_after_last_reader(group, encode, fake_mode, ("offloaded", action.target))
    starts: list[fx.Node] = []

    def decode(graph: fx.Graph, inputs: list[fx.Node], size: list[Any]) -> fx.Node:
        start = graph.call_function(RELOAD_START, (inputs[0],))
        run_fake(start, fake_mode)
        starts.append(start)
        return graph.call_function(RELOAD_WAIT, (start, size, value.dtype, value.device))

    rebuild = rebuild_from_base(group, decode, fake_mode, ("reloaded", action.target), symbols)
    replace_saved_values(step, group.values, [token], rebuild, names=[f"{base.name}_offloaded"])
    erase_dead_views(group)
    return _prefetch(starts[0], action.reload_lead)


def _prefetch(start: fx.Node, lead: int) -> int:
    """Move ``start`` up to ``lead`` compute nodes earlier (never above a placeholder
    or its token's producer); returns how far it moved."""
    target, moved = start, 0
    while moved < lead and target.prev.op == "call_function" and target.prev not in start.all_input_nodes:
        target, moved = target.prev, moved + 1
    if target is not start:
        target.prepend(start)
    return moved


def _applied(ctx: PassContext, group: SavedStorage, store_id: str, lead: int) -> TensorDecision:
    assert ctx.plan is not None
    planned = planned_decision(ctx.plan.decisions, group)
    return dataclasses.replace(planned, details={**planned.details, "store": store_id, "reload_lead_placed": lead})


@register_step_invariant
def check_offload_pairs(step: StepGraphs) -> None:
    """Every offload's token is saved and reloaded exactly once in backward (a
    ``reload_start`` feeding one ``reload_wait`` that some node reads); no offload op
    sits in the other graph."""
    forward_ops = [n for n in step.forward.graph.nodes if n.target in OFFLOAD_OPS]
    if step.backward is None:
        if forward_ops:
            raise GraphVerificationError(f"region {step.region}: offload ops in a graph without backward")
        return
    if any(n.target is not OFFLOAD for n in forward_ops):
        raise GraphVerificationError(f"region {step.region}: a reload op in the forward graph")
    if any(n.target is OFFLOAD for n in step.backward.graph.nodes):
        raise GraphVerificationError(f"region {step.region}: an offload op in the backward graph")
    pairs = dict(step.saved_pairs())
    for node in forward_ops:
        placeholder = pairs.get(node)
        if placeholder is None:
            raise GraphVerificationError(f"region {step.region}: offload {node.name}'s token is not saved for backward")
        users = list(placeholder.users)
        if len(users) != 1 or users[0].target is not RELOAD_START:
            raise GraphVerificationError(f"region {step.region}: token of {node.name} must feed exactly one reload_start, feeds {[u.name for u in users]}")
        waits = list(users[0].users)
        if len(waits) != 1 or waits[0].target is not RELOAD_WAIT or not waits[0].users:
            raise GraphVerificationError(f"region {step.region}: reload of {node.name} must be waited for once, before its first use")
