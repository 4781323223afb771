"""The memory timeline of one training (or inference) step of a region.

The forward and backward graphs are joined into one timeline: forward nodes in order,
then backward nodes in order (AOTAutograd runs the backward graph as one unit). Each
storage (see `memopt.analysis.aliasing`) gets a live interval on it:

* forward inputs (parameters, buffers, user inputs) are live for the whole step and
  make up the baseline (what is live when the step starts);
* a forward value lives from its producer to its last use in forward; if it is saved
  for backward, to its last use in backward (backward frees saved values as it consumes
  them: boxed calling convention); a user output stays live after the step; a mutated
  input written back by AOTAutograd's wrapper dies at the end of forward;
* a parameter all-gathered from its shard (`memopt.graph.meta.is_regatherable`: ZeRO-3's
  gathered weights, in forward or gathered again in backward) is a ``gathered_parameters``
  value, not an activation, and lives as any other value does (saved or not);
* incoming gradients (tangents) are allocated when backward starts and die after
  their last use (on torch 2.11 at the end of backward:
  `memopt._compat.BACKWARD_FREES_INCOMING_GRADIENTS`);
* backward values die after their last use, except the gradients backward returns,
  which stay live (they become ``.grad``); a parameter whose ``.grad`` exists when the
  step starts (`StepGraphs.grads_held`: gradient accumulation) has that gradient live
  throughout (category ``gradients``, in the baseline), and the one backward returns
  dies when backward ends (autograd adds it into ``.grad``);
* with the step's optimizer known (`StepGraphs.optimizer`,
  `memopt.analysis.optimizer_memory`): its state is live throughout (category
  ``optimizer_state``, in the baseline); with the update in backward a gradient dies
  at its parameter's update; with a separate ``opt.step()`` one more point follows
  backward (graph ``"optimizer"``), where the gradients, the state and the step's
  temporaries are live at once.

During a node's execution its inputs and its outputs are live at once; memory is freed
right after the node that last uses it. The peak of the step is the maximum, over
nodes, of the live bytes during the node. Only tensors on the step's main device
(where most parameter bytes live) are counted. A step that graph breaks cut into
regions is composed from their timelines by `memopt.analysis.compose`.

The timeline's types are `memopt.analysis.timeline`'s; where each graph's storages are
last read, `memopt.analysis.liveness`'s.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx

from memopt._compat import BACKWARD_FREES_INCOMING_GRADIENTS
from memopt.analysis.aliasing import Storage, concrete_int
from memopt.analysis.fusion import channels_last_copies
from memopt.analysis.liveness import GraphLiveness, compute_nodes, donated_buffers, graph_liveness
from memopt.analysis.manager import Analysis, AnalysisManager
from memopt.analysis.optimizer_memory import state_identity
from memopt.analysis.timeline import BEFORE, OPTIMIZER_GRAPH, LiveInterval, MemoryTimeline, TimelinePoint, finish_timeline
from memopt.analysis.workspace import retained_bytes, workspace_bytes
from memopt.analysis.value_ops import allocated_at
from memopt.graph import meta
from memopt.graph.step import StepGraphs, output_values

__all__ = ["MemoryAnalysis", "build_timeline", "held_grad_identity", "main_device"]

_KIND_CATEGORY = {
    "parameter": "parameters",
    "buffer": "buffers",
    "input": "inputs",
    "activation": "inputs",
    "other": "inputs",
}


def _apply_update_op() -> Any:
    """``memopt::apply_update``'s overload if registered (the pass imports it), else None."""
    try:
        return torch.ops.memopt.apply_update.default
    except (AttributeError, RuntimeError):
        return None


class MemoryAnalysis(Analysis[MemoryTimeline]):
    """The step's `MemoryTimeline` (see module docstring)."""

    name = "memory"

    def compute(self, step: StepGraphs, manager: AnalysisManager) -> MemoryTimeline:
        return build_timeline(step)


def held_grad_identity(identity: int) -> int:
    """The `LiveInterval.identity` of the ``.grad`` a parameter (``identity``, an
    ``id()``) holds when the step starts (`StepGraphs.grads_held`): distinct from the
    parameter's own and its optimizer state's (negative), so regions that share the
    parameter count it once."""
    return identity + (1 << 62)


