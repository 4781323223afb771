"""Estimated peak before and after the memory-aware scheduling pass.

    .venv/bin/python benchmarks/schedule.py [--models gpt hf_llama ...]
"""

from __future__ import annotations

import argparse
import sys

import torch

import memopt
from memopt.units import format_bytes

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from estimate_accuracy import BATCH  # noqa: E402
from models import MODELS, build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    print("| model | batch | peak before | peak after | change |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.models:
        torch._dynamo.reset()
        batch = BATCH.get(name, 16)
        model, inputs = build(name, batch)
        explanation = memopt.explain(model, *inputs, options={"codegen": "eager"})
        before = explanation.timeline(optimized=False).peak_bytes
        after = explanation.timeline().peak_bytes
        print(f"| {name} | {batch} | {format_bytes(before)} | {format_bytes(after)} | {(after - before) / before * 100:+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
