"""One rank of the 2-process tests in this folder (run by `memopt.distributed.testing.run_ranks`).

    python worker.py SCENARIO [options]

Each scenario checks what it can on its rank (an assertion fails the rank, and with it the
test) and prints one JSON line of results for the test to check across ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import memopt.distributed as md  # noqa: E402
from memopt.distributed.testing import init_from_env  # noqa: E402

VOCAB, DIM, HIDDEN, BATCH, SEQ = 24, 16, 13, 4, 5


class Tiny(nn.Module):
    """Every layout the sharding handles: an embedding tied to the output head, a
    13-row weight (uneven over 2 ranks), a 1-row parameter (rank 1's piece is empty), a
    0-dimensional parameter (replicated) and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.gate = nn.Parameter(torch.randn(1, DIM))
        self.temperature = nn.Parameter(torch.tensor(1.5))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(self.norm(h)))) * torch.sigmoid(self.gate)
        logits = self.head(h) / self.temperature
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (the same on every rank)."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return ids, torch.roll(ids, -1, dims=1)


def local(tensors: tuple[torch.Tensor, ...], rank: int, world: int) -> tuple[torch.Tensor, ...]:
    per = tensors[0].shape[0] // world
    return tuple(t[rank * per : (rank + 1) * per] for t in tensors)


def full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def global_loss(loss: torch.Tensor) -> float:
    value = loss.detach().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def adamw8bit(params: Any) -> torch.optim.Optimizer:
    """8-bit moments for the 24x16 embedding (384 elements; 192 per rank: 3 blocks of 64)."""
    from memopt.optim import AdamW8bit

    return AdamW8bit(params, lr=1e-2, weight_decay=0.1, block_size=64, min_8bit_size=256)


def offloaded(make: Callable[[Any], torch.optim.Optimizer]) -> Callable[[Any], torch.optim.Optimizer]:
    """``make``'s optimizer with its state on disk between steps (`OffloadedState`, a
    private directory per rank)."""
    from memopt.optim import OffloadedState

    return lambda params: OffloadedState(make(params), "disk")


def adamw8bit_straddling(params: Any) -> torch.optim.Optimizer:
    """8-bit moments for every parameter of 16 elements or more, in blocks of 128 that
    the cut between the ranks' rows crosses in 6 parameters: the embedding's block 1
    (rows 0-11 | 12-23), the first block of the 13x16 and 16x13 weights (cut at element
    112, 104) and the only block of the LayerNorm's two and `down`'s bias, 16 elements
    each (cut at 8); `gate` (1 row) is rank 0's alone, rank 1's piece is empty."""
    from memopt.optim import AdamW8bit

    return AdamW8bit(params, lr=1e-2, weight_decay=0.1, block_size=128, min_8bit_size=16)


OPTIMIZERS = {
    "adamw": adamw, "adamw8bit": adamw8bit, "adamw8bit-straddling": adamw8bit_straddling,
    "adamw-offloaded": offloaded(adamw), "adamw8bit-offloaded": offloaded(adamw8bit),
    "adamw8bit-straddling-offloaded": offloaded(adamw8bit_straddling),
}


