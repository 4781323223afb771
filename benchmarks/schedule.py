"""Estimated peak of one training step with the memory-aware scheduling pass off and on.

    .venv/bin/python benchmarks/schedule.py [--models gpt hf_llama ...]

Each model is compiled twice with ``codegen="eager"`` and no budget: once with
``disable_passes=["schedule"]`` and once with every pass, so the change is the
pass's own (the other passes run in both).
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


def step_peak(name: str, batch: int, disable_passes: list[str]) -> int:
    """The estimated peak of ``name``'s step at ``batch`` after memopt's passes."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, inputs = build(name, batch)
    options = {"codegen": "eager", "disable_passes": disable_passes}
    return memopt.explain(model, *inputs, options=options).timeline().peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    print("| model | batch | schedule off | schedule on | change |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.models:
        batch = BATCH.get(name, 16)
        before = step_peak(name, batch, ["schedule"])
        after = step_peak(name, batch, [])
        print(f"| {name} | {batch} | {format_bytes(before)} | {format_bytes(after)} | {(after - before) / before * 100:+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
