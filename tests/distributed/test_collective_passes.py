"""memopt's collective passes on sharded graphs, in a fake 8-rank world (one process):
a tied parameter reduced once (``dedupe_collectives``), all-gathers, reduce-scatters and
the all-reduces of stages 0 and 1 bucketed (``bucket_collectives``, on torch's private
bucketing API, pinned here), starts moved ahead of waits (``overlap_collectives``), and
the options' errors. Bitwise
numerics on 2 gloo ranks: test_shard_ranks.py."""

from __future__ import annotations

import inspect
import re
from collections import Counter

import pytest
import torch
import torch.nn as nn

import memopt.distributed as md
from memopt.config import MemoptConfig

LAYER_BYTES = (64 * 64 + 64) * 4
"""A Linear(64, 64)'s weight and bias, gathered (full size)."""


def _layers(n: int = 4, width: int = 64, stage: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return md.shard(nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(n)]), stage=stage)


def _collectives(graphs: dict) -> int:
    return sum(graphs["forward"].values()) + sum(graphs["backward"].values())


def _tied(stage: int = 3) -> nn.Module:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.mid = nn.Linear(16, 16)
            self.head = nn.Linear(16, 32, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mid(self.embed(ids))))

    torch.manual_seed(0)
    return md.shard(Tied(), stage=stage)


def _lines(code: str, pattern: str) -> list[int]:
    """Line numbers of ``code`` that call ``pattern`` (call syntax)."""
    return [i for i, line in enumerate(code.splitlines()) if pattern in line]


def test_tied_parameter_is_gathered_once_and_reduced_once(fake_world, graphs_of):
    """The embedding tied to the head: one all-gather (AOTAutograd's CSE already merges
    the two reads) and, with the pass, one reduce-scatter of the two gradients' sum
    instead of two reduce-scatters added."""
    ids = torch.randint(0, 32, (2, 5))
    unbucketed = {"collective_bucket_bytes": 0, "collective_prefetch": 0}
    off = graphs_of(_tied(), ids, disable_passes=["dedupe_collectives"], **unbucketed)
    on = graphs_of(_tied(), ids, **unbucketed)
    assert off["forward"]["all_gather_into_tensor"] == on["forward"]["all_gather_into_tensor"] == 3
    assert off["backward"]["reduce_scatter_tensor"] == 4
    assert on["backward"]["reduce_scatter_tensor"] == 3


@pytest.mark.parametrize("stage", [0, 1])
def test_tied_parameter_is_all_reduced_once(fake_world, graphs_of, stage):
    """Stages 0 and 1 all-reduce the tied embedding's two gradients (the embedding's and
    the head's) and add the results: with the pass, one all-reduce of their sum, viewed
    back to the parameter's shape. The add kept the two out of every bucket (a bucketed
    gradient reaches the output through views only); merged, the tied gradient is
    bucketed with the others: one all-reduce in all under the default cap, against three
    without the pass."""
    ids = torch.randint(0, 32, (2, 5))
    unbucketed = {"collective_bucket_bytes": 0, "collective_prefetch": 0}
    off = graphs_of(_tied(stage), ids, disable_passes=["dedupe_collectives"], **unbucketed)
    on = graphs_of(_tied(stage), ids, **unbucketed)
    assert off["backward"]["all_reduce"] == 4 and on["backward"]["all_reduce"] == 3  # embed twice, mid's weight, bias
    assert _all_reduce_sizes(off["backward_code"]).count(32 * 16) == 2 and _all_reduce_sizes(on["backward_code"]).count(32 * 16) == 1
    assert on["passes"]["dedupe_collectives"].details["reductions_removed"] == 1
    summed = re.search(r'(\w+): "f32\[32, 16\]" = torch\.ops\.aten\.add\.Tensor\(', on["backward_code"])
    assert summed and f"all_reduce.default({summed[1]}, 'sum'" in on["backward_code"]  # the sum is reduced
    assert graphs_of(_tied(stage), ids, disable_passes=["dedupe_collectives"])["backward"]["all_reduce"] == 3
    assert graphs_of(_tied(stage), ids)["backward"]["all_reduce"] == 1


