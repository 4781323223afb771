"""Liveness of one graph's storages: where each is last read, on the step's timeline.

Under the eager codegen a storage is read where its readers run, and one a kernel writes
its result into is freed just before that kernel. Under a fusing codegen (Inductor) values
fused into their consumers are read where the consumers run, kernels called as one
function hold what they read until the function returns, and a storage a kernel
overwrites in place is freed just before it. `memopt.analysis.memory.build_timeline`
turns these last uses into live intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from memopt.analysis.aliasing import GraphAliasing, Storage, analyze_aliasing
from memopt.analysis.eager_inplace import eager_inplace_writes
from memopt.analysis.fusion import fused_nodes, inplace_reuses, kernel_runs
from memopt.graph import meta
from memopt.graph.collectives import waited_collective
from memopt.graph.step import StepGraphs, output_values

__all__ = ["GraphLiveness", "compute_nodes", "donated_buffers", "graph_liveness", "last_reads", "reads_of"]


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """``gm``'s nodes that run, in order: one timeline point each."""
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


@dataclass
class GraphLiveness:
    """Per fresh storage of one graph: last use index (timeline-global)."""

    aliasing: GraphAliasing
    index: dict[fx.Node, int]
    last_use: dict[Storage, int] = field(default_factory=dict)
    fused: set[fx.Node] = field(default_factory=set)


def graph_liveness(
    gm: fx.GraphModule, offset: int, fused_codegen: bool = False, donated: set[fx.Node] | None = None
) -> GraphLiveness:
    """Last uses of ``gm``'s storages, timeline indices from ``offset``. Under a fusing
    codegen, values fused into their consumers are read where the consumers run, what
    kernels called as one function (`kernel_runs`) read from before the call is read
    until the function returns, and a storage a kernel overwrites in place (`inplace_reuses`;
    ``donated``: placeholders the graph may overwrite) is freed just before that
    kernel. Under the eager codegen, a storage a kernel writes its result into
    (`eager_inplace_writes`) is freed just before that kernel."""
    aliasing = analyze_aliasing(gm.graph)
    index = {n: offset + i for i, n in enumerate(compute_nodes(gm))}
    fused = fused_nodes(gm.graph) if fused_codegen else set()
    live = GraphLiveness(aliasing, index, fused=fused)
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


def donated_buffers(step: StepGraphs, fw_aliasing: GraphAliasing) -> set[fx.Node]:
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
    for node in reversed(compute_nodes(gm)):
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
    nodes = compute_nodes(gm)
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
