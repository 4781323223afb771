"""`AdamW8bit`: AdamW with both moments stored as 8-bit codes with one scale per block
(Dettmers et al., 8-bit Optimizers via Block-wise Quantization, 2022).

Each parameter with at least ``min_8bit_size`` elements keeps, for ``numel`` elements in
blocks of ``block_size``: two ``uint8`` code tensors of ``numel`` bytes and two fp32
absmax tensors of ``ceil(numel / block_size)`` entries, so
``2 * numel + 8 * ceil(numel / block_size)`` bytes (about 25.4% of AdamW's ``8 * numel``
at block 256). The first moment uses the signed dynamic code, the second moment (never
negative) the unsigned one, which has no 0 (its floor is 1e-7 of the block's maximum, so
an element with a tiny second moment never steps by ``m / eps``); see
`memopt.codegen.adam8bit`. Smaller parameters (biases,
norms) keep AdamW's two moments in the parameter's dtype: quantizing them saves little
and costs accuracy.

The code tables (4 KiB per device) are shared by all parameters and are not part of the
optimizer state.

A parameter declared a piece of a larger tensor (`AdamW8bit.set_piece`: a rank's rows of
a sharded parameter, which `memopt.distributed.ShardedOptimizer` declares) is quantized
in the whole tensor's blocks, so it steps bit for bit as the whole would
(`memopt.optim._flat_piece`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from memopt.codegen.adam8bit import SIGNED_ZERO_CODE, CodeTables, adam8bit_step, code_tables
from memopt.optim._adamw import ADAMW_STATE_KEYS, adam_coefficients, adamw_group_step, torch_update_device
from memopt.optim._base import MemoptOptimizer
from memopt.optim._checks import check_adamw_group, check_int
from memopt.optim._flat_piece import FlatPiece, piece_blocks, piece_step

__all__ = ["AdamW8bit"]


class AdamW8bit(MemoptOptimizer):
    """AdamW with blockwise 8-bit moments.

    Args:
        params: parameters or param groups; a group may override any option below.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        block_size: elements per quantization block, a power of two in [16, 4096].
        min_8bit_size: parameters with fewer elements keep full-precision moments.
        kernel: ``"auto"`` (fused Triton kernel for CUDA tensors), ``"triton"`` or ``"torch"``.
    """

    owner = "AdamW8bit"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        kernel: str = "auto",
    ) -> None:
        self._tables: dict[str, CodeTables] = {}
        self._pieces: dict[torch.Tensor, FlatPiece] = {}
        """Parameters that are pieces of a larger tensor (`set_piece`)."""
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block_size=block_size,
            min_8bit_size=min_8bit_size, kernel=kernel,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        check_adamw_group(self.owner, group)
        block_size = check_int(self.owner, "block_size", group["block_size"], low=16, high=4096)
        if block_size & (block_size - 1):
            raise ValueError(f"{self.owner}: block_size={block_size} is not a power of two; expected one of 16, 32, ..., 4096")
        check_int(self.owner, "min_8bit_size", group["min_8bit_size"], low=0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's; also builds the code tables for any new device (eagerly, so a
        compiled step finds them)."""
        super().add_param_group(param_group)
        for param in self.param_groups[-1]["params"]:
            if str(param.device) not in self._tables:
                self._tables[str(param.device)] = code_tables(param.device)

    @staticmethod
    def uses_8bit(param: torch.Tensor, group: Mapping[str, Any]) -> bool:
        """Whether ``param``'s moments are quantized under ``group``'s options."""
        return param.numel() >= group["min_8bit_size"]

    def _state_keys(self, param: torch.Tensor, group: Mapping[str, Any]) -> frozenset[str]:
        if not self.uses_8bit(param, group):
            return ADAMW_STATE_KEYS
        return frozenset({"step", "exp_avg_code", "exp_avg_scale", "exp_avg_sq_code", "exp_avg_sq_scale"})

    def set_piece(self, param: torch.Tensor, piece: FlatPiece) -> None:
        """Declare ``param`` (one of this optimizer's) the piece ``piece`` of a larger
        tensor: its 8-bit moments are then quantized in the whole tensor's blocks (one
        scale per block it touches; a block shared with other pieces gets the scale the
        whole gives it, agreed through ``piece.reduce_max`` in each step), so every
        element steps bit for bit as in the whole. Before ``param``'s first step only:
        raises ``ValueError`` once it has state."""
        if self.state.get(param):
            raise ValueError(
                f"AdamW8bit.set_piece: the {tuple(param.shape)} parameter already has state in "
                "another block layout; declare its piece before its first step"
            )
        self._pieces[param] = piece

    def scale_blocks(self, param: torch.Tensor, block_size: int) -> int:
        """Scales per moment that ``param``'s 8-bit state keeps: one per block of
        ``block_size`` it touches (of the whole tensor, for a piece)."""
        piece = self._pieces.get(param) if self._pieces else None
        return piece_blocks(0 if piece is None else piece.offset, param.numel(), block_size)

    def _update(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: Mapping[str, Any],
        position: int,
    ) -> None:
        if not self.uses_8bit(param, group):
            adamw_group_step(param, grad, state, group)
            return
        if not state:
            state.update(_init_8bit_state(param, self.scale_blocks(param, group["block_size"])))
        state["step"] += 1
        # The kernels walk the parameter's memory flat: a non-contiguous one (a channels_last
        # conv weight) is stepped in a contiguous copy, in the same element order as its
        # gradient and codes, and written back.
        target = param if param.is_contiguous() else param.contiguous()
        codes = (state["exp_avg_code"], state["exp_avg_scale"], state["exp_avg_sq_code"], state["exp_avg_sq_scale"])
        tables, block_size = self._tables_for(param.device), group["block_size"]
        coefficients = adam_coefficients(group, state["step"], device=torch_update_device(group["kernel"], param))
        piece = self._pieces.get(param) if self._pieces else None
        if piece is not None and piece.shared_blocks(block_size):
            piece_step(target, grad, codes, piece, tables=tables, block_size=block_size, kernel=group["kernel"],
                       coefficients=coefficients)
        else:
            adam8bit_step(target, grad, *codes, tables=tables, block_size=block_size, kernel=group["kernel"], **coefficients)
        if target is not param:
            param.copy_(target)

    def _tables_for(self, device: torch.device) -> CodeTables:
        """The code tables on ``device``; built here for a device that no parameter was on
        when its group was added (a parameter moved in place since: module.to() with
        swapped tensors)."""
        key = str(device)
        if key not in self._tables:
            self._tables[key] = code_tables(device)
        return self._tables[key]


def _init_8bit_state(param: torch.Tensor, blocks: int) -> dict[str, Any]:
    """Zero moments: zero codes and ``blocks`` zero scales per moment."""
    numel = param.numel()
    device = param.device
    return {
        "step": 0,
        "exp_avg_code": torch.full((numel,), SIGNED_ZERO_CODE, dtype=torch.uint8, device=device),
        "exp_avg_scale": torch.zeros(blocks, dtype=torch.float32, device=device),
        "exp_avg_sq_code": torch.zeros(numel, dtype=torch.uint8, device=device),
        "exp_avg_sq_scale": torch.zeros(blocks, dtype=torch.float32, device=device),
    }
