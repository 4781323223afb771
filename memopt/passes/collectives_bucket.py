"""Pass ``bucket_collectives``: small all-gathers and reduce-scatters travel together.

A sharded step holds one all-gather per parameter in forward (and per re-gathered
parameter in backward) and one reduce-scatter per gradient in backward. Each has a fixed
cost (a launch, a rendezvous of every rank) that small tensors (biases, norms) never
amortize. This pass merges runs of them into buckets of at most
``collective_bucket_bytes`` (full, gathered size):

    all-gather:     cat(flat pieces) -> all_gather -> wait -> view(world, -1)
                    -> split(dim 1) -> each piece's rows (a copy: rank-major rows)
    reduce-scatter: each gradient viewed (world, -1) -> cat(dim 1) -> reduce_scatter
                    -> wait -> split -> views of the shards

What is torch's (`torch/_inductor/fx_passes/bucketing.py`, private API, pinned by
``tests/distributed/test_collective_passes.py``):

* which collectives form a bucket: ``bucket_all_gather_by_mb`` and
  ``bucket_reduce_scatter_by_mb`` (greedy, in wait order, same process group and dtype,
  no collective depending on another in its bucket, under a size cap);
* the rewrite of a bucket: ``process_collective_bucket`` (traces a merge function
  with fake tensors, inserts it after the bucket's last collective, replaces the
  waits); for reduce-scatters with torch's own merge function
  (``merge_reduce_scatter_bucket``, mode ``"default"``);
* which reduce-scatters are a parameter's (``fsdp.is_fsdp_reduce_scatter_wait``: the
  result reaches the graph's outputs through unary ops only).

What is memopt's: the all-gather merge function. torch's (``all_gather_merge_fn_to_trace``)
gathers into a preallocated buffer (``copy_`` of the inputs, then
``all_gather_into_tensor_out``): in-place writes that memopt's analyses would have to
treat as a gather (regatherable values, the cost model, the per-rank report all key on
the functional ``all_gather_into_tensor``). memopt's merge is torch's
``all_gather_merge_fn_to_trace_functional`` without the ``out=`` buffer: ``cat`` then the
functional gather, so the bucket is a gather of parameter shards like any other.

A parameter's rows lie in every rank's part of the bucket, so they are not a view of
it: each is copied out (FSDP2's ``copy_out`` does the same). The bucket's buffer lives
until the last copy, so the transient is one bucket on top of its copies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from memopt.analysis.manager import AnalysisManager
from memopt.graph import meta
from memopt.graph.collectives import ALL_GATHER, WAIT, is_all_gather, is_reduce_scatter
from memopt.graph.step import StepGraphs
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.budget_guard import BudgetGuard

__all__ = ["BucketCollectives", "bucket_graph", "gather_bucket"]


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
    dtypes = [n.meta["val"].dtype for n in nodes]

    def trace_args(inputs: list[fx.Node]) -> tuple[Any, ...]:
        return ([n.meta["val"] for n in inputs], group_name, group_size, dtypes)

    process_collective_bucket(graph, nodes, gather_bucket, trace_args)


def _merge_reductions(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    from torch._inductor.fx_passes.bucketing import merge_reduce_scatter_bucket

    merge_reduce_scatter_bucket(graph, nodes, "default")


def bucket_graph(gm: fx.GraphModule, cap_bytes: int) -> tuple[int, int]:
    """Bucket ``gm``'s parameter all-gathers and gradient reduce-scatters under
    ``cap_bytes`` each; (all-gathers, reduce-scatters) removed."""
    from torch._inductor.fx_passes.bucketing import bucket_all_gather_by_mb, bucket_reduce_scatter_by_mb
    from torch._inductor.fx_passes.fsdp import is_fsdp_reduce_scatter_wait
    from torch._inductor.pattern_matcher import stable_topological_sort

    cap: Callable[[int], float] = lambda _: cap_bytes / 2**20  # noqa: E731
    counts = []
    for find, merge, is_kind, keep in (
        (bucket_all_gather_by_mb, _merge_gathers, is_all_gather, meta.is_regatherable),
        (bucket_reduce_scatter_by_mb, _merge_reductions, is_reduce_scatter, is_fsdp_reduce_scatter_wait),
    ):
        before = sum(is_kind(n) for n in gm.graph.nodes)
        buckets = find(gm, cap, filter_wait_node=keep, mode="default")
        for bucket in buckets:
            merge(gm.graph, bucket)
        if buckets:
            stable_topological_sort(gm.graph)
        counts.append(before - sum(is_kind(n) for n in gm.graph.nodes))
    return counts[0], counts[1]


class BucketCollectives(Pass):
    """Merge runs of small all-gathers and reduce-scatters (module docstring).

    Purpose: one collective per bucket instead of one per parameter.

    Preconditions: topologically sorted graphs with fake values; every bucketed
    collective has exactly one wait (memopt's sharded graphs).

    Guarantees: the same bytes are gathered and reduced, element by element, with the
    same reduction; gathered parameters are bit-identical, and reduced gradients are
    too wherever the process group's per-element sum does not depend on the buffer's
    length (always on 2 ranks). Collectives keep their relative order, so every rank
    issues the same sequence. Kept only while the step's estimated peak stays within
    the budget (`memopt.passes.budget_guard`): a bucket's buffer is live while its
    parameters are copied out of it.

    Ordering: after ``remat`` (re-gathers in backward are bucketed like the forward's)
    and ``dedupe_collectives``; before ``schedule``, which then orders the bucketed
    graph, and before ``overlap_collectives``, which moves whole buckets.
    """

    name = "bucket_collectives"

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        cap = ctx.config.collective_bucket_bytes
        if cap == 0 or not any(is_all_gather(n) or is_reduce_scatter(n) for _, gm in step.graphs() for n in gm.graph.nodes):
            return PassResult.unchanged()
        guard = BudgetGuard.before(step, analyses, ctx)
        removed = {name: bucket_graph(gm, cap) for name, gm in step.graphs()}
        if not any(sum(r) for r in removed.values()):
            return PassResult.unchanged()
        gathers = sum(r[0] for r in removed.values())
        scatters = sum(r[1] for r in removed.values())
        summary = f"bucketed collectives: {gathers} fewer all-gather(s), {scatters} fewer reduce-scatter(s)"
        return guard.result(analyses, ctx, {"removed": removed}, summary)
