"""Precision lowering and compressed saved activations: memory, gradient error, loss.

    PYTHONPATH=. .venv/bin/python benchmarks/precision.py              # all tables
    PYTHONPATH=. .venv/bin/python benchmarks/precision.py --steps 0    # memory + error only
    PYTHONPATH=. .venv/bin/python benchmarks/precision.py --inductor   # + Inductor rows (slow on CPU)
    PYTHONPATH=. .venv/bin/python benchmarks/precision.py --hf-defaults  # HF default configs only

Models (random weights, built from code or configs, nothing downloaded): the zoo's GPT
(tied embeddings), transformers' ``LlamaForCausalLM`` and ``BertForTokenClassification``
(dropout on), small enough for a CPU.

1. **Peak growth** of one training step (forward + backward from gradients set to
   None, so it includes the gradient buffers), measured with
   `memopt.testing.measure.measure_peak` (profiler allocator events) after two warm-up
   steps; median of ``--repeats``. Baselines compile with
   ``backend="aot_eager"`` (torch's min-cut partition, ops run eagerly: the same family
   as memopt's ``codegen="eager"``), fp32 and under ``torch.autocast("cpu",
   torch.bfloat16)``. ``saved`` is the bytes of saved activations in memopt's graphs
   (its memory timeline), relative to memopt fp32. ``--inductor-only`` measures the
   Inductor family instead: fp32 and autocast with ``backend="inductor"``, memopt
   with ``codegen="inductor"``.
2. **Gradient error**: relative L2 error of every parameter's gradient against the fp32
   model on the same batch, over all parameters together (``all``) and the median over
   parameters (a parameter whose fp32 gradient is near zero has a meaningless ratio).
``--hf-defaults`` measures instead Hugging Face GPT-2, Llama and BERT at their
default configs (`memopt.testing.hf.build(name, batch=4, seq=256, size="medium")`:
dropout 0.1 where the config has it, SDPA, KV cache on), called as
``model(**kwargs).loss``: fp32 and ``precision="bf16"`` compiled by memopt, and
``torch.autocast("cpu", dtype=torch.bfloat16)`` around memopt with no options (all
``codegen="eager"``), with the loss of one seeded step (same dropout masks).

3. **Loss after ``--steps`` steps** (AdamW) on the synthetic successor task
   (`memopt.testing.training`), mean of the last 20 steps, relative to fp32; the
   "other dropout seed" row is fp32 again with different dropout masks: the noise
   floor of the comparison.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tabulate import tabulate

import memopt
from memopt.analysis.error_probe import relative_error
from memopt.analysis.memory import build_timeline
from memopt.testing.measure import measure_peak
from memopt.testing.training import final_loss, successor_tokens, train_losses
from memopt.testing.zoo import GPT, GPTConfig

VOCAB = 512


@dataclass(frozen=True)
class Size:
    """Model width/depth and the batch it runs on."""

    dim: int
    layers: int
    heads: int
    batch: int
    seq: int


SIZES = {
    "memory": Size(dim=256, layers=4, heads=4, batch=8, seq=128),  # the peak-growth tables
    "training": Size(dim=64, layers=2, heads=2, batch=8, seq=32),  # 200-step runs on a CPU
}


class LlamaLM(nn.Module):
    """``LlamaForCausalLM`` returning only the loss (the logits are not kept)."""

    def __init__(self, size: Size) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=size.dim, intermediate_size=size.dim * 8 // 3,
            num_hidden_layers=size.layers, num_attention_heads=size.heads,
            num_key_value_heads=max(size.heads // 2, 1), max_position_embeddings=256, use_cache=False,
        )  # fmt: skip
        self.model = LlamaForCausalLM(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, labels=tokens).loss


class BertTagger(nn.Module):
    """``BertForTokenClassification`` (dropout 0.1) on a rule that needs attention: each
    token's label is the previous token modulo 4 (a per-token loss: smooth enough to
    compare runs; a one-label-per-sequence loss on batches of 8 varies by 25% between
    dropout seeds)."""

    def __init__(self, size: Size) -> None:
        super().__init__()
        from transformers import BertConfig, BertForTokenClassification

        config = BertConfig(
            vocab_size=VOCAB, hidden_size=size.dim, intermediate_size=4 * size.dim,
            num_hidden_layers=size.layers, num_attention_heads=size.heads,
            max_position_embeddings=256, num_labels=4,
        )  # fmt: skip
        self.model = BertForTokenClassification(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        labels = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1] % 4], dim=1)
        return self.model(input_ids=tokens, labels=labels).loss


class GPTLM(nn.Module):
    """The zoo GPT on whole token sequences."""

    def __init__(self, size: Size) -> None:
        super().__init__()
        self.model = GPT(GPTConfig(vocab=VOCAB, context=256, dim=size.dim, heads=size.heads, layers=size.layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens[:, :-1], tokens[:, 1:])


MODELS: dict[str, Callable[[Size], nn.Module]] = {"gpt": GPTLM, "llama": LlamaLM, "bert": BertTagger}


@dataclass(frozen=True)
class Variant:
    name: str
    backend: str
    options: dict[str, Any] | None = None
    autocast: bool = False


def variants(inductor: bool, inductor_only: bool = False) -> list[Variant]:
    """The variants to measure; the first is the reference of the ratios and errors."""
    inductor_rows = [
        Variant("fp32 (inductor)", "inductor"),
        Variant("autocast bf16 (inductor)", "inductor", autocast=True),
        Variant("memopt bf16 (inductor)", "memopt", {"precision": "bf16", "codegen": "inductor"}),
    ]
    if inductor_only:
        return inductor_rows
    rows = [
        Variant("fp32 (aot_eager)", "aot_eager"),
        Variant("autocast bf16 (aot_eager)", "aot_eager", autocast=True),
        Variant("memopt fp32", "memopt", {}),
        Variant("memopt bf16", "memopt", {"precision": "bf16"}),
        Variant("memopt bf16 + compress bf16", "memopt", {"precision": "bf16", "compress_activations": "bf16"}),
        Variant("memopt bf16 + compress fp8", "memopt", {"precision": "bf16", "compress_activations": "fp8"}),
        Variant("memopt compress fp8", "memopt", {"compress_activations": "fp8"}),
        Variant("memopt compress int8", "memopt", {"compress_activations": "int8"}),
    ]
    return rows + (inductor_rows if inductor else [])


def compile_variant(model: nn.Module, v: Variant) -> Callable[[torch.Tensor], torch.Tensor]:
    """``tokens -> loss`` for ``model`` compiled as ``v`` says (autocast around it)."""
    torch._dynamo.reset()
    if v.backend == "memopt":
        options = {"codegen": "eager", **(v.options or {})}
        compiled = torch.compile(model, backend="memopt", options=options)
    else:
        compiled = torch.compile(model, backend=v.backend)

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=v.autocast):
            return compiled(tokens)

    return loss


def peak_and_saved(
    model: nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, repeats: int
) -> tuple[int, int | None]:
    """Median measured peak growth of a step, and memopt's saved-activation bytes.

    Gradients are set to None before each step, outside the measurement (as
    ``optimizer.zero_grad()`` leaves them), so the growth includes the gradients."""

    def step() -> None:
        loss(tokens).backward()

    def measure() -> int:
        model.zero_grad(set_to_none=True)
        return measure_peak(step).peak_growth_bytes

    with memopt.record() as explanation:
        step()
    model.zero_grad(set_to_none=True)
    step()
    peaks = [measure() for _ in range(repeats)]
    saved = None
    if explanation.regions:
        saved = sum(iv.nbytes for r in explanation.regions for iv in build_timeline(r.step).saved_activations())
    return int(statistics.median(peaks)), saved


def gradients(model: nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after one step (RNG seeded: same dropout masks)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss(tokens).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_errors(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(error over all parameters together, median over parameters)."""
    names = sorted(reference)
    whole = relative_error(torch.cat([got[n].flatten() for n in names]), torch.cat([reference[n].flatten() for n in names]))
    median = statistics.median(relative_error(got[n], reference[n]) for n in names)
    return whole, median


