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
"""

from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from memopt._compat import BACKWARD_FREES_INCOMING_GRADIENTS
from memopt.analysis.aliasing import GraphAliasing, Storage, analyze_aliasing, concrete_int
from memopt.analysis.eager_inplace import eager_inplace_writes
from memopt.analysis.fusion import channels_last_copies, fused_nodes, inplace_reuses, kernel_runs
from memopt.analysis.manager import Analysis, AnalysisManager
from memopt.analysis.optimizer_memory import state_identity
from memopt.analysis.workspace import retained_bytes, workspace_bytes
from memopt.analysis.value_ops import allocated_at
from memopt.graph import meta
from memopt.graph.collectives import waited_collective
from memopt.graph.step import StepGraphs, output_values

__all__ = [
    "last_reads",
    "CATEGORIES",
    "OPTIMIZER_GRAPH",
    "LiveInterval",
    "TimelinePoint",
    "MemoryTimeline",
    "MemoryAnalysis",
    "build_timeline",
    "finish_timeline",
    "held_grad_identity",
]

CATEGORIES = (
    "parameters",
    "buffers",
    "inputs",
    "gathered_parameters",
    "saved_activations",
    "gradients",
    "optimizer_state",
    "outputs",
    "temporaries",
)
OPTIMIZER_GRAPH = "optimizer"
"""`TimelinePoint.graph` of the separate ``opt.step()`` after backward."""
_KIND_CATEGORY = {
    "parameter": "parameters",
    "buffer": "buffers",
    "input": "inputs",
    "activation": "inputs",
    "other": "inputs",
}
BEFORE = -1  # interval start for values live before the step


def _apply_update_op() -> Any:
    """``memopt::apply_update``'s overload if registered (the pass imports it), else None."""
    try:
        return torch.ops.memopt.apply_update.default
    except (AttributeError, RuntimeError):
        return None


@dataclass
class LiveInterval:
    """One storage's lifetime: live at timeline indices ``start..end`` inclusive
    (``start == BEFORE``: live when the step starts; ``end is None``: live after)."""

    graph: str
    node: fx.Node
    category: str
    nbytes: int
    start: int
    end: int | None
    workspace: bool = False
    """True for scratch memory inside one op's kernel (see analysis/workspace.py)."""
    region: str = ""
    identity: int | None = None
    """For step inputs: id() of the user's tensor, so inputs shared by several regions
    (parameters across a graph break) are counted once."""
    output_index: int = 0
    """Which of ``node``'s outputs the storage is (ops like ``native_layer_norm`` make
    several)."""
    saved: bool = False
    """Kept from forward for backward where the category does not say so (a gathered
    parameter the plan keeps); read `saved_for_backward`."""

    @property
    def saved_for_backward(self) -> bool:
        """A value forward keeps for backward: a saved activation or a kept gathered
        parameter (what remat, offload and compression may act on)."""
        return self.saved or self.category == "saved_activations"

    @property
    def value_node(self) -> fx.Node:
        """The node that names this storage's value: ``node`` itself, or for one output
        of a multi-output op (``native_dropout``, ``native_layer_norm``) the
        ``getitem`` that takes it out (the name the dumped graphs and a planned
        region's decisions use), when the graph has one."""
        if isinstance(meta.fake_value(self.node), (tuple, list)):
            for user in self.node.users:
                if user.target is operator.getitem and user.args[1] == self.output_index:
                    return user
        return self.node

    @property
    def name(self) -> str:
        return f"{self.graph}:{self.value_node.name}"

    def live_at(self, index: int) -> bool:
        return self.start <= index and (self.end is None or index <= self.end)

    def to_dict(self) -> dict[str, Any]:
        value = meta.tensor_value(self.value_node)
        loc = meta.source_location(self.node)
        return {
            "name": self.name,
            "region": self.region,
            "category": self.category,
            "bytes": self.nbytes,
            "start": self.start,
            "end": self.end,
            "workspace": self.workspace,
            "shape": None if value is None else [concrete_int(s) for s in value.shape],
            "dtype": None if value is None else str(value.dtype).replace("torch.", ""),
            "source": None if loc is None else loc.to_dict(),
        }


@dataclass(frozen=True)
class TimelinePoint:
    """One executed node and the bytes live while it runs."""

    graph: str
    node: str
    live_bytes: int
    region: str = ""


