"""Kernel accuracy of memopt's fused optimizer steps: Triton against the PyTorch reference.

On a CUDA machine the compiled kernels run on the GPU; elsewhere the script switches on
Triton's interpreter (``TRITON_INTERPRET=1``) and runs them on CPU at small shapes. For
each case it prints the max abs error of every fp32 output after a few steps, and for the
8-bit kernel how many codes differ (and by at most how much).

    python benchmarks/optimizers.py
    python benchmarks/optimizers.py --steps 10
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
from tabulate import tabulate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from memopt.codegen.adam8bit import adam8bit_step, code_tables  # noqa: E402
from memopt.codegen.lowrank_adam import lowrank_adam_step  # noqa: E402

LOWRANK_CASES = [(32, 16, 4), (40, 24, 5), (16, 48, 3), (64, 64, 8)] if DEVICE == "cpu" else [(4096, 1024, 128), (1024, 4096, 256)]
EIGHT_BIT_CASES = [(1000, 64), (4096, 256), (100, 16)] if DEVICE == "cpu" else [(10_000_000, 256), (1_000_003, 2048)]


def coefficients(step: int, scale: float = 1.0) -> dict[str, float]:
    lr, weight_decay, beta1, beta2 = 1e-2, 0.1, 0.9, 0.999
    return dict(
        beta1=beta1, beta2=beta2, eps=1e-8, step_size=lr * scale / (1 - beta1**step),
        bias_correction2_sqrt=(1 - beta2**step) ** 0.5, decay=1 - lr * weight_decay,
    )  # fmt: skip


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def lowrank_row(m: int, n: int, r: int, steps: int) -> list[object]:
    g = torch.Generator().manual_seed(m * n + r)
    ops = [torch.randn(m, n, generator=g), torch.randn(r, n, generator=g),
           torch.linalg.qr(torch.randn(m, r, generator=g))[0], torch.zeros(r, n), torch.zeros(r, n)]  # fmt: skip
    ref = [t.to(DEVICE) for t in ops]
    tri = [t.clone() for t in ref]
    tile = (16, 16) if DEVICE == "cpu" else (64, 64)
    for step in range(1, steps + 1):
        lowrank_adam_step(*ref, kernel="torch", **coefficients(step, scale=0.25))
        lowrank_adam_step(*tri, kernel="triton", tile=tile, **coefficients(step, scale=0.25))
    return [f"{m}x{n} r{r}", max_error(ref[0], tri[0]), max_error(ref[3], tri[3]), max_error(ref[4], tri[4])]


def eight_bit_row(numel: int, block: int, steps: int) -> list[object]:
    g = torch.Generator().manual_seed(numel)
    blocks = -(-numel // block)
    init = [torch.randn(numel, generator=g), torch.full((numel,), 127, dtype=torch.uint8), torch.zeros(blocks),
            torch.zeros(numel, dtype=torch.uint8), torch.zeros(blocks)]  # fmt: skip
    ref = [t.to(DEVICE) for t in init]
    tri = [t.clone() for t in ref]
    tables = code_tables(DEVICE)
    for step in range(1, steps + 1):
        grad = torch.randn(numel, generator=g).to(DEVICE)
        for state, kernel in ((ref, "torch"), (tri, "triton")):
            adam8bit_step(state[0], grad, *state[1:], tables=tables, block_size=block, kernel=kernel, **coefficients(step))
    code_diff = torch.cat([(ref[i].int() - tri[i].int()).abs() for i in (1, 3)])
    return [f"{numel} / block {block}", max_error(ref[0], tri[0]), max(max_error(ref[2], tri[2]), max_error(ref[4], tri[4])),
            int(code_diff.bool().sum()), int(code_diff.max())]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    mode = "CUDA" if DEVICE == "cuda" else "CPU, Triton interpreter"
    print(f"lowrank_adam_step, Triton vs reference, {args.steps} steps, fp32 ({mode})")
    rows = [lowrank_row(m, n, r, args.steps) for m, n, r in LOWRANK_CASES]
    print(tabulate(rows, headers=["shape", "max |dW|", "max |dM|", "max |dV|"], tablefmt="github", floatfmt=".2e"))
    print(f"\nadam8bit_step, Triton vs reference, {args.steps} steps ({mode})")
    rows = [eight_bit_row(numel, block, args.steps) for numel, block in EIGHT_BIT_CASES]
    headers = ["elements", "max |dparam|", "max |dscale|", "codes differing", "max code diff"]
    print(tabulate(rows, headers=headers, tablefmt="github", floatfmt=".2e"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