def memory_rows(name: str, args: argparse.Namespace) -> list[list[Any]]:
    """Peak growth, saved bytes and gradient error of every variant on one model."""
    size = SIZES["memory"]
    torch.manual_seed(0)
    base = MODELS[name](size).train()
    tokens = successor_tokens(VOCAB, size.batch, size.seq + 1, steps=1, seed=1)[0]
    rows: list[list[Any]] = []
    results: dict[str, tuple[int, int | None]] = {}
    reference: dict[str, torch.Tensor] = {}
    chosen = variants(args.inductor, args.inductor_only)
    for v in chosen:
        model = copy.deepcopy(base)
        loss = compile_variant(model, v)
        results[v.name] = peak, saved = peak_and_saved(model, loss, tokens, args.repeats)
        grads = gradients(model, loss, tokens)
        reference = reference or grads
        whole, median = grad_errors(reference, grads)
        fp32 = results[chosen[0].name][0]
        autocast = next((results[n][0] for n in results if "autocast" in n), None)
        saved_ref = results.get("memopt fp32", (None, None))[1]
        rows.append([
            name, v.name, f"{peak / 2**20:.2f}", f"{peak / fp32:.3f}",
            "" if autocast is None else f"{peak / autocast:.3f}",
            "" if saved is None or not saved_ref else f"{saved / saved_ref:.3f}",
            f"{whole:.2e}", f"{median:.2e}",
        ])  # fmt: skip
        print("progress:", *rows[-1], file=sys.stderr, flush=True)
    return rows


