"""Issue 17's acceptance row: Hugging Face ``transformers.Trainer`` training a model
compiled through memopt with ``optimizer_in_backward`` gives the same losses as without
it (docs/whole_step.md, "HF Trainer").

The supported way (transformers 5.x): build the optimizer yourself, compile the model's
``forward`` with memopt and the optimizer as ``optimizer_in_backward``, and hand the
optimizer to ``Trainer(optimizers=(opt, None))`` with ``max_grad_norm=0``. Trainer still
computes the gradient norm for its logs (``_get_grad_norm``, which reads every
``.grad``), so that is switched off in a subclass: memopt's marker raises on it, as it
raises for clipping.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it (transformers[torch])

from transformers import Trainer, TrainingArguments  # noqa: E402

from memopt.errors import MemoptOptimizerError  # noqa: E402
from memopt.testing.hf import build  # noqa: E402

STEPS = 8


class NoGradNormTrainer(Trainer):
    """Trainer that does not log the gradient norm: the gradients were applied and
    freed inside backward."""

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        return grad_norm


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (2 * STEPS, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(base: torch.nn.Module, in_backward: bool, trainer: type[Trainer], tmp: str) -> tuple[list[float], torch.nn.Module]:
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    options: dict[str, Any] = {"codegen": "eager", "optimizer_in_backward" if in_backward else "optimizer": opt}
    model.forward = torch.compile(model.forward, backend="memopt", options=options)  # type: ignore[method-assign]
    args = TrainingArguments(
        output_dir=tmp, use_cpu=True, report_to=[], max_steps=STEPS, per_device_train_batch_size=2,
        max_grad_norm=0, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
    )  # fmt: skip
    run = trainer(model=model, args=args, train_dataset=_Tokens(model.config.vocab_size), optimizers=(opt, None))
    run.train()
    return [h["loss"] for h in run.state.log_history if "loss" in h], model


def test_trainer_losses_equal_with_optimizer_in_backward(tmp_path: Any) -> None:
    """8 Trainer steps (AdamW, its linear LR schedule, max_grad_norm=0) of the tiny
    Llama: the logged losses and the final weights with the updates inside backward
    equal (bitwise: eager codegen, per-parameter math) those of a separate step."""
    torch.manual_seed(0)
    base, _ = build("llama", batch=2, seq=16)
    separate, model_a = _train(base, False, NoGradNormTrainer, str(tmp_path / "a"))
    fused, model_b = _train(base, True, NoGradNormTrainer, str(tmp_path / "b"))
    assert len(separate) == STEPS
    assert fused == separate
    assert len(set(separate)) > 1  # the weights moved: the losses are of different weights
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name


def test_trainer_gradient_norm_logging_raises_naming_the_fix(tmp_path: Any) -> None:
    """Trainer's own gradient-norm logging reads every .grad after backward: with the
    updates in backward it raises memopt's error naming the cause, never a wrong norm."""
    torch.manual_seed(0)
    base, _ = build("llama", batch=2, seq=16)
    with pytest.raises(MemoptOptimizerError, match="max_grad_norm=0"):
        _train(base, True, Trainer, str(tmp_path))