class TinyBroken(Tiny):
    """`Tiny` with a graph break before its loss (as Hugging Face GPT-2's): two regions
    per step, which memopt plans as a whole under a budget once it has seen a step."""

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(self.norm(h)))) * torch.sigmoid(self.gate)
        torch._dynamo.graph_break()
        logits = self.head(h) / self.temperature
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def compiled(model: nn.Module, backend: str, budget: float | None = None) -> Callable[..., Any]:
    if backend == "none":
        return model
    if backend.startswith("memopt"):  # memopt (eager codegen) or memopt-inductor
        codegen = "inductor" if backend == "memopt-inductor" else "eager"
        budgeted = {} if budget is None else {"memory_budget": budget}
        return torch.compile(model, backend="memopt", options={"codegen": codegen, "strict": True, **budgeted})
    return torch.compile(model, backend=backend)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def numerics(args: argparse.Namespace) -> dict[str, Any]:
    """Loss, every gradient and every parameter, step by step, against one process on the
    global batch, for each stage. ``--same-grads``: each rank's gradients are replaced by
    one process's (its rows of them) before the step, so the optimizers step on the same
    numbers, and the parameters must be equal bit for bit."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[str, Any] = {}
    for stage in [int(s) for s in args.stages.split(",")]:
        torch.manual_seed(0)
        reference = Tiny()
        model = md.shard(copy.deepcopy(reference), stage=stage)
        make = OPTIMIZERS[args.optimizer]
        ref_opt, opt = make(reference.parameters()), md.ShardedOptimizer(make, model)
        step_fn = compiled(model, args.backend)
        losses = []
        for step in range(args.steps):
            data = batch(step)
            ref_loss = reference(*data)
            ref_loss.backward()
            loss = step_fn(*local(data, rank, world))
            loss.backward()
            losses.append(global_loss(loss))
            close(torch.tensor(losses[-1]), ref_loss.detach(), f"stage {stage} step {step} loss")
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                close(full(p.grad), q.grad, f"stage {stage} step {step} grad {name}")
                if args.same_grads:
                    _set_grad(p, q.grad, rank, world)
            ref_opt.step(), opt.step()
            ref_opt.zero_grad(), opt.zero_grad()
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                if args.same_grads:
                    assert torch.equal(full(p.detach()), q.detach()), f"stage {stage} step {step} param {name} differs"
                close(full(p.detach()), q.detach(), f"stage {stage} step {step} param {name}")
        out[str(stage)] = losses
    return out


def _set_grad(param: torch.Tensor, grad: torch.Tensor, rank: int, world: int) -> None:
    """Write one process's gradient ``grad`` into the sharded parameter's (its rows where
    the gradient is a ``Shard(0)`` DTensor)."""
    from torch.distributed.tensor import DTensor

    local = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
    if local.shape != grad.shape:
        chunk = -(-grad.shape[0] // world)
        grad = grad.narrow(0, min(rank * chunk, grad.shape[0]), local.shape[0])
    local.copy_(grad)


def _reductions(counts: dict[Any, int]) -> int:
    return sum(n for op, n in counts.items() if "reduce" in str(op))


def accumulate(args: argparse.Namespace) -> dict[str, Any]:
    """``set_requires_gradient_sync(False)`` for all micro-steps but the last: the same
    gradients as one process accumulating every micro-batch. Eager, the reducing
    collectives of each micro-step's backward are counted (CommDebugMode); compiled
    (CommDebugMode would stop Dynamo), those in each compiled backward graph.
    ``--budget``: under that ``memory_budget``, also whether each region's plan counts
    gradients held (``held``) and was planned for the whole step (``whole``);
    ``--graph-break``: `TinyBroken`, two regions a step."""
    import memopt
    from torch.distributed.tensor.debug import CommDebugMode

    rank, world = dist.get_rank(), dist.get_world_size()
    micro, out = 3, {}
    for stage in [int(s) for s in args.stages.split(",")]:
        torch.manual_seed(0)
        torch._dynamo.reset()
        reference = TinyBroken() if args.graph_break else Tiny()
        model = md.shard(copy.deepcopy(reference), stage=stage)
        ref_opt, opt = adamw(reference.parameters()), md.ShardedOptimizer(adamw, model)
        step_fn = compiled(model, args.backend, args.budget)
        counts = []
        with memopt.record() as explanation:
            for step in range(2):
                for m in range(micro):
                    data = batch(10 * step + m)
                    reference(*data).backward()
                    model.set_requires_gradient_sync(m == micro - 1)
                    with CommDebugMode() if args.backend == "none" else contextlib.nullcontext() as comm:
                        step_fn(*local(data, rank, world)).backward()
                    if comm is not None:
                        counts.append(_reductions(comm.get_comm_counts()))
                for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                    close(full(p.grad), q.grad, f"stage {stage} step {step} grad {name}")
                ref_opt.step(), opt.step()
                ref_opt.zero_grad(), opt.zero_grad()
        graphs = [_graph_reductions(r.graph_code("backward")) for r in explanation.regions]
        out[str(stage)] = counts if args.backend == "none" else sorted(graphs)
        if args.budget is not None:
            plans = [r for r in explanation.regions if r.plan is not None and r.step is not None]
            out[f"{stage}-held"] = [len(r.step.grads_held) for r in plans]
            out[f"{stage}-whole"] = [any("whole step" in n for n in r.plan.notes) for r in plans]
    return out


def _graph_reductions(code: str) -> int:
    return sum(code.count(f"{op}.default(") for op in ("reduce_scatter_tensor", "all_reduce"))


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """Per-rank bytes of parameters, gradients and AdamW state after a step, measured from
    the tensors, next to ZeRO's formula for fp32 AdamW (4 + 4 + 8 bytes per element)."""
    from memopt.distributed.memory import model_state_bytes, zero_model_state_bytes

    world, out = dist.get_world_size(), {}
    for stage in [int(s) for s in args.stages.split(",")]:
        torch.manual_seed(0)
        model = md.shard(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)), stage=stage)
        opt = md.ShardedOptimizer(adamw, model)
        model(torch.randn(4, 64)).square().mean().backward()
        opt.step()
        numel = sum(p.numel() for p in model.parameters())
        measured = model_state_bytes(model, opt)
        formula = zero_model_state_bytes(numel, world, stage)
        out[str(stage)] = {"measured": measured.__dict__, "formula": formula.__dict__}
    return out


def checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """``--phase save``: train 3 steps (``--save-at``), save (sharded and full), train 3
    more; ``--phase resume`` (new processes): a model initialised differently loads each
    checkpoint and trains the same 3 steps. Returns the losses of the last 3 steps per
    stage."""
    from memopt.distributed import checkpoint as ckpt

    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[str, Any] = {}
    for stage in [int(s) for s in args.stages.split(",")]:
        for full in [mode == "full" for mode in args.modes.split(",")]:
            where = Path(args.dir) / f"stage{stage}-{'full' if full else 'sharded'}"
            torch.manual_seed(0 if args.phase == "save" else 1)
            model = md.shard(Tiny(), stage=stage)
            opt = md.ShardedOptimizer(OPTIMIZERS[args.optimizer], model)
            if args.phase == "resume":
                ckpt.load(where, model, opt, full=full)
            losses = []
            for step in range(3 if args.phase == "resume" else args.save_at + 3):
                if args.phase == "save" and step == args.save_at:
                    ckpt.save(where, model, opt, full=full)
                loss = model(*local(batch(step if args.phase == "save" else step + args.save_at), rank, world))
                loss.backward()
                opt.step(), opt.zero_grad()
                losses.append(global_loss(loss))
            out[f"{stage}-{'full' if full else 'sharded'}"] = losses[-3:]
    return out


def overwrite(args: argparse.Namespace) -> dict[str, Any]:
    """Save at stage 3 into a new directory, again into it (refused on every rank), then
    with ``overwrite=True`` after another step: no DCP warning, the directory's other
    files kept, a stale shard file of the old checkpoint gone, and a new model loads the
    second save's parameters."""
    import warnings

    from memopt.distributed import checkpoint as ckpt

    rank, world = dist.get_rank(), dist.get_world_size()
    where = Path(args.dir) / "ckpt"
    torch.manual_seed(0)
    model = md.shard(Tiny(), stage=3)
    opt = md.ShardedOptimizer(adamw, model)

    def train(step: int) -> None:
        model(*local(batch(step), rank, world)).backward()
        opt.step(), opt.zero_grad()

    train(0)
    out: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt.save(where, model, opt)
        if rank == 0:  # the user's own file, and a shard file as a larger world leaves it
            (where / "notes.txt").write_text("mine")
            (where / "__7_0.distcp").write_bytes(b"stale")
        dist.barrier()
        try:
            ckpt.save(where, model, opt)
        except md.ShardingError as error:
            out["refused"] = str(error)
        train(1)
        ckpt.save(where, model, opt, overwrite=True)
    out["warnings"] = [str(w.message) for w in caught if "checkpoint" in str(w.message).lower()]
    out["files"] = sorted(f.name for f in where.iterdir() if not f.name.startswith("__") or f.name == "__7_0.distcp")
    out["siblings"] = sorted(f.name for f in where.parent.iterdir())
    torch.manual_seed(1)
    fresh = md.shard(Tiny(), stage=3)
    fresh_opt = md.ShardedOptimizer(adamw, fresh)
    ckpt.load(where, fresh, fresh_opt)
    for (name, saved), loaded in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(full(saved), full(loaded)), name
    return out


