"""Planner solve time against graph size: Llama-style models of growing depth.

    .venv/bin/python benchmarks/planner_time.py --layers 4 16 32

Models are built and compiled on fake tensors (nothing real is allocated); the table
gives joint-graph nodes, segments, and the planner's wall time (problem construction:
three exact splits and timelines; MILP solves; verification) at a 50% budget.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import memopt


def timed_plan(loss: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> tuple[Any, float, float]:
    """``memopt.explain`` of ``loss(ids)`` at a 50% budget (eager codegen): the first
    region's plan, the planner's CPU seconds (`plan_remat`) and the whole compile's
    wall seconds."""
    import memopt.plan.planner as planner

    original = planner.plan_remat
    cpu: list[float] = []

    def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
        start_cpu = time.process_time()
        result = original(*args, **kwargs)
        cpu.append(time.process_time() - start_cpu)
        return result

    planner.plan_remat = timed
    start = time.perf_counter()
    try:
        explanation = memopt.explain(loss, ids, options={"codegen": "eager", "memory_budget": 0.5})
    finally:
        planner.plan_remat = original
    return explanation.regions[0].plan, cpu[0], time.perf_counter() - start


def run(layers: int) -> tuple[int, int, float, float, float, str]:
    import transformers as T

    torch._dynamo.reset()
    cfg = T.LlamaConfig(num_hidden_layers=layers, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                        intermediate_size=688, vocab_size=4096, max_position_embeddings=512, use_cache=False)
    with FakeTensorMode():
        model = T.LlamaForCausalLM(cfg)
        ids = torch.randint(0, 4096, (4, 256))
        plan, plan_cpu, total = timed_plan(lambda i: model(input_ids=i, labels=i).loss, ids)
    return plan.solver["joint_nodes"], plan.solver["segments"], plan.solver["seconds"], plan_cpu, total, plan.solver["method"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="*", default=[4, 16, 32])
    args = parser.parse_args()
    print("| layers | joint-graph nodes | segments | planner wall s | planner CPU s | whole compile wall s | solver |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for layers in args.layers:
        nodes, segments, plan_s, plan_cpu, total, method = run(layers)
        print(f"| {layers} | {nodes} | {segments} | {plan_s:.2f} | {plan_cpu:.2f} | {total:.1f} | {method} |", flush=True)


if __name__ == "__main__":
    main()
