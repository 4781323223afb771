"""memopt's memory_budget against torch's activation_memory_budget and per-block
torch.utils.checkpoint: measured peak, estimated peak, recompute FLOPs, step time.

    .venv/bin/python benchmarks/remat.py                      # all models (~10 min on 2 CPU cores)
    .venv/bin/python benchmarks/remat.py --models gpt hf_llama --steps 5

* memopt: ``backend="memopt", options={"codegen": "eager", "memory_budget": b}`` for
  b in 1.0, 0.75, 0.5, 0.3 and the minimum (a budget far below reach: memopt warns and
  uses its smallest-peak plan).
* torch: ``backend="aot_eager"`` (the same min-cut partitioner and eager execution)
  with ``torch._functorch.config.activation_memory_budget = b`` for the same b, and 0.0.
* memopt at torch's measured peak: memory_budget set to the peak torch measured at each
  of its budgets (+0.5%: estimates and measurements differ by a few bytes), to compare
  recompute FLOPs at equal peak.
* checkpoint: eager with ``torch.utils.checkpoint`` around every block (Hugging Face's
  ``gradient_checkpointing_enable``; the zoo GPT's blocks wrapped by hand).

Peaks are measured with memopt.testing.measure (profiler allocator events) plus the
bytes live before the step (parameters, buffers, inputs). "grads = unbudgeted": the
gradients of one seeded step equal (torch.equal) those of the same family without a
budget (a "no" means random ops were recomputed with new random numbers). Recompute FLOPs: for the
compiled variants, the FLOPs of forward ops copied into the backward graph; for
checkpoint, FlopCounterMode's count minus eager's. Step time: median CPU time of
--steps timed steps (``time.thread_time`` with one intra-op thread, so other processes
on this shared machine do not count), as a ratio to the same family's unbudgeted run,
measured in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch.fx.graph import _BoxedCodeGen
from torch.utils.flop_counter import FlopCounterMode

import memopt
from memopt.analysis.cost import device_model, node_cost
from memopt.testing.measure import measure_peak

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import PUBLIC, build, compile_memopt  # noqa: E402

BUDGETS = (1.0, 0.75, 0.5, 0.3)
EQUAL_PEAK_TOLERANCE = 0.005  # "equal peak": memopt's budget is torch's measured peak + 0.5%
BATCH = {"gpt": 32, "transformer_block": 64, "mlp": 1024, "cnn_bn": 64}


@dataclass
class Row:
    model: str
    method: str
    budget: str
    measured: int
    estimated: int | None
    flops: int
    time_ratio: float
    grads_exact: str = "-"


def _grads(model: nn.Module, run: Callable[[], Any]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    run()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    if a.keys() != b.keys():
        return "no"
    return "yes" if all(torch.equal(a[k], b[k]) for k in a) else "no"


_last_grads: dict[str, dict[str, torch.Tensor]] = {}


def _baseline_bytes(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers(), *inputs]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _recompute_flops(forward: torch.fx.GraphModule, backward: torch.fx.GraphModule) -> int:
    fw_names = {n.name for n in forward.graph.nodes if n.op == "call_function"}
    device = device_model(torch.device("cpu"))
    return sum(node_cost(n, device).flops for n in backward.graph.nodes if n.name in fw_names)


def _median_step(step: Callable[[], Any], model: nn.Module, steps: int) -> float:
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        start = time.thread_time()
        step()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def _measure(model: nn.Module, step: Callable[[], Any], steps: int) -> tuple[int, float]:
    for _ in range(2):  # compile, and recompile if the first call changed guarded state
        model.zero_grad(set_to_none=True)
        step()
    model.zero_grad(set_to_none=True)
    peak = measure_peak(step).peak_growth_bytes
    return peak, _median_step(step, model, steps)


def run_memopt(name: str, batch: int, budget: float | str | None, steps: int) -> tuple[int, int, int, float]:
    model, inputs, compiled = compile_memopt(name, batch, budget, "eager")
    with memopt.record() as explanation, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)
        growth, seconds = _measure(model, lambda: compiled(*inputs).backward(), steps)
        grads = _grads(model, lambda: compiled(*inputs).backward())
    flops = sum(_recompute_flops(r.step.forward, r.step.backward) for r in explanation.regions if r.step and r.step.backward)
    _last_grads["value"] = grads
    return growth + _baseline_bytes(model, inputs), explanation.estimated_peak_bytes, flops, seconds


def run_torch(name: str, batch: int, budget: float, steps: int) -> tuple[int, int, float]:
    torch._dynamo.reset()
    model, inputs = build(name, batch)
    graphs: list[tuple[str, torch.fx.GraphModule]] = []

    def capture(kind: str) -> Callable[..., Any]:
        def compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            graphs.append((kind, gm))
            gm.graph.set_codegen(_BoxedCodeGen())
            gm.recompile()
            forward = gm.forward

            def run(args: list[Any]) -> Any:
                return forward(args)

            run._boxed_call = True  # type: ignore[attr-defined]
            return run

        return compiler

    backend = aot_autograd(
        fw_compiler=capture("forward"), bw_compiler=capture("backward"),
        partition_fn=min_cut_rematerialization_partition, keep_inference_input_mutations=True,
    )  # fmt: skip
    compiled = torch.compile(model, backend=backend)
    with torch._functorch.config.patch(activation_memory_budget=budget):
        growth, seconds = _measure(model, lambda: compiled(*inputs).backward(), steps)
        _last_grads["value"] = _grads(model, lambda: compiled(*inputs).backward())
    fws = [g for k, g in graphs if k == "forward"]
    bws = [g for k, g in graphs if k == "backward"]
    flops = sum(_recompute_flops(f, b) for f, b in zip(fws, reversed(bws)))
    return growth + _baseline_bytes(model, inputs), flops, seconds


def _enable_checkpointing(name: str, model: nn.Module) -> bool:
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "gradient_checkpointing_enable"):
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return True
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return False
    for block in blocks:
        forward = block.forward
        block.forward = lambda x, f=forward: torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False)
    return True


def run_eager(name: str, batch: int, steps: int, checkpoint: bool) -> tuple[int, int, float] | None:
    model, inputs = build(name, batch)
    if checkpoint and not _enable_checkpointing(name, model):
        return None
    growth, seconds = _measure(model, lambda: model(*inputs).backward(), steps)
    counter = FlopCounterMode(display=False)
    with counter:
        model(*inputs).backward()
    return growth + _baseline_bytes(model, inputs), counter.get_total_flops(), seconds


def benchmark(name: str, steps: int) -> list[Row]:
    batch = BATCH.get(name, 16)
    rows: list[Row] = []
    base_peak, base_est, _, base_t = run_memopt(name, batch, None, steps)
    reference = _last_grads["value"]
    rows.append(Row(name, "memopt", "none", base_peak, base_est, 0, 1.0, "yes"))
    for budget in [*BUDGETS, "min"]:
        b: float | str = "1KiB" if budget == "min" else budget
        peak, est, flops, t = run_memopt(name, batch, b, steps)
        rows.append(Row(name, "memopt", str(budget), peak, est, flops, t / base_t, _same(reference, _last_grads["value"])))
    torch_base = None
    torch_reference: dict[str, torch.Tensor] | None = None
    torch_peaks = []
    for budget in [*BUDGETS, 0.0]:
        peak, flops, t = run_torch(name, batch, budget, steps)
        torch_base = torch_base or t
        torch_reference = torch_reference or _last_grads["value"]
        same = _same(torch_reference, _last_grads["value"])
        rows.append(Row(name, "torch activation_memory_budget", str(budget), peak, None, flops, t / torch_base, same))
        torch_peaks.append((budget, peak))
    for budget, peak in torch_peaks[1:]:
        m_peak, est, flops, t = run_memopt(name, batch, int(peak * (1 + EQUAL_PEAK_TOLERANCE)), steps)
        same = _same(reference, _last_grads["value"])
        rows.append(Row(name, "memopt at torch's measured peak", f"{peak / 2**20:.2f} MiB (torch {budget})",
                        m_peak, est, flops, t / base_t, same))
    eager = run_eager(name, batch, steps, checkpoint=False)
    ckpt = run_eager(name, batch, steps, checkpoint=True)
    assert eager is not None
    rows.append(Row(name, "eager", "-", eager[0], None, 0, 1.0))
    if ckpt is not None:
        rows.append(Row(name, "eager + checkpoint per block", "-", ckpt[0], None, ckpt[1] - eager[1], ckpt[2] / eager[2]))
    return rows


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["gpt", "transformer_block", "mlp", "cnn_bn", *PUBLIC])
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args()
    print("| model | method | budget | measured peak MiB | estimated peak MiB | recompute GFLOP | step time ratio | grads = unbudgeted |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for name in args.models:
        with contextlib.redirect_stderr(sys.stderr):
            for r in benchmark(name, args.steps):
                print(f"| {r.model} | {r.method} | {r.budget} | {_mib(r.measured)} | {_mib(r.estimated)} | "
                      f"{r.flops / 1e9:.3f} | {r.time_ratio:.2f} | {r.grads_exact} |", flush=True)


if __name__ == "__main__":
    main()