def mixed(args: argparse.Namespace) -> dict[str, Any]:
    """A bf16 ``param_dtype`` with fp32 ``reduce_dtype``: parameters, gradients and the
    optimizer stay fp32; losses follow the fp32 run within bf16's precision."""
    rank, world = dist.get_rank(), dist.get_world_size()
    policy = md.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out: dict[str, Any] = {}
    for stage in [int(s) for s in args.stages.split(",")]:
        torch.manual_seed(0)
        reference = Tiny()
        model = md.shard(copy.deepcopy(reference), stage=stage, mp_policy=policy)
        ref_opt, opt = adamw(reference.parameters()), md.ShardedOptimizer(adamw, model)
        step_fn = compiled(model, args.backend)
        for step in range(args.steps):
            data = batch(step)
            ref_loss = reference(*data)
            ref_loss.backward()
            loss = step_fn(*local(data, rank, world))
            assert loss.dtype == torch.bfloat16
            loss.backward()
            torch.testing.assert_close(torch.tensor(global_loss(loss.float())), ref_loss.detach(), rtol=2e-2, atol=0)
            for p in model.parameters():
                assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
            ref_opt.step(), opt.step()
            ref_opt.zero_grad(), opt.zero_grad()
        out[str(stage)] = "ok"
    return out


COLLECTIVE_PASSES = ("dedupe_collectives", "bucket_collectives", "overlap_collectives")


DEEP_WIDTH, DEEP_BATCH = 64, 1024


class Deep(nn.Module):
    """16 Linear(64, 64) + ReLU on 512 rows per rank: activations enough for
    ``memory_budget=0.6`` to be feasible on 2 ranks (`Tiny` is not) and collectives
    enough for it to make the collective passes search (re-gathers bucketed under a
    smaller cap, some collectives not moved)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(DEEP_WIDTH, DEEP_WIDTH), nn.ReLU()) for _ in range(16)])

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.layers(x), target)


def deep_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2000 + step)
    return torch.randn(DEEP_BATCH, DEEP_WIDTH, generator=gen), torch.randn(DEEP_BATCH, DEEP_WIDTH, generator=gen)


def _train(
    stage: int, options: dict[str, Any], rank: int, world: int, model_cls: type[nn.Module] = Tiny,
) -> tuple[list[list[torch.Tensor]], dict[str, Any]]:
    """3 SGD steps of ``model_cls`` at ``stage`` compiled by memopt with ``options``:
    each step's loss and full gradients, what ``bucket_collectives`` and
    ``overlap_collectives`` recorded (caps, distances) in the first compile, and its
    backward's all-reduces (all, and those reduced in place)."""
    import memopt

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = md.shard(model_cls(), stage=stage)
    data = deep_batch if model_cls is Deep else batch
    opt = md.ShardedOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.1), model)
    step_fn = torch.compile(model, backend="memopt", options={"codegen": "eager", "strict": True, "verify": True, **options})
    steps: list[list[torch.Tensor]] = []
    with memopt.record() as explanation:
        for step in range(3):
            loss = step_fn(*local(data(step), rank, world))
            loss.backward()
            steps.append([loss.detach()] + [full(p.grad) for p in model.parameters()])
            opt.step(), opt.zero_grad()
    records = {p.name: p.details for p in explanation.region(0).passes if p.name in COLLECTIVE_PASSES[1:]}
    backward = explanation.region(0).graph_code("backward")
    in_place = backward.count("_c10d_functional.all_reduce_.default(")  # a bucket's (`bucket_collectives`)
    chosen = {
        "caps": records.get("bucket_collectives", {}).get("caps"),
        "distances": records.get("overlap_collectives", {}).get("distances"),
        "all_reduces": backward.count("_c10d_functional.all_reduce.default(") + in_place,
        "in_place": in_place,
    }
    return steps, chosen


