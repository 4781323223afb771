"""Public architectures as users write them: Hugging Face ``transformers`` models at
their **default** configs (train mode, dropout as configured, ``use_cache`` as
configured), only the sizes made small, called with keyword arguments.

    from memopt.testing.hf import FAMILIES, build
    model, inputs = build("llama", batch=2, seq=32)
    loss = torch.compile(model, backend="memopt")(**inputs).loss

Weights are random (built from a config): nothing is downloaded. Needs
``transformers`` (in memopt's ``dev`` extra). Each family is one architecture a user
meets on day one: a decoder LM, an encoder, an encoder-decoder, a vision transformer, a
mixture-of-experts LM and a CNN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

__all__ = ["Family", "FAMILIES", "build", "make_inputs"]

Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """One architecture: its model class, the config fields that make it small (every
    other field stays at the default) and how to make a batch of keyword inputs."""

    name: str
    model_class: str
    config_class: str
    small: dict[str, Any]
    inputs: Callable[[Any, int, int], Inputs]
    """``inputs(config, batch, seq)``: the keyword arguments of one training call."""
    size_scale: dict[str, Any] = field(default_factory=dict)
    """Fields for the "medium" size (benchmarks: 4 layers, hidden 256)."""


def _lm(config: Any, batch: int, seq: int) -> Inputs:
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _masked_lm(config: Any, batch: int, seq: int) -> Inputs:
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    labels = torch.full_like(ids, -100)
    labels[:, ::7] = ids[:, ::7]  # ~15% of positions carry a label, as in MLM
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _seq2seq(config: Any, batch: int, seq: int) -> Inputs:
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    labels = torch.randint(0, config.vocab_size, (batch, max(seq // 2, 1)))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _images(config: Any, batch: int, seq: int) -> Inputs:
    size = getattr(config, "image_size", seq)
    return {
        "pixel_values": torch.randn(batch, config.num_channels, size, size),
        "labels": torch.randint(0, config.num_labels, (batch,)),
    }


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "gpt2", "GPT2LMHeadModel", "GPT2Config",
            dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=128),
            _lm, dict(n_layer=4, n_embd=256, n_head=8, vocab_size=2048, n_positions=256),
        ),
        Family(
            "llama", "LlamaForCausalLM", "LlamaConfig",
            dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=172, vocab_size=512, max_position_embeddings=128),
            _lm, dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=688, vocab_size=2048, max_position_embeddings=256),
        ),
        Family(
            "bert", "BertForMaskedLM", "BertConfig",
            dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                 vocab_size=512, max_position_embeddings=128),
            _masked_lm, dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, intermediate_size=1024,
                             vocab_size=2048, max_position_embeddings=256),
        ),
        Family(
            "t5", "T5ForConditionalGeneration", "T5Config",
            # decoder_start_token_id: every released T5 config sets it (the pad token, 0); the
            # class default leaves it unset and labels cannot be shifted without it.
            dict(num_layers=2, num_decoder_layers=2, d_model=64, d_kv=16, num_heads=4, d_ff=256, vocab_size=512,
                 decoder_start_token_id=0),
            _seq2seq, dict(num_layers=4, num_decoder_layers=4, d_model=256, d_kv=32, num_heads=8, d_ff=1024,
                           vocab_size=2048, decoder_start_token_id=0),
        ),
        Family(
            "vit", "ViTForImageClassification", "ViTConfig",
            dict(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                 intermediate_size=256, num_labels=10),
            _images, dict(image_size=64, patch_size=8, num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
                          intermediate_size=1024, num_labels=10),
        ),
        Family(
            "mixtral", "MixtralForCausalLM", "MixtralConfig",
            dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=128, num_local_experts=4,
                 num_experts_per_tok=2),
            _lm, dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=512, vocab_size=2048, max_position_embeddings=256, num_local_experts=4,
                      num_experts_per_tok=2),
        ),
        Family(
            "resnet", "ResNetForImageClassification", "ResNetConfig",
            dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10),
            _images, dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], num_labels=10),
        ),
    ]
}  # fmt: skip


def build(name: str, batch: int = 2, seq: int = 32, *, size: str = "small", seed: int = 0, **overrides: Any) -> tuple[nn.Module, Inputs]:
    """Family ``name`` in train mode at its default config with sizes ``size``
    ("small": tests; "medium": 4 layers, hidden 256, for benchmarks), plus one batch
    of keyword inputs (``seq`` tokens, or ``seq`` pixels square for images without an
    ``image_size``). ``overrides`` change config fields (e.g. ``use_cache=False``)."""
    import transformers

    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}")
    if size not in ("small", "medium"):
        raise ValueError(f"size={size!r}; choose 'small' or 'medium'")
    family = FAMILIES[name]
    fields = dict(family.small if size == "small" else family.size_scale)
    fields.update(overrides)
    config = getattr(transformers, family.config_class)(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config).train()
    return model, make_inputs(name, config, batch, seq)


def make_inputs(name: str, config: Any, batch: int, seq: int) -> Inputs:
    """A batch of keyword inputs for family ``name`` built with ``config``."""
    return FAMILIES[name].inputs(config, batch, seq)
