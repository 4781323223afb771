"""Split a joint forward+backward graph given the set of values to save.

This is the one place memopt calls AOTAutograd's private partitioning helpers
(``torch._functorch.partitioners``); ``tests/test_partition.py`` pins their behaviour.
Given the saved set, ``_extract_fwd_bwd_modules`` builds the forward graph (returning
the saved values after the user outputs) and the backward graph, into which it copies
every forward op the backward needs but that is not saved: that copy *is* the
rematerialization. ``reordering_to_mimic_autograd_engine`` then moves each recomputed
op to just before its first use, so recomputed values do not all materialize at once.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._functorch import partitioners as torch_partitioners
from torch.fx import _lazy_graph_module as torch_lazy_graph_module
from torch.fx._lazy_graph_module import _use_lazy_graph_module

from memopt.graph import meta
from memopt.graph.dropout import drawn_masks_in_forward
from memopt.graph.step import StepGraphs, clone_graph_module

__all__ = [
    "JointGraph", "split_joint", "forward_nodes", "saved_names", "saved_joint_names", "joint_values",
    "pin_reads_of_mutated_inputs", "writes_back_input",
]

log = logging.getLogger("memopt.plan")


@dataclass
class JointGraph:
    """AOTAutograd's joint graph of a training region, kept for re-partitioning."""

    module: fx.GraphModule
    num_fwd_outputs: int
    static_lifetime_input_indices: tuple[int, ...] | None = None
    """Inputs alive for the whole step (parameters, buffers), as AOTAutograd told its
    partitioner: torch's ``activation_memory_budget`` does not count them."""

    def node(self, name: str) -> fx.Node:
        found = self._by_name().get(name)
        if found is None:
            close = difflib.get_close_matches(name, list(self._by_name()), n=3)
            raise KeyError(
                f"joint graph has no node {name!r}"
                + (f"; did you mean {' or '.join(map(repr, close))}?" if close else ".")
                + " A plan names values as its decisions do (TensorDecision.node_name)."
            )
        return found

    def recomputable(self) -> JointGraph:
        """This joint graph with dropout outputs made recomputable from their masks
        (`memopt.graph.dropout`); computed once and cached, so the planner and the
        remat pass see the same node names."""
        cached = getattr(self, "_recomputable", None)
        if cached is None:
            from memopt.graph.dropout import with_recomputable_dropout

            module, count = with_recomputable_dropout(self.module)
            cached = self if count == 0 else JointGraph(module, self.num_fwd_outputs, self.static_lifetime_input_indices)
            self._recomputable = cached
        return cached

    def torch_partition(self, budget: float) -> tuple[fx.GraphModule, fx.GraphModule] | None:
        """Torch's min-cut partition of this graph at ``activation_memory_budget=budget``
        (None if torch's partitioner fails), with the user's activation checkpointing
        taken as the hint it is under a budget: torch partitions the graph without the
        checkpoint's policy tags (`meta.checkpoint_hint`; binding must-save tags stay),
        as it would the same model not checkpointed. Computed once per budget and
        cached, so the planner that weighs it and the remat pass that installs it see
        the same graphs."""
        cache: dict[float, Any] = self.__dict__.setdefault("_torch_partitions", {})
        if budget not in cache:
            cache[budget] = _torch_partition(self, budget)
        return cache[budget]  # type: ignore[no-any-return]

    def has_checkpoint_hints(self) -> bool:
        """Some node carries a policy tag of the user's activation checkpointing
        (`meta.checkpoint_hint`): torch's partition of the step (`saved_joint_names`)
        honours the checkpoint, `torch_partition` does not."""
        cached = getattr(self, "_hinted", None)
        if cached is None:
            cached = any(meta.checkpoint_hint(n) for n in self.module.graph.nodes)
            self._hinted = cached
        return cached

    def _by_name(self) -> dict[str, fx.Node]:
        cache = getattr(self, "_names", None)
        if cache is None:
            cache = {n.name: n for n in self.module.graph.nodes}
            self._names = cache
        return cache


def _torch_partition(joint: JointGraph, budget: float) -> tuple[fx.GraphModule, fx.GraphModule] | None:
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    # New nodes, shared fake values: a deep copy would also copy the fake tensors in
    # node.meta, which fails for graphs whose values alias real storage (a default
    # Hugging Face config's key/value cache: issue 14).
    module = clone_graph_module(joint.module)
    meta.drop_checkpoint_hints(module.graph)  # the clone's own metadata dicts: the joint keeps its tags
    try:
        with torch._functorch.config.patch(activation_memory_budget=budget), meta.graph_fake_mode(module.graph):
            return min_cut_rematerialization_partition(  # type: ignore[no-any-return]
                module,
                [],
                compiler="inductor",
                num_fwd_outputs=joint.num_fwd_outputs,
                static_lifetime_input_indices=list(joint.static_lifetime_input_indices or ()),
            )
    except Exception as exc:  # noqa: BLE001 - an option the planner can do without
        log.debug("torch's partitioner failed at budget %s (%s); option skipped", budget, exc)
        return None


