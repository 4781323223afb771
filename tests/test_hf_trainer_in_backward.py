"""Issue 17's acceptance row: Hugging Face ``transformers.Trainer`` training a model
compiled through memopt with ``optimizer_in_backward`` gives the same losses as without
it (docs/whole_step.md, "HF Trainer").

The supported way (transformers 5.x): build the optimizer yourself, compile the model's
``forward`` with memopt and the optimizer as ``optimizer_in_backward``, and hand the
optimizer to ``Trainer(optimizers=(opt, None))`` with ``max_grad_norm=0``. Trainer still
computes the gradient norm for its logs (``_get_grad_norm``, which reads every
``.grad``), so that is switched off in a subclass: memopt's marker raises on it, as it
raises for clipping.

Without the optimizer option (docs/usage.md, "Hugging Face Trainer"): Trainer's own
``torch_compile_backend="memopt"`` is refused by accelerate, and a model compiled in
place (``model.compile(backend="memopt", options=...)``) trains under a budget.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it (transformers[torch])

from transformers import Trainer, TrainingArguments  # noqa: E402

import memopt  # noqa: E402
from memopt.errors import MemoptOptimizerError  # noqa: E402
from memopt.testing.hf import build  # noqa: E402

STEPS = 8


class NoGradNormTrainer(Trainer):
    """Trainer that does not log the gradient norm: the gradients were applied and
    freed inside backward."""

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        return grad_norm


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, seq: int = 16) -> None:
        self.ids = torch.randint(0, vocab, (2 * STEPS, seq), generator=torch.Generator().manual_seed(1))

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


def _plain_args(tmp: str, **extra: Any) -> TrainingArguments:
    return TrainingArguments(
        output_dir=tmp, use_cpu=True, report_to=[], max_steps=3, per_device_train_batch_size=4,
        logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, **extra,
    )  # fmt: skip


def test_trainer_torch_compile_backend_memopt_is_refused_by_accelerate(tmp_path: Any) -> None:
    """``TrainingArguments(torch_compile=True, torch_compile_backend="memopt")`` fails in
    Trainer's constructor: accelerate's ``TorchDynamoPlugin`` takes only the backends of
    its ``DynamoBackend`` enum. docs/usage.md says so and gives the way that works (next
    test); if an accelerate release accepts it, this fails and the docs must change."""
    torch.manual_seed(0)
    model, _ = build("llama", batch=2, seq=16)
    args = _plain_args(str(tmp_path), torch_compile=True, torch_compile_backend="memopt")
    with pytest.raises(ValueError, match="'MEMOPT' is not a valid DynamoBackend"):
        Trainer(model=model, args=args, train_dataset=_Tokens(model.config.vocab_size))


def test_trainer_trains_a_model_compiled_in_place_under_a_budget(tmp_path: Any) -> None:
    """The model compiled in place with memopt's options (``model.compile``), handed to a
    default Trainer (its own AdamW, clipping at 1.0): the logged losses are eager
    Trainer's (to rounding: compiled kernels), and the step is planned within the budget."""
    torch.manual_seed(0)
    base, _ = build("llama", batch=2, seq=16)
    eager_model = copy.deepcopy(base)
    data = _Tokens(base.config.vocab_size, seq=64)  # batch 4 x 64: activations, not weights, dominate
    eager = Trainer(model=eager_model, args=_plain_args(str(tmp_path / "a")), train_dataset=data)
    eager.train()
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    model.compile(backend="memopt", options={"codegen": "eager", "memory_budget": 0.7})
    run = Trainer(model=model, args=_plain_args(str(tmp_path / "b")), train_dataset=data)
    with memopt.record() as explanation:
        run.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (eager, run)]
    assert len(losses[1]) == 3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    [plan] = [r.plan for r in explanation.step_regions()]
    assert plan is not None and plan.budget_bytes is not None
    assert explanation.estimated_peak_bytes <= plan.budget_bytes < explanation.timeline(optimized=False).peak_bytes
