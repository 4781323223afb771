"""Train a small GPT-style LM with AdamW and each of memopt's optimizers, side by side.

The task is synthetic and needs no download: every sequence follows a fixed random
second-order rule ``x[t] = T[x[t-2], x[t-1]]`` (a V x V table drawn from the seed), except
that each token is replaced by a uniformly random one with probability ``--noise``. The
best achievable loss is the entropy of that noise, printed as the "floor". Predicting the
rule needs attention (to the two previous tokens) and the MLP (to look up the table).

All optimizers start from the same weights and see the same batches; their steps are
interleaved (step i of every optimizer before step i + 1 of any), so machine noise hits
them alike, and each step's wall time (forward, backward, optimizer step) is recorded.
The table shows optimizer-state bytes (measured, and predicted from the documented
formulas), the final evaluation loss on held-out batches, and the median step time as a
ratio to AdamW's.

    python examples/train_optimizers.py                 # defaults: about a minute on one CPU core
    python examples/train_optimizers.py --steps 5 --d-model 32 --layers 1   # smoke test
    python examples/train_optimizers.py --check         # exit 1 unless the acceptance holds
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from memopt.optim import AdamW8bit, GaLoreAdamW, MeZO, SubspaceAdamW, optimizer_state_bytes

OPTIMIZERS = ("adamw", "galore", "subspace", "adamw8bit", "mezo")


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, seq, 3, self.heads, dim // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, dim))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyGPT(nn.Module):
    """Token and position embeddings, ``layers`` blocks, final norm, untied output head."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@dataclass
