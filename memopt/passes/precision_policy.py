"""The precision policy: which dtype each op of a Dynamo graph computes in, as data.

The `precision` pass (``memopt/passes/precision.py``) reads this table; users read it
here and override entries with ``options={"precision_policy": {"softmax": "fp32"}}``.
It plays the role of autocast's op lists, but as a readable mapping from op name (the
torch function or Tensor method name: ``linear``, ``matmul``, ``softmax``...) to a
mode:

``"low"``
    Floating inputs are cast to the low dtype (bf16/fp16) and the op runs in it; its
    result is low precision. For compute-bound ops (matmuls, convolutions,
    attention), where low precision halves the bytes read and uses faster units.
    Parameters are cast once per step, by one cast node shared by all their uses.
``"fp32"``
    Low-precision floating inputs are cast to fp32; the op runs and returns fp32.
    For losses and reductions, whose accumulated result is what training reads.
``"fp32_low_out"``
    Like ``"fp32"``, but the result is rounded to the low dtype: computed in fp32,
    handed on in low precision. For norms, softmax and embeddings, whose result is
    normally consumed by a lowered op (which would round it anyway): the statistics
    are exact fp32, and the values saved for backward stay low precision.
``"follow"`` (every op not in the table)
    No casts: the op runs in whatever dtype its inputs have (elementwise ops between
    lowered ops stay low precision; torch's type promotion decides mixed inputs).

Ops with an explicit ``dtype=`` argument (or a positional ``torch.dtype``), float64
inputs, or inside a user's ``torch.autocast`` block are left as written.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = [
    "PolicyOverrides",
    "MODES",
    "LOW",
    "FP32",
    "FP32_LOW_OUT",
    "FOLLOW",
    "DEFAULT_POLICY",
    "LOW_DTYPES",
    "resolve_policy",
    "validate_overrides",
    "op_name",
]

LOW = "low"
FP32 = "fp32"
FP32_LOW_OUT = "fp32_low_out"
FOLLOW = "follow"
MODES: tuple[str, ...] = (LOW, FP32, FP32_LOW_OUT, FOLLOW)

LOW_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"bf16": torch.bfloat16, "fp16": torch.float16}
)
"""The ``precision`` option's values and the dtype each lowers to."""

_MATMUL_LIKE = (
    "linear", "matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "mv",
    "einsum", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "conv_tbc", "scaled_dot_product_attention",
    "multi_head_attention_forward", "gru_cell", "lstm_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "lstm", "gru", "rnn_tanh", "rnn_relu",
)  # fmt: skip
"""Compute-bound ops, and composites of matrix products with weights (attention
modules, recurrent cells, and whole ``nn.LSTM``/``nn.GRU``/``nn.RNN`` layers, which
Dynamo traces as ``torch.lstm``... under ``torch._dynamo.config.allow_rnn``: autocast
lowers the cells too), whose eager kernels refuse a low-precision input with fp32
weights: they run in the low dtype."""
_NORMS_AND_SOFTMAX = (
    "layer_norm", "group_norm", "rms_norm", "batch_norm", "instance_norm", "softmax",
    "embedding",
)  # fmt: skip
_LOSSES = (
    "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div",
    "poisson_nll_loss", "cosine_embedding_loss", "margin_ranking_loss",
    "soft_margin_loss", "multilabel_soft_margin_loss", "triplet_margin_loss",
)  # fmt: skip
_REDUCTIONS = (
    "log_softmax", "sum", "mean", "nansum", "nanmean", "prod", "cumsum", "cumprod",
    "logsumexp", "norm", "var", "std", "var_mean", "std_mean", "cdist", "dist",
)  # fmt: skip

