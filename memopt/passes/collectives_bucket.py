"""Pass ``bucket_collectives``: small all-gathers, reduce-scatters and all-reduces travel
together.

A sharded step holds one all-gather per parameter in forward (and per re-gathered
parameter in backward) and one reduce-scatter (stages 2 and 3) or all-reduce (stages 0
and 1, and 0-dimensional parameters at every stage) per gradient in backward. Each has
a fixed cost (a launch, a rendezvous of every rank) that small tensors (biases, norms)
never amortize. This pass merges runs of them into buckets of at most
``collective_bucket_bytes`` (full, gathered size):

    all-gather:     cat(flat pieces) -> all_gather -> wait -> view(world, -1)
                    -> split(dim 1) -> each piece's rows (a copy: rank-major rows)
    reduce-scatter: each gradient viewed (world, -1) -> cat(dim 1) -> reduce_scatter
                    -> wait -> split -> views of the shards
    all-reduce:     cat(flat gradients) -> all_reduce_ (in place, on the cat) -> wait
                    -> split -> views of the gradients

What is torch's (`torch/_inductor/fx_passes/bucketing.py`, private API, pinned by
``tests/distributed/test_collective_passes.py``):

* which collectives form a bucket: ``bucket_all_gather_by_mb``,
  ``bucket_reduce_scatter_by_mb`` and ``bucket_all_reduce_by_mb`` (greedy, in wait
  order, same process group, reduction and dtype, no collective depending on another in
  its bucket, under a size cap);
* the rewrite of a bucket: ``process_collective_bucket`` (traces a merge function
  with fake tensors, inserts it after the bucket's last collective, replaces the
  waits); for reduce-scatters and all-reduces with torch's own merge functions
  (``merge_reduce_scatter_bucket``, mode ``"default"``; ``merge_all_reduce_bucket``:
  an all-reduce's sum is elementwise, so the bucket's element ``i`` is summed exactly
  as the gradient's element it came from).

What is memopt's: which reductions are a parameter's gradient's
(`is_gradient_reduction_wait`, for reduce-scatters and all-reduces: the result reaches
the graph's outputs through ops of one input only). torch 2.13's
``fsdp.is_fsdp_reduce_scatter_wait`` says the same; torch 2.11's accepts only the wait
or one cast as the output, so it refused a reduce-scatter followed by the ``narrow``
that cuts an uneven parameter's padding: on the rank whose rows are short, only there.
The ranks then bucketed differently and their collectives no longer matched (gloo:
"Received data size doesn't match expected size"). A bucket decision must be the same
on every rank, so it must not depend on a rank's own shapes or on torch's version.

Also memopt's: the all-reduce made in place (`reduce_in_place`). torch's merge
traces the functional ``all_reduce``, whose result is a new buffer: the concatenation
(read by the process group) and the result would both be live until the wait, the
bucket held twice while in flight. The concatenation is the bucket's own (nothing else
reads it), so memopt rewrites that one all-reduce to ``all_reduce_``, which reduces it
and returns it: the same elementwise sum, held once. memopt's analyses read it from the
schema (``Tensor(a!)``: the result aliases the input, `memopt.analysis.aliasing`; a
mutation, kept by ``dce``, `memopt.graph.meta.has_side_effects`), and Inductor lowers it
as it is (``comm_lowering``; the functional one it lowers to the same call on a copy,
which its buffer reuse elided in the graphs checked, so under Inductor the generated
code is the same and only memopt's estimate changes).

And the all-gather merge function. torch's (``all_gather_merge_fn_to_trace``)
gathers into a preallocated buffer (``copy_`` of the inputs, then
``all_gather_into_tensor_out``): in-place writes that memopt's analyses would have to
treat as a gather (regatherable values, the cost model, the per-rank report all key on
the functional ``all_gather_into_tensor``). memopt's merge is torch's
``all_gather_merge_fn_to_trace_functional`` without the ``out=`` buffer: ``cat`` then the
functional gather, so the bucket is a gather of parameter shards like any other.

A parameter's rows lie in every rank's part of the bucket, so they are not a view of
it: each is copied out (FSDP2's ``copy_out`` does the same). The bucket's buffer lives
until the last copy, so the transient is one bucket on top of its copies. A reduction
bucket holds its gradients until the last of them is ready; its results are views of
one buffer (an all-reduce bucket's: its concatenation, reduced in place), which lives
as long as the longest-lived gradient of the bucket.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.graph import meta
from memopt.graph.collectives import (
    ALL_GATHER,
    ALL_REDUCE,
    ALL_REDUCE_INPLACE,
    WAIT,
    is_all_gather,
    is_all_reduce,
    is_reduce_scatter,
)
from memopt.graph.step import StepGraphs, clone_graph_module
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.budget_guard import BudgetGuard

__all__ = ["BucketCollectives", "bucket_graph", "gather_bucket", "reduce_in_place"]


def gather_bucket(
    pieces: list[torch.Tensor], group_name: str, group_size: int, dtypes: list[torch.dtype]
) -> list[torch.Tensor]:
    """The bucketed all-gather of ``pieces`` (each rank's rows of several parameters,
    cast to ``dtypes``): one gather of their concatenation, then each parameter's
    gathered rows (traced into the graph by `bucket_graph`)."""
    flat = torch.cat([p.to(d).reshape(-1) for p, d in zip(pieces, dtypes)])
    gathered = WAIT(ALL_GATHER(flat, group_size, group_name))
    parts = torch.split_with_sizes(gathered.view(group_size, -1), [p.numel() for p in pieces], dim=1)
    return [part.reshape((group_size * p.shape[0], *p.shape[1:])) for part, p in zip(parts, pieces)]


def _merge_gathers(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    from torch._inductor.fx_passes.bucketing import process_collective_bucket

    _, group_size, group_name = nodes[0].args
    dtypes = [meta.fake_value(n).dtype for n in nodes]

    def trace_args(inputs: list[fx.Node]) -> tuple[Any, ...]:
        return ([meta.fake_value(n) for n in inputs], group_name, group_size, dtypes)

    process_collective_bucket(graph, nodes, gather_bucket, trace_args)


def _merge_reductions(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    from torch._inductor.fx_passes.bucketing import merge_reduce_scatter_bucket

    merge_reduce_scatter_bucket(graph, nodes, "default")


def _merge_all_reductions(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """torch's all-reduce merge, then its all-reduce made in place: the reduced buffer
    is the concatenation itself (`reduce_in_place`)."""
    from torch._inductor.fx_passes.bucketing import merge_all_reduce_bucket

    new_nodes, _ = merge_all_reduce_bucket(graph, nodes)
    (reduction,) = [n for n in new_nodes if n.op == "call_function" and n.target is ALL_REDUCE]
    reduce_in_place(reduction)


def reduce_in_place(reduction: fx.Node) -> None:
    """Make the functional all-reduce ``reduction`` of a bucket's concatenation
    ``all_reduce_`` on it: the result is the concatenation's own buffer, so the bucket is
    held once until the wait instead of twice (the input, read by the process group until
    then, and the result). Only a buffer private to the bucket may be written: the
    ``cat`` that torch's merge traced, read by nothing but ``reduction``; anything else
    raises."""
    source = reduction.args[0]
    private = (
        isinstance(source, fx.Node)
        and source.op == "call_function"
        and source.target is torch.ops.aten.cat.default
        and list(source.users) == [reduction]
    )
    if not private:
        raise ValueError(
            f"bucket_collectives: all-reduce {reduction.name} reads {source}, not a concatenation only it "
            "reads; reducing it in place would overwrite a value something else reads. "
            "Reduce in place only the bucket's own cat."
        )
    reduction.target = ALL_REDUCE_INPLACE


def is_gradient_reduction_wait(wait: fx.Node) -> bool:
    """Whether the result of ``wait`` (a reduction's wait) reaches only the graph's
    outputs, through ops that read one node each (views, casts, a ``narrow`` of the
    padding): a gradient's reduction, which can wait for its bucket. False for a wait
    nothing reads, or whose result meets another value on the way (an accumulation)."""
    if not wait.users:
        return False
    seen: set[fx.Node] = set()
    queue = [wait]
    while queue:
        node = queue.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user.op == "output":
                continue
            if len(user.all_input_nodes) != 1:
                return False
            queue.append(user)
    return True


def _find_all_reductions(
    gm: fx.GraphModule, cap: Callable[[int], float], filter_wait_node: Callable[[fx.Node], bool], mode: str,
) -> list[list[fx.Node]]:
    """torch's ``bucket_all_reduce_by_mb``, called as its siblings are (it takes no
    ``mode``: there is one all-reduce merge)."""
    from torch._inductor.fx_passes.bucketing import bucket_all_reduce_by_mb

    return bucket_all_reduce_by_mb(gm, cap, filter_wait_node=filter_wait_node)


Finder = tuple[
    Callable[..., list[list[fx.Node]]], Callable[[fx.Graph, list[fx.Node]], None], Callable[[fx.Node], bool], Callable[[fx.Node], bool]
]
"""(find buckets, merge one, is the collective, which waits qualify)."""


def _finders() -> tuple[Finder, Finder, Finder]:
    """(find buckets, merge one, is the collective, which waits qualify) for all-gathers,
    reduce-scatters, then all-reduces: torch's greedy bucketing, memopt's or torch's
    merge."""
    from torch._inductor.fx_passes.bucketing import bucket_all_gather_by_mb, bucket_reduce_scatter_by_mb

    return (
        (bucket_all_gather_by_mb, _merge_gathers, is_all_gather, meta.is_regatherable),
        (bucket_reduce_scatter_by_mb, _merge_reductions, is_reduce_scatter, is_gradient_reduction_wait),
        (_find_all_reductions, _merge_all_reductions, is_all_reduce, is_gradient_reduction_wait),
    )


def _bucketable(node: fx.Node) -> bool:
    return is_all_gather(node) or is_reduce_scatter(node) or is_all_reduce(node)


def _cap_fn(cap_bytes: int) -> Callable[[int], float]:
    return lambda _: cap_bytes / 2**20


Traces = dict[tuple[Any, ...], tuple[Any, fx.GraphModule]]
"""A merge function and its trace arguments (`_trace_key`) -> (the arguments, kept so
that the ids in the key stay theirs; the merge traced on them)."""


def _trace_key(value: Any) -> Any:
    """``value`` (a merge's trace arguments) as a key: tensors (fake values) by
    identity, lists and tuples item by item, anything else as itself."""
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_trace_key, value))
    return value


@contextlib.contextmanager
def _reused_traces(traces: Traces) -> Iterator[None]:
    """Within the block, torch's bucket merges trace each merge function once per set
    of trace arguments (the same fake values, by identity) across the graphs bucketed
    with ``traces``, instead of once per merge: a search bucketing one graph under
    several caps merges the same bucket again and again. Tracing is deterministic
    (`make_fx` on fake values), and its graph is only read (copied into the graph being
    bucketed), so a reused trace inserts the same nodes. Never twice into one graph in
    one block: two buckets of one graph must not share fake values (memory analyses
    tell storages apart by their fake values' storages)."""
    from torch._inductor.fx_passes import bucketing

    trace = getattr(bucketing, "_trace", None)
    if trace is None:  # a torch without this private hook: every merge traced, as torch does
        yield
        return
    inserted: set[Any] = set()

    def reused(fn: Callable[..., Any], inputs: Any) -> fx.GraphModule:
        try:
            key = (fn, _trace_key(inputs))
            hash(key)
        except TypeError:  # an argument that is no key: trace it
            return trace(fn, inputs)
        if key not in traces or key in inserted:
            traces[key] = (inputs, trace(fn, inputs))
        inserted.add(key)
        return traces[key][1]

    bucketing._trace = reused
    try:
        yield
    finally:
        bucketing._trace = trace


def bucket_graph(
    gm: fx.GraphModule, cap_bytes: int, scatter_cap_bytes: int | None = None, reduce_cap_bytes: int | None = None,
    traces: Traces | None = None,
) -> tuple[int, int, int]:
    """Bucket ``gm``'s parameter all-gathers under ``cap_bytes``, its gradient
    reduce-scatters under ``scatter_cap_bytes`` and its gradient all-reduces under
    ``reduce_cap_bytes`` (each defaults to ``cap_bytes``; 0 leaves that kind alone);
    (all-gathers, reduce-scatters, all-reduces) removed. ``traces``: merges traced
    while bucketing copies of this graph before, reused (`_reused_traces`)."""
    from torch._inductor.pattern_matcher import stable_topological_sort

    caps = (
        cap_bytes,
        cap_bytes if scatter_cap_bytes is None else scatter_cap_bytes,
        cap_bytes if reduce_cap_bytes is None else reduce_cap_bytes,
    )
    counts = []
    with _reused_traces(traces) if traces is not None else contextlib.nullcontext():
        for (find, merge, is_kind, keep), cap in zip(_finders(), caps):
            before = sum(is_kind(n) for n in gm.graph.nodes)
            buckets = find(gm, _cap_fn(cap), filter_wait_node=keep, mode="default") if cap else []
            for bucket in buckets:
                merge(gm.graph, bucket)
            if buckets:
                stable_topological_sort(gm.graph)
            counts.append(before - sum(is_kind(n) for n in gm.graph.nodes))
    return counts[0], counts[1], counts[2]


KINDS = ("forward_all_gather", "reduce_scatter", "all_reduce", "backward_all_gather")
"""The collectives bucketed under caps of their own when the budget is tight, in the
order the search gives them the memory it has (`BucketCollectives`)."""


def _graph_caps(name: str, caps: dict[str, int]) -> tuple[int, int, int]:
    """(all-gather cap, reduce-scatter cap, all-reduce cap) of graph ``name``:
    backward's all-gathers are re-gathers, every other graph's are forward gathers."""
    gathers = caps["backward_all_gather" if name == "backward" else "forward_all_gather"]
    return gathers, caps["reduce_scatter"], caps["all_reduce"]


def buckets_of(step: StepGraphs, kind: str, cap_bytes: int) -> tuple[tuple[str, ...], ...]:
    """The buckets (node names, two or more each) torch's greedy bucketing forms of
    ``kind`` under ``cap_bytes`` on ``step`` as it is (nothing merged)."""
    gathers, scatters, reductions = _finders()
    find, _, _, keep = {"reduce_scatter": scatters, "all_reduce": reductions}.get(kind, gathers)
    out: list[tuple[str, ...]] = []
    for name, gm in step.graphs():
        if kind.endswith("all_gather") and (name == "backward") != (kind == "backward_all_gather"):
            continue  # forward all-gathers are the other graphs', re-gathers backward's
        out += [tuple(n.name for n in bucket) for bucket in find(gm, _cap_fn(cap_bytes), filter_wait_node=keep, mode="default")]
    return tuple(out)


_Built = dict[tuple[str, int, int, int], tuple[fx.GraphModule, tuple[int, int, int]]]
"""(graph name, all-gather cap, reduce-scatter cap, all-reduce cap) -> the graph
bucketed so, and the all-gathers, reduce-scatters and all-reduces it lost."""


@dataclass
class _Cache:
    """What the tries of one `BucketCollectives` run share: each graph bucketed under
    each of its caps, and per graph the merges traced on its values."""

    built: _Built = field(default_factory=dict)
    traces: dict[str, Traces] = field(default_factory=dict)


MIN_CAP_BYTES = 1 << 10
"""Caps are halved no further than this (a bucket of a few biases)."""


def _ladder(cap: int) -> list[int]:
    """``cap``, then halved down to `MIN_CAP_BYTES`."""
    caps = [cap]
    while caps[-1] // 2 >= MIN_CAP_BYTES:
        caps.append(caps[-1] // 2)
    return caps


def _cache_key(name: str, gm: fx.GraphModule, caps: dict[str, int]) -> tuple[str, int, int, int]:
    """The `_Built` key of graph ``name`` (``gm``, unbucketed) under ``caps``: a cap of
    a kind the graph does not hold changes nothing, so it counts as 0."""
    gather_cap, scatter_cap, reduce_cap = _graph_caps(name, caps)
    return (
        name,
        gather_cap if any(map(is_all_gather, gm.graph.nodes)) else 0,
        scatter_cap if any(map(is_reduce_scatter, gm.graph.nodes)) else 0,
        reduce_cap if any(map(is_all_reduce, gm.graph.nodes)) else 0,
    )


class BucketCollectives(Pass):
    """Merge runs of small all-gathers, reduce-scatters and all-reduces (module docstring).

    Purpose: one collective per bucket instead of one per parameter.

    Preconditions: topologically sorted graphs with fake values; every bucketed
    collective has exactly one wait (memopt's sharded graphs).

    Guarantees: the same bytes are gathered and reduced, element by element, with the
    same reduction; gathered parameters are bit-identical, and reduced gradients are
    too wherever the process group's per-element sum does not depend on the buffer's
    length (always on 2 ranks). Collectives keep their relative order, so every rank
    issues the same sequence. The step's estimated peak stays within the budget
    (`memopt.passes.budget_guard`; a bucket's buffer is live while its parameters are
    copied out of it, a reduce-scatter bucket holds its gradients until the last one
    is ready, an all-reduce bucket too, then its concatenation, reduced in place, until
    the wait): when ``collective_bucket_bytes`` for every
    collective puts it over, each kind of collective (`KINDS`: forward all-gathers, then
    reduce-scatters, then all-reduces, then re-gathers in backward) in turn gets the largest cap of ``collective_bucket_bytes``
    halved down to `MIN_CAP_BYTES` that keeps the step within the budget, the kinds
    before it at their chosen caps and those after it unbucketed; a kind for which no
    cap fits stays unbucketed. ``details`` says which caps were tried, at which
    estimated peaks, and which were kept.

    Ordering: after ``remat`` (re-gathers in backward are bucketed like the forward's)
    and ``dedupe_collectives``; before ``schedule``, which then orders the bucketed
    graph, and before ``overlap_collectives``, which moves whole buckets.
    """

    name = "bucket_collectives"

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        cap = ctx.config.collective_bucket_bytes
        if cap == 0 or not any(_bucketable(n) for _, gm in step.graphs() for n in gm.graph.nodes):
            return PassResult.unchanged()
        guard = BudgetGuard.before(step, analyses, ctx)
        caps, cache = dict.fromkeys(KINDS, cap), _Cache()
        removed = self._apply(step, guard, analyses, caps, cache)
        if not any(sum(r) for r in removed.values()):
            guard.restore(analyses)
            return PassResult.unchanged()
        fits, peak = guard.fits(analyses, ctx)
        tried = [{"caps": dict(caps), "peak": peak, "fits": fits}]
        if not fits:
            caps, removed = self._search(step, guard, analyses, ctx, cap, tried, cache)
        details: dict[str, Any] = {"caps": caps, "peak_before": guard.peak_before, "limit": guard.limit(ctx), "tried": tried}
        if not any(sum(r) for r in removed.values()):
            guard.restore(analyses)
            details["reverted"] = f"no cap keeps the estimated peak within the limit {guard.limit(ctx)} B"
            return PassResult(False, PreservedAnalyses.none(), details)
        gathers, scatters, reductions = (sum(r[i] for r in removed.values()) for i in range(3))
        capped = "" if all(c == cap for c in caps.values()) else f" (caps under the budget: {caps})"
        summary = (
            f"bucketed collectives: {gathers} fewer all-gather(s), {scatters} fewer reduce-scatter(s), "
            f"{reductions} fewer all-reduce(s){capped}"
        )
        # the step holds the graphs of a try that fit (`_apply` put back the very modules)
        kept = next(t["peak"] for t in reversed(tried) if t["caps"] == caps and t["fits"])
        return guard.result(analyses, ctx, {**details, "removed": removed}, summary, measured=(True, kept))

    @staticmethod
    def _apply(
        step: StepGraphs, guard: BudgetGuard, analyses: AnalysisManager, caps: dict[str, int], cache: _Cache | None = None,
    ) -> dict[str, tuple[int, int, int]]:
        """The snapshot's graphs, bucketed under ``caps``, put into ``step``; the
        collectives removed per graph. ``cache`` keeps each graph bucketed under each
        of its caps (a try that changes one graph's caps rebuckets only that one), and
        the merges traced on each graph's values (a bucket merged again in a later try
        is not traced again, `_reused_traces`).

        The step holds the cache's graph modules themselves, not copies: between tries
        nothing rewrites them (the guard only reads them), and the cache lives only as
        long as the pass. Each is a lazy module, its code generated only for the graphs
        the step runs (a rejected try's never)."""
        cache = _Cache() if cache is None else cache
        removed, built = {}, {}
        for name, gm in guard.snapshot.graphs():
            key = _cache_key(name, gm, caps)
            if key not in cache.built:
                fresh = clone_graph_module(gm, lazy=True)
                cache.built[key] = (fresh, bucket_graph(fresh, *key[1:], traces=cache.traces.setdefault(name, {})))
                fresh.recompile()  # lazy: the code of the bucketed graph, when first needed
            built[name], removed[name] = cache.built[key]
        if step.backward is None:
            step.forward = built[step.single_graph_name]
        else:
            step.forward, step.backward = built["forward"], built["backward"]
        analyses.invalidate(PreservedAnalyses.none())
        return removed

    def _search(
        self, step: StepGraphs, guard: BudgetGuard, analyses: AnalysisManager, ctx: PassContext,
        cap: int, tried: list[dict[str, Any]], cache: _Cache,
    ) -> tuple[dict[str, int], dict[str, tuple[int, int, int]]]:
        """The caps of the kinds in turn (class docstring); ``step`` left bucketed under
        them, and the collectives removed."""
        chosen = dict.fromkeys(KINDS, 0)
        removed: dict[str, tuple[int, int, int]] = {name: (0, 0, 0) for name, _ in step.graphs()}
        current = dict.fromkeys(KINDS, -1)  # the caps the step holds now (-1: as it came)
        for kind in KINDS:
            seen: set[tuple[tuple[str, ...], ...]] = set()
            for c in _ladder(cap):
                buckets = buckets_of(guard.snapshot, kind, c)
                if not buckets:
                    break  # nothing merges under this cap, nor under smaller ones
                if buckets in seen:
                    continue  # the same buckets as a cap already tried
                seen.add(buckets)
                trial = {**chosen, kind: c}
                trial_removed = self._apply(step, guard, analyses, trial, cache)
                current = trial
                fits, peak = guard.fits(analyses, ctx)
                tried.append({"caps": dict(trial), "peak": peak, "fits": fits})
                if fits:
                    chosen, removed = trial, trial_removed
                    break
        if current != chosen:
            removed = self._apply(step, guard, analyses, chosen, cache)
        return chosen, removed
