"""A sharded region under a budget on two gloo ranks: every rank runs rank 0's plan
(`memopt.backends.ranks`), parameters gathered again in backward give the same
gradients as one process on the whole batch."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD = 2


def _model_inputs():
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    weights = [torch.randn(256, 256) / 256**0.5 for _ in range(3)]
    return x, weights


def _loss(x, w1, w2, w3, gather=lambda w: w):
    """Three layers; ``gather`` makes a weight whole where it is used (ZeRO-3)."""
    h = torch.tanh(x @ gather(w1))
    h = torch.tanh(h @ gather(w2))
    return (h @ gather(w3)).square().mean()


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    import torch.distributed._functional_collectives as funcol

    import memopt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        x, weights = _model_inputs()
        rows = 256 // WORLD
        shards = [w[rank * rows : (rank + 1) * rows].clone().requires_grad_(True) for w in weights]

        def sharded(xs, *ws):
            return _loss(xs, *ws, gather=lambda w: funcol.all_gather_tensor(w, 0, dist.group.WORLD))

        compiled = torch.compile(sharded, backend="memopt", options={"codegen": "eager", "memory_budget": 0.8, "strict": True})
        with memopt.record() as explanation:
            loss = compiled(x, *shards)  # every rank: the whole batch, its shards
            loss.backward()
        plan = explanation.regions[0].plan
        backward = explanation.regions[0].step.backward
        result = {
            "loss": loss.item(),
            "grads": [(s.grad / 1.0).tolist() for s in shards],  # reduce-scattered sums over ranks
            "plan": sorted(d.to_dict()["reason"] + d.name for d in plan.decisions),
            "saved_values": list(plan.saved_values or []),
            "regathers": sum(str(n.target) == "_c10d_functional.all_gather_into_tensor.default" for n in backward.graph.nodes),
        }
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_ranks_run_one_plan_and_match_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=WORLD, join=True)
        results = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(WORLD)]
    assert results[0]["plan"] == results[1]["plan"] and results[0]["saved_values"] == results[1]["saved_values"]
    assert results[0]["regathers"] > 0  # the budget made the plan gather parameters again
    x, weights = _model_inputs()
    full = [w.clone().requires_grad_(True) for w in weights]
    loss = _loss(x, *full)
    loss.backward()
    rows = 256 // WORLD
    for rank, result in enumerate(results):
        assert result["loss"] == pytest.approx(loss.item(), rel=1e-6)
        for got, w in zip(result["grads"], full):
            # every rank computed the full-batch gradient; reduce-scatter summed WORLD copies
            want = WORLD * w.grad[rank * rows : (rank + 1) * rows]
            torch.testing.assert_close(torch.tensor(got), want, rtol=1e-5, atol=1e-6)
