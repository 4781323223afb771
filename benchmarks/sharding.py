"""Issue 16's acceptance rows for `memopt.distributed`, measured on gloo ranks (CPU).

    PYTHONPATH=. .venv/bin/python benchmarks/sharding.py                      # every row (slow)
    PYTHONPATH=. .venv/bin/python benchmarks/sharding.py --rows state --ranks 2 --stages 0,1,2,3
    PYTHONPATH=. .venv/bin/python benchmarks/sharding.py --rows peak,budget --ranks 2 4
    PYTHONPATH=. .venv/bin/python benchmarks/sharding.py --rows peak,budget --ranks 2 4 --fake  # one process
    PYTHONPATH=. .venv/bin/python benchmarks/sharding.py --rows state --stages 0,3 --optimizer sgd
    PYTHONPATH=. .venv/bin/python benchmarks/sharding.py --rows explain      # fake 8-rank world, 1B Llama
    PYTHONPATH=. .venv/bin/python benchmarks/sharding.py --rows allreduce --ranks 8 --stages 0,1 --fake
    PYTHONPATH=. .venv/bin/python benchmarks/sharding.py --rows allreduce --ranks 2 --stages 0,1 --time-steps 7
    PYTHONPATH=. .venv/bin/python benchmarks/sharding.py --rows overlap --ranks 2 --fake

Rows (each prints a Markdown table):

* ``state``: default-config Hugging Face GPT-2 and Llama (`memopt.testing.hf`, size
  "medium": 4 layers, hidden 256; GPT-2's dropout set to 0, since random masks differ
  between one process and N), each stage: per-rank model-state bytes measured from the
  tensors (`md.model_state_bytes`, after the last optimizer step) against ZeRO's formula
  for fp32 AdamW (`md.zero_model_state_bytes`), and the loss, every gradient and every
  parameter over ``--steps`` steps against one process on the same global batch (each rank
  runs that process itself, eagerly). "tol" is the worst ``|a - b| / (atol + rtol |b|)``
  (rtol 1e-5, atol 1e-6): at most 1 is equal within tolerance. Stages in
  ``--compile-stages`` run compiled by memopt (eager codegen), the others eagerly.
* ``peak``: stage 3 compiled by memopt (eager codegen), with and without
  ``memory_budget``, against FSDP2 eager (``fully_shard`` per decoder layer and the root,
  reshard after forward) on the same model (default config, dropout on), ranks and batch.
  Per-rank peak of one forward+backward (gradients None before it), measured the same way
  for both: the allocator's view (`memopt.testing.measure.measure_peak`: torch.profiler
  memory events on the rank's thread) above the bytes live at the step's start, plus this
  rank's parameter shards. Step time: median of ``--time-steps`` forward+backward steps,
  the variants taking turns step by step in the same processes.
* ``budget``: stage 3 under ``memory_budget`` fractions (``--budgets``, of memopt's
  unoptimized estimate): requested budget, memopt's estimate, measured peak (growth
  + memopt's baseline, as benchmarks/budget_inductor.py), and the plan's decisions whose
  reason is "gathered again" (parameters freed after forward and all-gathered again in
  backward).
  On gloo ranks the profiler misses frees made by gloo's worker thread (the "end - grads"
  column shows how many bytes); ``--fake`` runs the peak and budget rows in this process
  on a fake world of the same size instead (collectives allocate their outputs and move
  nothing: the same memory, no missed free, no step times).
* ``allreduce``: stages 0 and 1 (of ``--stages``) compiled by memopt with the
  gradients' all-reduces bucketed (default cap) and not: all-reduces per step, the
  estimated peak and the measured one (allocator view, plus the baseline; on gloo ranks
  with the frees gloo's thread makes unseen, counted in "frees unseen"), whether one
  step's gradients are bit for bit equal, and on gloo ranks the median step time of
  ``--time-steps`` steps (the variants taking turns).
* ``overlap``: stage 3 compiled by memopt at each ``--prefetch`` bound
  (``collective_prefetch``), without a budget and at ``--peak-budget``: the estimated
  peak, the collectives ``overlap_collectives`` moved at each distance, and the
  modelled network and exposed time of the step's collectives.
* ``explain``: one process, a fake 8-rank process group, a ~1B-parameter Llama config
  built on the meta device and sharded there (stage 3): wall time of `memopt.explain`
  and the per-rank estimate.

Each multi-rank row runs this file on N ranks (`memopt.distributed.testing.run_ranks`,
one thread per rank); every rank prints one JSON line and the driver tabulates them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RTOL, ATOL = 1e-5, 1e-6
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "llama": {}}
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, use_cache=False,
)  # TinyLlama-1.1B's shape  # fmt: skip


# ---- one rank --------------------------------------------------------------------------


def build(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """``family`` at its default config, size "medium" (4 layers, hidden 256), fp32."""
    from memopt.testing.hf import build as build_hf

    model, _ = build_hf(family, size="medium", seed=seed, **overrides)
    return model


def global_batch(model: nn.Module, batch: int, seq: int, step: int) -> dict[str, torch.Tensor]:
    """The global batch of ``step``: the same on every rank."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def rank_rows(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    per = next(iter(inputs.values())).shape[0] // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in inputs.items()}