def forward_nodes(joint: JointGraph, *, required_only: bool = False) -> list[fx.Node]:
    """Joint-graph compute nodes that do not depend on an incoming gradient, in graph
    order: the values a forward pass can compute. With ``required_only``, only those
    the forward outputs depend on (the rest are forward-side values only backward
    uses, such as a layer norm's saved statistics or views of attention inputs)."""
    graph = joint.module.graph
    output = graph.find_nodes(op="output")[0]
    outs = output.args[0][: joint.num_fwd_outputs]
    needed: set[fx.Node] = set()
    stack = [o for o in outs if isinstance(o, fx.Node)]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    tangent_dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if meta.is_tangent(node) or any(i in tangent_dependent for i in node.all_input_nodes):
            tangent_dependent.add(node)
    return [
        n
        for n in graph.nodes
        if n.op == "call_function" and n not in tangent_dependent and (n in needed or not required_only)
    ]


def saved_names(step: StepGraphs) -> list[str]:
    """Names of the values ``step``'s forward saves for backward."""
    return [n.name for n in step.saved_outputs()]


def saved_joint_names(step: StepGraphs) -> list[str]:
    """Names of the values ``step``'s forward saves that are values of its joint graph
    outside backward (`joint_values`)."""
    if step.joint is None:
        return saved_names(step)
    return joint_values(step.joint, step.saved_outputs())


def joint_values(joint: JointGraph, nodes: Iterable[object]) -> list[str]:
    """The names of those ``nodes`` (a partition's forward nodes) that are values of
    ``joint`` outside backward: primals, symbols and forward ops of the same name, op
    and inputs.

    The planner reads torch's partitions through these names. torch's partitioner can
    add nodes of its own: around random ops under activation checkpointing it
    functionalizes the RNG (``run_and_save_rng_state``), and the getitems of those
    nodes take names the joint graph gives to backward values. Such nodes are not the
    joint graph's and are left out (memopt's own split of the joint graph handles
    random ops itself: `memopt.graph.dropout`)."""
    by_name = joint._by_name()
    outside_backward = {n for n in joint.module.graph.find_nodes(op="placeholder") if not meta.is_tangent(n)}
    outside_backward.update(forward_nodes(joint))
    names = []
    for node in nodes:
        if not isinstance(node, fx.Node):
            continue
        twin = by_name.get(node.name)
        same = (
            twin is not None and twin in outside_backward and twin.op == node.op
            and (node.op == "placeholder" or twin.target == node.target)
            and [a.name for a in twin.all_input_nodes] == [a.name for a in node.all_input_nodes]
        )  # fmt: skip
        if same:
            names.append(node.name)
    return names


