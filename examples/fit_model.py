"""A factory for ``memopt fit``: returns (model, make_inputs) for the zoo's GPT.

    memopt fit examples/fit_model.py:build --budget 40MiB --seq 128 --global-batch 64

FACTORY returns ``(model, make_inputs)``; ``make_inputs(batch, seq)`` (``make_inputs(batch)``
without ``--seq``) builds one training call's inputs. The factory and every probe run
under a FakeTensorMode, so nothing real is allocated (docs/fit.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memopt.testing.zoo import GPT, GPTConfig


def build() -> tuple[torch.nn.Module, Callable[..., tuple[torch.Tensor, ...]]]:
    config = GPTConfig(vocab=512, context=256, dim=128, heads=4, layers=4)

    def make_inputs(batch: int, seq: int = 128) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(0, config.vocab, (batch, seq))
        return idx, idx  # tokens and targets: the model returns the loss

    return GPT(config), make_inputs
