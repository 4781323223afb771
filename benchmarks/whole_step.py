"""The whole training step with the optimizer update inside backward (issue 17, row 1).

    python benchmarks/whole_step.py [--optimizers AdamW AdamW8bit GaLoreAdamW] [--vocab 2048 32000]

A parameter-dominated Llama (HF ``LlamaForCausalLM``, memopt's "medium" test config
with 4 layers and hidden 512, intermediate 1376, 8 heads, 4 key/value heads; the
vocabulary as given), batch 1 x 64, fp32, CPU, eager codegen. Each row is one fresh
process (`memopt.testing.measure.measure_in_fresh_process`: glibc's malloc thresholds
fixed, heap trimmed before each step) training with the usual loop::

    out = compiled(**inputs); out.loss.backward(); opt.step()   # zero_grad before

once with a separate ``opt.step()`` and once with ``optimizer_in_backward=opt``: 6
steps, 3 of them warm-up, then one measured step (the 10th: every parameter has its
optimizer state before it). Columns:

* ``growth``: the measured step's peak growth over what was live at its start
  (parameters, optimizer state, inputs), allocator's view and OS view (resident set);
* ``saved / gradients``: (separate-step growth - in-backward growth) / gradient bytes
  (issue 17 asks for at least 0.70 in the OS view);
* ``equal``: the parameters after the 10 steps are bitwise equal (SHA-256 of their
  bytes) between the two runs.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Any

import torch

from memopt.units import format_bytes
from memopt.testing.fresh_process import Workload
from memopt.testing.hf import build
from memopt.testing.measure import measure_in_fresh_process

STEPS = 10
WARMUP = 3
BEFORE = STEPS - WARMUP - 1  # steps run by the factory (the first compiles)


def _optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    from memopt.optim import AdamW8bit, GaLoreAdamW

    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-4)
    if name == "AdamW8bit":
        return AdamW8bit(params, lr=1e-4)
    if name == "GaLoreAdamW":
        return GaLoreAdamW(params, lr=1e-4, rank=64, update_proj_gap=200)
    raise ValueError(f"unknown optimizer {name!r}")


def workload(optimizer: str, in_backward: bool, vocab: int) -> Workload:
    """Fresh-process factory: the model, its optimizer, ``BEFORE`` training steps, then
    the step to measure; info: gradient bytes and the parameters' digest after it."""
    model, inputs = build(
        "llama", batch=1, seq=64, size="medium", hidden_size=512, intermediate_size=1376,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab,
    )  # fmt: skip
    opt = _optimizer(optimizer, model.parameters())
    options: dict[str, Any] = {"codegen": "eager"}
    if in_backward:
        options["optimizer_in_backward"] = opt
    compiled = torch.compile(model, backend="memopt", options=options)

    def step() -> None:
        compiled(**inputs).loss.backward()
        opt.step()

    for _ in range(BEFORE):
        opt.zero_grad(set_to_none=True)
        step()

    def info() -> dict[str, Any]:
        digest = hashlib.sha256()
        for p in model.parameters():
            digest.update(p.detach().numpy().tobytes())
        return {
            "gradient_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
            "largest_gradient": max(p.numel() * p.element_size() for p in model.parameters()),
            "digest": digest.hexdigest(),
        }

    return Workload(step=step, prepare=lambda: opt.zero_grad(set_to_none=True), info=info)


def _measure(optimizer: str, in_backward: bool, vocab: int) -> tuple[dict[str, Any], Any]:
    kwargs = {"optimizer": optimizer, "in_backward": in_backward, "vocab": vocab}
    result = measure_in_fresh_process(f"{__file__}:workload", kwargs=kwargs, warmup=WARMUP)
    print(f"  {optimizer} vocab={vocab} in_backward={in_backward}: done", file=sys.stderr, flush=True)
    return result.info, result.last


def _fmt(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", default=["AdamW", "AdamW8bit", "GaLoreAdamW"])
    parser.add_argument("--vocab", nargs="+", type=int, default=[2048])
    args = parser.parse_args(argv)
    print("| optimizer | vocab | gradients (largest) | growth, separate step (alloc / OS) "
          "| growth, in backward (alloc / OS) | saved / gradients (alloc / OS) | equal after 10 steps |")
    print("|---|--:|--:|--:|--:|--:|---|")
    for vocab in args.vocab:
        for name in args.optimizers:
            sep_info, sep = _measure(name, False, vocab)
            inb_info, inb = _measure(name, True, vocab)
            grads = sep_info["gradient_bytes"]
            alloc = (sep.peak_growth_bytes - inb.peak_growth_bytes) / grads
            os_ratio = "-"
            if sep.os_peak_growth_bytes is not None and inb.os_peak_growth_bytes is not None:
                os_ratio = f"{(sep.os_peak_growth_bytes - inb.os_peak_growth_bytes) / grads:.2f}"
            print(
                f"| {name} | {vocab} | {format_bytes(grads)} ({format_bytes(sep_info['largest_gradient'])}) "
                f"| {_fmt(sep.peak_growth_bytes)} / {_fmt(sep.os_peak_growth_bytes)} "
                f"| {_fmt(inb.peak_growth_bytes)} / {_fmt(inb.os_peak_growth_bytes)} "
                f"| {alloc:.2f} / {os_ratio} | {'yes' if sep_info['digest'] == inb_info['digest'] else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
