"""The in-backward update op, ``torch.ops.memopt.apply_update``, that the
``optimizer_in_backward`` pass inserts.

Importing this module registers::

    memopt::apply_update(Tensor grad, Tensor(a!) param, str name, Tensor[] after) -> ()

It updates ``param`` in place from ``grad`` with the parameter's optimizer
(`memopt.optim.in_backward.update`: the optimizer's own per-parameter math, its
hyper-parameters and state read at call time); ``name`` labels the parameter in
errors. The schema declares the mutation of ``param``: that makes the op impure, so
neither FX's dead-code elimination nor Inductor's removes it (it has no output), and
Inductor orders every read of ``param`` in the graph before it. That holds for the
reads Inductor keeps as buffers, not for a pointwise value it computes lazily inside a
later kernel (a norm's ``grad * weight``, fused into the next reduction): such a kernel
read ``param`` after the update, so every gradient upstream of it came from updated
weights. Under Inductor the pass therefore passes the graph's readers of ``param`` as
``after``: an extern kernel's inputs are computed before it runs. The op is below
autograd (it runs inside the compiled backward, gradients disabled); its fake
implementation does nothing, so it traces under FakeTensor and Inductor calls it as an
extern fallback kernel. Tagged ``cudagraph_unsafe``: the update runs the optimizer's
Python at every step (its step count, the learning rate a scheduler set), which a
CUDA graph replay (``mode="reduce-overhead"``) would skip, replaying the captured
kernels with the captured scalars; Inductor keeps the op out of its CUDA graphs.
"""

from __future__ import annotations

import torch

from memopt.optim import in_backward

__all__ = ["apply_update"]


@torch.library.custom_op(
    "memopt::apply_update", mutates_args=("param",),
    schema="(Tensor grad, Tensor(a!) param, str name, Tensor[] after) -> ()",
    tags=(torch.Tag.cudagraph_unsafe,),
)
def apply_update(grad: torch.Tensor, param: torch.Tensor, name: str, after: list[torch.Tensor]) -> None:
    """Update ``param`` from ``grad`` by its optimizer (module docstring). ``after``: the
    values computed from ``param`` in the graph; unused here, they make Inductor compute
    them before the update (module docstring)."""
    in_backward.update(grad, param, name)


@apply_update.register_fake
def _apply_update_fake(grad: torch.Tensor, param: torch.Tensor, name: str, after: list[torch.Tensor]) -> None:
    return None
