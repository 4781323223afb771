"""Measure, on real example inputs, the error a numerics-changing rewrite introduces.

Precision lowering and compressed activations change numbers; their reports say by
how much on the inputs the region was compiled for. These probes run graphs eagerly
at compile time (only when asked: `PassContext.measure_error`, set while
`memopt.explain`/`memopt.record` is active), never touching the caller's tensors:
inputs are cloned, the RNG state is forked and reseeded identically for each run, so
dropout draws the same masks in the reference and the candidate.

Errors are relative L2 norms, ``||actual - expected|| / ||expected||``, in float64.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

__all__ = [
    "concrete_inputs",
    "relative_error",
    "compare_with_reference",
    "capture_values",
    "real_tensors",
]

_SEED = 0
ZERO_UP_TO_ROUNDING = 1e-6
"""A reference gradient below this fraction of all gradients' norm is zero up to fp32
rounding (`compare_with_reference`)."""


def concrete_inputs(example_inputs: Sequence[Any]) -> list[Any] | None:
    """The inputs as a list if they hold real data (no fake or meta tensors), else None."""
    for value in example_inputs:
        if isinstance(value, FakeTensor) or (
            isinstance(value, torch.Tensor) and value.device.type == "meta"
        ):
            return None
    return list(example_inputs)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (L2, float64); 0 for two zero tensors,
    inf when only ``expected`` is zero."""
    a = actual.detach().to(torch.float64)
    b = expected.detach().to(torch.float64)
    denominator = float(torch.linalg.vector_norm(b))
    difference = float(torch.linalg.vector_norm(a - b))
    if denominator == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / denominator


def _rng_devices(inputs: Iterable[Any]) -> list[int]:
    return sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda})


@contextlib.contextmanager
def real_tensors(inputs: Sequence[Any]) -> Iterator[None]:
    """Real tensors even inside a compile (AOTAutograd's fake mode is active while the
    partitioner and memopt's passes run), with the RNG forked and seeded."""
    with unset_fake_temporarily(), torch.random.fork_rng(devices=_rng_devices(inputs)):
        torch.manual_seed(_SEED)
        yield


def _clone_leaves(inputs: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for value in inputs:
        if isinstance(value, torch.Tensor):
            leaf = value.detach().clone()
            leaf.requires_grad_(value.requires_grad and leaf.is_floating_point())
            out.append(leaf)
        else:
            out.append(value)
    return out


def _run_with_grads(gm: Callable[..., Any], inputs: Sequence[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Outputs (floating tensors) and the gradients of their sum w.r.t. every input
    that requires grad (None for inputs that do not, or do not affect the outputs)."""
    with unset_fake_temporarily():
        leaves = _clone_leaves(inputs)
    with real_tensors(leaves), torch.enable_grad():
        outputs = [
            t for t in pytree.tree_leaves(gm(*leaves)) if isinstance(t, torch.Tensor) and t.is_floating_point()
        ]
        wants = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
        differentiable = [t for t in outputs if t.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(leaves)
        if wants and differentiable:
            loss = torch.stack([t.float().sum() for t in differentiable]).sum()
            found = torch.autograd.grad(loss, [leaves[i] for i in wants], allow_unused=True)
            for i, g in zip(wants, found):
                grads[i] = g
    return [t.detach() for t in outputs], grads


def compare_with_reference(
    reference: Callable[..., Any],
    candidate: Callable[..., Any],
    inputs: Sequence[Any],
    names: Sequence[str],
) -> dict[str, Any]:
    """Run ``reference`` and ``candidate`` on clones of ``inputs`` (same RNG seed) and
    report the relative error of each output and of the gradient of the outputs' sum
    with respect to each input that requires grad (keyed by ``names[i]``).

    Returns ``{"output_rel_error": max over outputs, "grad_rel_error": {name: error},
    "grad_rel_error_overall": error of all gradients as one vector (None: none),
    "grad_rel_error_max": max over the gradients that are not zero up to rounding,
    "grad_rel_error_max_of": its name, "grad_zero_up_to_rounding": [names]}``.

    A gradient whose reference norm and error are both below `ZERO_UP_TO_ROUNDING`
    times the norm of all gradients together is rounding noise around zero (a key
    projection's bias: softmax cancels its true gradient), whose relative error is
    meaningless (1e+05 on BERT in fp16 for an absolute error of 1e-6): it is named,
    not counted in the max. A tiny gradient with an error that is not tiny (a rarely
    used expert computed wrongly) stays in the max.
    """
    want_out, want_grads = _run_with_grads(reference, inputs)
    got_out, got_grads = _run_with_grads(candidate, inputs)
    if len(want_out) != len(got_out):
        raise ValueError(f"candidate returns {len(got_out)} floating outputs, reference {len(want_out)}")
    pairs = {
        names[i]: (got.detach().to(torch.float64), want.detach().to(torch.float64))
        for i, (want, got) in enumerate(zip(want_grads, got_grads))
        if want is not None and got is not None
    }
    grad_errors = {name: relative_error(got, want) for name, (got, want) in pairs.items()}
    norms = {name: float(torch.linalg.vector_norm(want)) for name, (_, want) in pairs.items()}
    errors = {name: float(torch.linalg.vector_norm(got - want)) for name, (got, want) in pairs.items()}
    total = math.sqrt(sum(n * n for n in norms.values()))
    difference = math.sqrt(sum(e * e for e in errors.values()))
    tiny = ZERO_UP_TO_ROUNDING * total
    noise = [name for name in pairs if norms[name] < tiny and errors[name] < tiny]
    counted = {name: e for name, e in grad_errors.items() if name not in noise}
    worst = max(counted, key=counted.__getitem__, default=None)
    return {
        "output_rel_error": max((relative_error(g, w) for g, w in zip(got_out, want_out)), default=0.0),
        "grad_rel_error": grad_errors,
        "grad_rel_error_overall": (difference / total if total else (0.0 if difference == 0.0 else float("inf")))
        if pairs
        else None,
        "grad_rel_error_max": None if worst is None else counted[worst],
        "grad_rel_error_max_of": worst,
        "grad_zero_up_to_rounding": noise,
    }


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.wanted = wanted
        self.captured: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.wanted and isinstance(value, torch.Tensor):
            self.captured[n] = value
        return value


def capture_values(gm: fx.GraphModule, inputs: Sequence[Any], nodes: Iterable[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Run ``gm`` on ``inputs`` (no grad, forked RNG seeded like
    `compare_with_reference`) and return the real values of ``nodes``."""
    interpreter = _Capture(gm, set(nodes))
    with real_tensors(inputs), torch.no_grad():
        interpreter.run(*inputs)
    return interpreter.captured