class Task:
    """Second-order rule with noise; batch ``i`` is a pure function of (seed, i)."""

    vocab: int
    seq_len: int
    batch_size: int
    noise: float
    seed: int
    table: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self.table = torch.randint(0, self.vocab, (self.vocab, self.vocab), generator=generator)

    def batch(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        shape = (self.batch_size, self.seq_len + 1)
        random_tokens = torch.randint(0, self.vocab, shape, generator=generator)
        keep_rule = torch.rand(shape, generator=generator) >= self.noise
        tokens = random_tokens.clone()
        for t in range(2, shape[1]):
            ruled = self.table[tokens[:, t - 2], tokens[:, t - 1]]
            tokens[:, t] = torch.where(keep_rule[:, t], ruled, random_tokens[:, t])
        return tokens

    def floor(self) -> float:
        """Entropy (nats) of the next token given the two before it: the best loss on
        positions >= 2."""
        p_rule = 1 - self.noise + self.noise / self.vocab
        p_other = self.noise / self.vocab
        return -(p_rule * math.log(p_rule) + (self.vocab - 1) * p_other * math.log(p_other))


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy on positions 2.. (the first two tokens are pure noise)."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits[:, 1:].reshape(-1, logits.shape[-1]), tokens[:, 2:].reshape(-1))


def lowrank_groups(model: TinyGPT) -> list[dict]:
    """Transformer-block matrices get the low-rank update; embeddings, head, norms and
    biases plain AdamW (as in the GaLore paper)."""
    matrices = [p for n, p in model.blocks.named_parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if all(p is not m for m in matrices)]
    return [{"params": matrices}, {"params": others, "lowrank": False}]


def make_optimizer(name: str, model: TinyGPT, args: argparse.Namespace) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if name == "galore":
        return GaLoreAdamW(
            lowrank_groups(model), lr=args.lowrank_lr, weight_decay=args.weight_decay, rank=args.rank,
            update_proj_gap=args.gap, scale=args.scale, proj_type=args.proj_type,
        )  # fmt: skip
    if name == "subspace":
        return SubspaceAdamW(
            lowrank_groups(model), lr=args.lowrank_lr, weight_decay=args.weight_decay, rank=args.rank,
            update_proj_gap=args.gap, scale=args.scale, seed=args.seed, proj_type=args.proj_type,
        )  # fmt: skip
    if name == "adamw8bit":
        return AdamW8bit(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, block_size=args.block_size)
    if name == "mezo":
        return MeZO(model.parameters(), lr=args.mezo_lr, eps=args.mezo_eps, seed=args.seed)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def predicted_state_bytes(name: str, opt: torch.optim.Optimizer, args: argparse.Namespace) -> int:
    """Optimizer-state bytes from the formulas in docs/optimizers.md (fp32 parameters)."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            n, low_rank = p.numel(), p.dim() == 2 and group.get("lowrank", False) and args.rank < min(p.shape)
            if name == "adamw":
                total += 8 * n + 4
            elif name in ("galore", "subspace") and low_rank:
                # "std" keeps the moments on the larger side (GaLore's rule), "min_state" on the smaller.
                big, small = max(p.shape), min(p.shape)
                kept, projected = (big, small) if args.proj_type == "std" else (small, big)
                total += 4 * (2 * args.rank * kept + (projected * args.rank if name == "galore" else 0))
            elif name == "adamw8bit" and n >= 4096:
                total += 2 * n + 8 * math.ceil(n / args.block_size)
            elif name != "mezo":
                total += 8 * n
    return total


@dataclass
class Run:
    """One optimizer's model, optimizer, compiled forward and measurements."""

    name: str
    model: TinyGPT
    opt: torch.optim.Optimizer
    forward: Callable[[torch.Tensor], torch.Tensor]
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def step(self, tokens: torch.Tensor) -> None:
        start = time.perf_counter()
        if self.name == "mezo":
            loss = self.opt.step(lambda: lm_loss(self.forward, tokens))
        else:
            loss_t = lm_loss(self.forward, tokens)
            loss_t.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            loss = loss_t.item()
        self.seconds.append(time.perf_counter() - start)
        self.losses.append(float(loss))


def train_all(args: argparse.Namespace, task: Task) -> tuple[list[Run], float]:
    """Train every optimizer; returns the runs and the untrained model's evaluation loss."""
    torch.manual_seed(args.seed)
    base = TinyGPT(args.vocab, args.seq_len, args.d_model, args.layers, args.heads)
    initial_loss = eval_loss(base, task, args.eval_batches)
    runs = []
    for name in args.optimizers:
        model = copy.deepcopy(base)
        forward = torch.compile(model, backend="memopt", options={"codegen": "eager"}) if args.compile else model
        runs.append(Run(name, model, make_optimizer(name, model, args), forward))
    for index in range(args.steps):
        tokens = task.batch(index)
        for run in runs:
            run.step(tokens)
        if args.log_every and (index + 1) % args.log_every == 0:
            print(f"step {index + 1}: " + ", ".join(f"{r.name} {r.losses[-1]:.3f}" for r in runs), flush=True)
    return runs, initial_loss


@torch.no_grad()
def eval_loss(model: nn.Module, task: Task, batches: int) -> float:
    return statistics.fmean(lm_loss(model, task.batch(-1 - i)).item() for i in range(batches))


def report(
    runs: list[Run], initial: float, args: argparse.Namespace, task: Task
) -> tuple[str, dict[str, dict[str, float]]]:
    """The table (text) and its numbers."""
    skip = min(args.warmup_steps, max(args.steps - 1, 0))  # first steps include lazy state init
    results: dict[str, dict[str, float]] = {}
    for run in runs:
        results[run.name] = {
            "initial_loss": initial,
            "state_bytes": optimizer_state_bytes(run.opt),
            "predicted_bytes": predicted_state_bytes(run.name, run.opt, args),
            "final_loss": eval_loss(run.model, task, args.eval_batches),
            "step_ms": 1000 * statistics.median(run.seconds[skip:]),
        }
    ref = results.get("adamw", next(iter(results.values())))
    rows = [
        [name, r["state_bytes"], r["predicted_bytes"], f"{r['state_bytes'] / max(ref['state_bytes'], 1):.1%}",
         f"{r['final_loss']:.4f}", f"{r['final_loss'] / ref['final_loss']:.3f}", f"{r['step_ms']:.2f}",
         f"{r['step_ms'] / ref['step_ms']:.2f}"]  # fmt: skip
        for name, r in results.items()
    ]
    headers = ["optimizer", "state bytes", "formula", "vs AdamW", "final loss", "loss / AdamW", "step ms (median)", "step time / AdamW"]
    lines = [
        tabulate(rows, headers=headers, tablefmt="github"),
        f"\ninitial loss {initial:.4f}; floor (noise entropy) {task.floor():.4f}; "
        f"{args.steps} steps, batch {args.batch_size} x {args.seq_len} tokens, "
        f"d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, "
        f"{sum(p.numel() for p in runs[0].model.parameters())} parameters",
    ]
    return "\n".join(lines), results


def check_acceptance(results: dict[str, dict[str, float]]) -> list[str]:
    """The issue's acceptance criteria, as failure messages (empty when all hold)."""
    if "adamw" not in results:
        return ["--check compares with AdamW: include adamw in --optimizers"]
    failures = []
    ref = results["adamw"]
    for name in ("galore", "subspace", "adamw8bit"):
        if name in results and results[name]["final_loss"] > 1.10 * ref["final_loss"]:
            failures.append(f"{name}: final loss {results[name]['final_loss']:.4f} > 1.1 x AdamW's {ref['final_loss']:.4f}")
    if "mezo" in results and results["mezo"]["final_loss"] >= results["mezo"]["initial_loss"]:
        failures.append("mezo: the loss did not decrease")
    if "adamw8bit" in results and results["adamw8bit"]["state_bytes"] > 0.30 * ref["state_bytes"]:
        failures.append("adamw8bit: state above 30% of AdamW's")
    if {"galore", "subspace"} <= results.keys() and results["subspace"]["state_bytes"] >= results["galore"]["state_bytes"]:
        failures.append("subspace: state not below GaLore's")
    failures += [f"{n}: state bytes differ from the formula" for n, r in results.items() if r["state_bytes"] != r["predicted_bytes"]]
    return failures


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps per optimizer")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.1, help="probability a token ignores the rule")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW and AdamW8bit learning rate")
    p.add_argument("--lowrank-lr", type=float, default=1e-2, help="GaLore and Subspace learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--gap", type=int, default=25, help="update_proj_gap of GaLore and Subspace")
    p.add_argument("--scale", type=float, default=3.0, help="scale of GaLore and Subspace updates")
    p.add_argument("--proj-type", default="std", choices=("std", "min_state"), help="GaLore and Subspace side rule")
    p.add_argument("--block-size", type=int, default=256, help="AdamW8bit quantization block")
    p.add_argument("--mezo-lr", type=float, default=3e-3)
    p.add_argument("--mezo-eps", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the timing medians")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: steady timings on a busy machine; 0: torch's default)",
    )  # fmt: skip
    p.add_argument("--compile", action="store_true", help="run the models under torch.compile(backend='memopt')")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--check", action="store_true", help="exit 1 unless the acceptance criteria hold")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = Task(args.vocab, args.seq_len, args.batch_size, args.noise, args.seed)
    runs, initial = train_all(args, task)
    text, results = report(runs, initial, args, task)
    print(text)
    if args.check:
        failures = check_acceptance(results)
        for failure in failures:
            print("FAILED:", failure)
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
