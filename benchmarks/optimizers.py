"""Kernel accuracy of memopt's fused optimizer steps (Triton against the PyTorch reference),
and, with ``--side-rules``, which side a low-rank optimizer should project on.

Kernels: on a CUDA machine the compiled kernels run on the GPU; elsewhere the script switches on
Triton's interpreter (``TRITON_INTERPRET=1``) and runs them on CPU at small shapes. For
each case it prints the max abs error of every fp32 output after a few steps, and for the
8-bit kernel how many codes differ (and by at most how much).

    python benchmarks/optimizers.py
    python benchmarks/optimizers.py --steps 10

``--side-rules``: a small Llama LM (``transformers.LlamaConfig`` defaults except the sizes,
random init from ``--seed``, train mode) trains ``--steps`` steps on one fixed batch of
``--batch`` x ``--seq-len`` random tokens (``labels=input_ids``) with AdamW, and with
`GaLoreAdamW` and `SubspaceAdamW` under ``proj_type="std"`` (GaLore's side rule) and
``"min_state"`` (the side with the least state), at each ``--ranks``. The low-rank
update applies to every 2-D weight but the token embedding (attention, MLP, output head:
the selection of docs/optimizers.md's example; ``--full-rank-head`` leaves the head to
AdamW too, as GaLore's training script does); the embedding and the norms get plain AdamW.
Every optimizer keeps its defaults except ``lr``, ``rank`` and ``update_proj_gap``. The
table shows the loss on the batch after the last step and the optimizer-state bytes.

    python benchmarks/optimizers.py --side-rules --steps 40
"""

from __future__ import annotations

import argparse
import os
import sys
import copy
from collections.abc import Sequence

import torch
from tabulate import tabulate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from memopt.codegen.adam8bit import adam8bit_step, code_tables  # noqa: E402
from memopt.codegen.lowrank_adam import lowrank_adam_step  # noqa: E402
from memopt.optim import GaLoreAdamW, SubspaceAdamW, optimizer_state_bytes  # noqa: E402

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


def llama(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
    )  # fmt: skip
    return LlamaForCausalLM(config).train()


def lowrank_matrices(model: torch.nn.Module, full_rank_head: bool) -> list[torch.nn.Parameter]:
    """The parameters that get the low-rank update: the 2-D ones but the token embedding
    (attention, MLP and the output head), as in docs/optimizers.md's example; without the
    head if ``full_rank_head``."""
    skip = ("embed", "lm_head") if full_rank_head else ("embed",)
    return [p for n, p in model.named_parameters() if p.dim() == 2 and not any(s in n for s in skip)]


def side_rule_optimizer(name: str, proj_type: str, rank: int, model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=args.lr)
    matrices = lowrank_matrices(model, args.full_rank_head)
    others = [p for p in model.parameters() if all(p is not m for m in matrices)]
    groups = [{"params": matrices}, {"params": others, "lowrank": False}]
    cls = GaLoreAdamW if name == "GaLoreAdamW" else SubspaceAdamW
    return cls(groups, lr=args.lr, rank=rank, update_proj_gap=args.gap, proj_type=proj_type)


def side_rule_row(name: str, proj_type: str, rank: int, base: torch.nn.Module, tokens: torch.Tensor, args: argparse.Namespace) -> list[object]:
    model = copy.deepcopy(base)
    opt = side_rule_optimizer(name, proj_type, rank, model, args)
    for _ in range(args.steps):
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss = model(input_ids=tokens, labels=tokens).loss.item()
    states = [opt.state[p].values() for p in lowrank_matrices(model, args.full_rank_head)]
    matrix_bytes = sum(t.numel() * t.element_size() for state in states for t in state if isinstance(t, torch.Tensor))
    return [name, proj_type, rank, optimizer_state_bytes(opt), matrix_bytes, loss]


def side_rules(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    base = llama(args)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        initial = base(input_ids=tokens, labels=tokens).loss.item()
    rows = [side_rule_row("AdamW", "-", "-", base, tokens, args)]
    for rank in args.ranks:
        for name in ("GaLoreAdamW", "SubspaceAdamW"):
            rows += [side_rule_row(name, proj_type, rank, base, tokens, args) for proj_type in ("std", "min_state")]
    adamw_bytes, adamw_matrix_bytes = rows[0][3], rows[0][4]
    rows = [
        row[:4] + [f"{row[3] / adamw_bytes:.1%}", row[4], f"{row[4] / adamw_matrix_bytes:.1%}", f"{row[5]:.3f}"]
        for row in rows
    ]
    headers = ["optimizer", "proj_type", "rank", "state bytes", "vs AdamW", "matrices' state", "vs AdamW", "final loss"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    parameters = sum(p.numel() for p in base.parameters())
    print(
        f"\ninitial loss {initial:.3f}; Llama {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, {args.heads} heads, vocab {args.vocab}, {parameters} parameters; "
        f"{args.steps} steps on one batch of {args.batch} x {args.seq_len} tokens; lr {args.lr}, "
        f"update_proj_gap {args.gap}, {args.threads} thread(s), output head "
        f"{'full rank' if args.full_rank_head else 'low rank'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--side-rules", action="store_true", help="compare the low-rank side rules on a small Llama")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32])
    side_rule_defaults = dict(
        layers=2, hidden=256, intermediate=688, heads=4, vocab=2048, batch=4, seq_len=64, lr=3e-3,
        gap=10, seed=0, threads=1,
    )  # fmt: skip
    for name, default in side_rule_defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help="with --side-rules (default %(default)s)")
    parser.add_argument("--full-rank-head", action="store_true", help="--side-rules: plain AdamW for the output head")
    args = parser.parse_args(argv)
    if args.side_rules:
        side_rules(args)
        return 0
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
