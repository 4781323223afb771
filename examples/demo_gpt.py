"""Train a small GPT-style model with ``backend="memopt"``, then show what memopt did.

    ./dev.sh demo                      # eager codegen: compiling and planning take the first step, ~30 s
    ./dev.sh demo --budget 0.4         # ask for 40% of the unoptimized peak
    ./dev.sh demo --codegen inductor   # Inductor's C++ codegen (its first step: 1 to 3 minutes on 2 CPU cores)

The task is synthetic (no downloads): the model learns to continue a repeating
token pattern, so the loss visibly falls within a few dozen steps.
"""

from __future__ import annotations

import argparse
import time

import torch

import memopt
from memopt.testing.zoo import GPT, GPTConfig


def pattern_batch(batch: int, seq: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``start, start+stride, ...`` (mod vocab): predictable after a few tokens."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    stride = torch.randint(1, 5, (batch, 1), generator=generator)
    tokens = (start + stride * torch.arange(seq + 1)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


def budget_option(text: str) -> float | str:
    """``--budget`` as ``memory_budget`` takes it: a number up to 1 is a fraction of the
    unoptimized peak (``"0.5"`` -> 0.5), anything else stays a string (``"8MiB"``,
    ``"50%"``, or ``"6000000"``: whole bytes)."""
    try:
        number = float(text)
    except ValueError:
        return text
    return number if number <= 1 else text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codegen", choices=["eager", "inductor"], default="eager")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budget", default="0.5",
                        help="memory_budget: a fraction of the unoptimized peak, or a size like 8MiB ('none' for no budget)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = GPTConfig(vocab=64, context=args.seq, dim=64, heads=4, layers=args.layers)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    options: dict[str, object] = {"codegen": args.codegen}
    if args.budget.lower() != "none":
        options["memory_budget"] = budget_option(args.budget)
    try:
        memopt.MemoptConfig.from_options(options)  # a bad --budget fails here, not inside the compile
    except ValueError as exc:
        parser.error(str(exc))
    compiled = torch.compile(model, backend="memopt", options=options)
    generator = torch.Generator().manual_seed(0)

    print(f"training a {sum(p.numel() for p in model.parameters()):,}-parameter GPT "
          f"with backend='memopt' ({options}) for {args.steps} steps")
    print(f"  compiling forward and backward in the first step ({args.codegen} codegen) ...", flush=True)
    with memopt.record(optimizer=optimizer) as explanation:
        start = time.perf_counter()
        for step in range(args.steps):
            idx, targets = pattern_batch(args.batch, args.seq, config.vocab, generator)
            loss = compiled(idx, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 0:
                print(f"  step   0  loss {loss.item():.3f}  (first step includes compilation: "
                      f"{time.perf_counter() - start:.1f}s)", flush=True)
            elif step % 10 == 9 or step == args.steps - 1:
                print(f"  step {step:3d}  loss {loss.item():.3f}", flush=True)
    print()
    print(explanation.report(top=8))


if __name__ == "__main__":
    main()