def test_duplicate_all_gathers_of_one_shard_merge():
    """Two all-gathers of identical views of one input become one, waited once."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memopt.passes.collectives_dedupe import merge_duplicate_gathers

    c10d = torch.ops._c10d_functional

    def two_reads(shard: torch.Tensor) -> torch.Tensor:
        a = c10d.wait_tensor(c10d.all_gather_into_tensor(shard.view(4, 4), 2, "0"))
        b = c10d.wait_tensor(c10d.all_gather_into_tensor(shard.view(4, 4), 2, "0"))
        return a.sum() + b.sum()

    gm = make_fx(two_reads, tracing_mode="fake")(torch.randn(16))
    assert merge_duplicate_gathers(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    code = gm.code
    assert code.count("all_gather_into_tensor.default(") == 1 and code.count("wait_tensor.default(") == 1


def test_bucketing_is_the_same_on_a_rank_whose_rows_are_short(graphs_of):
    """13 rows over 8 ranks: rank 0 holds 2 of them, rank 7 none, so only rank 7's
    reduce-scatters are followed by a ``narrow`` that cuts the padding. Every rank must
    bucket alike, or their collectives stop matching (torch 2.11's
    ``is_fsdp_reduce_scatter_wait`` refused the narrowed ones: gloo failed on 2 ranks)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    backward = {}
    for rank in (0, 7):
        torch.manual_seed(0)
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
        try:
            model = md.shard(nn.Sequential(nn.Linear(16, 13), nn.ReLU(), nn.Linear(13, 16)), stage=3)
            graphs = graphs_of(model, torch.randn(4, 16))
        finally:
            dist.destroy_process_group()
        backward[rank] = (graphs["backward"], graphs["backward_code"].count(".narrow"))
    assert backward[0][0] == backward[7][0] == {"all_gather_into_tensor": 0, "reduce_scatter_tensor": 1, "all_reduce": 0}
    assert backward[0][1] < backward[7][1], "rank 7's pieces are short: it narrows more"


def test_collectives_are_bucketed_under_the_cap(fake_world, graphs_of):
    """4 layers (weight + bias each) gather 8 times and reduce 8 times when bucketing
    is off; the default cap (4 MiB) buckets all of them into one all-gather and one
    reduce-scatter; a cap of two layers into two each."""
    x = torch.randn(2, 64)
    off = graphs_of(_layers(), x, collective_bucket_bytes=0)
    assert off["forward"]["all_gather_into_tensor"] == 8 and off["backward"]["reduce_scatter_tensor"] == 8
    default = graphs_of(_layers(), x)
    assert default["forward"]["all_gather_into_tensor"] == 1 and default["backward"]["reduce_scatter_tensor"] == 1
    two = graphs_of(_layers(), x, collective_bucket_bytes=2 * LAYER_BYTES)
    assert two["forward"]["all_gather_into_tensor"] == 2 and two["backward"]["reduce_scatter_tensor"] == 2
    # a bucket gathers the concatenated shards: 2 layers' rows, 8 ranks
    assert re.search(rf'all_gather_into_tensor\w*: "f32\[{2 * LAYER_BYTES // 4}\]"', two["forward_code"])