def memopt_compile(model: nn.Module, **options: Any) -> Callable[..., Any]:
    return torch.compile(model, backend="memopt", options={"codegen": "eager", **options})


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)


def sgd(params: Any) -> torch.optim.Optimizer:
    """No state, and an update linear in the gradient: rounding differences between one
    process and N ranks are not amplified (Adam divides by sqrt(v) + eps)."""
    return torch.optim.SGD(params, lr=0.1)


OPTIMIZERS = {"adamw": (adamw, 8), "sgd": (sgd, 0)}
"""name -> (factory, optimizer-state bytes per parameter element in fp32)."""


def tolerance_ratio(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Worst ``|a - b| / (atol + rtol |b|)``: at most 1 means equal within tolerance."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float(((actual - expected).abs() / (ATOL + RTOL * expected.abs())).max())


def full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def state_row(args: argparse.Namespace) -> dict[str, Any]:
    """Model-state bytes and numerics against one process, per model and stage."""
    import torch.distributed as dist

    import memopt.distributed as md

    world, out = dist.get_world_size(), {}
    compiled_stages = {int(s) for s in args.compile_stages.split(",") if s}
    for family in args.models:
        for stage in [int(s) for s in args.stages.split(",")]:
            torch._dynamo.reset()
            reference = build(family, **NO_DROPOUT[family])
            numel = sum(p.numel() for p in reference.parameters())
            model = md.shard(copy.deepcopy(reference), stage=stage)
            make, state_bytes = OPTIMIZERS[args.optimizer]
            ref_opt, opt = make(reference.parameters()), md.ShardedOptimizer(make, model)
            step_fn = memopt_compile(model, strict=True) if stage in compiled_stages else model
            worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
            losses, start, first_over = [], time.perf_counter(), None
            for step in range(args.steps):
                data = global_batch(reference, args.batch, args.seq, step)
                ref_loss = reference(**data).loss
                ref_loss.backward()
                loss = step_fn(**rank_rows(data)).loss
                loss.backward()
                total = loss.detach().clone()
                dist.all_reduce(total)
                losses.append(total.item() / world)
                worst["loss"] = max(worst["loss"], tolerance_ratio(total / world, ref_loss))
                pairs = zip(model.parameters(), reference.parameters())
                grad_tol = max(tolerance_ratio(full(p.grad), q.grad) for p, q in pairs)
                worst["grad"] = max(worst["grad"], grad_tol)
                if grad_tol > 1 and first_over is None:
                    first_over = step
                ref_opt.step(), opt.step()
                if step == args.steps - 1:
                    held = md.model_state_bytes(model, opt)
                ref_opt.zero_grad(), opt.zero_grad()
                for p, q in zip(model.parameters(), reference.parameters()):
                    worst["param"] = max(worst["param"], tolerance_ratio(full(p.detach()), q))
            formula = md.zero_model_state_bytes(numel, world, stage, state_bytes=state_bytes)
            out[f"{family}/{stage}"] = {
                "numel": numel, "measured": held.__dict__, "formula": formula.__dict__, "worst": worst,
                "losses": [losses[0], losses[-1]], "compiled": stage in compiled_stages, "first_over": first_over,
                "seconds": time.perf_counter() - start,
            }
    return out


def _regathered(explanation: Any) -> int:
    return sum("gathered again" in d.reason for d in explanation.decisions())


def _fsdp2(model: nn.Module) -> nn.Module:
    """FSDP2 eager: ``fully_shard`` on each decoder layer, then on the root."""
    from torch.distributed.fsdp import fully_shard

    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _local_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``' local parts, each storage once (FSDP2's
    sharded gradients are views of one reduce-scatter output)."""
    from torch.distributed.tensor import DTensor

    storages = {}
    for t in tensors:
        storage = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _local_param_bytes(model: nn.Module) -> int:
    return _local_bytes(list(model.parameters()))


def _local_grad_bytes(model: nn.Module) -> int:
    return _local_bytes([p.grad for p in model.parameters() if p.grad is not None])


COLLECTIVE_PASSES = ("dedupe_collectives", "bucket_collectives", "overlap_collectives")


def peak_row(args: argparse.Namespace) -> dict[str, Any]:
    """Per-rank peak and step time: memopt stage 3 (with and without budgets) and FSDP2."""
    import memopt
    import memopt.distributed as md
    from memopt.testing.measure import measure_peak

    out: dict[str, Any] = {}
    budgets = [None, *args.budgets] if args.row == "budget" else [None, args.peak_budget]
    for family in args.models:
        torch._dynamo.reset()
        base = build(family)
        data = rank_rows(global_batch(base, args.batch, args.seq, 0))
        variants: dict[str, tuple[nn.Module, Callable[..., Any]]] = {}
        info: dict[str, dict[str, Any]] = {}
        runs = [(budget, False) for budget in budgets]
        if args.traced and args.row == "peak":
            runs += [(budget, True) for budget in budgets]
        for budget, traced in runs:
            name = ("memopt" if budget is None else f"memopt@{budget}") + (" traced" if traced else "")
            model = md.shard(copy.deepcopy(base), stage=3)
            options: dict[str, Any] = {} if budget is None else {"memory_budget": budget}
            if traced:  # the collectives as Unshard traces them: one per parameter, waited at once
                options["disable_passes"] = list(COLLECTIVE_PASSES)
            compiled = memopt_compile(model, **options)
            with memopt.record() as explanation, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled(**data).loss.backward()
            plans = [r.plan for r in explanation.step_regions() if r.plan is not None]
            info[name] = {
                "estimate": explanation.estimated_peak_bytes,
                "baseline": explanation.baseline_bytes,
                # every region's plan carries the whole step's budget (planned across graph breaks)
                "budget": max(p.budget_bytes or 0 for p in plans) if budget is not None else None,
                "feasible": all(p.feasible for p in plans),
                "regathered": _regathered(explanation),
                "regions": len(explanation.step_regions()),
            }
            variants[name] = (model, compiled)
        if args.row == "peak":
            fsdp = _fsdp2(copy.deepcopy(base))
            fsdp(**data).loss.backward()
            variants["fsdp2"] = (fsdp, fsdp)
            info["fsdp2"] = {}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.time_steps if args.row == "peak" and not args.fake else 0):
            for name, (model, fn) in variants.items():
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                fn(**data).loss.backward()
                times[name].append(time.perf_counter() - start)
        for name, (model, fn) in variants.items():
            model.zero_grad(set_to_none=True)
            measured = measure_peak(lambda: fn(**data).loss.backward())
            info[name].update(
                growth=measured.peak_growth_bytes, end=measured.end_growth_bytes,
                local_params=_local_param_bytes(model), grads=_local_grad_bytes(model),
            )
            if times[name]:
                info[name]["step_s"] = statistics.median(times[name])
        out[family] = info
    return out


def allreduce_row(args: argparse.Namespace) -> dict[str, Any]:
    """Stages 0 and 1 (of ``--stages``) compiled by memopt with the gradients' all-reduces
    bucketed (default 4 MiB cap) and not (``collective_bucket_bytes=0``): all-reduces per
    step and rank (`memopt.distributed.report.collectives`), estimated peak, whether
    the gradients of one step are bitwise equal, and (gloo ranks) the median step time,
    the two variants taking turns step by step."""
    import memopt
    import memopt.distributed as md
    from memopt.distributed.report import collectives
    from memopt.testing.measure import measure_peak

    out: dict[str, Any] = {}
    for family in args.models:
        base = build(family, **NO_DROPOUT[family])
        data = rank_rows(global_batch(base, args.batch, args.seq, 0))
        for stage in [int(s) for s in args.stages.split(",") if s in ("0", "1")]:
            variants: dict[str, tuple[nn.Module, Callable[..., Any]]] = {}
            info: dict[str, dict[str, Any]] = {}
            for name, options in (("unbucketed", {"collective_bucket_bytes": 0}), ("bucketed", {})):
                torch._dynamo.reset()
                model = md.shard(copy.deepcopy(base), stage=stage)
                compiled = memopt_compile(model, **options)
                with memopt.record() as explanation, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    compiled(**data).loss.backward()
                rows = collectives(explanation)
                info[name] = {
                    "all_reduce": sum(r.count for r in rows if r.kind == "all_reduce"),
                    "estimate": explanation.estimated_peak_bytes,
                    "baseline": explanation.baseline_bytes,
                    "grads": [full(p.grad).clone() for p in model.parameters()],
                }
                variants[name] = (model, compiled)
            equal = all(torch.equal(a, b) for a, b in zip(info["unbucketed"].pop("grads"), info["bucketed"].pop("grads")))
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(0 if args.fake else args.time_steps):
                for name, (model, fn) in variants.items():
                    model.zero_grad(set_to_none=True)
                    start = time.perf_counter()
                    fn(**data).loss.backward()
                    times[name].append(time.perf_counter() - start)
            for name, (model, fn) in variants.items():
                if times[name]:
                    info[name]["step_s"] = statistics.median(times[name])
                for _ in range(2):  # the first call after the other variant's dynamo.reset() compiles again
                    model.zero_grad(set_to_none=True)
                    measured = measure_peak(lambda: fn(**data).loss.backward())
                info[name]["measured"] = info[name]["baseline"] + measured.peak_growth_bytes
                info[name]["unseen"] = measured.end_growth_bytes - _local_grad_bytes(model)
            out[f"{family}/{stage}"] = {**info, "bitwise_equal": equal}
    return out


def print_head(title: str, world: int, fake: bool, columns: str, align: str) -> None:
    """A table's title (``title``, where it ran, memopt with eager codegen) and header."""
    where = f"fake {world}-rank world" if fake else f"{world} gloo ranks"
    print(f"\n**{title}, {where}, memopt (eager codegen)**\n")
    print(columns)
    print(align)


