"""Run memopt's Triton quantize kernels under Triton's interpreter, in their own process.

test_quantize.py starts this script with ``TRITON_INTERPRET=1`` in the environment:
triton reads the variable when ``@triton.jit`` decorates a kernel (at import), so a
pytest process that imported the kernels without it cannot switch them to the
interpreter. Run by hand to debug a kernel::

    TRITON_INTERPRET=1 PYTHONPATH=. python tests/codegen/quantize_kernel_worker.py IN OUT

``IN`` (torch.save): ``{name: {"x", "block_size", "dtype", "codes", "scales"}}`` where
codes/scales are the reference's, the dequantize kernel's input. ``OUT``:
``{name: {"codes", "scales", "dequantized": {out_dtype: tensor}}}``.
"""

from __future__ import annotations

import os
import sys

import torch

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def run_cases(cases: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """Each case's kernel outputs: quantized ``x``, and the reference codes dequantized."""
    from memopt.codegen.quantize_triton import (
        dequantize_blockwise_triton,
        quantize_blockwise_triton,
    )

    results: dict[str, dict[str, object]] = {}
    for name, case in cases.items():
        x, block_size = case["x"], case["block_size"]
        codes, scales = quantize_blockwise_triton(x, block_size, case["dtype"])
        dequantized = {
            dtype: dequantize_blockwise_triton(
                case["codes"], case["scales"], x.shape, block_size, dtype
            )
            for dtype in OUT_DTYPES
        }
        results[name] = {"codes": codes, "scales": scales, "dequantized": dequantized}
    return results


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1" or len(argv) != 3:
        print(f"usage: TRITON_INTERPRET=1 python {argv[0]} IN OUT", file=sys.stderr)
        return 2
    torch.save(run_cases(torch.load(argv[1])), argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