def test_starts_move_ahead_of_waits(fake_world, graphs_of):
    """One layer per bucket, prefetch 1: each layer's all-gather starts right after the
    previous bucket's wait, before the previous layer computes (its addmm); in backward
    a reduce-scatter is waited after the next layer's gradient matmuls, right before
    the next reduce-scatter starts (one in flight)."""
    graphs = graphs_of(_layers(), torch.randn(2, 64), collective_bucket_bytes=LAYER_BYTES)
    forward, backward = graphs["forward_code"], graphs["backward_code"]
    starts, mms = _lines(forward, "all_gather_into_tensor.default("), _lines(forward, "aten.addmm.default(")
    assert len(starts) == len(mms) == 4
    assert all(start < mm for start, mm in zip(starts[1:], mms))  # layer k+1 fetched before layer k computes
    scatters = _lines(backward, "reduce_scatter_tensor.default(")
    waits = [i for i in _lines(backward, "wait_tensor.default(") if "reduce_scatter" in backward.splitlines()[i]]
    assert len(scatters) == len(waits) == 4
    matmuls = _lines(backward, "aten.mm.default(")
    for start, wait, after in zip(scatters, waits, [*scatters[1:], len(backward.splitlines())]):
        assert start < wait < after
    assert all(any(start < mm < wait for mm in matmuls) for start, wait in zip(scatters[:-1], waits))

    traced = graphs_of(_layers(), torch.randn(2, 64), collective_bucket_bytes=LAYER_BYTES, collective_prefetch=0)
    starts, mms = _lines(traced["forward_code"], "all_gather_into_tensor.default("), _lines(traced["forward_code"], "aten.addmm.default(")
    assert all(start > mm for start, mm in zip(starts[1:], mms))


def _all_reduce_sizes(code: str) -> list[int]:
    """Elements of each all-reduce in ``code`` (its output's annotated shape)."""
    shapes = re.findall(r'all_reduce\w*: "f32\[([\d, ]*)\]" = torch\.ops\._c10d_functional\.all_reduce_?\.default\(', code)
    return [int(torch.Size(int(d) for d in shape.split(", ") if d).numel()) for shape in shapes]