def main_device(step: StepGraphs) -> torch.device:
    """The device holding most parameter bytes (else the first tensor input's)."""
    by_device: dict[torch.device, int] = defaultdict(int)
    first: torch.device | None = None
    for i, node in enumerate(step.forward.graph.find_nodes(op="placeholder")):
        value = meta.tensor_value(node)
        if value is None:
            continue
        first = first or value.device
        if step.input_kind(i) == "parameter":
            by_device[value.device] += concrete_int(value.numel()) * value.element_size()
    if by_device:
        return max(by_device, key=lambda d: by_device[d])
    return first or torch.device("cpu")


def build_timeline(step: StepGraphs) -> MemoryTimeline:
    """Join the step's graphs into one `MemoryTimeline`."""
    device = main_device(step)
    fw_nodes = compute_nodes(step.forward)
    fw = graph_liveness(step.forward, 0, step.fused_codegen)
    n_fw = len(fw_nodes)
    bw = None
    if step.backward is not None:
        bw = graph_liveness(step.backward, n_fw, step.fused_codegen, donated_buffers(step, fw.aliasing) if step.fused_codegen else None)
    intervals: list[LiveInterval] = []
    owner: dict[Storage, LiveInterval] = {}
    virtual = fw.fused | (bw.fused if bw is not None else set())

    def add(
        graph: str, storage: Storage, category: str, start: int, end: int | None, identity: int | None = None
    ) -> None:
        if storage.device != device or storage in owner or storage.producer in virtual:
            return
        saved = category == "saved_activations"
        if category in ("saved_activations", "temporaries") and (
            meta.is_regatherable(storage.producer) or meta.is_gathered_copy(storage.producer)
        ):
            category = "gathered_parameters"
        nbytes = storage.nbytes
        if storage.index == 0 and storage.producer.op == "call_function" and not step.fused_codegen:
            nbytes += retained_bytes(storage.producer, device)
        iv = LiveInterval(
            graph, storage.producer, category, nbytes, start, end, region=step.region, identity=identity,
            output_index=storage.index, saved=saved and category != "saved_activations",
        )  # fmt: skip
        owner[storage] = iv
        intervals.append(iv)

    fw_name = "forward" if step.is_training else "inference"
    for i, ph in enumerate(step.forward.graph.find_nodes(op="placeholder")):
        category = _KIND_CATEGORY.get(step.input_kind(i), "inputs")
        identity = step.inputs[i].identity if i < len(step.inputs) else None
        for storage in fw.aliasing.storages_of(ph):
            add(fw_name, storage, category, BEFORE, None, identity)
        if identity is not None and identity in step.grads_held:  # a parameter, or a leaf input
            value = meta.tensor_value(ph)
            if value is not None and value.device == device:
                nbytes = concrete_int(value.numel()) * value.element_size()
                intervals.append(LiveInterval(fw_name, ph, "gradients", nbytes, BEFORE, None,
                                              region=step.region, identity=held_grad_identity(identity)))
        if step.optimizer is not None and category == "parameters" and step.optimizer.holds(identity):
            value = meta.tensor_value(ph)
            if value is not None and value.device == device:
                state = step.optimizer.state_bytes[identity]  # type: ignore[index]
                intervals.append(LiveInterval(fw_name, ph, "optimizer_state", state, BEFORE, None,
                                              region=step.region, identity=state_identity(identity)))  # type: ignore[arg-type]

    outputs = output_values(step.forward)
    n_user = step.num_user_outputs
    n_mut = 0 if n_user is None else max(step.num_fwd_outputs - n_user, 0)
    escaping: dict[Storage, str] = {}
    for pos, out in enumerate(outputs[: step.num_fwd_outputs]):
        if out is not None:
            for storage in fw.aliasing.storages_of(out):
                escaping.setdefault(storage, "mutation" if pos < n_mut else "output")

    saved_end, input_saved_until = _saved_ends(step, fw, bw, n_fw) if bw is not None else ({}, {})
    output_saved_until: dict[fx.Node, int] = {}
    for node in fw_nodes:
        for storage in fw.aliasing.fresh.get(node, []):
            start = fw.index[node]
            kind = escaping.get(storage)
            if kind == "output":
                add(fw_name, storage, "outputs", start, None)
                if storage in saved_end:
                    output_saved_until[storage.producer] = saved_end[storage]
            elif storage in saved_end:
                add(fw_name, storage, "saved_activations", start, max(saved_end[storage], fw.last_use[storage]))
            elif kind == "mutation":
                add(fw_name, storage, "temporaries", start, n_fw - 1)
            else:
                add(fw_name, storage, "temporaries", start, fw.last_use[storage])

    if step.fused_codegen:
        for ph, convs in channels_last_copies(step.forward.graph, device).items():
            first, last = min(fw.index[c] for c in convs), max(fw.index[c] for c in convs)
            nbytes = sum(s.nbytes for s in fw.aliasing.storages_of(ph))
            until = input_saved_until.get(ph)
            category = "temporaries" if until is None else "saved_activations"
            intervals.append(
                LiveInterval(fw_name, ph, category, nbytes, first, max(last, until or last), region=step.region)
            )

    points = [TimelinePoint(fw_name, n.name, 0, step.region) for n in fw_nodes]
    if bw is not None:
        updates = _update_ends(step, fw, bw, n_fw)
        _add_backward(step, bw, n_fw, add, points, updates)
        intervals.extend(_update_temporaries(step, bw, updates, device))
    graphs = [(fw_name, fw_nodes)]
    if step.backward is not None:
        graphs.append(("backward", compute_nodes(step.backward)))
    index = 0
    for graph, nodes in graphs:
        for node in nodes:
            ws = workspace_bytes(node, device, fused=step.fused_codegen)
            if ws:
                intervals.append(
                    LiveInterval(graph, node, "temporaries", ws, index, index, workspace=True, region=step.region)
                )
            index += 1
    if bw is not None and step.optimizer is not None and not step.optimizer.in_backward:
        points.append(TimelinePoint(OPTIMIZER_GRAPH, "opt.step()", 0, step.region))
        last = step.backward.graph.find_nodes(op="output")[0]  # type: ignore[union-attr]
        temporaries = step.optimizer.step_temporaries
        intervals.append(LiveInterval(OPTIMIZER_GRAPH, last, "temporaries", temporaries, index, index,
                                      workspace=True, region=step.region))  # fmt: skip
    timeline = finish_timeline(points, intervals, device)
    timeline.input_saved_until = input_saved_until
    timeline.output_saved_until = output_saved_until
    return timeline


