"""How far one AdamW8bit step moves a parameter element, against AdamW's (one process, CPU).

    PYTHONPATH=. .venv/bin/python benchmarks/adamw8bit_steps.py
    PYTHONPATH=. .venv/bin/python benchmarks/adamw8bit_steps.py --steps 50 --floors 1e-7 0

Hugging Face Llama at its small test config (`memopt.testing.hf`: 2 layers, hidden 64,
vocabulary 512, defaults otherwise: train mode), random init, batches of ``--batch`` x
``--seq`` random tokens (a new batch each step, so most embedding rows are absent from
any one batch and get gradient 0), lr 1e-3, eager. AdamW and AdamW8bit start from the
same weights and see the same batches; AdamW8bit runs once per ``--floors`` value: the
second-moment code's entry 0 (`memopt.codegen.adam8bit.SECOND_MOMENT_FLOOR`; ``0``
gives the code with 0 that AdamW8bit had before, bitsandbytes' choice too).

Columns: "largest step / lr" is the largest ``|p_after - p_before| / lr`` over every
element and step (AdamW's is at most about 1 after its first steps: ``m_hat /
sqrt(v_hat)``); "elements > 10 lr" counts (element, step) pairs that moved by more than
10 lr; "max rel to AdamW" is ``max |p - p_adamw| / max |p_adamw|`` over the parameters
after the last step; "loss" the training loss at the last step.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from tabulate import tabulate

import memopt.codegen.adam8bit as adam8bit
from memopt.optim import AdamW8bit
from memopt.testing.hf import build, make_inputs

LR = 1e-3


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, args: argparse.Namespace) -> dict[str, Any]:
    """``args.steps`` steps; the largest per-element move and the count above 10 lr."""
    largest, above, loss = 0.0, 0, float("nan")
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(args.steps):
        torch.manual_seed(100 + step)  # the same batches (and dropout) for every optimizer
        data = make_inputs("llama", model.config, args.batch, args.seq)
        before = [p.detach().clone() for p in params]
        out = model(**data)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        for p, b in zip(params, before):
            moved = (p.detach() - b).abs() / LR
            largest = max(largest, moved.max().item())
            above += int((moved > 10).sum())
    return {"largest": largest, "above": above, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--block", type=int, default=256, help="AdamW8bit block_size")
    parser.add_argument("--floors", type=float, nargs="+", default=[adam8bit.SECOND_MOMENT_FLOOR, 0.0])
    args = parser.parse_args()
    torch.set_num_threads(1)  # deterministic sums: the same gradients in every run
    base, _ = build("llama", batch=1, seq=args.seq, seed=0)
    runs: list[tuple[str, torch.nn.Module, dict[str, Any]]] = []
    model = copy.deepcopy(base)
    runs.append(("AdamW", model, _train(model, torch.optim.AdamW(model.parameters(), lr=LR), args)))
    default_floor = adam8bit.SECOND_MOMENT_FLOOR
    for floor in args.floors:
        adam8bit.SECOND_MOMENT_FLOOR = floor  # read when the optimizer builds its code tables
        try:
            model = copy.deepcopy(base)
            opt = AdamW8bit(model.parameters(), lr=LR, block_size=args.block)
        finally:
            adam8bit.SECOND_MOMENT_FLOOR = default_floor
        runs.append((f"AdamW8bit, second-moment floor {floor:g}", model, _train(model, opt, args)))
    reference = list(runs[0][1].parameters())
    rows = []
    for name, model, r in runs:
        rel = max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(model.parameters(), reference))
        rows.append([name, f"{r['largest']:.3g}", r["above"], f"{rel:.2e}", f"{r['loss']:.4f}"])
    print(f"Llama (small config), {args.steps} steps of {args.batch} x {args.seq} random tokens, lr {LR:g}, block {args.block}\n")
    print(tabulate(rows, headers=["optimizer", "largest step / lr", "elements > 10 lr", "max rel to AdamW", "loss"], tablefmt="github"))


if __name__ == "__main__":
    main()
