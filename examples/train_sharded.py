"""Train a GPT with its parameters, gradients and optimizer state sharded over the ranks
(ZeRO-1/2/3), compiled by memopt, then print what each rank holds.

    torchrun --nproc_per_node 2 examples/train_sharded.py                  # stage 3, eager codegen
    torchrun --nproc_per_node 2 examples/train_sharded.py --stage 2 --accumulate 4
    torchrun --nproc_per_node 2 examples/train_sharded.py --hf gpt2        # Hugging Face GPT-2 (small config)
    torchrun --nproc_per_node 2 examples/train_sharded.py --save ckpt      # then --load ckpt to resume
                                                                           # (--save ckpt --overwrite: save there again)
    torchrun --nproc_per_node 2 examples/train_sharded.py --meta           # built on meta, each rank allocates its shards

gloo on CPU, NCCL on CUDA (one GPU per rank; with fewer GPUs than local ranks, gloo on
CPU). The task is synthetic (no downloads): the
model learns to continue a repeating token pattern. Each rank trains on its part of the
global batch (``--batch`` must be a multiple of the number of ranks: equal parts);
gradients are averaged, so the losses are those of one process on the global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

import memopt.distributed as md
from memopt.distributed import checkpoint
from memopt.distributed.memory import model_state_bytes, zero_model_state_bytes
from memopt.distributed.testing import gpu_per_rank


def init() -> torch.device:
    """The process group from torchrun's environment: NCCL on CUDA when each local rank
    has a GPU of its own (NCCL needs one per rank), else gloo on CPU."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        sys.exit(
            f"{sys.argv[0]}: {', '.join(missing)} not set: run it under torchrun, which starts one process per "
            f"rank and sets them: torchrun --nproc_per_node 2 {sys.argv[0]} (--nproc_per_node 1 for one process)"
        )
    if gpu_per_rank():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def pattern_batch(batch: int, seq: int, vocab: int, step: int) -> torch.Tensor:
    """The global batch of ``step`` (the same on every rank): sequences ``start,
    start+stride, ...`` (mod vocab)."""
    gen = torch.Generator().manual_seed(step)
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    stride = torch.randint(1, 5, (batch, 1), generator=gen)
    return (start + stride * torch.arange(seq + 1)) % vocab