def _saved_ends(
    step: StepGraphs, fw: GraphLiveness, bw: GraphLiveness, n_fw: int
) -> tuple[dict[Storage, int], dict[fx.Node, int]]:
    """Forward storages saved for backward -> last timeline index they are used at;
    and the same for saved forward inputs (keyed by placeholder)."""
    ends: dict[Storage, int] = {}
    inputs: dict[fx.Node, int] = {}
    for fw_node, bw_ph in step.saved_pairs():
        bw_storages = bw.aliasing.storages_of(bw_ph)
        last = max((bw.last_use.get(s, n_fw) for s in bw_storages), default=n_fw)
        if bw_ph.users and not bw_storages:
            last = n_fw
        for storage in fw.aliasing.storages_of(fw_node):
            if storage.producer.op != "placeholder":
                ends[storage] = max(ends.get(storage, n_fw), last)
            else:
                inputs[storage.producer] = max(inputs.get(storage.producer, n_fw), last)
    return ends, inputs


def _update_ends(step: StepGraphs, fw: GraphLiveness, bw: GraphLiveness, n_fw: int) -> dict[Storage, int]:
    """With the update in backward (`OptimizerMemory.in_backward`) and the
    ``optimizer_in_backward`` pass not yet run: each returned gradient storage of a
    parameter the optimizer holds -> the timeline index of its update, where the pass
    will put it (after the gradient's last read and the parameter's last read in
    backward, saved views of it included). Empty otherwise."""
    memory = step.optimizer
    if memory is None or not memory.in_backward or step.backward is None:
        return {}
    primals = step.forward.graph.find_nodes(op="placeholder")
    param_reads: dict[fx.Node, int] = {}  # forward placeholder -> last backward read of it
    for fw_node, bw_ph in step.saved_pairs():
        for storage in fw.aliasing.storages_of(fw_node):
            if storage.producer.op == "placeholder":
                last = max((bw.last_use.get(s, n_fw) for s in bw.aliasing.storages_of(bw_ph)), default=n_fw)
                param_reads[storage.producer] = max(param_reads.get(storage.producer, n_fw), last)
    ends: dict[Storage, int] = {}
    for i, out in enumerate(output_values(step.backward)):
        if out is None or i >= len(primals) or step.input_kind(i) != "parameter":
            continue
        if not memory.holds(step.inputs[i].identity):
            continue
        for storage in bw.aliasing.storages_of(out):
            ends[storage] = max(bw.last_use.get(storage, n_fw), param_reads.get(primals[i], n_fw))
    return ends


