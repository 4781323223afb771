"""Dequantization error of memopt's block-wise int8 / fp8-e4m3 format (docs/kernels.md).

    PYTHONPATH=. python benchmarks/quantize_error.py [--numel N] [--seed S]

Runs the PyTorch reference (the Triton kernels are bit-identical to it; see
tests/codegen/test_quantize.py) on float32 tensors from a standard normal and from a
heavy-tailed Student-t (2 degrees of freedom), and prints per block size:

* max_err/absmax: the largest |x - x_hat| divided by the absmax of its block (the
  format's bound is 1/254 = 0.00394 for int8 and 16/448 = 0.0357 for e4m3);
* rel_rms: ||x - x_hat|| / ||x|| over the whole tensor.
"""

from __future__ import annotations

import argparse

import torch

from memopt.codegen.quantize_reference import (
    dequantize_blockwise_reference,
    quantize_blockwise_reference,
)

BLOCK_SIZES = (32, 64, 128, 256)
CODE_DTYPES = {"int8": torch.int8, "fp8_e4m3fn": torch.float8_e4m3fn}


def _inputs(numel: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {
        "normal": torch.randn(numel),
        "student_t(2)": torch.distributions.StudentT(2.0).sample((numel,)),
    }


def measure(x: torch.Tensor, block_size: int, dtype: torch.dtype) -> tuple[float, float]:
    """``(max |x - x_hat| / block absmax, ||x - x_hat|| / ||x||)``."""
    codes, scales = quantize_blockwise_reference(x, block_size, dtype)
    x_hat = dequantize_blockwise_reference(codes, scales, x.shape, block_size, torch.float32)
    absmax = (scales * (127.0 if dtype == torch.int8 else 448.0)).repeat_interleave(block_size)
    error = (x - x_hat).abs()
    return (error / absmax[: x.numel()]).max().item(), (error.norm() / x.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"numel={args.numel} seed={args.seed} torch={torch.__version__}")
    print("| input | codes | block | max_err/absmax | rel_rms |")
    print("|---|---|---:|---:|---:|")
    for name, x in _inputs(args.numel, args.seed).items():
        for code_name, dtype in CODE_DTYPES.items():
            for block_size in BLOCK_SIZES:
                worst, rms = measure(x, block_size, dtype)
                print(f"| {name} | {code_name} | {block_size} | {worst:.5f} | {rms:.5f} |")


if __name__ == "__main__":
    main()