def print_allreduce(world: int, ranks: list[dict[str, Any]], fake: bool) -> None:
    print_head("all-reduces per step and rank", world, fake,
               "| model / stage | unbucketed | bucketed (4 MiB) | estimated peak, unbucketed / bucketed | measured peak (allocator), unbucketed / bucketed | frees unseen | grads bitwise equal | step time, bucketed / unbucketed |",
               "|---|---:|---:|---|---|---:|---|---:|")  # fmt: skip
    for key, info in ranks[0].items():
        if key == "rank":
            continue
        off, on = info["unbucketed"], info["bucketed"]
        ratio = f"{on['step_s'] / off['step_s']:.2f} ({on['step_s']:.3f} / {off['step_s']:.3f} s)" if "step_s" in on else "-"
        equal = "-" if fake else all(r[key]["bitwise_equal"] for r in ranks)  # a fake all-reduce sums nothing
        unseen = mb(max(off["unseen"], on["unseen"]))  # frees the profiler missed (gloo's thread; 0 on a fake world)
        print(f"| {key} | {off['all_reduce']} | {on['all_reduce']} | {mb(off['estimate'])} / {mb(on['estimate'])} "
              f"| {mb(off['measured'])} / {mb(on['measured'])} | {unseen} | {equal} | {ratio} |")


