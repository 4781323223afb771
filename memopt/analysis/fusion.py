"""What a fusing code generator (Inductor) does to memory: which values it never
writes, which buffers it overwrites in place, which kernels it runs as one call.

Inductor inlines pointwise computations into the kernels that consume them; such a
value exists only in registers. The rules here follow Inductor's lowering
(``GraphLowering.run_node`` and ``StorageBox.should_realize_on_reuse``): a pointwise
value is fused away when every user is itself fusible (pointwise, a reduction, or a
view whose users are fusible), unless

* its inlined body reads more than ``realize_acc_reads_threshold`` (8) buffers or is
  larger than ``realize_opcount_threshold`` (30 ops), or
* it has more than one user and, on CPU, its body computes a costly op (exp, log,
  sigmoid, tanh, ...), or its body reads more than ``realize_reads_threshold`` (4)
  buffers.

Indexing ops Inductor lowers to loops (gather, index, embedding, constant padding)
and tensors it computes in the loop (full, iota, arange) count as pointwise, and a
matmul folded into the add that consumes it (``addmm``) is never a buffer of its own.
Values read by extern kernels (matmuls, convolutions) are materialized. So are random
values (``prims.inductor_random``): their lowering realizes them
(``lowering.inductor_random``). When the scheduler fuses them into their one reader's
kernel, that buffer is never allocated (``Kernel.remove_kernel_local_buffers``); here
the reader overwrites it in place instead, which counts the same bytes.

A kernel writes its output into a buffer it reads when that read is the buffer's last
(`inplace_reuses`, ``Scheduler.decide_inplace_update``). On CPU, the kernels generated
between two library calls are one function, whose inputs and outputs are all live
while it runs (`kernel_runs`, ``CppScheduling``'s kernel group). It is a model of
Inductor, checked against measured peaks in ``benchmarks/estimate_accuracy.py`` and
``benchmarks/real_models.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from memopt.analysis.aliasing import GraphAliasing, Storage, concrete_int
from memopt.analysis.cost import is_view
from memopt.graph import meta

__all__ = ["channels_last_copies", "fused_nodes", "inplace_reuses", "kernel_runs"]

aten = torch.ops.aten
_REDUCTIONS = {
    aten.sum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.var, aten.var_mean,
    aten.prod, aten.argmax, aten.argmin, aten.any, aten.all, aten.std,
}  # fmt: skip
_MAX_READS = 4  # config.realize_reads_threshold
_MAX_ACC_READS = 8  # config.realize_acc_reads_threshold
_MAX_OPS = 30  # config.realize_opcount_threshold
# Ops whose reused results Inductor stores on CPU rather than recompute.
_COSTLY_ON_CPU = {aten.exp, aten.log, aten.log10, aten.log1p, aten.log2, aten.sigmoid, aten.tanh}


# Indexing ops Inductor lowers to loops with indirect loads, and tensors it computes
# from their indices (constants, ranges): they fuse like pointwise ops.
_INDEXING = {aten.gather, aten.index, aten.index_select, aten.embedding, aten.constant_pad_nd}
_GENERATED = {aten.full, aten.scalar_tensor, aten.arange, aten.zeros, aten.ones, torch.ops.prims.iota}


# The max-pool backward Inductor lowers to a loop over the input that gathers each
# element's gradient from the windows covering it (``lowering.max_pool2d_with_indices_backward``),
# and the offsets -> indices conversion that loop inlines
# (``lowering._low_memory_max_pool_offsets_to_indices``). The backward reaches Inductor as
# this op on torch 2.11, whose decomposition table has no entry for it; torch 2.13's
# decomposes it into ``scatter_add`` first (`_CLONE_THEN_UPDATE`).
_OFFSETS_TO_INDICES = "prims::_low_memory_max_pool_offsets_to_indices"
_MAX_POOL_WINDOW = 25  # larger windows (or any dilation) take the eager fallback


def _pointwise(node: fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target.overloadpacket is aten.max_pool2d_with_indices_backward:
        return _max_pool_backward_is_a_loop(node)
    return (
        torch.Tag.pointwise in target.tags
        or target.overloadpacket in _INDEXING | _GENERATED
        or target.name() == _OFFSETS_TO_INDICES
    )


def _max_pool_backward_is_a_loop(node: fx.Node) -> bool:
    """Whether Inductor lowers this ``max_pool2d_with_indices_backward`` to its gather
    loop rather than the eager fallback: no dilation, and at most 25 pooling windows
    cover an input element (``lowering.max_pool2d_with_indices_backward``)."""
    _, _, kernel_size, stride, _, dilation, *_ = node.args
    if any(d != 1 for d in _pair(dilation)):
        return False
    window = 1
    for k, s in zip(_pair(kernel_size), _pair(stride or kernel_size)):
        window *= max(max(h // s - max(0, (h - k) // s), 1) for h in range(2 * k))
    return window <= _MAX_POOL_WINDOW


def _pair(value: int | list[int]) -> list[int]:
    """An ``int[2]`` argument as two ints (a schema's ``int[2]`` takes one int for both)."""
    values = [value] if isinstance(value, int) else list(value)
    return values * 2 if len(values) == 1 else values


def _reduction(node: fx.Node) -> bool:
    return getattr(node.target, "overloadpacket", None) in _REDUCTIONS


def _reused(node: fx.Node) -> bool:
    """More than one user reads the value (directly or through one of its views)."""
    return len(node.users) > 1 or any(is_view(u) and _reused(u) for u in node.users)


def _view_base(node: fx.Node) -> fx.Node:
    while is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _on_cpu(node: fx.Node) -> bool:
    value = meta.fake_value(node)
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


@dataclass
class _Body:
    """What a value's loop body computes once its fused producers are inlined."""

    reads: set[fx.Node] = field(default_factory=set)
    ops: int = 0
    costly: bool = False


def fused_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Pointwise nodes of ``graph`` whose values a fusing codegen never materializes."""
    fusible_consumer: dict[fx.Node, bool] = {}

    def consumes_fused(node: fx.Node) -> bool:
        if node in fusible_consumer:
            return fusible_consumer[node]
        if node.op != "call_function":
            result = False
        elif _pointwise(node) or _reduction(node):
            result = True
        elif is_view(node):
            result = bool(node.users) and all(consumes_fused(u) for u in node.users)
        else:
            result = False
        fusible_consumer[node] = result
        return result

    fused: set[fx.Node] = set()
    bodies: dict[fx.Node, _Body] = {}
    for node in graph.nodes:
        if not _pointwise(node) or not node.users:
            continue
        body = _Body(ops=1, costly=getattr(node.target, "overloadpacket", None) in _COSTLY_ON_CPU)
        for inp in node.all_input_nodes:
            base = _view_base(inp)
            inner = bodies.get(base)
            if inner is None:
                body.reads.add(base)
            else:
                body.reads |= inner.reads
                body.ops += inner.ops
                body.costly |= inner.costly
        if not all(consumes_fused(u) or _clones_into(u, node) for u in node.users):
            continue
        if len(body.reads) > _MAX_ACC_READS or body.ops + len(body.reads) > _MAX_OPS:
            continue
        if _reused(node) and ((body.costly and _on_cpu(node)) or len(body.reads) > _MAX_READS):
            continue
        fused.add(node)
        bodies[node] = body
    fused.update(n for n in graph.nodes if _folded_into_addmm(n))
    return fused


# Out-of-place ops Inductor lowers as a clone of their first argument that the op then
# updates in place (``lowering.scatter_add``: ``scatter_add_(clone(x), ...)``; likewise
# scatter, scatter_reduce, index_put): the clone is one more pointwise consumer.
_CLONE_THEN_UPDATE = {
    aten.scatter, aten.scatter_add, aten.scatter_reduce, aten.index_put, aten._unsafe_index_put,
}  # fmt: skip


def _clones_into(user: fx.Node, node: fx.Node) -> bool:
    """``user`` starts from a copy of ``node`` (its first argument) that Inductor
    computes with ``node``'s loop inlined, so ``node`` itself is never a buffer: the
    zeros a max-pool or embedding backward scatters into (``full`` then
    ``scatter_add``/``index_put``) are one buffer, not two."""
    target = getattr(user.target, "overloadpacket", None)
    return target in _CLONE_THEN_UPDATE and bool(user.args) and user.args[0] is node


def _folded_into_addmm(node: fx.Node) -> bool:
    """``add(mm(a, b), c)`` becomes ``addmm(c, a, b)`` (Inductor's post-grad pattern; on
    GPU it keeps them apart, not modelled): the mm's result is never a buffer of its
    own, and ``a`` and ``b`` are read where the add runs."""
    if node.target is not aten.mm.default or len(node.users) != 1:
        return False
    value = meta.fake_value(node)
    add = next(iter(node.users))
    if add.target is not aten.add.Tensor or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return False
    other = add.args[1] if add.args[0] is node else add.args[0]
    other_value = meta.fake_value(other) if isinstance(other, fx.Node) else None
    return (
        isinstance(value, torch.Tensor)
        and value.device.type == "cpu"
        and isinstance(other_value, torch.Tensor)
        and other_value.dtype == value.dtype
        and other_value.dim() <= 2
        and all(concrete_int(o) in (1, concrete_int(m)) for o, m in zip(reversed(other_value.shape), reversed(value.shape)))
    )


# Ops Inductor runs as a library call (``ExternKernel``): matmuls and convolutions.
_LIBRARY = {
    aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.addbmm, aten._int_mm, aten.convolution,
    aten.convolution_backward,
}  # fmt: skip
_SEEDS = "prims::inductor_seeds"  # ``ir.RandomSeeds``, an extern kernel


def _makes_addmm(node: fx.Node, fused: set[fx.Node]) -> bool:
    """An add whose mm operand is folded into it (`_folded_into_addmm`): an addmm."""
    return any(inp in fused and inp.target is aten.mm.default for inp in node.all_input_nodes)


def _extern(node: fx.Node, fused: set[fx.Node]) -> bool:
    """Inductor calls a library kernel or an eager fallback for ``node`` rather than
    generating its loops: a matmul, a convolution, an op in ``lowering.fallbacks`` or
    without a lowering (custom ops)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or node in fused or is_view(node):
        return False
    if target.overloadpacket in _LIBRARY or target.name() == _SEEDS or _makes_addmm(node, fused):
        return True
    from torch._inductor import lowering

    return target in lowering.fallbacks or target not in lowering.lowerings


def kernel_runs(graph: fx.Graph, fused: set[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Generated CPU kernels Inductor calls as one function: kernel -> the last kernel
    of its run.

    Inductor's C++ backend puts the kernels it generates one after another into one
    function (``CppScheduling.codegen_node`` adds each to its ``kernel_group``) until a
    library call or a fallback comes (``Scheduler.codegen`` then calls ``flush``). The
    wrapper allocates every output of the function before calling it and frees its
    inputs after, so all of them are live together while any of its kernels runs. A
    kernel here is a node that is not fused into its consumers, not a view and not
    extern (`_extern`); views and fused nodes do not end a run. Every generated kernel
    on CPU is listed, alone in its run or not (on GPU every kernel is launched on its
    own: none is listed).
    """
    runs: dict[fx.Node, fx.Node] = {}
    run: list[fx.Node] = []

    def close() -> None:
        if run:
            runs.update(dict.fromkeys(run, run[-1]))
        run.clear()

    for node in graph.nodes:
        if node.op != "call_function" or node in fused or is_view(node):
            continue
        if _extern(node, fused):
            close()
        elif isinstance(node.target, torch._ops.OpOverload) and _on_cpu(node):
            run.append(node)
    close()
    return runs


def inplace_reuses(
    graph: fx.Graph,
    fused: set[fx.Node],
    aliasing: GraphAliasing,
    last_use: dict[Storage, int],
    index: dict[fx.Node, int],
    donated: set[fx.Node],
) -> dict[Storage, fx.Node]:
    """Storages a fusing codegen overwrites in place: storage -> the node writing into it.

    Inductor writes a pointwise kernel's output into one of the buffers it reads when
    that read is the buffer's last use and the two have the same size and dtype
    (``config.inplace_buffers``; in the generated code ``buf5 = buf4; del buf4  # reuse``).
    The output then costs no new memory while the kernel runs. A buffer a scatter
    wrote (`_CLONE_THEN_UPDATE`) is never overwritten: its readers read the
    scatter's mutation, whose ``MutationLayoutSHOULDREMOVE`` Inductor does not reuse.
    Buffers the graph does not own are never overwritten: its outputs, and its inputs except those in
    ``donated`` (a backward graph's saved values, which the boxed calling convention
    hands over to it).

    ``last_use`` is per storage, in the same numbering as ``index`` (after fusion: a
    value fused into a consumer is read where the consumer runs).
    """
    output = graph.find_nodes(op="output")
    protected = {s for n in (output[0].all_input_nodes if output else []) for s in aliasing.storages_of(n)}
    protected |= {
        s for n in graph.find_nodes(op="placeholder") if n not in donated for s in aliasing.storages_of(n)
    }
    reuses: dict[Storage, fx.Node] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node in fused or not _pointwise(node):
            continue
        if _makes_addmm(node, fused):
            continue  # an addmm: an extern kernel with its own output
        made = aliasing.fresh.get(node, [])
        value = meta.fake_value(node)
        if len(made) != 1 or not isinstance(value, torch.Tensor):
            continue
        for leaf in _kernel_reads(node, fused):
            if getattr(_view_base(leaf).target, "overloadpacket", None) in _CLONE_THEN_UPDATE:
                continue  # read through the scatter's mutation (MutationLayoutSHOULDREMOVE): never in place
            if _overwritable(leaf, value, made[0], aliasing, last_use, index[node], protected, reuses):
                reuses[aliasing.storages_of(leaf)[0]] = node
                break
    return reuses


def _kernel_reads(node: fx.Node, fused: set[fx.Node]) -> list[fx.Node]:
    """The materialized values one fused kernel ending at ``node`` reads."""
    reads: list[fx.Node] = []
    stack = list(node.all_input_nodes)
    seen: set[fx.Node] = set()
    while stack:
        inp = stack.pop()
        if inp in seen:
            continue
        seen.add(inp)
        if inp in fused:
            stack.extend(inp.all_input_nodes)
        else:
            reads.append(inp)
    return reads


def _overwritable(
    leaf: fx.Node,
    value: torch.Tensor,
    made: Storage,
    aliasing: GraphAliasing,
    last_use: dict[Storage, int],
    at: int,
    protected: set[Storage],
    taken: dict[Storage, fx.Node],
) -> bool:
    storages = aliasing.storages_of(leaf)
    read = meta.fake_value(leaf)
    if len(storages) != 1 or not isinstance(read, torch.Tensor):
        return False
    storage = storages[0]
    return (
        storage not in protected
        and storage not in taken
        and last_use.get(storage) == at
        and storage.nbytes == made.nbytes
        and storage.device == made.device
        and read.dtype == value.dtype
        and concrete_int(read.numel()) == concrete_int(value.numel())
        and read.is_contiguous()
        and value.is_contiguous()
    )


def channels_last_copies(graph: fx.Graph, device: torch.device) -> dict[fx.Node, list[fx.Node]]:
    """Graph inputs Inductor copies to channels-last before a convolution reads them:
    placeholder -> the convolutions reading it.

    On CPU with oneDNN, Inductor lays out every convolution's input and weight
    channels-last (``GraphLowering.decide_layout_opt``: always, when the graph has a
    convolution). Intermediate values are produced in that layout; a graph input in
    another layout is copied once, and when it is saved for backward the copy is what
    is saved. On CUDA the decision depends on heuristics and is not modelled.
    """
    if device.type != "cpu" or not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return {}
    convolutions = [n for n in graph.nodes if n.target is aten.convolution.default]
    copies: dict[fx.Node, list[fx.Node]] = {}
    for conv in convolutions:
        for arg in conv.args[:2]:
            value = meta.fake_value(arg) if isinstance(arg, fx.Node) else None
            if (
                isinstance(arg, fx.Node)
                and arg.op == "placeholder"
                and isinstance(value, torch.Tensor)
                and value.dim() == 4
                and not _channels_last(value)
            ):
                copies.setdefault(arg, []).append(conv)
    return copies


def _channels_last(value: torch.Tensor) -> bool:
    """Channels are innermost (read from sizes and strides, so no guard is added on
    symbolic shapes)."""
    return concrete_int(value.shape[1]) == 1 or concrete_int(value.stride(1)) == 1