@dataclass
class MemoryTimeline:
    """Live bytes across the step, the intervals behind them, and the peak."""

    points: list[TimelinePoint]
    intervals: list[LiveInterval]
    device: torch.device
    baseline_bytes: int = 0
    peak_bytes: int = 0
    peak_index: int = 0
    end_bytes: int = 0
    input_saved_until: dict[fx.Node, int] = field(default_factory=dict)
    """Forward placeholders saved for backward -> last timeline index using them."""
    output_saved_until: dict[fx.Node, int] = field(default_factory=dict)
    """Producers of user outputs the region also saves for its own backward -> last
    timeline index using them (the interval itself lives past the step)."""

    def live_at(self, index: int) -> list[LiveInterval]:
        return [iv for iv in self.intervals if iv.live_at(index)]

    def breakdown_at(self, index: int) -> dict[str, int]:
        """Live bytes by category at timeline index ``index``."""
        out = dict.fromkeys(CATEGORIES, 0)
        for iv in self.live_at(index):
            out[iv.category] += iv.nbytes
        return out

    @property
    def peak_breakdown(self) -> dict[str, int]:
        return self.breakdown_at(self.peak_index)

    @property
    def peak_growth_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    def saved_activations(self) -> list[LiveInterval]:
        """Saved-for-backward storages (gathered parameters kept for backward too),
        largest first."""
        saved = [iv for iv in self.intervals if iv.saved_for_backward]
        return sorted(saved, key=lambda iv: -iv.nbytes)

    def by_category(self, category: str) -> list[LiveInterval]:
        return [iv for iv in self.intervals if iv.category == category]


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


def _compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


@dataclass
class _GraphLiveness:
    """Per fresh storage of one graph: last use index (timeline-global)."""

    aliasing: GraphAliasing
    index: dict[fx.Node, int]
    last_use: dict[Storage, int] = field(default_factory=dict)
    fused: set[fx.Node] = field(default_factory=set)


def _liveness(
    gm: fx.GraphModule, offset: int, fused_codegen: bool = False, donated: set[fx.Node] | None = None
) -> _GraphLiveness:
    """Last uses of ``gm``'s storages, timeline indices from ``offset``. Under a fusing
    codegen, values fused into their consumers are read where the consumers run, what
    kernels called as one function (`kernel_runs`) read from before the call is read
    until the function returns, and a storage a kernel overwrites in place (`inplace_reuses`;
    ``donated``: placeholders the graph may overwrite) is freed just before that
    kernel. Under the eager codegen, a storage a kernel writes its result into
    (`eager_inplace_writes`) is freed just before that kernel."""
    aliasing = analyze_aliasing(gm.graph)
    index = {n: offset + i for i, n in enumerate(_compute_nodes(gm))}
    fused = fused_nodes(gm.graph) if fused_codegen else set()
    live = _GraphLiveness(aliasing, index, fused=fused)
    read_at = _effective_positions(gm, index, fused)
    last_read = last_reads(gm.graph, aliasing, index, read_at)
    if not fused_codegen:
        live.last_use = last_read
        for writer, grad in eager_inplace_writes(gm.graph, aliasing, last_read, index).items():
            live.last_use[aliasing.storages_of(grad)[0]] = index[writer] - 1
        return live
    live.last_use = _run_last_uses(gm, aliasing, index, fused, kernel_runs(gm.graph, fused))
    for storage, writer in inplace_reuses(gm.graph, fused, aliasing, last_read, index, donated or set()).items():
        live.last_use[storage] = index[writer] - 1
    return live


def reads_of(node: fx.Node) -> list[fx.Node]:
    """The values ``node`` keeps alive until it runs: its inputs, and for the wait on a
    collective also the collective's inputs (the process group reads them until the
    communication ends, so a collective waited late holds its input until then)."""
    collective = waited_collective(node)
    if collective is None:
        return node.all_input_nodes
    return [*node.all_input_nodes, *collective.all_input_nodes]


def last_reads(
    graph: fx.Graph, aliasing: GraphAliasing, index: dict[fx.Node, int], at: dict[fx.Node, int] | None = None
) -> dict[Storage, int]:
    """Per storage, the last position (``at``, default ``index``) of a node reading it."""
    at = index if at is None else at
    last_use: dict[Storage, int] = {}
    for node in (n for n in graph.nodes if n.op not in ("placeholder", "output")):
        for inp in reads_of(node):
            for storage in aliasing.storages_of(inp):
                last_use[storage] = max(last_use.get(storage, 0), at[node])
        for storage in aliasing.storages_of(node):  # a value is used by its own producer
            last_use.setdefault(storage, index[node])
    return last_use


def _donated(step: StepGraphs, fw_aliasing: GraphAliasing) -> set[fx.Node]:
    """Backward placeholders AOTAutograd donates to the backward graph: saved values
    that alias no forward input and no user output (``collect_bw_donated_buffer_idxs``).
    ``fw_aliasing`` is the forward graph's."""
    if not torch._functorch.config.donated_buffer:
        return set()
    kept = {s for ph in step.forward.graph.find_nodes(op="placeholder") for s in fw_aliasing.storages_of(ph)}
    for out in output_values(step.forward)[: step.num_fwd_outputs]:
        if out is not None:
            kept.update(fw_aliasing.storages_of(out))
    return {
        bw_ph
        for fw_node, bw_ph in step.saved_pairs()
        if not meta.is_symbolic(bw_ph) and not kept.intersection(fw_aliasing.storages_of(fw_node))
    }