def training_rows(name: str, args: argparse.Namespace) -> list[list[Any]]:
    """Loss after ``args.steps`` steps of every (non-Inductor) variant on one model."""
    size = SIZES["training"]
    torch.manual_seed(0)
    base = MODELS[name](size).train()
    batches = successor_tokens(VOCAB, size.batch, size.seq + 1, steps=args.steps, seed=2)
    rows: list[list[Any]] = []
    reference: float | None = None
    runs = [(v, 0) for v in variants(False) if v.name != "memopt fp32"]
    runs.insert(1, (Variant("fp32, other dropout seed (noise)", "aot_eager"), 1000))
    for v, seed in runs:
        model = copy.deepcopy(base)
        losses = train_losses(compile_variant(model, v), model.parameters(), batches, lr=args.lr, seed=seed)
        final = final_loss(losses)
        reference = final if reference is None else reference
        rows.append([name, v.name, f"{final:.4f}", f"{100 * (final - reference) / reference:+.2f}%"])
        print("progress:", *rows[-1], file=sys.stderr, flush=True)
    return rows


HF_VARIANTS = [
    Variant("fp32 (memopt)", "memopt", {}),
    Variant("memopt bf16", "memopt", {"precision": "bf16"}),
    Variant("autocast bf16 (memopt, no options)", "memopt", {}, autocast=True),
    Variant("memopt bf16 under autocast", "memopt", {"precision": "bf16"}, autocast=True),
]


def hf_rows(name: str, args: argparse.Namespace) -> list[list[Any]]:
    """Peak growth, saved bytes and one step's loss of `HF_VARIANTS` on the Hugging
    Face family ``name`` at its default config, medium size, batch 4 x 256."""
    from memopt.testing.hf import build

    base, kwargs = build(name, batch=4, seq=256, size="medium")
    rows: list[list[Any]] = []
    peaks: dict[str, int] = {}
    losses: dict[str, float] = {}
    for v in HF_VARIANTS:
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", **(v.options or {})})

        def loss(_: Any, compiled: Any = compiled, autocast: bool = v.autocast) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return compiled(**kwargs).loss

        peaks[v.name], saved = peak_and_saved(model, loss, None, args.repeats)  # type: ignore[arg-type]
        torch.manual_seed(0)
        losses[v.name] = float(loss(None))
        fp32, ref_loss = peaks[HF_VARIANTS[0].name], losses[HF_VARIANTS[0].name]
        autocast = peaks.get(HF_VARIANTS[2].name)
        rows.append([
            name, v.name, f"{peaks[v.name] / 2**20:.2f}", f"{peaks[v.name] / fp32:.3f}",
            "" if autocast is None else f"{peaks[v.name] / autocast:.3f}",
            "" if saved is None else f"{saved / 2**20:.2f}",
            f"{losses[v.name]:.4f}", f"{100 * (losses[v.name] - ref_loss) / ref_loss:+.2f}%",
        ])  # fmt: skip
        print("progress:", *rows[-1], file=sys.stderr, flush=True)
    return rows


def main_hf(args: argparse.Namespace) -> None:
    """The ``--hf-defaults`` table."""
    models = dict.fromkeys("gpt2" if m == "gpt" else m for m in args.models)  # gpt: HF GPT-2 here
    rows = [row for name in models for row in hf_rows(name, args)]
    print(f"\nHugging Face default configs, medium size, batch 4 x 256, torch {torch.__version__}, CPU, median of {args.repeats}\n")
    headers = ["model", "variant", "peak growth MiB", "vs fp32", "vs autocast", "saved MiB", "loss (1 step)", "vs fp32"]
    print(tabulate(rows, headers=headers, tablefmt="github"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, "gpt2"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--inductor", action="store_true", help="add Inductor rows (C++ compiles: minutes on CPU)")
    parser.add_argument("--inductor-only", action="store_true", help="only the Inductor rows (fp32 Inductor is the reference)")
    parser.add_argument("--hf-defaults", action="store_true", help="only Hugging Face GPT-2, Llama, BERT at default configs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.hf_defaults:
        main_hf(args)
        return
    memory = [row for name in args.models for row in memory_rows(name, args)]
    training = [row for name in args.models for row in training_rows(name, args)] if args.steps and not args.inductor_only else []
    print(f"\nmemory: {SIZES['memory']}, torch {torch.__version__}, CPU, median of {args.repeats}\n")
    print(tabulate(memory, headers=["model", "variant", "peak growth MiB", "vs fp32", "vs autocast", "saved vs memopt fp32", "grad err (all)", "grad err (median)"], tablefmt="github"))
    if training:
        print(f"\nloss after {args.steps} steps (mean of last 20), AdamW lr {args.lr}, {SIZES['training']}\n")
        print(tabulate(training, headers=["model", "variant", "final loss", "vs fp32"], tablefmt="github"))


if __name__ == "__main__":
    main()
