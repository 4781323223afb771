"""A factory for ``memopt report``: returns (model, inputs) for the zoo's GPT.

    memopt report examples/report_model.py:build --plot gpt_memory.png

The factory runs under a FakeTensorMode (unless --real), so this builds nothing real.
"""

from __future__ import annotations

import torch

from memopt.testing.zoo import GPT, GPTConfig


def build() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    config = GPTConfig(vocab=512, context=128, dim=128, heads=4, layers=4)
    model = GPT(config)
    idx = torch.randint(0, config.vocab, (8, 128))
    return model, (idx, idx)
