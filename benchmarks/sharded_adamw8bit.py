"""8-bit AdamW under `memopt.distributed` sharding against one process (2 gloo ranks, CPU).

    PYTHONPATH=. .venv/bin/python benchmarks/sharded_adamw8bit.py                   # default table
    PYTHONPATH=. .venv/bin/python benchmarks/sharded_adamw8bit.py --block 64 --min-8bit-size 256
    PYTHONPATH=. .venv/bin/python benchmarks/sharded_adamw8bit.py --backend memopt --stages 3

Hugging Face Llama at its small test config (`memopt.testing.hf`: 2 layers, hidden 64,
MLP 172, vocabulary 512), global batch 4 x 32 tokens split over the ranks, lr 1e-3.
Each rank trains the sharded model (`md.shard` at each stage, `md.ShardedOptimizer`)
and, on the whole global batch, one process's model with the same optimizer, eagerly;
after each step it compares every parameter. Two kinds of gradients:

* ``own``: each side steps on its own gradients (the ranks' reduced ones differ from one
  process's in the last bits: data parallelism sums the batch in another order);
* ``same``: the ranks' gradients are replaced by one process's (each rank its rows), so
  the optimizers step on the same numbers and any difference is the optimizer's.

Columns: "param tol" is the worst ``|a - b| / (1e-6 + 1e-5 |b|)`` over every parameter
element after each step (at most 1: equal within rtol 1e-5); "max rel" the largest
``max |a - b| / max |b|`` over the parameters after the last step; the losses are the
ranks' mean and one process's at the last step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

OPTIMIZERS = ("adamw", "adamw8bit")


def _optimizer(name: str, args: argparse.Namespace) -> Callable[[Any], torch.optim.Optimizer]:
    from memopt.optim import AdamW8bit

    if name == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=1e-3)
    return lambda params: AdamW8bit(params, lr=1e-3, block_size=args.block, min_8bit_size=args.min_8bit_size)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _set_rows(param: torch.Tensor, grad: torch.Tensor, rank: int, world: int) -> None:
    """One process's gradient ``grad`` into the sharded parameter's (its rows of it)."""
    from torch.distributed.tensor import DTensor

    local = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
    if local.shape != grad.shape:
        chunk = -(-grad.shape[0] // world)
        grad = grad.narrow(0, min(rank * chunk, grad.shape[0]), local.shape[0])
    local.copy_(grad)


def _run(name: str, stage: int, same: bool, args: argparse.Namespace) -> dict[str, Any]:
    import memopt.distributed as md
    from memopt.testing.hf import build, make_inputs

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    torch._dynamo.reset()
    reference, _ = build("llama", batch=1, seq=args.seq, seed=0)
    model = md.shard(copy.deepcopy(reference), stage=stage)
    make = _optimizer(name, args)
    opt, ref_opt = md.ShardedOptimizer(make, model), make(reference.parameters())
    step_fn = model if args.backend == "none" else torch.compile(model, backend="memopt", options={"codegen": "eager"})
    tol: list[float] = []
    per = args.batch // world
    for step in range(args.steps):
        torch.manual_seed(100 + step)
        data = make_inputs("llama", reference.config, args.batch, args.seq)
        ref_loss = reference(**data).loss
        ref_loss.backward()
        loss = step_fn(**{k: v[rank * per : (rank + 1) * per] for k, v in data.items()}).loss
        loss.backward()
        if same:
            for p, q in zip(model.parameters(), reference.parameters()):
                _set_rows(p, q.grad, rank, world)
        ref_opt.step(), opt.step()
        ref_opt.zero_grad(), opt.zero_grad()
        pairs = [(_full(p.detach()), q.detach()) for p, q in zip(model.parameters(), reference.parameters())]
        tol.append(max(((a - b).abs() / (1e-6 + 1e-5 * b.abs())).max().item() for a, b in pairs))
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs)
    return {"tol": tol, "rel": rel, "loss": mean.item() / world, "ref_loss": ref_loss.item()}


def rank_main(args: argparse.Namespace) -> None:
    from memopt.distributed.testing import init_from_env

    init_from_env("cpu")
    try:
        rows = [
            {"optimizer": name, "grads": "same" if same else "own", "stage": stage, **_run(name, stage, same, args)}
            for name in args.optimizers.split(",")
            for same in (False, True)
            for stage in (int(s) for s in args.stages.split(","))
        ]
        print(json.dumps(rows), flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as tests/distributed/worker.py: no interpreter teardown under gloo's threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--block", type=int, default=256, help="AdamW8bit block_size")
    parser.add_argument("--min-8bit-size", type=int, default=4096, help="AdamW8bit min_8bit_size")
    parser.add_argument("--backend", default="none", help="none (eager) or memopt (eager codegen)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    if "RANK" in os.environ:
        rank_main(args)
        return
    from memopt.distributed.testing import run_ranks

    outputs = run_ranks(__file__, sys.argv[1:], world_size=2, timeout=3600)
    rows = json.loads(outputs[0].strip().splitlines()[-1])
    print(f"block_size {args.block}, min_8bit_size {args.min_8bit_size}, {args.steps} steps, backend {args.backend}\n")
    print("| optimizer | gradients | stage | param tol after each step | max rel | loss (ranks / one process) |")
    print("|---|---|---:|---|---:|---|")
    for r in rows:
        tols = " ".join(f"{t:.3g}" for t in r["tol"])
        print(f"| {r['optimizer']} | {r['grads']} | {r['stage']} | {tols} | {r['rel']:.2e} | {r['loss']:.6f} / {r['ref_loss']:.6f} |")


if __name__ == "__main__":
    main()