def _update_temporaries(
    step: StepGraphs, bw: GraphLiveness, updates: dict[Storage, int], device: torch.device
) -> list[LiveInterval]:
    """The temporaries of each in-backward update while it runs: at the updates
    `_update_ends` places, and at the ``memopt::apply_update`` nodes the pass put in."""
    memory = step.optimizer
    if memory is None or not memory.in_backward or not memory.update_factor:
        return []
    out = []
    apply_update = _apply_update_op()
    for storage, at in updates.items():
        if storage.device == device:
            nbytes = memory.update_temporaries(storage.nbytes)
            out.append(LiveInterval("backward", storage.producer, "temporaries", nbytes, at, at, workspace=True,
                                    region=step.region))  # fmt: skip
    for node, at in bw.index.items():
        if apply_update is not None and node.target is apply_update and isinstance(node.args[0], fx.Node):
            value = meta.tensor_value(node.args[0])
            if value is not None and value.device == device:
                nbytes = memory.update_temporaries(concrete_int(value.numel()) * value.element_size())
                out.append(LiveInterval("backward", node, "temporaries", nbytes, at, at, workspace=True,
                                        region=step.region))  # fmt: skip
    return out


def _add_backward(
    step: StepGraphs,
    bw: GraphLiveness,
    n_fw: int,
    add: Any,
    points: list[TimelinePoint],
    updates: dict[Storage, int] | None = None,
) -> None:
    """Backward's storages: tangents, temporaries, and the gradients it returns (live
    after the step, or until their update: ``updates``, `_update_ends`; or until
    backward ends when autograd adds them into an existing ``.grad``)."""
    assert step.backward is not None
    updates = dict(updates or {})
    bw_nodes = compute_nodes(step.backward)
    grads: set[Storage] = set()
    passed_on: set[Storage] = set()  # gradients of activations from an earlier region
    accumulated: set[Storage] = set()  # gradients autograd adds into an existing .grad
    for i, out in enumerate(output_values(step.backward)):
        if out is not None:
            storages = bw.aliasing.storages_of(out)
            (passed_on if step.input_kind(i) == "activation" else grads).update(storages)
            if i < len(step.inputs) and step.inputs[i].identity in step.grads_held:
                accumulated.update(storages)
    last_bw = n_fw + len(bw_nodes) - 1
    for storage in accumulated:
        updates.setdefault(storage, last_bw)
    saved = {ph for _, ph in step.saved_pairs()}
    for ph in step.backward.graph.find_nodes(op="placeholder"):
        if ph in saved or meta.is_symbolic(ph):
            continue
        for storage in bw.aliasing.storages_of(ph):  # tangents and seeds
            if storage in grads:
                end = last_bw if storage in accumulated else None
            elif BACKWARD_FREES_INCOMING_GRADIENTS:
                end = bw.last_use.get(storage, n_fw)
            else:  # held by AOTAutograd's backward until it returns (torch 2.11)
                end = last_bw
            add("backward", storage, "gradients", n_fw, end)
    for node in bw_nodes:
        start = bw.index[allocated_at(node)]
        for storage in bw.aliasing.fresh.get(node, []):
            if storage in passed_on and storage not in grads:
                add("backward", storage, "gradients", start, last_bw)
            elif storage in grads:
                add("backward", storage, "gradients", start, updates.get(storage))
            else:
                add("backward", storage, "temporaries", start, bw.last_use[storage])
    points.extend(TimelinePoint("backward", n.name, 0, step.region) for n in bw_nodes)