@pytest.mark.parametrize("stage", [0, 1])
def test_all_reduces_are_bucketed_under_the_cap(fake_world, graphs_of, stage):
    """Stages 0 and 1 all-reduce each gradient in backward: 8 (4 layers' weight and
    bias) unbucketed, one under the default cap (4 MiB), two at a cap of two layers,
    and no all-reduce over the cap. Nothing is gathered or scattered at these stages."""
    x = torch.randn(2, 64)
    off = graphs_of(_layers(stage=stage), x, collective_bucket_bytes=0)
    assert off["backward"]["all_reduce"] == 8 and off["forward"] == dict.fromkeys(off["forward"], 0)
    default = graphs_of(_layers(stage=stage), x)
    assert default["backward"]["all_reduce"] == 1
    assert _all_reduce_sizes(default["backward_code"]) == [4 * LAYER_BYTES // 4]
    two = graphs_of(_layers(stage=stage), x, collective_bucket_bytes=2 * LAYER_BYTES)
    assert two["backward"]["all_reduce"] == 2
    assert _all_reduce_sizes(two["backward_code"]) == [2 * LAYER_BYTES // 4] * 2  # each at the cap, none over
    assert two["backward"]["reduce_scatter_tensor"] == two["backward"]["all_gather_into_tensor"] == 0
    removed = two["passes"]["bucket_collectives"].details["removed"]
    assert removed["backward"] == (0, 0, 6)


def test_bucketed_all_reduces_are_waited_late(fake_world, graphs_of):
    """One layer per all-reduce bucket, prefetch 1: each bucket's all-reduce starts as
    soon as its gradients are ready and is waited after the next layer's gradient
    matmuls, right before the next all-reduce starts (as reduce-scatters). Each bucket
    is reduced in place (``all_reduce_`` on its concatenation)."""
    graphs = graphs_of(_layers(stage=0), torch.randn(2, 64), collective_bucket_bytes=LAYER_BYTES)
    backward = graphs["backward_code"]
    assert "all_reduce.default(" not in backward
    starts = _lines(backward, "all_reduce_.default(cat")
    waits = [i for i in _lines(backward, "wait_tensor.default(") if "all_reduce" in backward.splitlines()[i]]
    assert len(starts) == len(waits) == 4
    for start, wait, after in zip(starts, waits, [*starts[1:], len(backward.splitlines())]):
        assert start < wait < after
    matmuls = _lines(backward, "aten.mm.default(")
    assert all(any(start < mm < wait for mm in matmuls) for start, wait in zip(starts[:-1], waits))
    record = graphs["passes"]["overlap_collectives"]
    assert record.details["moved"]["backward"]["reduction"] == 4


def test_tight_budget_buckets_all_reduces_under_a_smaller_cap(fake_world, graphs_of):
    """Stage 0, 8 layers: one 4 MiB all-reduce bucket holds every gradient until the
    last is ready, then their concatenation and the reduced buffer: over a budget a
    little above the unbucketed peak. The all-reduces get the largest smaller cap that
    fits (the fourth kind of the search): fewer all-reduces than unbucketed, more than
    one, the step within the budget."""
    x, options = torch.randn(2, 128), {"memory_budget": "1.25MiB", "plan_across_graph_breaks": False}
    graphs = graphs_of(_layers(8, 128, stage=0), x, **options)
    record = graphs["passes"]["bucket_collectives"]
    requested, *searched = record.details["tried"]
    assert not requested["fits"] and searched
    assert 0 < record.details["caps"]["all_reduce"] < 4 << 20
    assert record.details["caps"] in [t["caps"] for t in searched if t["fits"]]
    assert record.modified and record.details["peak_after"] <= record.details["limit"]
    assert graphs["estimate"] <= graphs["budget"]
    assert 1 < graphs["backward"]["all_reduce"] < 16


def _traced_all_reduce_bucket() -> torch.fx.GraphModule:
    """torch's all-reduce merge traced on two 1000-element gradients (4000 B each, made
    from two inputs of 8000 B)."""
    from torch._inductor.fx_passes.bucketing import all_reduce_merge_fn_to_trace
    from torch.fx.experimental.proxy_tensor import make_fx

    def bucket(a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
        return all_reduce_merge_fn_to_trace([a * 2, b * 3], "0", "sum", torch.float32, a.device)

    return make_fx(bucket, tracing_mode="fake")(torch.randn(1000), torch.randn(1000))


def _live_bytes(gm: torch.fx.GraphModule) -> tuple[dict[str, int], int, int]:
    from memopt.analysis.memory import build_timeline
    from memopt.graph.step import StepGraphs

    timeline = build_timeline(StepGraphs(gm, None, 2, num_user_outputs=2))
    return {p.node: p.live_bytes for p in timeline.points}, timeline.peak_bytes, timeline.end_bytes


def test_all_reduce_bucket_memory_is_modelled():
    """torch's functional merge: the gradients live until the concatenation (24000 B
    with it), the concatenation until the wait (the process group reads it: 24000 B at
    the all-reduce and at its wait, with the reduced buffer), then only the reduced
    buffer, which both gradients view (16000 B to the end). Reduced in place
    (`reduce_in_place`, what ``bucket_collectives`` does), the result is the
    concatenation's buffer: 16000 B from the all-reduce to its wait, the bucket held
    once."""
    from memopt.passes.collectives_bucket import reduce_in_place

    gm = _traced_all_reduce_bucket()
    assert gm.code.count("_c10d_functional.all_reduce.default(") == 1
    live, peak, end = _live_bytes(gm)
    assert (live["mul_1"], live["cat"], live["all_reduce"], live["wait_tensor"]) == (16000, 24000, 24000, 24000)
    assert peak == 24000 and end == 16000

    (reduction,) = gm.graph.find_nodes(op="call_function", target=torch.ops._c10d_functional.all_reduce.default)
    reduce_in_place(reduction)
    gm.recompile()
    assert gm.code.count("_c10d_functional.all_reduce_.default(cat") == 1
    live, peak, end = _live_bytes(gm)
    assert (live["mul_1"], live["cat"], live["all_reduce"], live["wait_tensor"]) == (16000, 24000, 16000, 16000)
    assert peak == 24000 and end == 16000


def test_all_reduce_buckets_held_once_until_their_wait(fake_world, graphs_of, monkeypatch):
    """Stage 0, one layer per bucket, each waited after the next layer's gradient
    matmuls: reduced in place, a bucket is held once while it is in flight, so the
    step's estimated peak is one bucket (a layer's weight and bias) below that of the
    functional all-reduce (its concatenation and its result both live until the wait),
    and below the unbucketed step's. With every gradient in one bucket the peak is
    where the bucket is concatenated (its gradients and their concatenation), the same
    either way."""
    import memopt.passes.collectives_bucket as bucketing

    def estimate(**options: object) -> int:
        torch._dynamo.reset()
        return graphs_of(_layers(stage=0), torch.randn(2, 64), **options)["estimate"]

    in_place = {"per_layer": estimate(collective_bucket_bytes=LAYER_BYTES), "one": estimate()}
    unbucketed = estimate(collective_bucket_bytes=0)
    monkeypatch.setattr(bucketing, "reduce_in_place", lambda reduction: None)
    functional = {"per_layer": estimate(collective_bucket_bytes=LAYER_BYTES), "one": estimate()}
    assert in_place["per_layer"] == functional["per_layer"] - LAYER_BYTES
    assert in_place["per_layer"] < unbucketed < functional["per_layer"]
    assert in_place["one"] == functional["one"]


def _traced_reduce_scatters(n: int = 4) -> torch.fx.GraphModule:
    """``n`` gradients (64 elements each, fake), each reduce-scattered over the fake
    world, its shard returned: what ``bucket_collectives`` buckets in backward."""
    import torch.distributed as dist
    from torch.fx.experimental.proxy_tensor import make_fx

    group, size = dist.group.WORLD.group_name, dist.get_world_size()  # type: ignore[union-attr]
    functional = torch.ops._c10d_functional

    def grads(*gs: torch.Tensor) -> list[torch.Tensor]:
        return [functional.wait_tensor(functional.reduce_scatter_tensor(g * 2, "sum", size, group)) for g in gs]

    return make_fx(grads, tracing_mode="fake")(*[torch.randn(64) for _ in range(n)])


def test_a_bucket_merged_again_reuses_its_trace(fake_world, monkeypatch):
    """``bucket_graph`` with ``traces`` (a search's tries, each bucketing a copy of one
    graph): a bucket merged again is not traced again, and the graph is the same as
    bucketed without reuse. Within one graph a trace is never inserted twice (two
    buckets would share fake values, which memory analyses tell storages apart by)."""
    from torch._inductor.fx_passes import bucketing

    from memopt.graph.step import clone_graph_module
    from memopt.passes.collectives_bucket import bucket_graph
    from memopt.passes.instruments import readable_code

    gm = _traced_reduce_scatters()
    traced: list[object] = []
    trace = bucketing._trace
    monkeypatch.setattr(bucketing, "_trace", lambda fn, inputs: traced.append(fn) or trace(fn, inputs))
    alone = clone_graph_module(gm)
    assert bucket_graph(alone, 0, 128 * 4) == (0, 2, 0)  # two buckets of two gradients
    assert len(traced) == 2
    traces: dict = {}
    first, again = clone_graph_module(gm), clone_graph_module(gm)
    assert bucket_graph(first, 0, 128 * 4, traces=traces) == (0, 2, 0)
    assert len(traced) == 4
    assert bucket_graph(again, 0, 128 * 4, traces=traces) == (0, 2, 0)
    assert len(traced) == 4  # both buckets' traces reused
    for bucketed in (first, again):
        bucketed.recompile()
        assert readable_code(bucketed) == readable_code(alone)
    values = [id(n.meta["val"]) for n in again.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert len(values) == len(set(values))
    assert bucketing._trace is not trace and bucketing._trace.__name__ == "<lambda>"  # the spy, put back


def test_only_a_private_concatenation_is_reduced_in_place():
    """An all-reduce of anything but a ``cat`` only it reads (a graph input, a gradient
    another node reads) stays functional: `reduce_in_place` refuses, naming the node."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memopt.passes.collectives_bucket import reduce_in_place

    c10d = torch.ops._c10d_functional

    def shared(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = torch.cat([x, x])
        return c10d.wait_tensor(c10d.all_reduce(flat, "sum", "0")), flat + 1

    def of_input(x: torch.Tensor) -> torch.Tensor:
        return c10d.wait_tensor(c10d.all_reduce(x, "sum", "0"))

    for fn in (shared, of_input):
        gm = make_fx(fn, tracing_mode="fake")(torch.randn(4))
        (reduction,) = gm.graph.find_nodes(op="call_function", target=c10d.all_reduce.default)
        with pytest.raises(ValueError, match=rf"all-reduce {reduction.name} reads .* Reduce in place only the bucket's own cat"):
            reduce_in_place(reduction)
        assert reduction.target is c10d.all_reduce.default


def test_budget_keeps_regathering_with_the_passes(fake_world, graphs_of):
    """Under a budget the plan still frees gathered weights after forward and gathers
    them again in backward; those re-gathers are bucketed too."""
    model = md.shard(nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(4)]), stage=3)
    graphs = graphs_of(model, torch.randn(2, 64), memory_budget=0.75, plan_across_graph_breaks=False)
    assert graphs["backward"]["all_gather_into_tensor"] >= 1


def test_tight_budget_buckets_under_smaller_caps(fake_world, graphs_of):
    """Under the budget the plan frees the gathered weights after forward and gathers
    them again in backward one by one, and each gradient is reduced as soon as it is
    ready. One bucket of every re-gather (the default 4 MiB cap holds the whole model)
    would hold every weight at once in backward, as if none were re-gathered, and one
    reduce-scatter bucket every gradient until the last: over the budget, where the
    pass used to undo all of its bucketing. Now it keeps smaller buckets: the step
    within the budget, with fewer collectives than unbucketed."""
    x, options = torch.randn(2, 128), {"memory_budget": 0.6, "plan_across_graph_breaks": False}
    graphs = graphs_of(_layers(8, 128), x, **options)
    unbucketed = graphs_of(_layers(8, 128), x, collective_bucket_bytes=0, **options)
    record = graphs["passes"]["bucket_collectives"]
    requested, *searched = record.details["tried"]
    assert requested["caps"] == dict.fromkeys(requested["caps"], 4 << 20) and not requested["fits"]
    assert requested["peak"] > record.details["limit"] and searched
    assert record.modified and record.details["peak_after"] <= record.details["limit"]
    assert any(0 < cap < 4 << 20 for cap in record.details["caps"].values())
    assert record.details["caps"] in [t["caps"] for t in searched if t["fits"]]  # a cap the timeline checked
    assert graphs["estimate"] <= graphs["budget"]
    assert unbucketed["backward"]["all_gather_into_tensor"] > 0  # the plan re-gathers
    assert _collectives(graphs) < _collectives(unbucketed)


def test_tight_budget_prefetches_what_fits(fake_world, graphs_of):
    """Bucketing (before it) has taken most of the budget's headroom: every gather one
    bucket ahead and every reduction waited one behind puts the step over. The pass
    then moves each collective only where the step stays within the limit: some move,
    some stay in place, and the estimate is within the budget."""
    options = {"memory_budget": 0.6, "plan_across_graph_breaks": False}
    graphs = graphs_of(_layers(8, 128), torch.randn(2, 128), **options)
    record = graphs["passes"]["overlap_collectives"]
    assert not record.details["all_at_depth"]["fits"] and record.details["all_at_depth"]["peak"] > record.details["limit"]
    counts = Counter()
    for kinds in record.details["distances"].values():
        for by_distance in kinds.values():
            counts.update(by_distance)
    assert counts[0] > 0 and counts[1] > 0  # left in place / moved one ahead
    assert record.modified and record.details["peak_after"] <= record.details["limit"]
    assert graphs["estimate"] <= graphs["budget"]


def test_rejected_moves_are_undone_and_shorter_distances_tried():
    """``accept`` answers each move in turn: a rejected one leaves the graph exactly
    as it was, and the next shorter distance is tried."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memopt.passes.collectives_overlap import prefetch_gathers

    c10d = torch.ops._c10d_functional

    def three_layers(w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for w in (w0, w1, w2):
            x = torch.mm(x, c10d.wait_tensor(c10d.all_gather_into_tensor(w, 2, "0")))
        return x

    def traced() -> torch.fx.GraphModule:
        return make_fx(three_layers, tracing_mode="fake")(*[torch.randn(2, 4)] * 3, torch.randn(3, 4))

    gm = traced()
    code, answers = gm.code, []
    # gather 1 may move 1 place, gather 2 two places then one: three questions
    assert list(prefetch_gathers(gm.graph, 2, accept=lambda: answers.append(False) or False).values()) == [0, 0, 0]
    gm.recompile()
    assert len(answers) == 3 and gm.code == code

    gm = traced()
    replies = iter([True, False, True])  # gather 1: one place; gather 2: not two, one
    assert list(prefetch_gathers(gm.graph, 2, accept=lambda: next(replies)).values()) == [0, 1, 1]
    gm.recompile()
    starts, waits = _lines(gm.code, "all_gather_into_tensor.default("), _lines(gm.code, "wait_tensor.default(")
    assert starts[1] == waits[0] + 1 and starts[2] == waits[1] + 1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("collective_bucket_bytes", -1, "collective_bucket_bytes=-1 must be a non-negative number of bytes"),
        ("collective_bucket_bytes", "lots", "memory size 'lots' not understood"),
        ("collective_prefetch", 1.5, "collective_prefetch=1.5 must be a non-negative int"),
    ],
)
def test_option_errors_name_the_value_and_the_fix(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MemoptConfig.from_options({key: value})


def test_option_values():
    config = MemoptConfig.from_options({"collective_bucket_bytes": "16MiB", "collective_prefetch": 0})
    assert config.collective_bucket_bytes == 16 << 20 and config.collective_prefetch == 0
    assert MemoptConfig().collective_bucket_bytes == 4 << 20 and MemoptConfig().collective_prefetch == 1


def test_torch_private_bucketing_api_is_as_used():
    """memopt reuses torch's private FX bucketing helpers (torch 2.11 and 2.13). If this fails
    after a torch upgrade, `memopt/passes/collectives_bucket.py` needs the new names or
    signatures."""
    from torch._inductor.fx_passes import bucketing
    from torch._inductor.pattern_matcher import stable_topological_sort

    expected = {
        bucketing.bucket_all_gather_by_mb: ["gm", "bucket_cap_mb_by_bucket_idx", "filter_wait_node", "mode"],
        bucketing.bucket_reduce_scatter_by_mb: ["gm", "bucket_cap_mb_by_bucket_idx", "filter_wait_node", "mode"],
        bucketing.process_collective_bucket: ["g", "bucket_nodes", "fn_to_trace", "trace_args_fn"],
        bucketing.merge_reduce_scatter_bucket: ["g", "rs_nodes", "mode"],
        bucketing.bucket_all_reduce_by_mb: ["gm", "bucket_cap_mb_by_bucket_idx", "filter_wait_node"],
        bucketing.merge_all_reduce_bucket: ["g", "ar_nodes"],
        bucketing.all_reduce_merge_fn_to_trace: ["ar_ins", "group_name", "reduce_op", "reduce_dtype", "device"],
        bucketing._trace: ["fn", "inps"],  # reused across a search's tries (`_reused_traces`)
        stable_topological_sort: ["graph"],
    }
    for fn, params in expected.items():
        assert list(inspect.signature(fn).parameters)[: len(params)] == params, fn.__name__