def _bitwise(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]], what: str) -> None:
    for step, (a_step, b_step) in enumerate(zip(got, want, strict=True)):
        for i, (a, b) in enumerate(zip(a_step, b_step, strict=True)):
            assert torch.equal(a, b), f"{what} step {step} tensor {i}: not bitwise equal"


def collectives(args: argparse.Namespace) -> dict[str, Any]:
    """3 SGD steps compiled by memopt, each variant against its reference bit for bit:

    * stages 3, 0 and 1 (gradients reduce-scattered, then all-reduced), the collective
      passes on (defaults, and 1 KiB buckets: several buckets, each prefetched) against
      bucketing and overlap off, bit for bit; merging the tied parameter's two
      reductions (reduce-scatters at stage 3, all-reduces at 0 and 1) reorders its sum,
      so against no merge at all: rtol 1e-5;
    * stage 3 under ``memory_budget=0.6`` (the budget search's caps and moves; `Deep`:
      no tied parameter, so dedupe changes nothing) against the same budget with every
      collective pass off, bit for bit."""
    rank, world = dist.get_rank(), dist.get_world_size()
    off = {"disable_passes": ["bucket_collectives", "overlap_collectives"]}
    variants = {"default": {}, "small_buckets": {"collective_bucket_bytes": 1024, "collective_prefetch": 2}}
    out: dict[str, Any] = {}
    for stage in (3, 0, 1):
        reference, out[f"{stage}/unbucketed"] = _train(stage, off, rank, world)
        for name, options in variants.items():
            steps, chosen = _train(stage, options, rank, world)
            _bitwise(steps, reference, f"stage {stage} {name}")
            out[f"{stage}/{name}"] = chosen
        traced, out[f"{stage}/traced"] = _train(stage, {"disable_passes": list(COLLECTIVE_PASSES)}, rank, world)
        for step, (got, want) in enumerate(zip(reference, traced)):
            for i, (a, b) in enumerate(zip(got, want)):
                close(a, b, f"stage {stage} deduped step {step} tensor {i}")
        if stage == 3:
            out["losses"] = [float(r[0]) for r in steps]
    budget = {"memory_budget": 0.6}
    steps, out["3/budget"] = _train(3, budget, rank, world, Deep)
    _bitwise(steps, _train(3, {**budget, "disable_passes": list(COLLECTIVE_PASSES)}, rank, world, Deep)[0], "stage 3 memory_budget=0.6")
    return out


def gathers(args: argparse.Namespace) -> dict[str, Any]:
    """Stages 1 and 2, 3 AdamW steps eagerly: the updated rows all-gathered one parameter
    per collective (``gather_bucket_bytes=0``) and in one default bucket give the same
    parameters bit for bit; the collectives of each optimizer step are counted."""
    import memopt.distributed.param as param_module

    rank, world = dist.get_rank(), dist.get_world_size()
    real, calls = param_module._all_gather_single, [0]

    def counted(*a: Any, **k: Any) -> None:
        calls[0] += 1
        real(*a, **k)

    param_module._all_gather_single = counted
    out: dict[str, Any] = {}
    try:
        for stage in [int(s) for s in args.stages.split(",")]:
            params, counts = {}, {}
            for cap in (0, 4 * 2**20):
                torch.manual_seed(0)
                model = md.shard(Tiny(), stage=stage)
                opt = md.ShardedOptimizer(adamw, model, gather_bucket_bytes=cap)
                counts[cap] = []
                for step in range(3):
                    model(*local(batch(step), rank, world)).backward()
                    calls[0] = 0
                    opt.step()
                    counts[cap].append(calls[0])
                    opt.zero_grad()
                params[cap] = [full(p.detach()) for p in model.parameters()]
            for i, (a, b) in enumerate(zip(params[0], params[4 * 2**20])):
                assert torch.equal(a, b), f"stage {stage} parameter {i}: bucketed gathers changed its bits"
            out[str(stage)] = {"apart": counts[0], "bucketed": counts[4 * 2**20]}
    finally:
        param_module._all_gather_single = real
    return out


