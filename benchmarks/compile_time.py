"""Compile time of ``backend="memopt"`` (codegen="eager") against ``backend="aot_eager"``.

    .venv/bin/python benchmarks/compile_time.py --runs 7

Each run resets Dynamo, then times the first training step (forward + backward, which
includes tracing, partitioning, memopt's pipeline and codegen) on the zoo's GPT model.
Backends alternate run by run so machine noise hits both alike; time is this process's
CPU time (one intra-op thread), so other work on a shared machine does not count. The
table gives medians and the ratio of medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from tabulate import tabulate

from memopt.testing.zoo import GPT, GPTConfig


def first_step_seconds(backend: str, options: dict[str, object] | None, layers: int) -> float:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=layers))
    idx = torch.randint(0, 256, (4, 32))
    kwargs: dict[str, object] = {"backend": backend}
    if options:
        kwargs["options"] = options
    compiled: Callable[..., torch.Tensor] = torch.compile(model, **kwargs)  # type: ignore[arg-type]
    start = time.process_time()
    compiled(idx, idx).backward()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = {
        "aot_eager": ("aot_eager", None),
        "memopt (codegen=eager)": ("memopt", {"codegen": "eager"}),
    }
    first_step_seconds("aot_eager", None, args.layers)  # warm imports and caches
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, (backend, options) in variants.items():
            times[name].append(first_step_seconds(backend, options, args.layers))
    base = statistics.median(times["aot_eager"])
    rows = [
        [name, f"{statistics.median(t):.3f}", f"{min(t):.3f}", f"{statistics.median(t) / base:.2f}x"]
        for name, t in times.items()
    ]
    print(f"GPT ({args.layers} layers), first training step, {args.runs} runs each, alternating")
    print(tabulate(rows, headers=["backend", "median s", "min s", "ratio (median)"]))


if __name__ == "__main__":
    main()
