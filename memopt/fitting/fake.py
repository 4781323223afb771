"""The model, its optimizer and the context of one `memopt.fit` probe, on fake tensors.

A probe plans a step without allocating it: the model's parameters and buffers become
`FakeTensor` s (`fake_model`), the optimizer a copy over them whose state is predicted
(`with_fake_optimizer`), and each probe runs in `planning`. The user's model and
optimizer are never touched.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from memopt.config import MemoptConfig
from memopt.errors import MemoptFitError, MemoptWarning
from memopt.explain import backward_with_forward

__all__ = ["fake_model", "planning", "reset_optimizer", "with_fake_optimizer"]


def fake_model(model: Callable[..., Any]) -> tuple[Callable[..., Any], Any, dict[int, torch.Tensor]]:
    """``model`` with fake parameters and buffers, the fake mode to probe in, and
    ``id(real tensor) -> its fake copy`` (empty when nothing was copied). A module whose
    tensors are already fake (built under a `FakeTensorMode`) is used as is; one with
    real tensors is deep-copied with each parameter and buffer replaced by a fake one (the
    copy shares nothing writable with ``model``; nothing of the size of a parameter is
    allocated)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    if not isinstance(model, torch.nn.Module):
        return model, FakeTensorMode(allow_non_fake_inputs=True), {}
    tensors = [_local(t) for t in (*model.parameters(), *model.buffers())]
    fakes = [t for t in tensors if isinstance(t, FakeTensor)]
    if tensors and len(fakes) == len(tensors):
        return model, fakes[0].fake_mode, {}
    if fakes:
        raise MemoptFitError(
            f"{type(model).__name__} mixes {len(fakes)} fake and {len(tensors) - len(fakes)} real parameters/buffers; "
            f"build it entirely under one FakeTensorMode, or entirely on real tensors."
        )
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memo: dict[int, Any] = {}
    for t in tensors:
        fake = mode.from_tensor(t)
        if isinstance(t, torch.nn.Parameter):
            fake = torch.nn.Parameter(fake, requires_grad=t.requires_grad)
        memo[id(t)] = fake
    fakes = dict(memo)  # before deepcopy adds its own entries
    return copy.deepcopy(model, memo), mode, fakes


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor that holds ``tensor``'s storage: a DTensor's (a parameter of a model
    `memopt.distributed.shard` sharded) local shard, which is the fake tensor when the
    model was built and sharded under a `FakeTensorMode`; any other tensor itself."""
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor


def with_fake_optimizer(config: MemoptConfig, fakes: Mapping[int, torch.Tensor]) -> MemoptConfig:
    """``config`` with its ``optimizer`` / ``optimizer_in_backward`` replaced by a copy
    over the fake parameters (`fake_optimizer`), so each probe's plan counts the
    optimizer's state (predicted: `memopt.optim.state_size`) and, in backward, each
    gradient dying at its update. The user's optimizer is not touched."""
    optimizer = config.step_optimizer
    if optimizer is None:
        return config
    proxy = fake_optimizer(optimizer, fakes)
    fused = config.optimizer_in_backward is not None
    return dataclasses.replace(
        config, optimizer=None if fused else proxy, optimizer_in_backward=proxy if fused else None
    )


def fake_optimizer(optimizer: Any, fakes: Mapping[int, torch.Tensor]) -> Any:
    """A shallow copy of ``optimizer`` whose groups hold the fake copies of its
    parameters (``fakes``: `fake_model`'s map; empty when the model's parameters are
    fake already and the optimizer is over them), with no state (it is predicted) and
    without memopt's in-backward attachment (the copy gets its own). Raises
    `MemoptFitError` for a parameter that is not the model's."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer  # the config's own check names the problem
    groups = []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            fake = fakes.get(id(p)) if fakes else p
            if fake is None:
                raise MemoptFitError(
                    f"the optimizer ({type(optimizer).__name__}) holds a parameter of shape {tuple(p.shape)} that is "
                    f"not the model's: fit plans the model's step with the optimizer's state. Build the optimizer "
                    f"over model.parameters() (the model passed to fit)."
                )
            params.append(fake)
        groups.append({**group, "params": params})
    proxy = copy.copy(optimizer)
    for attribute in ("step", "_memopt_in_backward"):
        proxy.__dict__.pop(attribute, None)  # instance attributes memopt's attachment set
    proxy.param_groups = groups
    proxy.state = collections.defaultdict(dict)
    return proxy


def reset_optimizer(config: MemoptConfig) -> None:
    """After a probe: the fake optimizer copy as it was before it (no gradients, no
    state, no update pending), so the next probe predicts its state afresh and its
    in-backward updates are not taken for a second backward before a step."""
    optimizer = config.step_optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        return
    optimizer.zero_grad(set_to_none=True)
    if config.optimizer_in_backward is not None:
        optimizer.step()  # memopt's wrapped step: clears the updates pending (no gradient is left to step)
    optimizer.state.clear()


@contextlib.contextmanager
def planning(mode: Any, training: bool) -> Iterator[None]:
    """The context of one probe: the fake mode, memopt's warnings silenced (an infeasible
    budget is a probe that does not fit, not a problem), and the backward graph compiled
    with the forward (`memopt.explain.backward_with_forward`: the lazy backward fails to
    copy a graph holding a real constant under the fake mode)."""
    grad = contextlib.nullcontext() if training else torch.no_grad()
    with mode, backward_with_forward(), warnings.catch_warnings(), grad:
        warnings.simplefilter("ignore", MemoptWarning)
        yield