def _effective_positions(gm: fx.GraphModule, index: dict[fx.Node, int], fused: set[fx.Node]) -> dict[fx.Node, int]:
    """Where each node's inputs are read: its own position, or for a value fused into
    its consumers, the last of their positions."""
    at: dict[fx.Node, int] = {}
    for node in reversed(_compute_nodes(gm)):
        at[node] = index[node]
        if node in fused:
            at[node] = max([index[node], *(at[u] for u in node.users if u in at)])
    return at


def _run_last_uses(
    gm: fx.GraphModule,
    aliasing: GraphAliasing,
    index: dict[fx.Node, int],
    fused: set[fx.Node],
    runs: dict[fx.Node, fx.Node],
) -> dict[Storage, int]:
    """Per storage, its last use when runs of kernels are called as one function
    (``runs``: generated kernel -> the last kernel of its run): a graph input or a
    library call's output read in a run is freed after the call, so it is read at the
    run's last kernel. A generated kernel's output keeps the last read of the kernel
    reading it: Inductor's scheduler may fuse its writer into its readers' kernel, in
    the same run or, across a library call, in a later one (Llama's loss gradient, made
    before the logits' matmul in the graph, is made after it), and a buffer whose
    writer and readers share one loop is never allocated
    (``remove_kernel_local_buffers``); the reads kernel by kernel, with the in-place
    writes, approximate that. Fused values are read where their consumers run."""
    nodes = _compute_nodes(gm)
    kernels: dict[fx.Node, set[fx.Node]] = {}  # node -> the kernels its inputs are read in
    for node in reversed(nodes):
        users = {k for u in node.users if u in kernels for k in kernels[u]} if node in fused else set()
        kernels[node] = users | {node}
    last_use: dict[Storage, int] = {}
    for node in nodes:
        for inp in reads_of(node):
            for storage in aliasing.storages_of(inp):
                for kernel in kernels[node]:
                    end = runs.get(kernel)
                    at = index[kernel] if end is None or storage.producer in runs else index[end]
                    last_use[storage] = max(last_use.get(storage, 0), at)
        for storage in aliasing.storages_of(node):  # a value is used by its own producer
            last_use.setdefault(storage, index[node])
    return last_use


def build_timeline(step: StepGraphs) -> MemoryTimeline:
    """Join the step's graphs into one `MemoryTimeline`."""
    device = main_device(step)
    fw_nodes = _compute_nodes(step.forward)
    fw = _liveness(step.forward, 0, step.fused_codegen)
    n_fw = len(fw_nodes)
    bw = None
    if step.backward is not None:
        bw = _liveness(step.backward, n_fw, step.fused_codegen, _donated(step, fw.aliasing) if step.fused_codegen else None)
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
        if category == "parameters" and identity is not None and identity in step.grads_held:
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
        graphs.append(("backward", _compute_nodes(step.backward)))
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
    step: StepGraphs, fw: _GraphLiveness, bw: _GraphLiveness, n_fw: int
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


def _update_ends(step: StepGraphs, fw: _GraphLiveness, bw: _GraphLiveness, n_fw: int) -> dict[Storage, int]:
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
    step: StepGraphs, bw: _GraphLiveness, updates: dict[Storage, int], device: torch.device
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
    bw: _GraphLiveness,
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
    bw_nodes = _compute_nodes(step.backward)
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


def finish_timeline(points: list[TimelinePoint], intervals: list[LiveInterval], device: torch.device) -> MemoryTimeline:
    """The timeline of ``intervals`` over ``points``: live bytes at each point, the
    baseline, the peak and the bytes left at the end."""
    n = len(points)
    delta = [0] * (n + 1)
    baseline = 0
    for iv in intervals:
        if iv.start == BEFORE:
            baseline += iv.nbytes
            continue
        start = min(iv.start, n)  # a value made after the last op never overlaps one
        delta[start] += iv.nbytes
        if iv.end is not None:
            delta[min(max(iv.end, start - 1), n - 1) + 1] -= iv.nbytes
    live = baseline
    filled = []
    for i, p in enumerate(points):
        live += delta[i]
        filled.append(dataclasses.replace(p, live_bytes=live))
    peak_index = max(range(n), key=lambda i: filled[i].live_bytes) if n else 0
    peak = filled[peak_index].live_bytes if n else baseline
    end = baseline + sum(iv.nbytes for iv in intervals if iv.start != BEFORE and iv.end is None)
    return MemoryTimeline(filled, intervals, device, baseline, max(peak, baseline), peak_index, end)
