"""Estimated against measured peak growth of one training step.

    .venv/bin/python benchmarks/estimate_accuracy.py                # zoo + public models, eager codegen
    .venv/bin/python benchmarks/estimate_accuracy.py --codegen inductor --models gpt hf_llama

For each model: compile with memopt, run one step to compile, then measure the next
step with `memopt.testing.measure.measure_peak` (profiler allocator events on CPU).
The estimate is ``estimated_peak_bytes - baseline_bytes`` from `memopt.explain`'s
timeline of the same graphs. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys

import torch

import memopt
from memopt.plan.report import format_bytes
from memopt.testing.measure import measure_peak

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import MODELS, build  # noqa: E402

BATCH = {"gpt": 16, "mlp": 256, "cnn_bn": 64, "transformer_block": 64, "graph_break": 256, "inplace_input": 256}


def measure(name: str, codegen: str, batch: int) -> tuple[int, int]:
    torch._dynamo.reset()
    model, inputs = build(name, batch)
    compiled = torch.compile(model, backend="memopt", options={"codegen": codegen})
    with memopt.record() as explanation:
        for _ in range(2):  # compile, and recompile if the first call changed guarded state
            model.zero_grad(set_to_none=True)
            compiled(*inputs).backward()
    model.zero_grad(set_to_none=True)
    measured = measure_peak(lambda: compiled(*inputs).backward())
    timeline = explanation.timeline()
    return timeline.peak_growth_bytes, measured.peak_growth_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--codegen", default="eager", choices=["eager", "inductor"])
    parser.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    args = parser.parse_args()
    print(f"codegen={args.codegen}\n")
    print("| model | batch | estimated growth | measured growth | error |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.models:
        batch = args.batch or BATCH.get(name, 16)
        estimated, measured = measure(name, args.codegen, batch)
        error = (estimated - measured) / measured * 100
        print(f"| {name} | {batch} | {format_bytes(estimated)} | {format_bytes(measured)} | {error:+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
