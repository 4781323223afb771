"""The per-rank report of a sharded model (`memopt.distributed.report`), on a fake
world of 8 ranks: model state in ZeRO terms, gathered parameters, collectives."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import memopt
import memopt.distributed as md
from memopt.distributed.report import collectives, gathered_parameters, report


def _explain(model: nn.Module, **options: object) -> memopt.Explanation:
    """One collective per parameter unless ``options`` bucket them (the rows below are
    per parameter)."""
    torch._dynamo.reset()
    options = {"codegen": "eager", "strict": True, "collective_bucket_bytes": 0, **options}
    return memopt.explain(model, torch.randn(2, 64), options=options)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return md.shard(nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(4)]), stage=3)


def test_collectives_and_gathered_parameters_follow_the_plan(fake_world):
    """Without a budget every gathered weight is kept (gathered once per step, four
    all-gathers in forward, four reduce-scatters in backward); under a budget some are
    gathered again in backward, and the report says which."""
    free = _explain(_model())
    kinds = {(c.graph, c.kind): c for c in collectives(free)}
    assert kinds[("forward", "all_gather")].count == 4
    assert kinds[("backward", "reduce_scatter")].count == 4
    assert ("backward", "all_gather") not in kinds
    # ring all-gather of a 64x64 fp32 weight over 8 ranks: each rank receives 7/8 of it
    assert kinds[("forward", "all_gather")].bytes_moved == 4 * 64 * 64 * 4 * 7 // 8
    gathered = gathered_parameters(free)
    assert gathered and not any(g.gathered_again for g in gathered)

    tight = _explain(_model(), memory_budget=0.75, plan_across_graph_breaks=False)
    again = [g for g in gathered_parameters(tight) if g.gathered_again]
    assert again
    backward_gathers = {(c.graph, c.kind): c.count for c in collectives(tight)}.get(("backward", "all_gather"), 0)
    assert backward_gathers == len(again)  # one all-gather in backward per parameter gathered again


def test_model_state_table_per_rank(fake_world):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    text = report(model, _explain(model), optimizer)
    assert "ZeRO stage 3, rank 0 of 8" in text
    # stage 3 over 8 ranks: this rank holds 1/8 of the 4 x 64 x 64 fp32 weights
    per_rank = 4 * 64 * 64 * 4 // 8
    params = next(line for line in text.splitlines() if line.startswith("parameters"))
    assert params.split()[-2:] == ["8.00", "KiB"] and per_rank == 8 * 1024
    assert "collectives per step" in text and "planned peak on this rank" in text


def test_the_formula_follows_the_optimizer(fake_world):
    """ZeRO's formula is written for the optimizer in use: plain SGD keeps no state."""
    model = _model()
    text = report(model, None, torch.optim.SGD(model.parameters(), lr=0.1))
    state = next(line for line in text.splitlines() if line.startswith("optimizer state"))
    assert state.split()[-2:] == ["0", "B"]


def test_an_optimizer_passed_as_the_explanation_is_named(fake_world):
    """``md.report(model, optimizer)`` (the order `md.model_state_bytes` takes) read the
    optimizer as the explanation: "AttributeError: 'ShardedOptimizer' object has no
    attribute 'regions'". The error now names the argument, its type and the call."""
    model = _model()
    optimizer = md.ShardedOptimizer(lambda params: torch.optim.SGD(params, lr=0.1), model)
    with pytest.raises(TypeError, match=r"explanation is a ShardedOptimizer \(an optimizer: pass it as optimizer="):
        md.report(model, optimizer)
    with pytest.raises(TypeError, match="optimizer is a str"):
        md.report(model, None, "adamw")
    assert "optimizer state" in md.report(model, optimizer=optimizer)


def test_gathered_rows_name_their_parameters(fake_world):
    """One gather per parameter: each row names its parameter by module path; a bucket
    (default `collective_bucket_bytes`) is one row naming every parameter it gathers."""
    torch.manual_seed(0)
    model = md.shard(nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)]), stage=3)
    names = [name for name, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias"]
    apart = gathered_parameters(_explain(model))
    assert sorted(p for g in apart for p in g.parameters) == sorted(names)
    assert all(len(g.parameters) == 1 for g in apart)
    (bucket,) = gathered_parameters(_explain(model, collective_bucket_bytes=4 * 2**20))
    assert list(bucket.parameters) == names
    text = report(model, _explain(model, collective_bucket_bytes=4 * 2**20))
    assert "0.weight, 0.bias (+6 more)" in text


def test_a_bucket_gathered_again_in_part_says_so(fake_world):
    """Under a budget with the default bucketing, the forward gathers all 16 parameters
    in one bucket and backward gathers some of them again in other buckets: the report
    names the same parameters as gathered again as the same plan without buckets (one
    gather per parameter) does. It read the plan's decisions by node name, which the
    buckets renamed, and said "kept" and "gathered again in backward: 0" while backward
    all-gathered."""

    def explain(bucket_bytes: int) -> memopt.Explanation:
        torch.manual_seed(0)
        model = md.shard(nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(8)]), stage=3)
        torch._dynamo.reset()
        return memopt.explain(model, torch.randn(512, 64), options={
            "codegen": "eager", "memory_budget": 0.75, "collective_bucket_bytes": bucket_bytes,
            "plan_across_graph_breaks": False,
        })  # fmt: skip

    apart = {p for g in gathered_parameters(explain(0)) if g.gathered_again for p in g.parameters}
    bucketed = explain(4 << 20)
    (bucket,) = gathered_parameters(bucketed)
    assert len(bucket.parameters) == 16 and bucket.gathered_again
    assert apart and set(bucket.again) == apart
    assert {(c.graph, c.kind) for c in collectives(bucketed)} >= {("backward", "all_gather")}
    text = report(bucketed.sharded_model, bucketed)
    assert f"gathered again in backward: 1, {len(apart)} of 16 parameters" in text
    assert f"{len(apart)} of 16 gathered again" in text or len(apart) == 16