def overlap_row(args: argparse.Namespace) -> dict[str, Any]:
    """Stage 3 compiled by memopt at each ``--prefetch`` bound, without a budget and at
    ``--peak-budget``: the estimated peak, how many collectives ``overlap_collectives``
    moved each distance, and the modelled network and exposed seconds of the final
    graphs' collectives (`memopt.analysis.collective_time`, the device model's network)."""
    import memopt
    import memopt.distributed as md
    from memopt.analysis.collective_time import CollectiveClock
    from memopt.analysis.cost import device_model
    from memopt.analysis.memory import main_device

    out: dict[str, Any] = {}
    for family in args.models:
        base = build(family)
        data = rank_rows(global_batch(base, args.batch, args.seq, 0))
        for prefetch, budget in [(p, b) for b in (None, args.peak_budget) for p in args.prefetch]:
            torch._dynamo.reset()
            options: dict[str, Any] = {"collective_prefetch": prefetch} | ({} if budget is None else {"memory_budget": budget})
            compiled = memopt_compile(md.shard(copy.deepcopy(base), stage=3), **options)
            with memopt.record() as explanation, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled(**data).loss.backward()
            distances: dict[int, int] = {}
            network = exposed = 0.0
            for region in explanation.step_regions():
                record = next((p for p in region.passes if p.name == "overlap_collectives"), None)
                for kinds in ({} if record is None else record.details.get("distances", {})).values():
                    for distance, count in [item for by in kinds.values() for item in by.items()]:
                        distances[int(distance)] = distances.get(int(distance), 0) + count
                clock = CollectiveClock(device_model(main_device(region.step)))
                times = [t for _, gm in region.step.graphs() for t in clock.times(gm.graph).values()]
                network, exposed = network + sum(t.seconds for t in times), exposed + sum(t.exposed for t in times)
            key = f"{family}, prefetch {prefetch}" + ("" if budget is None else f" @{budget}")
            out[key] = {"estimate": explanation.estimated_peak_bytes, "distances": dict(sorted(distances.items())),
                        "network_s": network, "exposed_s": exposed}  # fmt: skip
    return out


