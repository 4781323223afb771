"""A ``memopt report`` factory: a 32-layer Llama at 7B sizes (Llama-2-7B's config),
one training step's loss, batch 1 x 2048 tokens.

    memopt report benchmarks/llama7b.py:build --options '{"memory_budget": 0.5}' --json

``memopt report`` runs the factory under a FakeTensorMode: nothing is allocated, the
model is traced and planned on fake tensors. `benchmarks/compile_time.py plan7b` times it.
"""

from __future__ import annotations

import torch


class LossOf(torch.nn.Module):
    """``model(input_ids=ids, labels=ids).loss`` as a module of positional inputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]


def build(batch: int = 1, seq: int = 2048) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    import transformers as T

    config = T.LlamaConfig(
        num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, use_cache=False,
    )  # fmt: skip
    model = T.LlamaForCausalLM(config)
    return LossOf(model), (torch.randint(0, config.vocab_size, (batch, seq)),)
