"""Gathered parameters are plannable values (issue 16, item 2): an all-gather of a
parameter shard may be gathered again in backward instead of being kept, like a
recomputation that costs network time. Traced on a fake process group (no
processes): the graphs, the plan and the cost model, not the numbers."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.testing._internal.distributed.fake_pg import FakeStore

import memopt
from memopt.analysis.cost import device_model, node_cost
from memopt.graph import meta

WORLD = 4


@pytest.fixture(scope="module")
def fake_world():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    yield
    dist.destroy_process_group()


def _sharded_mlp(x, w1s, w2s, w3s):
    """Three layers whose weights are row shards gathered for use (ZeRO-3)."""
    group = dist.group.WORLD
    h = torch.tanh(x @ funcol.all_gather_tensor(w1s, 0, group))
    h = torch.tanh(h @ funcol.all_gather_tensor(w2s, 0, group))
    return (h @ funcol.all_gather_tensor(w3s, 0, group)).sum()


def _explain(options: dict):
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    shards = [torch.randn(256 // WORLD, 256, requires_grad=True) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tight budget may be infeasible: the plan says so
        return memopt.explain(_sharded_mlp, x, *shards, options={"codegen": "eager", **options}).regions[0]


def _gathers(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if str(n.target) == "_c10d_functional.all_gather_into_tensor.default"]


PER_PARAMETER = {"collective_bucket_bytes": 0}
"""One all-gather per parameter (the passes of memopt/passes/collectives_bucket.py off)."""


def test_without_a_budget_gathered_parameters_are_kept(fake_world):
    region = _explain(PER_PARAMETER)
    assert len(_gathers(region.step.forward)) == 3 and not _gathers(region.step.backward)


def test_a_tight_budget_gathers_parameters_again_in_backward(fake_world):
    unbudgeted = _explain({})
    region = _explain({"memory_budget": 0.8})
    assert _gathers(region.step.backward), "the plan should re-gather some parameter"
    assert region.plan.estimated_peak_after < unbudgeted.plan.estimated_peak_after
    regathered = [d for d in region.plan.decisions if "gathered again" in d.reason]
    assert regathered and all(d.policy == "recompute" for d in regathered)


def test_only_gathers_of_step_inputs_are_regatherable(fake_world):
    region = _explain({})
    nodes = {n.name: n for n in region.step.forward.graph.nodes}
    assert all(meta.is_regatherable(nodes[name]) for name in _gathers(region.step.forward))  # a bucket too
    waits = [n for n in nodes.values() if str(n.target) == "_c10d_functional.wait_tensor.default"]
    assert waits and all(meta.is_regatherable(w) for w in waits)
    grads = [n for n in region.step.backward.graph.nodes if str(n.target) == "_c10d_functional.reduce_scatter_tensor.default"]
    assert grads and not any(meta.is_regatherable(n) for n in grads)


def test_collective_cost_is_ring_traffic_over_the_network(fake_world):
    """An all-gather producing S bytes over N ranks moves S (N-1)/N bytes per rank."""
    region = _explain(PER_PARAMETER)
    gather = next(n for n in region.step.forward.graph.nodes if n.name in _gathers(region.step.forward))
    device = device_model(torch.device("cpu"))
    size = 256 * 256 * 4
    cost = node_cost(gather, device)
    assert cost.flops == 0
    assert cost.seconds == pytest.approx(size * (WORLD - 1) / WORLD / device.network_bytes_per_s + device.op_overhead_s)