def print_overlap(world: int, ranks: list[dict[str, Any]], fake: bool) -> None:
    print_head("overlap_collectives, stage 3", world, fake,
               "| model, bound | estimated peak (MiB) | collectives moved per distance | modelled network ms | exposed ms |",
               "|---|---:|---|---:|---:|")  # fmt: skip
    for key, info in ranks[0].items():
        if key != "rank":
            moved = ", ".join(f"{d}: {n}" for d, n in info["distances"].items())
            print(f"| {key} | {mb(info['estimate'])} | {moved} | {info['network_s'] * 1e3:.2f} | {info['exposed_s'] * 1e3:.2f} |")


ROWS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "state": state_row, "peak": peak_row, "budget": peak_row, "allreduce": allreduce_row, "overlap": overlap_row,
}


def rank_main(args: argparse.Namespace) -> None:
    """One rank of a row: print its JSON line (the teardown of tests/distributed/worker.py)."""
    import torch.distributed as dist

    from memopt.distributed.testing import init_from_env

    init_from_env("cpu")
    try:
        result = ROWS[args.row](args)
        print(json.dumps({"rank": dist.get_rank(), **result}), flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)


# ---- the driver --------------------------------------------------------------------------


def on_ranks(row: str, world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every rank's result of ``row``: ``world`` gloo processes, or (``--fake``) this
    process as rank 0 of a fake world of ``world`` ranks (collectives allocate their
    outputs and move nothing)."""
    from memopt.distributed.testing import run_ranks

    if args.fake:
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        try:
            return [{"rank": 0, **ROWS[row](argparse.Namespace(**{**vars(args), "row": row}))}]
        finally:
            dist.destroy_process_group()

    argv = ["--rank-row", row, "--models", *args.models, "--stages", args.stages,
            "--compile-stages", args.compile_stages, "--steps", str(args.steps), "--batch", str(args.batch),
            "--seq", str(args.seq), "--optimizer", args.optimizer, "--time-steps", str(args.time_steps),
            "--peak-budget", str(args.peak_budget), "--budgets", *map(str, args.budgets), "--prefetch", *map(str, args.prefetch),
            *(["--traced"] if args.traced else [])]  # fmt: skip
    outputs = run_ranks(__file__, argv, world_size=world, timeout=3000)
    return [json.loads(line) for text in outputs for line in text.splitlines() if line.startswith('{"rank"')]


def by_key(ranks: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Each result key of the ranks' JSON lines (not "rank") with every rank's value."""
    return {key: [r[key] for r in ranks] for key in ranks[0] if key != "rank"}


def mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.2f}"


