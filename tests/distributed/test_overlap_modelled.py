"""``overlap_collectives`` moves each collective as far as its modelled time needs
(`memopt.analysis.collective_time`), at most ``collective_prefetch`` places: the full
distance on a slow network, one place on a fast one, and a step that holds fewer
gathered buffers for it; the clock's FIFO link, the gathers' starting order, and
`md.report`'s exposed time. Fake 8-rank world (one process); the network's speed is the
device model's (`memopt.analysis.cost`), set per test. Bitwise numerics of the moves on
2 gloo ranks: test_shard_ranks.py::test_collective_passes_are_bitwise_exact."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import memopt.distributed as md
from memopt.analysis import cost
from memopt.analysis.collective_time import CollectiveClock
from memopt.analysis.cost import DeviceModel

LAYERS, PREFETCH = 6, 3
LAYER_BYTES = (64 * 64 + 64) * 4
"""A Linear(64, 64)'s weight and bias, gathered (full size): one bucket per layer."""

SLOW, FAST = 1e3, 1e15
"""Network bytes per second: a gather takes seconds (no layer hides it) or only its
launch overhead (one layer's compute hides it)."""


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """``network(bytes_per_s)``: the CPU device model's network bandwidth, for this test."""

    def set_bandwidth(bytes_per_s: float) -> None:
        model = dataclasses.replace(cost._DEVICES["cpu"], network_bytes_per_s=bytes_per_s)
        monkeypatch.setitem(cost._DEVICES, "cpu", model)

    return set_bandwidth


def _layers() -> nn.Module:
    torch.manual_seed(0)
    return md.shard(nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(LAYERS)]), stage=3)


def _overlapped(graphs_of: Callable[..., dict], bytes_per_s: float, network: Callable[[float], None]) -> dict:
    torch._dynamo.reset()
    network(bytes_per_s)
    return graphs_of(_layers(), torch.randn(2, 64), collective_bucket_bytes=LAYER_BYTES, collective_prefetch=PREFETCH)


def _rows(graphs: dict, graph: str, kind: str) -> list[dict]:
    record = graphs["passes"]["overlap_collectives"]
    return [row for row in record.details["collectives"][graph] if row["kind"] == kind]


def _starts_in_wait_order(code: str) -> bool:
    """The all-gathers start in the order they are waited."""
    starts = re.findall(r"(all_gather_into_tensor\w*)[^=]*= torch\.ops\._c10d_functional\.all_gather_into_tensor", code)
    waited = re.findall(r"wait_tensor\.default\((all_gather_into_tensor\w*)\)", code)
    return starts == waited


def test_slow_network_moves_the_full_distance(fake_world, graphs_of, network):
    """No layer's compute hides a gather: each starts ``collective_prefetch`` gathers
    ahead (the first ones as far as there are gathers before them), each reduction is
    waited ``collective_prefetch`` reductions later (the last ones at the outputs), and
    the record says they stay exposed."""
    graphs = _overlapped(graphs_of, SLOW, network)
    gathers = _rows(graphs, "forward", "all_gather")
    assert [row["distance"] for row in gathers] == [min(i, PREFETCH) for i in range(LAYERS)]
    reductions = _rows(graphs, "backward", "reduction")
    assert [row["distance"] for row in reductions] == [min(PREFETCH, LAYERS - i) for i in range(LAYERS)]
    for row in gathers + reductions:
        assert row["exposed"] > 0.99 * row["seconds"] and row["hidden"] < 0.01 * row["seconds"]
    assert _starts_in_wait_order(graphs["forward_code"])


def test_fast_network_moves_only_as_far_as_needed(fake_world, graphs_of, network):
    """One layer's compute hides a gather: each moves one place, not
    ``collective_prefetch``, and is hidden (all but the first, which has nothing to
    start behind); each reduction is waited one reduction later, hidden (all but the
    last, waited at the outputs)."""
    graphs = _overlapped(graphs_of, FAST, network)
    gathers = _rows(graphs, "forward", "all_gather")
    assert [row["distance"] for row in gathers] == [0] + [1] * (LAYERS - 1)
    assert all(row["exposed"] == 0 and row["hidden"] == row["seconds"] for row in gathers[1:])
    reductions = _rows(graphs, "backward", "reduction")
    assert [row["distance"] for row in reductions] == [1] * LAYERS
    assert all(row["exposed"] == 0 for row in reductions[:-1])
    record = graphs["passes"]["overlap_collectives"]
    assert record.details["exposed"]["after"]["forward"] < record.details["exposed"]["before"]["forward"]
    assert _starts_in_wait_order(graphs["forward_code"])


