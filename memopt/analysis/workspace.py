"""Transient workspace some ops allocate inside their kernels, beyond their outputs.

A graph-level liveness model sees each op's inputs and outputs, not the scratch
buffers the kernel allocates and frees before returning. For most ops that scratch is
zero; for a few it is as large as an activation and moves the step's peak. The table
below is per device type and was calibrated on CPU (oneDNN convolutions, ATen's
dropout/batch-norm/loss kernels) by measuring each op alone with
`memopt.testing.measure.measure_peak` (`tests/test_memory_analysis.py` holds some of
them to a measurement). CUDA kernels (cuDNN workspaces) are not modelled: the table is
empty there and estimates on CUDA see outputs only.

The main table describes ATen's eager kernels. Under ``codegen="inductor"`` (``fused``)
Inductor decomposes dropout, batch norm and the losses into its own kernels, and calls
oneDNN's convolutions on channels-last tensors, whose scratch is small: about the
weight plus 12 KiB forward, twice the weight plus 20 KiB backward (measured on CPU
with channels-last inputs, strides 1 and 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from memopt.analysis.aliasing import concrete_int
from memopt.codegen import cross_entropy as _cross_entropy
from memopt.codegen.promoting import PROMOTING, promoted_copy_bytes
from memopt.codegen.quantize_chunked import _chunk
from memopt.graph import meta
from memopt.codegen import quantize as _quantize  # noqa: F401  (registers memopt::(de)quantize_blockwise)
from memopt.graph import rng as _rng  # noqa: F401  (registers memopt::dropout_mask_replay)

__all__ = ["workspace_bytes", "retained_bytes"]

aten = torch.ops.aten


def _bytes(value: Any) -> int:
    if isinstance(value, fx.Node):
        value = meta.fake_value(value)
    if isinstance(value, torch.Tensor):
        return concrete_int(value.numel()) * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def _strided(node: fx.Node, index: int) -> bool:
    stride = _arg(node, index, "stride", [1])
    return any(s != 1 for s in stride) if isinstance(stride, (list, tuple)) else stride != 1


def _conv(node: fx.Node) -> int:
    # oneDNN computes into a blocked-layout buffer (the output, or for strided
    # convolutions the reordered input) and reorders the weight.
    x, w = _arg(node, 0, "input"), _arg(node, 1, "weight")
    return (_bytes(x) if _strided(node, 3) else _bytes(node)) + _bytes(w)


def _conv_backward(node: fx.Node) -> int:
    grad_out, x = _arg(node, 0, "grad_output"), _arg(node, 1, "input")
    mask = _arg(node, 10, "output_mask", [True, True, True])
    if not mask[0]:
        return _bytes(grad_out)
    return 2 * (_bytes(x) if _strided(node, 4) else _bytes(grad_out))


def _first_arg(node: fx.Node) -> int:
    return _bytes(node.args[0]) if node.args else 0


def _loss(node: fx.Node) -> int:
    reduction = _arg(node, 2, "reduction", 1)
    return _bytes(node.args[0]) if reduction != 0 else 0


def _replay_noise(node: fx.Node) -> int:
    # memopt::dropout_mask_replay draws its bool mask through a float noise tensor of
    # the default dtype (memopt.graph.rng)
    return _bytes(node) * torch.empty((), dtype=torch.get_default_dtype()).element_size()


_REPLAY = torch.ops.memopt.dropout_mask_replay.default
_DROPOUT_WITH_STATE = torch.ops.memopt.dropout_with_rng_state.default  # native_dropout inside


def _safe_softmax(node: fx.Node) -> int:
    # softmax, then the rows that are all -inf zeroed: a bool ``x == -inf`` of the input's
    # elements and its reduction over the softmax dim (measured: 2.008 MiB at 2M fp32)
    x = meta.fake_value(node.args[0])
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return 0
    numel = concrete_int(x.numel())
    dim = _arg(node, 1, "dim", -1)
    return numel + numel // max(concrete_int(x.shape[dim]), 1)


def _blockwise_elements(numel: int, block_size: int) -> int:
    """Elements one pass of memopt's chunked (de)quantization works on at once: the
    whole tensor padded to whole blocks, or one chunk (`memopt.codegen.quantize_chunked`)."""
    chunk = _chunk(block_size)
    return -(-numel // block_size) * block_size if numel <= chunk else chunk


def _quantize_scratch(node: fx.Node) -> int:
    # the scaled fp32 values per pass (the input itself is read in place when it is fp32
    # and whole blocks; else an fp32 or padded copy too); the chunked path adds the
    # per-block scales twice. Measured on CPU at 8K-1M elements (within 15%, above).
    x = meta.fake_value(_arg(node, 0, "x"))
    block = _arg(node, 1, "block_size")
    if not isinstance(x, torch.Tensor) or not isinstance(block, int):
        return 0
    numel = concrete_int(x.numel())
    at_once = _blockwise_elements(numel, block)
    if at_once < numel:
        return 4 * at_once + 2 * 4 * -(-numel // block)
    copies = 1 if numel % block == 0 and x.element_size() == 4 else 2
    return copies * 4 * at_once


def _dequantize_scratch(node: fx.Node) -> int:
    # whole blocks decode in place into the output (no scratch, for an fp32 output); a
    # padded tail decodes into a padded fp32 copy; the chunked path decodes each chunk
    # into an fp32 chunk it then copies into the output
    out = meta.fake_value(node)
    block = _arg(node, 3, "block_size")
    if not isinstance(out, torch.Tensor) or not isinstance(block, int):
        return 0
    numel = concrete_int(out.numel())
    at_once = _blockwise_elements(numel, block)
    if at_once < numel or numel % block or out.element_size() != 4:
        return 4 * at_once
    return 0


_QUANTIZE = torch.ops.memopt.quantize_blockwise.default
_DEQUANTIZE = torch.ops.memopt.dequantize_blockwise.default


def _cross_entropy_scratch(node: fx.Node, forward: bool) -> int:
    # memopt::cross_entropy and its backward hold one block of log-probabilities;
    # the forward also, for the whole op, the (N, 1) column of picked ones and the (N,)
    # targets it reduces over. With ``upcast`` and half logits the blocks are fp32 and
    # two are held at once (the widened block and its log-probabilities; in backward,
    # the log-probabilities and the gradient block) (memopt.codegen.cross_entropy).
    x = meta.fake_value(node.args[0] if forward else node.args[1])
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        return 0
    upcast = _arg(node, 4 if forward else 6, "upcast", False)
    size = _cross_entropy.compute_dtype(x.dtype, upcast).itemsize
    blocks = 2 if size != x.element_size() else 1
    rows, classes = concrete_int(x.shape[0]), concrete_int(x.shape[1])
    per_op = rows * (size + 2 * 8) if forward else 0
    return blocks * _cross_entropy.block_bytes(rows, classes, size) + per_op


_CROSS_ENTROPY = torch.ops.memopt.cross_entropy.default
_CROSS_ENTROPY_BACKWARD = torch.ops.memopt.cross_entropy_backward.default
# memopt's own ops allocate their scratch through the device's allocator on every
# device, and Inductor calls them as extern kernels: one rule everywhere.
_OWN: dict[Any, Callable[[fx.Node], int]] = {
    _CROSS_ENTROPY: lambda n: _cross_entropy_scratch(n, forward=True),
    _CROSS_ENTROPY_BACKWARD: lambda n: _cross_entropy_scratch(n, forward=False),
}

_CPU: dict[Any, Callable[[fx.Node], int]] = {
    aten.convolution.default: _conv,
    aten.convolution_backward.default: _conv_backward,
    aten.native_batch_norm_backward.default: _first_arg,
    aten.native_dropout.default: _first_arg,
    _DROPOUT_WITH_STATE: _first_arg,
    aten._safe_softmax.default: _safe_softmax,
    aten.native_dropout_backward.default: _first_arg,
    aten.mse_loss.default: _loss,
    _REPLAY: _replay_noise,
    _QUANTIZE: _quantize_scratch,
    _DEQUANTIZE: _dequantize_scratch,
    **dict.fromkeys(PROMOTING, promoted_copy_bytes),  # eager codegen: a piece (memopt.codegen.promoting)
}

_TABLES: dict[str, dict[Any, Callable[[fx.Node], int]]] = {"cpu": _CPU, "meta": _CPU}

_KIB = 1024
_CPU_FUSED: dict[Any, Callable[[fx.Node], int]] = {
    aten.convolution.default: lambda n: _bytes(_arg(n, 1, "weight")) + 12 * _KIB,
    aten.convolution_backward.default: lambda n: 2 * _bytes(_arg(n, 2, "weight")) + 20 * _KIB,
    _REPLAY: _replay_noise,  # an extern kernel under Inductor: the same workspace
    _DROPOUT_WITH_STATE: _first_arg,  # likewise
    _QUANTIZE: _quantize_scratch,  # likewise
    _DEQUANTIZE: _dequantize_scratch,
}
_FUSED_TABLES: dict[str, dict[Any, Callable[[fx.Node], int]]] = {"cpu": _CPU_FUSED, "meta": _CPU_FUSED}

# Ops whose (small) output keeps a larger buffer alive: on CPU, a reduced mse_loss
# returns a 0-dim tensor whose storage is the full elementwise-loss buffer.
_CPU_RETAINED: dict[Any, Callable[[fx.Node], int]] = {aten.mse_loss.default: _loss}
_RETAINED: dict[str, dict[Any, Callable[[fx.Node], int]]] = {"cpu": _CPU_RETAINED, "meta": _CPU_RETAINED}


def workspace_bytes(node: fx.Node, device: torch.device, fused: bool = False) -> int:
    """Scratch bytes ``node``'s kernel holds while it runs on ``device`` (0 if unknown);
    ``fused``: the kernel Inductor calls for it. Unfused CPU elementwise kernels with
    operands of different dtypes hold their promoted copies
    (`memopt.codegen.promoting`: a piece of them under the eager codegen).

    ``meta`` uses the CPU table so that estimates made on meta tensors equal those on
    CPU tensors.
    """
    rule = _OWN.get(node.target) or (_FUSED_TABLES if fused else _TABLES).get(device.type, {}).get(node.target)
    return 0 if rule is None else max(int(rule(node)), 0)


def retained_bytes(node: fx.Node, device: torch.device) -> int:
    """Extra bytes ``node``'s first output storage holds beyond its own size, for as
    long as the output lives (0 if none)."""
    rule = _RETAINED.get(device.type, {}).get(node.target)
    return 0 if rule is None else max(int(rule(node)), 0)