def print_state(world: int, ranks: list[dict[str, Any]], args_optimizer: str) -> None:
    print(f"\n**Model state and numerics, {world} ranks, {args_optimizer}** (bytes per rank: the largest over ranks)\n")
    print("| model | stage | compiled | params | grads | optimizer | total | formula | total/formula "
          "| loss tol | grad tol | first step grad tol > 1 | param tol | loss step 0 -> last |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for key, rows in by_key(ranks).items():
        family, stage = key.split("/")
        held = max(rows, key=lambda r: sum(r["measured"].values()))
        m, f = held["measured"], held["formula"]
        total, formula = sum(m.values()), sum(f.values())
        worst = {k: max(r["worst"][k] for r in rows) for k in ("loss", "grad", "param")}
        first, last = held["losses"]
        over = [r["first_over"] for r in rows if r["first_over"] is not None]
        first_over = "none" if not over else str(min(over))
        print(f"| {family} | {stage} | {'memopt' if held['compiled'] else 'eager'} | {m['params']:,} | "
              f"{m['grads']:,} | {m['optimizer']:,} | {total:,} | {formula:,} | {total / formula:.4f} | "
              f"{worst['loss']:.2f} | {worst['grad']:.2f} | {first_over} | {worst['param']:.2f} | "
              f"{first:.4f} -> {last:.4f} |")


def print_peak(world: int, ranks: list[dict[str, Any]], row: str, fake: bool) -> None:
    kind = "Per-rank peak, stage 3 vs FSDP2 eager" if row == "peak" else "memory_budget at stage 3"
    where = f"one process, fake {world}-rank world" if fake else f"{world} gloo ranks"
    print(f"\n**{kind}, {where}** (MiB; the largest over ranks)\n")
    if row == "peak":
        print("| model | variant | peak (growth + shards) | growth | end - grads | vs FSDP2 | step s (median) "
              "| vs FSDP2 | re-gathered | estimate |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    else:
        print("| model | budget | requested | estimate | measured | measured/requested | end - grads | feasible "
              "| re-gathered |")
        print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for family, results in by_key(ranks).items():
        worst = {n: max((r[n] for r in results), key=lambda v: v["growth"]) for n in results[0]}
        fsdp = worst.get("fsdp2")
        for name, v in worst.items():
            peak = v["growth"] + v["local_params"]
            unseen = mb(v["end"] - v["grads"])  # bytes whose free the profiler missed (0 when none)
            if row == "peak":
                ratio = "-" if fsdp is None else f"{peak / (fsdp['growth'] + fsdp['local_params']):.2f}"
                slow = "-" if fsdp is None or "step_s" not in v else f"{v['step_s'] / fsdp['step_s']:.2f}"
                step = f"{v['step_s']:.3f}" if "step_s" in v else "-"
                print(f"| {family} | {name} | {mb(peak)} | {mb(v['growth'])} | {unseen} | {ratio} | {step} | "
                      f"{slow} | {v.get('regathered', '-')} | {mb(v.get('estimate'))} |")
            else:
                measured = v["growth"] + v["baseline"]
                within = "-" if not v["budget"] else f"{measured / v['budget']:.3f}"
                print(f"| {family} | {name.partition('@')[2] or 'none'} | {mb(v['budget'] or None)} | "
                      f"{mb(v['estimate'])} | {mb(measured)} | {within} | {unseen} | {v['feasible']} | {v['regathered']} |")


def _meta_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The language-model loss without ``nll_loss``: compiled on the meta device,
    ``aten::nll_loss`` has no autograd kernel (torch warns "an autograd kernel was not
    registered") and the backward graph loses everything before the loss, so memopt
    would plan a step without most of its backward."""
    logits = model(input_ids=ids).logits.float()
    return -logits.log_softmax(-1).gather(-1, ids[..., None]).mean()


def explain_row(args: argparse.Namespace) -> None:
    """A ~1B Llama on the meta device, sharded at stage 3 over a fake 8-rank world,
    explained by memopt (nothing is allocated or computed)."""
    import torch.distributed as dist
    import transformers
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import memopt
    import memopt.distributed as md

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.fake_world)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        config = transformers.LlamaConfig(**LLAMA_1B)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config).train()
        numel = sum(p.numel() for p in model.parameters())
        model = md.shard(model, stage=3)
        ids = torch.randint(0, config.vocab_size, (args.explain_batch, args.explain_seq), device="meta")
        built = time.perf_counter() - start
        explanation = memopt.explain(lambda i: _meta_loss(model, i), ids, options={"codegen": "eager"})
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        state = md.zero_model_state_bytes(numel, args.fake_world, 3)
        print(f"\n**memopt.explain, Llama {numel / 1e9:.2f}B parameters on the meta device, stage 3, fake "
              f"{args.fake_world}-rank world, batch {args.explain_batch} x {args.explain_seq} per rank**\n")
        print("| what | value |\n|---|---:|")
        print(f"| wall time (build + shard, then explain) | {seconds:.1f} s ({built:.1f} s + {seconds - built:.1f} s) |")
        print(f"| CPU time of this process (the machine is shared) | {cpu:.1f} s |")
        backward = "".join(r.graph_code("backward") for r in explanation.step_regions())
        print(f"| regions | {len(explanation.step_regions())} |")
        print(f"| reduce-scatters in backward (one per parameter) | {backward.count('reduce_scatter_tensor.default(')} |")
        print(f"| per-rank estimated peak of the step | {explanation.estimated_peak_bytes / 2**30:.2f} GiB |")
        print(f"| per-rank baseline (live at the step's start) | {explanation.baseline_bytes / 2**30:.2f} GiB |")
        print(f"| ZeRO-3 model state per rank (fp32 AdamW, 16 Psi / N) | {state.total / 2**30:.2f} GiB |")
        if args.explain_budget >= 0:
            torch._dynamo.reset()
            start = time.perf_counter()
            options = {"codegen": "eager", "memory_budget": args.explain_budget}
            budgeted = memopt.explain(lambda i: _meta_loss(model, i), ids, options=options)
            print(f"| with memory_budget={args.explain_budget}: estimated peak, re-gathered parameters, time "
                  f"| {budgeted.estimated_peak_bytes / 2**30:.2f} GiB, {_regathered(budgeted)}, "
                  f"{time.perf_counter() - start:.1f} s |")
        if args.verbose:
            print(explanation.report())
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="state,peak,budget,explain", help="comma-separated: state, peak, budget, allreduce, overlap, explain")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--compile-stages", default="3", help="stages compiled by memopt in the state row; others eager")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw", help="the state row's optimizer")
    parser.add_argument("--batch", type=int, default=4, help="global batch (split over the ranks)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--time-steps", type=int, default=5)
    parser.add_argument("--peak-budget", type=float, default=0.6, help="memory_budget of the peak and overlap rows' budgeted variants")
    parser.add_argument("--prefetch", type=int, nargs="+", default=[1, 3], help="overlap row: collective_prefetch bounds")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--traced", action="store_true",
                        help="peak row: also memopt with its collective passes off (one collective per "
                             "parameter, waited at once), taking turns with the others")
    parser.add_argument("--fake", action="store_true",
                        help="peak/budget rows in this process on a fake world of each --ranks size (no gloo threads)")
    parser.add_argument("--fake-world", type=int, default=8)
    parser.add_argument("--explain-batch", type=int, default=1)
    parser.add_argument("--explain-seq", type=int, default=512)
    parser.add_argument("--explain-budget", type=float, default=0.5,
                        help="also explain the 1B step under this memory_budget (fraction); negative: skip")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--rank-row", dest="row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        return rank_main(args)
    rows = args.rows.split(",")
    for world in args.ranks:
        for row in [r for r in rows if r in ROWS]:
            start = time.perf_counter()
            ranks = on_ranks(row, world, args)
            if row == "state":
                print_state(world, ranks, args.optimizer)
            elif row == "allreduce":
                print_allreduce(world, ranks, args.fake)
            elif row == "overlap":
                print_overlap(world, ranks, args.fake)
            else:
                print_peak(world, ranks, row, args.fake)
            print(f"\n({row}, {world} ranks: {time.perf_counter() - start:.0f} s)", flush=True)
    if "explain" in rows:
        explain_row(args)


if __name__ == "__main__":
    main()
