"""Planner solve time against graph size: Llama-style models of growing depth.

    .venv/bin/python benchmarks/planner_time.py --layers 4 16 32

Models are built and compiled on fake tensors (nothing real is allocated); the table
gives joint-graph nodes, segments, and the planner's wall time (problem construction:
three exact splits and timelines; MILP solves; verification) at a 50% budget.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import memopt


def run(layers: int) -> tuple[int, int, float, float, float, str]:
    import transformers as T

    torch._dynamo.reset()
    cfg = T.LlamaConfig(num_hidden_layers=layers, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                        intermediate_size=688, vocab_size=4096, max_position_embeddings=512, use_cache=False)
    with FakeTensorMode():
        model = T.LlamaForCausalLM(cfg)
        ids = torch.randint(0, 4096, (4, 256))
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
            explanation = memopt.explain(lambda i: model(input_ids=i, labels=i).loss, ids,
                                         options={"codegen": "eager", "memory_budget": 0.5})
        finally:
            planner.plan_remat = original
        total = time.perf_counter() - start
    plan = explanation.regions[0].plan
    return plan.solver["joint_nodes"], plan.solver["segments"], plan.solver["seconds"], cpu[0], total, plan.solver["method"]


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
