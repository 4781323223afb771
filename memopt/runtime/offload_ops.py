"""The offload operations as the compiled graphs call them: by store id and by token.

The custom ops of `memopt.codegen.offload` (``torch.ops.memopt.offload``,
``reload_start``, ``reload_wait``) call these functions. ``offload`` finds its store by
the id the offload pass baked into the graph (`memopt.runtime.store_registry.get_store`);
the reloads find the store that holds a handle from the token alone (the process-wide
table of live handles, `memopt.runtime.offload_store`).
"""

from __future__ import annotations

import torch

from memopt.errors import MemoptOffloadError
from memopt.runtime.offload_store import _HANDLES, OffloadStore, _unknown_handle
from memopt.runtime.store_registry import get_store

__all__ = ["offload", "reload_start", "reload_wait"]


def _handle_of(token: torch.Tensor) -> int:
    if not (isinstance(token, torch.Tensor) and token.dtype == torch.int64 and token.dim() == 0
            and token.device.type == "cpu"):
        raise TypeError("an offload token is a CPU int64 scalar tensor made by memopt::offload")
    return int(token.item())


def _owner(hid: int) -> OffloadStore:
    store = _HANDLES.get(hid)
    if store is None:
        raise MemoptOffloadError(_unknown_handle(hid))
    return store


def offload(value: torch.Tensor, store_id: str, name: str = "") -> torch.Tensor:
    """Start moving ``value`` to store ``store_id``; its token."""
    return get_store(store_id).offload(value, name)


def reload_start(token: torch.Tensor) -> torch.Tensor:
    """Start bringing back the value of ``token``; a second token for it."""
    hid = _handle_of(token)
    return _owner(hid).reload_start(hid)


def reload_wait(token: torch.Tensor, size: list[int], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """The value of ``token`` (either token of its handle), contiguous."""
    hid = _handle_of(token)
    return _owner(hid).reload_wait(hid, size, dtype, device)

