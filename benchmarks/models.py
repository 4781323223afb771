"""Benchmark models: the zoo plus public architectures built from config.

Public architectures come from Hugging Face ``transformers`` (an optional benchmark
dependency, ``pip install transformers``), built from a config with random weights:
nothing is downloaded. Each entry returns ``(module, inputs)`` where
``module(*inputs)`` is a scalar loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from memopt.testing.zoo import ZOO

__all__ = ["MODELS", "build", "compile_memopt", "PUBLIC"]


class LossWrapper(nn.Module):
    """Calls a Hugging Face model with keyword inputs and returns ``.loss``."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.keys, args))).loss


def _gpt2(batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import transformers as T

    cfg = T.GPT2Config(n_layer=4, n_embd=256, n_head=8, vocab_size=2048, n_positions=256,
                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, use_cache=False)
    ids = torch.randint(0, 2048, (batch, 128))
    return LossWrapper(T.GPT2LMHeadModel(cfg), ("input_ids", "labels")), (ids, ids)


def _llama(batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import transformers as T

    cfg = T.LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                        intermediate_size=688, vocab_size=2048, max_position_embeddings=256, use_cache=False)
    ids = torch.randint(0, 2048, (batch, 128))
    return LossWrapper(T.LlamaForCausalLM(cfg), ("input_ids", "labels")), (ids, ids)


def _bert(batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import transformers as T

    cfg = T.BertConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, intermediate_size=1024,
                       vocab_size=2048, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = torch.randint(0, 2048, (batch, 128))
    labels = torch.randint(0, 2, (batch,))
    return LossWrapper(T.BertForSequenceClassification(cfg), ("input_ids", "labels")), (ids, labels)


def _vit(batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import transformers as T

    cfg = T.ViTConfig(image_size=64, patch_size=8, num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
                      intermediate_size=1024, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    pixels = torch.randn(batch, 3, 64, 64)
    labels = torch.randint(0, 10, (batch,))
    return LossWrapper(T.ViTForImageClassification(cfg), ("pixel_values", "labels")), (pixels, labels)


def _zoo(name: str) -> Callable[[int], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def build(batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        case = ZOO[name]
        return case.build(), case.inputs(batch)

    return build


PUBLIC = {"hf_gpt2": _gpt2, "hf_llama": _llama, "hf_bert": _bert, "hf_vit": _vit}
MODELS: dict[str, Callable[[int], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    **{name: _zoo(name) for name in ZOO},
    **PUBLIC,
}


def build(name: str, batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Model ``name`` in training mode and its inputs for ``batch``."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    torch.manual_seed(0)
    model, inputs = MODELS[name](batch)
    return model.train(), inputs


def compile_memopt(
    name: str, batch: int, budget: float | str | None, codegen: str
) -> tuple[nn.Module, tuple[torch.Tensor, ...], Callable[..., torch.Tensor]]:
    """``build(name, batch)`` compiled with ``backend="memopt"`` (after a Dynamo reset),
    with ``memory_budget=budget`` unless it is None."""
    torch._dynamo.reset()
    model, inputs = build(name, batch)
    options: dict[str, object] = {"codegen": codegen}
    if budget is not None:
        options["memory_budget"] = budget
    return model, inputs, torch.compile(model, backend="memopt", options=options)  # type: ignore[arg-type]