def split_joint(
    joint: JointGraph, saved: Iterable[str], region: str = "0", *, draft: bool = False
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward and backward graphs that save exactly the values named in ``saved``
    (plus every primal and symbol backward needs) and recompute the rest in backward,
    each recomputed op placed just before its first use.

    ``draft=True`` is for the planner's evaluations: the graphs are only analysed,
    never run, so Python code generation (the bulk of the cost on large graphs) is
    deferred (lazy graph modules) and getitems are not hoisted (it moves no memory)."""
    graph = joint.module.graph
    placeholders = graph.find_nodes(op="placeholder")
    primals = [p for p in placeholders if not meta.is_tangent(p) and "seed" not in p.name]
    wanted = [joint.node(n) for n in dict.fromkeys(saved)]
    tensors = [n for n in primals if not meta.is_symbolic(n)] + [n for n in wanted if not meta.is_symbolic(n)]
    symbols = [n for n in graph.nodes if meta.is_symbolic(n) and n.op != "output" and not meta.is_tangent(n)]
    tensors, symbols = list(dict.fromkeys(tensors)), list(dict.fromkeys(symbols))
    if draft:
        forward, backward = _draft_split(joint, tensors, symbols)
        drawn_masks_in_forward(forward.graph)
        return forward, backward
    forward, backward = _extract_read_values(joint, tensors, symbols)
    if drawn_masks_in_forward(forward.graph):
        forward.recompile()
    forward = torch_partitioners.raise_getitems(forward)
    backward = torch_partitioners.raise_getitems(backward)
    return forward, backward


def _extract_read_values(
    joint: JointGraph, tensors: list[fx.Node], symbols: list[fx.Node]
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """torch's extraction saving those of ``tensors`` the backward reads, the backward
    in just-in-time order.

    torch copies into backward every node its inputs can compute and then removes dead
    ones, except random ops (``is_impure``): a dropout draw computable from a saved
    value stays, and so the value stays saved. The just-in-time copy drops such a
    draw (nothing reads it: backward replays masks, `memopt.graph.dropout`), which left
    the value saved and never read: held through backward, where the draft split the
    planner evaluated (`_draft_split`, which copies only needed nodes) did not save it
    (Hugging Face ELECTRA under a budget: four 8 KiB values, the measured peak 7% over
    the estimate and above the unbudgeted one). Such values are left out and the
    graphs extracted again, until the backward reads every value it is given."""
    while True:
        forward, backward = torch_partitioners._extract_fwd_bwd_modules(
            joint.module, list(tensors), list(symbols), num_fwd_outputs=joint.num_fwd_outputs
        )
        graph = _recompute_just_in_time(backward.graph)
        unread = {p.name for p in graph.find_nodes(op="placeholder") if not p.users}
        kept = [t for t in tensors if t.name not in unread]
        if len(kept) == len(tensors):
            return forward, _make_graph_module(backward, graph)
        tensors = kept


def _draft_split(
    joint: JointGraph, tensors: list[fx.Node], symbols: list[fx.Node]
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """What `_extract_fwd_bwd_modules` builds, for analysis only: each graph copies
    just the nodes its outputs need (torch's helper copies every computable node and
    then eliminates the dead ones), with lazy modules (no code generation)."""
    graph = joint.module.graph
    output = graph.find_nodes(op="output")[0].args[0]
    fwd_outs, bwd_outs = list(output[: joint.num_fwd_outputs]), list(output[joint.num_fwd_outputs :])
    placeholders = graph.find_nodes(op="placeholder")
    tangents = [p for p in placeholders if meta.is_tangent(p)]
    saved = [*tensors, *symbols]
    bwd_needed = _needed(bwd_outs, set(saved) | set(tangents))
    used = [n for n in saved if n in bwd_needed]
    primals = [p for p in placeholders if not meta.is_tangent(p)]
    fwd = _copy_subgraph(graph, primals, [*fwd_outs, *[n for n in used if not meta.is_symbolic(n)],
                                          *[n for n in used if meta.is_symbolic(n)]])
    sym_used = [n for n in used if meta.is_symbolic(n)]
    bwd_inputs = [*sym_used, *[n for n in used if not meta.is_symbolic(n)], *tangents]
    bwd = _recompute_just_in_time(graph, bwd_inputs, _needed(bwd_outs, set(bwd_inputs)), bwd_outs)
    with _use_lazy_graph_module(True):
        forward = torch_lazy_graph_module._make_graph_module(joint.module, fwd)
        backward = torch_lazy_graph_module._make_graph_module(joint.module, bwd)
    return forward, backward


def _needed(outputs: list[object], stops: set[fx.Node]) -> set[fx.Node]:
    needed: set[fx.Node] = set()
    stack = [o for o in outputs if isinstance(o, fx.Node)]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node not in stops:
            stack.extend(node.all_input_nodes)
    return needed


def _copy_subgraph(graph: fx.Graph, inputs: list[fx.Node], outputs: list[object]) -> fx.Graph:
    new = fx.Graph()
    env = _placeholders_for(new, inputs)
    needed = _needed(outputs, set(inputs))
    for node in graph.nodes:
        if node in needed and node not in env and node.op != "placeholder":
            env[node] = new.node_copy(node, env.__getitem__)
    new.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in outputs))
    return new


def _placeholders_for(new: fx.Graph, inputs: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """One placeholder of ``new`` per node of ``inputs`` (same name, same meta)."""
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        placeholder = new.placeholder(node.name)
        placeholder.meta = node.meta
        env[node] = placeholder
    return env


def _recompute_just_in_time(
    graph: fx.Graph,
    inputs: list[fx.Node] | None = None,
    needed: set[fx.Node] | None = None,
    outputs: list[object] | None = None,
) -> fx.Graph:
    """Copy of ``graph`` where every node not driven by an incoming gradient (the
    recomputed forward ops) is placed just before the first node that needs it, and
    everything else keeps its order; what torch's
    ``reordering_to_mimic_autograd_engine`` does, without building a module.

    With ``inputs``, ``needed`` and ``outputs`` the copy is of the subgraph of ``graph``
    computing ``outputs`` from ``inputs`` (placeholders named as they are; ``needed``:
    `_needed` of the outputs down to the inputs), in one pass: the same graph as
    `_copy_subgraph` followed by this function, without the intermediate copy (the
    planner's draft splits spend most of their time copying nodes)."""
    new_graph = fx.Graph()
    if inputs is None:
        env: dict[fx.Node, fx.Node] = {}
        for node in graph.find_nodes(op="placeholder"):
            env[node] = new_graph.node_copy(node, lambda x: env[x])
        nodes = list(graph.nodes)
    else:
        assert needed is not None and outputs is not None
        env = _placeholders_for(new_graph, inputs)
        nodes = [n for n in graph.nodes if n in needed and n not in env and n.op != "placeholder"]
    order = {node: i for i, node in enumerate(nodes)}
    sources = [n for n in env if meta.is_tangent(n)]
    first = min((order[u] for t in sources for u in t.users if u in order), default=None)
    if first is None:
        if inputs is None:
            return graph
        assert outputs is not None
        return _copy_subgraph(graph, inputs, outputs)

    def insert(*roots: fx.Node) -> None:
        pending: list[fx.Node] = []
        stack = list(roots)
        seen: set[fx.Node] = set()
        while stack:
            node = stack.pop()
            if node in env or node in seen:
                continue
            seen.add(node)
            pending.append(node)
            stack.extend(node.all_input_nodes)
        for node in sorted(pending, key=order.__getitem__):
            env[node] = new_graph.node_copy(node, lambda x: env[x])

    for node in nodes[:first]:
        if node.op == "call_function" and node.target is torch.ops.aten.copy_.default:
            insert(node)
    for node in nodes[first:]:
        insert(node)
    if outputs is None:
        new_graph._codegen = graph._codegen
    else:
        insert(*[o for o in outputs if isinstance(o, fx.Node)])
        new_graph.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in outputs))
    return new_graph