def build(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, int, Any]:
    """The model, its vocabulary size, and ``loss(model, tokens)``."""
    if args.hf:
        from memopt.testing.hf import build as build_hf

        model, _ = build_hf(args.hf, batch=1, seq=args.seq)
        vocab = model.config.vocab_size
        return model.to(device), vocab, lambda m, t: m(input_ids=t[:, :-1], labels=t[:, :-1]).loss
    from memopt.testing.zoo import GPT, GPTConfig

    config = GPTConfig(vocab=64, context=args.seq, dim=args.dim, heads=4, layers=args.layers)
    return GPT(config).to(device), config.vocab, lambda m, t: m(t[:, :-1], t[:, 1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, default=3, choices=[0, 1, 2, 3])
    parser.add_argument("--codegen", choices=["eager", "inductor", "none"], default="eager",
                        help="memopt's codegen; none: no torch.compile")
    parser.add_argument("--hf", choices=["gpt2", "llama"], help="a Hugging Face model (small config)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8,
                        help="global batch, split evenly over the ranks (a multiple of their number)")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-steps per optimizer step")
    parser.add_argument("--bf16", action="store_true", help="MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)")
    parser.add_argument("--save", help="save a sharded checkpoint here after training (a new directory, or "
                                         "--overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="--save replaces a checkpoint already there")
    parser.add_argument("--load", help="load this checkpoint before training")
    parser.add_argument("--meta", action="store_true",
                        help="build the model on the meta device, shard it there, then md.materialize: no rank "
                             "ever holds the whole model (memopt's GPT only)")
    args = parser.parse_args(argv)
    if args.meta and args.hf:
        parser.error("--meta builds memopt's GPT; a Hugging Face model's buffers would need its own init")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; init() says if it is missing
    if args.batch % world_size or args.batch < world_size:
        # each rank's loss is the mean over its rows and the gradients are averaged over the
        # ranks: equal parts make that the mean over the global batch (unequal parts would
        # weight samples unequally, and under a memory_budget compile other shapes per rank)
        message = (f"--batch {args.batch} does not split evenly over {world_size} ranks: give a multiple of "
                   f"{world_size} (each rank trains on batch / ranks samples)")
        if os.environ.get("RANK", "0") == "0":
            parser.error(message)
        sys.exit(2)
    if args.save and not args.overwrite and os.path.exists(os.path.join(args.save, ".metadata")):
        parser.error(f"--save {args.save} already holds a checkpoint: pass --overwrite to replace it")  # before training

    device = init()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    with torch.device("meta") if args.meta else contextlib.nullcontext():
        model, vocab, loss_of = build(args, torch.device("meta") if args.meta else device)
    numel = sum(p.numel() for p in model.parameters())
    policy = md.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
    model = md.shard(model, stage=args.stage, mp_policy=policy)
    if args.meta:  # each module: its own defaults (LayerNorm's ones), then GPT-2's N(0, 0.02)
        from memopt.testing.zoo import GPT

        md.materialize(model, device, init=lambda m: (md.reset_parameters(m), GPT._init_weights(m)))
    optimizer = md.ShardedOptimizer(lambda params: torch.optim.AdamW(params, lr=3e-3), model)
    if args.load:
        checkpoint.load(args.load, model, optimizer)
    step_fn = model if args.codegen == "none" else torch.compile(model, backend="memopt", options={"codegen": args.codegen})
    if rank == 0:
        print(f"{numel:,} parameters, stage {args.stage} over {world} ranks ({device.type}), "
              f"codegen {args.codegen}, {args.accumulate} micro-step(s) per step")

    per_rank = args.batch // world
    start = time.perf_counter()
    for step in range(args.steps):
        tokens = pattern_batch(args.batch * args.accumulate, args.seq, vocab, step).to(device)
        total = torch.zeros((), device=device)
        for micro in range(args.accumulate):
            model.set_requires_gradient_sync(micro == args.accumulate - 1)
            rows = tokens[(micro * world + rank) * per_rank : (micro * world + rank + 1) * per_rank]
            loss = loss_of(step_fn, rows) / args.accumulate
            loss.backward()
            total += loss.detach().float()
        optimizer.step()
        held = model_state_bytes(model, optimizer) if step == args.steps - 1 else None
        optimizer.zero_grad()
        dist.all_reduce(total)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"  step {step:3d}  loss {total.item() / world:.4f}  ({time.perf_counter() - start:.1f}s)")
    if args.save:
        checkpoint.save(args.save, model, optimizer, overwrite=args.overwrite)
    report(held, numel, world, args.stage)
    dist.barrier()  # no rank tears its process group down while another still talks to it
    dist.destroy_process_group()


def report(held: Any, numel: int, world: int, stage: int) -> None:
    """Each rank's model-state bytes (after the last step, before zero_grad) next to ZeRO's."""
    formula = zero_model_state_bytes(numel, world, stage)
    rows = [None] * world
    dist.all_gather_object(rows, held.__dict__)
    if dist.get_rank() != 0:
        return
    print(f"model state per rank (bytes)   params      grads  optimizer      total   ZeRO-{stage} formula")
    for rank, row in enumerate(rows):
        total = sum(row.values())
        print(f"  rank {rank}                {row['params']:10,} {row['grads']:10,} {row['optimizer']:10,} "
              f"{total:10,}   {formula.total:10,}")


def exit_without_teardown() -> None:
    """End this rank's process without the interpreter's teardown (``os._exit``), after
    ``main`` has left the process group and its output is flushed.

    ``destroy_process_group`` does not free a gloo process group while anything still
    refers to it, and torch's DTensor caches keep the device mesh (and with it the group)
    alive, so gloo's worker and I/O threads outlive it and run during interpreter
    teardown. A rank then aborted at exit, rarely and only on a loaded machine
    ('terminate called without an active exception', exit -6; twice in the test suite,
    never in 50 runs alone). Ending with ``os._exit``, as ``torch.multiprocessing``'s
    children do, skips that teardown; everything the script writes is written by then.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_without_teardown()
