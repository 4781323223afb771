"""The offload custom ops, ``torch.ops.memopt.*``, that the offload pass inserts.

Importing this module registers::

    memopt::offload(Tensor value, str store_id, str name="") -> Tensor   # token
    memopt::reload_start(Tensor token) -> Tensor                          # token
    memopt::reload_wait(Tensor token, SymInt[] size, ScalarType dtype,
                        Device device) -> Tensor                          # the value

The forward graph calls ``offload`` after the value's last forward use and saves the
token instead of the value; the backward graph calls ``reload_start`` early (prefetch)
and ``reload_wait`` right before the first use. ``store_id`` comes from
`memopt.runtime.register_store`; ``name`` labels the value in logs and errors.

Tokens are fresh CPU int64 scalar tensors holding a handle id, a new one per call, so
two forwards before one backward never collide. The value comes back bitwise equal,
with its size and dtype, contiguous (a non-contiguous value is stored as its
contiguous copy). Each handle is brought back once (no ``retain_graph`` double
backward); a handle whose tokens all die unreloaded is discarded (see
`memopt.runtime.offload_store`).

The ops are pure in the data-flow sense (token in, token or value out, every output
used), and deliberately not marked side-effectful: torch's partitioners copy an
impure op into the forward graph wherever its inputs are available, which would
reload in forward. Each offload needs a distinct ``name`` and one ``reload_start``,
so that no CSE merges two of them. Fake implementations give the outputs' metadata,
so the ops trace under FakeTensor, ``make_fx``, AOTAutograd and Dynamo, and Inductor
calls them as extern fallback kernels, never inside a CUDA graph (they are tagged
``cudagraph_unsafe``: a replay would not call the store). Under Inductor the buffer given to ``offload``
must be freed after its last use but not reused for another buffer while its write is
under way: `register_inductor_lowering` (to be called before Inductor lowers a graph
with these ops) makes Inductor free it with a plain ``del``. No autograd: the ops live below autograd, in the partitioned graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from memopt.runtime import offload_ops

__all__ = ["offload", "reload_start", "reload_wait", "register_inductor_lowering"]


def _token_like() -> torch.Tensor:
    return torch.empty((), dtype=torch.int64, device="cpu")


_NOT_IN_CUDA_GRAPHS = (torch.Tag.cudagraph_unsafe,)
"""The ops call the store from Python at every step (threads, events, handles): a CUDA
graph replay would skip that call and hand back the buffer of the capture. Inductor
keeps an op so tagged out of its CUDA graphs (a graph partition of its own, or no
cudagraphs for the graph), under ``mode="reduce-overhead"`` too."""


@torch.library.custom_op(
    "memopt::offload", mutates_args=(), schema="(Tensor value, str store_id, str name='') -> Tensor",
    tags=_NOT_IN_CUDA_GRAPHS,
)
def offload(value: torch.Tensor, store_id: str, name: str = "") -> torch.Tensor:
    """Start moving ``value`` to store ``store_id``; its token."""
    return offload_ops.offload(value, store_id, name)


@torch.library.custom_op("memopt::reload_start", mutates_args=(), schema="(Tensor token) -> Tensor",
                         tags=_NOT_IN_CUDA_GRAPHS)
def reload_start(token: torch.Tensor) -> torch.Tensor:
    """Start bringing back the value of ``token``; a second token for it."""
    return offload_ops.reload_start(token)


@torch.library.custom_op(
    "memopt::reload_wait",
    mutates_args=(),
    schema="(Tensor token, SymInt[] size, ScalarType dtype, Device device) -> Tensor",
    tags=_NOT_IN_CUDA_GRAPHS,
)
def reload_wait(
    token: torch.Tensor, size: Sequence[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The value of ``token`` (from ``offload`` or ``reload_start``), contiguous."""
    return offload_ops.reload_wait(token, list(size), dtype, device)


@offload.register_fake
def _offload_fake(value: torch.Tensor, store_id: str, name: str = "") -> torch.Tensor:
    return _token_like()


@reload_start.register_fake
def _reload_start_fake(token: torch.Tensor) -> torch.Tensor:
    return _token_like()


@reload_wait.register_fake
def _reload_wait_fake(
    token: torch.Tensor, size: Sequence[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.empty(list(size), dtype=dtype, device=device)


_lowering_registered = False

_FREE_WITHOUT_REUSE = "_memopt_free_without_reuse"
"""Attribute of Inductor's graph lowering (``V.graph``): names of the buffers read by
``memopt::offload`` in the graph being compiled."""


def _free_without_reuse(wrapper_class: type) -> None:
    """Make ``wrapper_class.codegen_free`` write a plain ``del`` for the buffers named in
    ``V.graph._memopt_free_without_reuse``.

    Inductor frees a buffer after its last use by offering it for reuse
    (``FreeIfNotReusedLine``), and writes nothing at all for a buffer in
    ``V.graph.never_reuse_buffers`` (``codegen_free`` returns early), so such a buffer
    lives until the graph returns. An offloaded buffer must be dropped (the store's own
    reference keeps its storage alive until it is written out) but never handed to
    another kernel while the store may still be reading it: a ``FreeLine``, as Inductor
    writes for graph inputs. Idempotent; other buffers go through the original method.
    """
    original = wrapper_class.codegen_free
    if getattr(original, "_memopt_free_without_reuse", False):
        return
    from torch._inductor.codegen.wrapper import FreeLine
    from torch._inductor.virtualized import V

    def codegen_free(self: Any, buffer: Any) -> None:
        name = buffer.get_name()
        if name in getattr(V.graph, _FREE_WITHOUT_REUSE, ()) and name not in self.freed:
            self.freed.add(name)  # never freed twice, never offered for reuse
            self.writeline(FreeLine(self, buffer))
            return
        original(self, buffer)

    codegen_free._memopt_free_without_reuse = True  # type: ignore[attr-defined]
    wrapper_class.codegen_free = codegen_free


def register_inductor_lowering() -> None:
    """Teach Inductor to free the buffer read by ``memopt::offload`` after its last use
    without ever reusing it for another buffer (the store may still be writing it out
    after the op returns); otherwise the op is Inductor's usual extern fallback.
    Idempotent; imports Inductor's lowering module (about a second), so memopt calls it
    only when Inductor compiles with ``offload`` set."""
    global _lowering_registered
    if _lowering_registered:
        return
    from torch._inductor import ir
    from torch._inductor.codegen.wrapper import PythonWrapperCodegen
    from torch._inductor.lowering import fallback_handler, register_lowering
    from torch._inductor.virtualized import V

    _free_without_reuse(PythonWrapperCodegen)
    op = torch.ops.memopt.offload.default
    fallback = fallback_handler(op, add_to_fallback_set=False)

    @register_lowering(op, type_promotion_kind=None)
    def _lower_offload(value: Any, store_id: str, name: str = "") -> Any:
        token = fallback(value, store_id, name)
        kernel = next(node for node in reversed(V.graph.operations)
                      if isinstance(node, ir.FallbackKernel) and node.op_overload is op)
        if not hasattr(V.graph, _FREE_WITHOUT_REUSE):
            setattr(V.graph, _FREE_WITHOUT_REUSE, set())
        for read in kernel.inputs:
            V.graph.never_reuse_buffers.add(read.get_name())
            getattr(V.graph, _FREE_WITHOUT_REUSE).add(read.get_name())
        return token

    _lowering_registered = True
