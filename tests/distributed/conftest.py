"""Fixtures of the sharding tests: a fake 8-rank world in this process (no other
process: collectives return uninitialised values of the right shape, enough to trace and
compile the sharded graphs), and the compiled graphs of a sharded model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

FAKE_WORLD = 8


@pytest.fixture
def fake_world() -> Iterator[int]:
    """This process as rank 0 of a fake world of 8 (torch's ``fake`` backend)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=FAKE_WORLD)
    try:
        yield FAKE_WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture
def graphs_of():
    """``graphs_of(model, *args, **options)`` -> collective counts of the forward and the
    backward graph memopt compiles for ``model(*args).sum()``, and their code."""
    return compiled_graphs


def collective_counts(code: str) -> dict[str, int]:
    """Calls of each functional collective in a graph's code (call syntax, as the design
    guide asks); all-reduces functional or in place (a bucket's, ``all_reduce_``)."""
    ops = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce")
    counts = {op: code.count(f"_c10d_functional.{op}.default(") for op in ops}
    counts["all_reduce"] += code.count("_c10d_functional.all_reduce_.default(")
    return counts


def compiled_graphs(model: torch.nn.Module, *args: torch.Tensor, **options: object) -> dict[str, object]:
    """The forward and backward graphs memopt compiles for one training step of
    ``model(*args).sum()`` (eager codegen, strict): their code and collective counts,
    the region's pass records by name, its plan's budget and the step's estimated peak."""
    import memopt

    with memopt.record() as explanation:
        compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "strict": True, **options})
        compiled(*args).float().sum().backward()
    assert len(explanation.regions) == 1, "a sharded step must compile to one region (no graph break)"
    region = explanation.region(0)
    forward, backward = region.graph_code("forward"), region.graph_code("backward")
    return {
        "forward": collective_counts(forward),
        "backward": collective_counts(backward),
        "forward_code": forward,
        "backward_code": backward,
        "passes": {p.name: p for p in region.passes},
        "budget": None if region.plan is None else region.plan.budget_bytes,
        "estimate": explanation.estimated_peak_bytes,
    }
