"""Peak memory per micro-batch under gradient accumulation (docs/memory.md, "Gradient
accumulation").

A default-config Hugging Face model (train mode, dropout on, keyword call, ``.loss``)
runs ``--micro-batches`` forward+backward calls per ``opt.step()``, for two optimizer
steps. Each micro-batch's peak is measured (`memopt.testing.measure.measure_peak`, the
allocator's view) as growth over the bytes live at its start (parameters, buffers,
inputs, ``.grad``, optimizer state), and printed absolute beside memopt's estimate and
budget (`memopt.record`). The second optimizer step is the steady state: its first
micro-batch starts without ``.grad``, the later ones with it.

    PYTHONPATH=. python benchmarks/grad_accumulation.py --family llama --budget 15MiB
    PYTHONPATH=. python benchmarks/grad_accumulation.py --family gpt2 --budget none
    PYTHONPATH=. python benchmarks/grad_accumulation.py --family llama --budget eager   # no memopt
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import warnings
from typing import Any

import torch

import memopt
from memopt.testing.hf import build
from memopt.testing.measure import measure_peak

SIZES = {
    "llama": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=344, vocab_size=1000),
    "gpt2": dict(n_layer=2, n_embd=128, vocab_size=1000),
}
MiB = 2**20


def _bytes(tensors: list[Any]) -> int:
    """Bytes of the distinct storages among ``tensors`` (None skipped)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if isinstance(t, torch.Tensor)}.values())  # fmt: skip


def _budget(text: str) -> int | float | str:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text  # a size string: memopt parses it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(SIZES), default="llama")
    parser.add_argument("--budget", default="15MiB",
                        help="memory_budget (bytes, a size string or a fraction), 'none', or 'eager' (no memopt)")
    parser.add_argument("--micro-batches", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, inputs = build(args.family, batch=4, seq=128, **SIZES[args.family])
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    if args.budget == "eager":
        fn: Any = model
    else:
        options: dict[str, Any] = {"codegen": "eager"}
        if args.budget != "none":
            options["memory_budget"] = _budget(args.budget)
        fn = torch.compile(model, backend="memopt", options=options)

    def step() -> None:
        fn(**inputs).loss.backward()

    print(f"{args.family}, budget {args.budget}: absolute peak per micro-batch (MiB)")
    print("| optimizer step | micro-batch | .grad at start | peak | memopt estimate | budget |")
    print("|---|--:|--:|--:|--:|--:|")
    recording = memopt.record() if args.budget != "eager" else contextlib.nullcontext()
    with warnings.catch_warnings(), recording as explanation:
        warnings.simplefilter("always")
        for optimizer_step in (1, 2):
            for micro_batch in range(1, args.micro_batches + 1):
                gc.collect()
                start = _bytes(params) + _bytes(list(model.buffers())) + _bytes(list(inputs.values()))
                grads = _bytes([p.grad for p in params])
                start += grads + _bytes([v for s in opt.state.values() for v in s.values()])
                peak = start + measure_peak(step).peak_growth_bytes
                estimate = budget = "-"
                if explanation is not None:
                    figures = explanation.to_dict()
                    estimate = f"{figures['estimated_peak_bytes'] / MiB:.2f}"
                    if figures["budget_bytes"]:
                        budget = f"{figures['budget_bytes'] / MiB:.2f}"
                print(f"| {optimizer_step} | {micro_batch} | {grads / MiB:.2f} | {peak / MiB:.2f} | {estimate} | {budget} |")
            opt.step()
            opt.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