def _mlp() -> nn.Module:
    """Built in the order its default initialisation runs (`md.materialize`)."""
    return nn.Sequential(nn.Linear(16, 48), nn.LayerNorm(48), nn.GELU(), nn.Linear(48, 13), nn.Linear(13, 4))


def materialize(args: argparse.Namespace) -> dict[str, Any]:
    """Built on the meta device, sharded there and materialised with the seed set: the
    same shards as the model built for real with that seed and sharded, and 3 SGD steps
    compiled by memopt give the same losses and parameters bit for bit."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[str, Any] = {}
    for stage in [int(s) for s in args.stages.split(",")]:
        runs = []
        for on_meta in (False, True):
            torch._dynamo.reset()
            torch.manual_seed(0)
            if on_meta:
                with torch.device("meta"):
                    model = md.shard(_mlp(), stage=stage)
                torch.manual_seed(0)
                md.materialize(model)
            else:
                model = md.shard(_mlp(), stage=stage)
            opt = md.ShardedOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.1), model)
            step_fn = torch.compile(model, backend="memopt", options={"codegen": "eager", "strict": True})
            gen = torch.Generator().manual_seed(rank)
            losses = []
            for _ in range(3):
                loss = step_fn(torch.randn(8 // world, 16, generator=gen)).square().mean()
                loss.backward()
                opt.step(), opt.zero_grad()
                losses.append(loss.detach())
            runs.append((losses, [full(p.detach()) for p in model.parameters()]))
        (want_losses, want_params), (got_losses, got_params) = runs
        for step, (a, b) in enumerate(zip(got_losses, want_losses)):
            assert torch.equal(a, b), f"stage {stage} step {step}: loss {a} != {b}"
        for i, (a, b) in enumerate(zip(got_params, want_params)):
            assert torch.equal(a, b), f"stage {stage} parameter {i} differs after 3 steps"
        out[str(stage)] = [float(x) for x in got_losses]
    return out


def uneven(args: argparse.Namespace) -> dict[str, Any]:
    """Compiled by memopt without a budget, rank 1's batch changes size at step 2 while
    rank 0's does not (a last, shorter batch; sequences of other lengths): only rank 1
    compiles again. The step must neither hang nor diverge: 3 SGD steps leave the
    parameters of one process stepping on the mean of the two ranks' losses.

    ``--budget``: under ``memory_budget`` the ranks' batches differ from the first step
    (2 and 24 rows), so both compile at once, each its own shapes. One plan cannot serve
    both: every rank warns and runs the region unoptimized, and the parameters follow
    one process all the same. ``--alone R``: rank R's batch alone loses a row at step 2,
    so rank R alone compiles again under the budget (it raises `MemoptRanksError`);
    ``--late S``: rank 1 comes S seconds late to step 2. ``--graph-break``: a graph break
    after the model (`_broken`), so that the step's regions are planned again as a whole."""
    import memopt

    assert dist.get_world_size() == 2
    options: dict[str, Any] = {"codegen": "eager", "strict": args.budget is None}
    if args.budget is not None:
        options["memory_budget"] = args.budget
    if args.agree_timeout is not None:
        options["rank_agreement_timeout"] = args.agree_timeout
    out: dict[str, Any] = {}
    for stage in [int(s) for s in args.stages.split(",")]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        reference = _mlp()
        model = md.shard(copy.deepcopy(reference), stage=stage)
        opt = md.ShardedOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.1), model)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
        step_fn = torch.compile(_broken(model) if args.graph_break else model, backend="memopt", options=options)
        losses = []
        with memopt.record() as explanation, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", memopt.errors.MemoptWarning)
            for step in range(3):
                _uneven_step(args, step, step_fn, opt, reference, ref_opt, losses)
        for (name, got), want in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(full(got.detach()), want.detach(), rtol=1e-5, atol=1e-6, msg=name)
        out[str(stage)] = losses
        out[f"{stage}/fallbacks"] = [f.reason for f in explanation.fallbacks]
        out[f"{stage}/warnings"] = [str(w.message) for w in caught if issubclass(w.category, memopt.errors.MemoptWarning)]
    return out


