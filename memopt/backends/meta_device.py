"""Gradients of a step traced on the meta device (docs/sharding.md, "Planning on the
meta device").

torch registers Python meta kernels (``torch._meta_registrations.activate_meta``) for
some operators that also have a CompositeImplicitAutograd kernel: ``aten.nll_loss``
(``F.cross_entropy``, Hugging Face's ``labels=`` loss), ``var``/``std``, ``dropout``,
``prelu``, ``selu``, the ``upsample`` family and about a hundred more. Under the Python
dispatcher, which AOTAutograd turns on while it traces the joint graph, such an
operator on a meta tensor finds that Meta kernel and no autograd kernel at the
AutogradMeta key: torch warns "an autograd kernel was not registered to the Autograd
key(s)" and the backward graph loses every gradient before the operator. Eagerly, and
on any other device, the operator decomposes at its autograd key into operators that
have derivatives.

`composite_autograd_on_meta` makes the Python dispatcher decompose them at AutogradMeta
too while memopt compiles a region, so a model planned on the meta device gets the
backward graph it would get on a real device. `check_backward_reaches_inputs` warns,
once per region, when a training region's backward still computes no gradient at all
(an operator with no autograd kernel on any device, such as a custom op), naming the
cause and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch._ops import OpOverload

from memopt.errors import MemoptWarning
from memopt.graph import meta
from memopt.graph.step import StepGraphs, output_values

__all__ = ["composite_autograd_on_meta", "lost_on_meta", "check_backward_reaches_inputs"]

_KEY = torch._C.DispatchKey


def lost_on_meta() -> tuple[OpOverload, ...]:
    """The operators whose autograd the Python dispatcher loses on meta tensors: a
    Python Meta kernel beside a CompositeImplicitAutograd kernel, and no Python kernel
    of their own at AutogradMeta."""
    return tuple(op for op in _candidates() if _KEY.AutogradMeta not in op.py_kernels)


@functools.cache
def _candidates() -> tuple[OpOverload, ...]:
    import torch._meta_registrations  # noqa: F401 - registers the Python meta kernels
    from torch._decomp import global_decomposition_table

    ops = {op for table in global_decomposition_table.values() for op in table if isinstance(op, OpOverload)}
    return tuple(
        sorted(
            (
                op
                for op in ops
                if _KEY.Meta in op.py_kernels
                and torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")
            ),
            key=str,
        )
    )


def _decompose(op: OpOverload, *args: Any, **kwargs: Any) -> Any:
    return op.decompose(*args, **kwargs)


@contextlib.contextmanager
def composite_autograd_on_meta() -> Iterator[None]:
    """Inside, each operator of `lost_on_meta` decomposes at AutogradMeta under the
    Python dispatcher (its CompositeImplicitAutograd kernel, as the C++ dispatcher runs
    it), so its inputs get gradients. Only meta tensors dispatch to that key: nothing
    changes for tensors on any other device (fake or real). Re-entrant; the kernels
    are removed on exit."""
    added = lost_on_meta()
    for op in added:
        op.py_impl(_KEY.AutogradMeta)(functools.partial(_decompose, op))
    try:
        yield
    finally:
        for op in added:
            op.py_kernels.pop(_KEY.AutogradMeta, None)
            op._dispatch_cache.clear()


def check_backward_reaches_inputs(step: StepGraphs) -> None:
    """Warn (`MemoptWarning`, once per call) when ``step`` is a training region whose
    backward graph returns no gradient for any input: the plan would then be of a
    forward alone. Precondition: ``step.backward`` is AOTAutograd's backward graph,
    whose outputs are the gradients of the forward's inputs."""
    if step.backward is None or any(out is not None for out in output_values(step.backward)):
        return
    values = [meta.tensor_value(ph) for ph in step.forward.graph.find_nodes(op="placeholder")]
    on_meta = any(v is not None and v.is_meta for v in values)
    if on_meta:
        cause = "Its tensors are on the meta device, where an operator with no autograd kernel there"
        fix = (
            "compute the loss from operators with derivatives on meta (log_softmax + gather instead of "
            "nll_loss), or build the model on fake tensors of a real device (torch's FakeTensorMode, as "
            "`memopt report` does) instead of the meta device"
        )
    else:
        cause = "An operator with no autograd kernel"
        fix = (
            "register the operator's autograd (torch.library.register_autograd), or compute it from "
            "operators with derivatives"
        )
    warnings.warn(
        f"memopt: region {step.region}'s backward graph computes no gradient for any of its "
        f"{len(values)} inputs, so its plan is of a step without its backward. {cause} drops the gradient "
        "of everything before it (torch warns 'an autograd kernel was not registered to the Autograd "
        f"key(s)'). Fix: {fix}.",
        MemoptWarning,
        stacklevel=2,
    )