_SPECTRAL = (
    "fft_fft", "fft_ifft", "fft_fft2", "fft_ifft2", "fft_fftn", "fft_ifftn", "fft_rfft", "fft_irfft",
    "fft_rfft2", "fft_irfft2", "fft_rfftn", "fft_irfftn", "fft_hfft", "fft_ihfft", "fft_hfft2",
    "fft_ihfft2", "fft_hfftn", "fft_ihfftn", "stft", "istft",
)  # fmt: skip
"""``torch.fft`` (named as its functions are, ``fft_rfft`` for ``torch.fft.rfft``) and
the short-time transforms: no bf16 kernel on CPU ("Unsupported dtype BFloat16"), and
cuFFT takes fp16 at power-of-two sizes only; autocast runs them in fp32 too."""

DEFAULT_POLICY: Mapping[str, str] = MappingProxyType(
    {
        **dict.fromkeys(_MATMUL_LIKE, LOW),
        **dict.fromkeys(_NORMS_AND_SOFTMAX, FP32_LOW_OUT),
        **dict.fromkeys(_LOSSES, FP32),
        **dict.fromkeys(_REDUCTIONS, FP32),
        **dict.fromkeys(_SPECTRAL, FP32),
    }
)
"""The default table. ``log_softmax`` is fp32 (not ``fp32_low_out``) because its
result feeds a loss, where rounding log-probabilities would cost accuracy."""

_TORCH_MODULES = (
    "torch", "torch.nn.functional", "torch._C._nn", "torch.functional", "torch._C._VariableFunctions",
    "torch._C._fft",
)  # fmt: skip


class PolicyOverrides(dict[str, str]):
    """The ``precision_policy`` option's value: a read-only, hashable dict, so that
    `MemoptConfig` stays hashable and JSON-able."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("precision_policy is read-only; use MemoptConfig.replace(precision_policy=...)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only  # type: ignore[assignment]


def resolve_policy(overrides: Mapping[str, str]) -> Mapping[str, str]:
    """`DEFAULT_POLICY` with ``overrides`` applied (validated by `validate_overrides`)."""
    return MappingProxyType({**DEFAULT_POLICY, **overrides})


def _known_op(name: str) -> bool:
    return name in DEFAULT_POLICY or any(
        callable(getattr(namespace, name, None)) for namespace in (torch, F, torch.Tensor)
    )


def validate_overrides(key: str, value: Any) -> PolicyOverrides:
    """Check a ``precision_policy`` option: a mapping from op names (torch functions or
    Tensor methods) to modes. Raises ``ValueError`` naming the bad entry and the fix."""
    if not isinstance(value, Mapping):
        raise ValueError(
            f"memopt option {key}={value!r} must be a dict {{op name: mode}}, e.g. "
            f"{{'softmax': 'fp32'}}; modes: {', '.join(MODES)}."
        )
    result: dict[str, str] = {}
    for name, mode in value.items():
        if not isinstance(name, str) or not _known_op(name):
            close = difflib.get_close_matches(str(name), list(DEFAULT_POLICY), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"memopt option {key}: {name!r} is not a torch function or Tensor method "
                f"name.{hint} Use names like {', '.join(sorted(DEFAULT_POLICY)[:4])}..."
            )
        if mode not in MODES:
            raise ValueError(
                f"memopt option {key}: mode {mode!r} for {name!r} is not allowed; "
                f"choose one of {', '.join(repr(m) for m in MODES)}."
            )
        result[name] = str(mode)
    return PolicyOverrides(sorted(result.items()))


def op_name(node: fx.Node) -> str | None:
    """The policy-table name of a Dynamo-graph node: the torch function's or Tensor
    method's name (``linear``, ``matmul``, ``softmax``), or None for anything else
    (user functions, placeholders, ``operator`` arithmetic other than ``@``)."""
    target = node.target
    if node.op == "call_method" and isinstance(target, str):
        return "matmul" if target == "__matmul__" else target
    if node.op != "call_function":
        return None
    if target is operator.matmul:
        return "matmul"
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        packet = getattr(target, "overloadpacket", target)
        return str(packet.__name__).lstrip("_")
    module = getattr(target, "__module__", None)
    name = getattr(target, "__name__", None)
    if isinstance(name, str) and module in _TORCH_MODULES:
        return name
    return None