def test_moving_less_far_holds_less(fake_world, graphs_of, network):
    """The fast network's shorter moves hold fewer gathered layers at once: the step's
    estimated peak is below the slow network's (every gather ``collective_prefetch``
    ahead), never above."""
    slow = _overlapped(graphs_of, SLOW, network)["estimate"]
    fast = _overlapped(graphs_of, FAST, network)["estimate"]
    assert fast < slow


def test_clock_queues_collectives_on_one_link():
    """Every op takes 1 s (the launch overhead; data and FLOPs cost ~nothing), a
    collective too. Two gathers issued back to back run one after the other on the
    link (0-1 s, 1-2 s). The first is waited at once: exposed 1 s. The matmul after it
    (1-2 s) hides the second, so it is exposed ~0. Against compute alone (no stall at
    the first wait), the matmul runs 0-1 s and the second gather, queued to 2 s, is
    exposed 1 s."""
    from torch.fx.experimental.proxy_tensor import make_fx

    c10d = torch.ops._c10d_functional

    def two_gathers(w0: torch.Tensor, w1: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g0, g1 = c10d.all_gather_into_tensor(w0, 2, "0"), c10d.all_gather_into_tensor(w1, 2, "0")
        x = torch.mm(x, c10d.wait_tensor(g0))
        return x + c10d.wait_tensor(g1).sum()

    gm = make_fx(two_gathers, tracing_mode="fake")(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4))
    clock = CollectiveClock(DeviceModel("test", 1e18, 1e18, 1.0, 1e18, 1e18))
    first, second = clock.times(gm.graph).values()
    assert first.seconds == pytest.approx(1.0) and first.exposed == pytest.approx(1.0) and first.hidden == 0
    assert second.exposed == 0 and second.hidden == pytest.approx(1.0)
    first, second = clock.times(gm.graph, stalls=False).values()
    assert first.exposed == pytest.approx(1.0) and second.exposed == pytest.approx(1.0)


def test_gathers_keep_their_starting_order():
    """Every op takes 1 s (launch overhead), a gather 1 s more per row of its shard (16
    B/s). Gather 1 (3 s) is queued behind gather 0 (2 s) and moves one place, as far as
    it can; gather 2 (3 s) is queued behind both and hidden nowhere, so it moves two
    places, which would start it right after gather 0's wait, before gather 1. It
    starts right after gather 1 instead: the all-gathers start in the order they are
    waited, so a gather never delays one needed before it on the link."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memopt.passes.collectives_overlap import prefetch_gathers

    c10d = torch.ops._c10d_functional

    def three_layers(w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for w in (w0, w1, w2):
            x = x + c10d.wait_tensor(c10d.all_gather_into_tensor(w, 2, "0")).sum()
        return x

    gm = make_fx(three_layers, tracing_mode="fake")(torch.randn(1, 4), torch.randn(2, 4), torch.randn(2, 4), torch.randn(4))
    clock = CollectiveClock(DeviceModel("test", 1e18, 1e18, 1.0, 1e18, 16.0))
    assert list(prefetch_gathers(gm.graph, 2, clock=clock).values()) == [0, 1, 2]
    gm.recompile()
    assert _starts_in_wait_order(gm.code)


def test_report_shows_the_exposed_time(fake_world, network):
    """`md.report`'s collectives table gives each kind's modelled exposed time in the
    final graphs: on the fast network only the first gather's (nothing starts before
    it), one layer's share of the forward's gathers; with ``collective_prefetch=0``
    (waited where traced) all of it."""
    import memopt
    from memopt.distributed.report import collectives

    network(FAST)

    def forward_gathers(prefetch: int) -> object:
        torch._dynamo.reset()
        options = {"codegen": "eager", "strict": True, "collective_bucket_bytes": LAYER_BYTES, "collective_prefetch": prefetch}
        rows = collectives(memopt.explain(_layers(), torch.randn(2, 64), options=options))
        return next(r for r in rows if (r.graph, r.kind) == ("forward", "all_gather"))

    overlapped, traced = forward_gathers(PREFETCH), forward_gathers(0)
    assert overlapped.count == traced.count == LAYERS
    assert overlapped.exposed == pytest.approx(overlapped.seconds / LAYERS)
    assert traced.exposed == pytest.approx(traced.seconds)