def _make_graph_module(template: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    if graph is template.graph:
        return template
    return torch_lazy_graph_module._make_graph_module(template, graph)


def writes_back_input(node: fx.Node) -> bool:
    """``node`` copies into a graph input in place (``copy_`` into a placeholder: a
    batch norm's running statistics, a step counter): the write-back of an input the
    graph mutates. Its result is the input's storage, and backward never reads it."""
    return (
        node.op == "call_function"
        and node.target is torch.ops.aten.copy_.default
        and isinstance(node.args[0], fx.Node)
        and node.args[0].op == "placeholder"
    )


def _reads_only_to_update(node: fx.Node) -> bool:
    """``node`` reads the mutated inputs it is given only for the values written back
    to them: a batch norm in training mode normalizes with the batch's statistics and
    reads its running statistics only to update them."""
    return node.target is torch.ops.aten._native_batch_norm_legit_functional.default and bool(
        node.args[5] if len(node.args) > 5 else node.kwargs.get("training")
    )


def pin_reads_of_mutated_inputs(joint_module: fx.GraphModule) -> list[str]:
    """Tag must-save (``node.meta["recompute"]``, as selective checkpointing does) every
    forward value that reads an input the forward then writes (``copy_`` into it: a
    step counter ``self.step += 1``, a buffer updated in place). Recomputed in backward,
    such a read runs after the write and sees the new contents: torch's min-cut
    partition recomputed ``step + 1`` from the counter already incremented, and the
    gradients were silently wrong (the open pull request pytorch/pytorch#197039 fixes the same in torch).
    Views of the input are followed to the op that reads them. Returns the names tagged.

    The ``copy_`` itself and a batch norm's reads of its running statistics
    (`_reads_only_to_update`) are left alone; any other read is saved, even one that
    only feeds the write (a counter's increment: as small as the buffer). These tags
    bind the planner too, even on a value a user's checkpoint already tagged must-save
    (`meta.checkpoint_must_save`, a preference the planner may override, is then False)."""
    from memopt.analysis.cost import is_view

    graph = joint_module.graph
    copies = [n for n in graph.nodes if writes_back_input(n)]
    if not copies:  # most graphs: nothing to pin, no need to walk the backward
        return []
    tangent_dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if meta.is_tangent(node) or any(i in tangent_dependent for i in node.all_input_nodes):
            tangent_dependent.add(node)
    pinned: list[str] = []
    for target in dict.fromkeys(c.args[0] for c in copies):
        stack = [u for u in target.users if u.target is not torch.ops.aten.copy_.default]
        seen: set[fx.Node] = set()
        while stack:
            node = stack.pop()
            if node in seen or node in tangent_dependent or node.op != "call_function":
                continue
            seen.add(node)
            if is_view(node):
                stack.extend(node.users)
            elif not _reads_only_to_update(node) and (not meta.must_save_tag(node) or meta.checkpoint_must_save(node)):
                meta.set_must_save_tag(node)  # binding even where a checkpoint tagged it must-save first
                pinned.append(node.name)
    return pinned