def _broken(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` followed by a graph break (as Hugging Face GPT-2's before its loss): two
    regions per step, which memopt plans as a whole under a budget once it has seen a step."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = model(x)
        torch._dynamo.graph_break()
        return torch.tanh(y)

    return forward


def _uneven_step(args: argparse.Namespace, step: int, step_fn: Any, opt: Any, reference: nn.Module,
                 ref_opt: torch.optim.Optimizer, losses: list[float]) -> None:
    """One step of `uneven` on this rank's batch, and the reference's on both ranks'."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(step)
    rows = [2 if r == 0 or step < 2 else 3 for r in range(world)] if args.budget is None else args.rows
    if args.short and step == 2:  # a short last batch on every rank
        rows = [n // 2 for n in rows]
    if args.late and step == 2 and rank == 1:  # rank 1 comes late to the step that compiles again
        time.sleep(args.late)
    if args.alone is not None and step == 2:  # one rank's batch alone changes: it alone compiles again
        rows = [n - (r == args.alone) for r, n in enumerate(rows)]
    inputs = [torch.randn(n, 16, generator=gen) for n in rows]
    mine = inputs[rank]
    if args.slice:  # the rank's rows of the global batch, a view at its offset
        mine = torch.cat(inputs)[sum(rows[:rank]) : sum(rows[: rank + 1])]
    loss = step_fn(mine).square().mean()
    loss.backward()
    opt.step(), opt.zero_grad()
    head = torch.tanh if args.graph_break else (lambda y: y)  # `_broken`'s
    (sum(head(reference(x)).square().mean() for x in inputs) / world).backward()
    ref_opt.step(), ref_opt.zero_grad()
    losses.append(global_loss(loss))


SCENARIOS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "numerics": numerics, "accumulate": accumulate, "memory": memory, "checkpoint": checkpoint, "mixed": mixed,
    "collectives": collectives, "gathers": gathers, "materialize": materialize, "uneven": uneven,
    "overwrite": overwrite,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--backend", default="none", help="none (eager), aot_eager, memopt (eager codegen) or memopt-inductor")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS))
    parser.add_argument("--same-grads", action="store_true", help="step on one process's gradients (scenario numerics)")
    parser.add_argument("--dir", default="")
    parser.add_argument("--phase", default="save", choices=["save", "resume"])
    parser.add_argument("--save-at", type=int, default=3, help="the step before which to save (scenario checkpoint)")
    parser.add_argument("--modes", default="sharded,full", help="checkpoint kinds: sharded, full")
    parser.add_argument("--budget", type=float, default=None, help="memory_budget (scenarios uneven, accumulate)")
    parser.add_argument("--graph-break", action="store_true", help="a graph break before the loss (scenarios accumulate, uneven)")
    parser.add_argument("--rows", type=lambda v: [int(n) for n in v.split(",")], default=[2, 24],
                        help="each rank's batch rows under --budget (scenario uneven)")
    parser.add_argument("--short", action="store_true", help="half the rows at the last step (scenario uneven)")
    parser.add_argument("--slice", action="store_true",
                        help="each rank's input is its slice of the global batch (scenario uneven)")
    parser.add_argument("--alone", type=int, default=None,
                        help="this rank's batch alone loses a row at the last step (scenario uneven)")
    parser.add_argument("--late", type=float, default=0.0,
                        help="rank 1 sleeps this long before the last step (scenario uneven)")
    parser.add_argument("--pg-timeout", type=float, default=None, help="the process group's timeout, seconds")
    parser.add_argument("--agree-timeout", type=float, default=None, help="rank_agreement_timeout (scenario uneven)")
    args = parser.parse_args()
    init_from_env("cpu", timeout=None if args.pg_timeout is None else timedelta(seconds=args.pg_timeout))
    try:
        result = SCENARIOS[args.scenario](args)
        print(json.dumps({"rank": dist.get_rank(), **result}), flush=True)
        dist.barrier()  # no rank tears down while another still talks to it
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown: torch's DTensor caches keep the gloo process group
    # alive past destroy_process_group, so its threads run during teardown, and a rank
    # aborted there ('terminate called without an active exception', exit -6) after its
    # result was printed, on a loaded machine (see examples/train_sharded.py).
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
