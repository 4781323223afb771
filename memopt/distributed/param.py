"""`ShardedParam`: one parameter of a sharded model. It builds the parameter's storage
(the DTensor registered on the module), is the parametrization that hands the module
its full value (`memopt.distributed.collectives.Unshard`), and gives the optimizer the
plain local tensor it steps on.

Storage per stage (``Psi`` the parameter's elements, ``N`` the world size):

    stage  registered DTensor                 replica buffer        optimizer steps on
    0      Replicate, the full tensor         none                  the full tensor
    1      Replicate, a view of the replica   full, padded rows     this rank's rows of it
    2      Shard(0), a view of the replica    full, padded rows     this rank's rows of it
    3      Shard(0), this rank's rows         none                  this rank's rows

Stages 1 and 2 keep the full parameter in a padded replica buffer; the rank's own rows
are a view of it, so the optimizer updates the replica in place and
`gather_replicas` all-gathers the other ranks' rows after the step, several parameters
per collective (``bucket_bytes`` of full tensors, 4 MiB by default, as the compiled
steps' buckets). A 0-dimensional parameter is replicated (stage-0 treatment) at every
stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from memopt._compat import dist_all_gather_single
from memopt.distributed.collectives import Accumulate, Unshard
from memopt.distributed.layout import ShardLayout

__all__ = ["GATHER_BUCKET_BYTES", "ShardState", "ShardedParam", "gather_replicas"]

GATHER_BUCKET_BYTES = 4 * 2**20
"""Default cap of one post-step all-gather bucket (bytes of full parameters)."""


@dataclass
class ShardState:
    """What every parameter of one sharded model shares."""

    mesh: DeviceMesh
    stage: int
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    sync: bool = True
    """Reduce gradients in backward (`ShardedModule.set_requires_gradient_sync`)."""
    active: bool = True
    """Parametrization on: ``module.weight`` is the full tensor (off: the DTensor)."""
    params: dict[str, ShardedParam] = field(default_factory=dict)
    """Each parameter's handle, by its first fully qualified name."""

    @property
    def world(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    @property
    def group_name(self) -> str:
        return self.mesh.get_group().group_name


def _all_gather_single(output: torch.Tensor, piece: torch.Tensor, group: dist.ProcessGroup) -> None:
    dist_all_gather_single(output, piece, group)  # a module-level name: tests count the calls


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


class ShardedParam:
    """One parameter's sharding (see the module docstring)."""

    def __init__(self, fqn: str, tensor: torch.Tensor, state: ShardState) -> None:
        self.fqn = fqn
        self.state = state
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.device = tensor.device
        self.stage = state.stage if tensor.dim() > 0 else 0
        self.layout = ShardLayout(self.shape[0] if self.shape else 1, state.world, state.rank)
        self.kind = {0: "replicate", 1: "replicate", 2: "replica", 3: "shard"}[self.stage]
        self.locations: list[tuple[nn.Module, str]] = []
        """Every (module, name) that registers this parameter (more than one when tied)."""
        self.replica: torch.Tensor | None = None
        self.accumulator: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None
        self.reduce_dtype = state.reduce_dtype or state.param_dtype
        self.param_dtype = state.param_dtype if state.param_dtype != tensor.dtype else None

    @property
    def param(self) -> DTensor:
        """The registered DTensor parameter."""
        module, name = self.locations[0]
        return module._parameters[name]  # type: ignore[return-value]

    # ---- storage -------------------------------------------------------------------

    def build(self, tensor: torch.Tensor) -> DTensor:
        """The DTensor to register for ``tensor`` (the same values on every rank)."""
        data = tensor.detach()
        lay = self.layout
        if self.stage in (1, 2):
            self.replica = data.new_zeros((lay.padded_rows, *self.shape[1:]))
            self.replica[: lay.rows].copy_(data)
        if self.stage in (1, 2):
            local = self._replica_local()
        elif self.stage == 0:
            local = data
        else:
            local = data.narrow(0, lay.start, lay.length).clone()
        return self._registered(local)

    def _replica_local(self) -> torch.Tensor:
        """Stages 1 and 2: the registered local tensor, a view of the replica (stage 1:
        the whole parameter; stage 2: this rank's rows)."""
        assert self.replica is not None
        lay = self.layout
        return self.replica.narrow(0, 0, lay.rows) if self.stage == 1 else self.replica.narrow(0, lay.padded_start, lay.length)

    def _registered(self, local: torch.Tensor) -> DTensor:
        """``local`` as this rank's part of the DTensor registered for the parameter."""
        placement: Placement = Replicate() if self.stage in (0, 1) else Shard(0)
        return DTensor.from_local(
            local, self.state.mesh, [placement], run_check=False, shape=torch.Size(self.shape),
            stride=_contiguous_stride(self.shape),
        )  # fmt: skip

    def allocate(self, device: torch.device) -> DTensor:
        """The DTensor to register for this parameter with fresh storage on ``device``
        (values uninitialised; a replica's padding rows zero), for a parameter sharded
        on the meta device (`memopt.distributed.materialize`)."""
        lay = self.layout
        self.device = device
        if self.stage in (1, 2):
            self.replica = torch.zeros((lay.padded_rows, *self.shape[1:]), dtype=self.dtype, device=device)
            local = self._replica_local()
        elif self.stage == 3:
            local = torch.empty((lay.length, *self.shape[1:]), dtype=self.dtype, device=device)
        else:
            local = torch.empty(self.shape, dtype=self.dtype, device=device)
        return self._registered(local)

    @torch.no_grad()
    def load_full(self, value: torch.Tensor) -> None:
        """Write the full parameter ``value`` into this rank's storage (its rows, or all
        of it where the rank holds the whole tensor)."""
        if self.replica is not None:
            self.replica.narrow(0, 0, self.layout.rows).copy_(value)
        elif self.stage == 3:
            lay = self.layout
            self.param.to_local().copy_(value.narrow(0, lay.start, lay.length))
        else:
            self.param.to_local().copy_(value)

    @property
    def optimizer_placement(self) -> Placement:
        """How the optimizer's tensors of this parameter lie over the ranks."""
        return Replicate() if self.stage == 0 else Shard(0)

    def optimizer_tensor(self, param: DTensor) -> torch.Tensor:
        """The plain tensor the optimizer updates in place: an alias of this rank's part
        of ``param``'s storage (all of it at stage 0)."""
        with torch.no_grad():
            if self.stage == 1:
                return self.replica.narrow(0, self.layout.start, self.layout.length).detach()  # type: ignore[union-attr]
            return param.to_local().detach()

    def optimizer_grad(self, param: DTensor) -> torch.Tensor | None:
        """The gradient of `optimizer_tensor` (an alias of ``param.grad``'s local part)."""
        grad = param.grad
        if grad is None:
            return None
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        if self.stage == 1:
            return local.narrow(0, self.layout.start, self.layout.length)
        return local

    def own_piece(self) -> torch.Tensor:
        """This rank's padded rows of the replica (stages 1 and 2): a view."""
        assert self.replica is not None
        lay = self.layout
        return self.replica.narrow(0, lay.padded_start, lay.chunk)

    # ---- the parametrization ---------------------------------------------------------

    def __call__(self, param: DTensor) -> torch.Tensor:
        """The full parameter the module computes with (``module.weight``)."""
        state = self.state
        if not state.active:
            return param
        local = param.to_local()
        training = param.requires_grad and torch.is_grad_enabled()
        if state.sync or not training:
            pending = self._take_pending() if training else None
            return self._unshard(local, pending)
        full = self._unshard(local.detach(), None)
        assert self.accumulator is not None, "set_requires_gradient_sync(False) makes the accumulators"
        return Accumulate.apply(full, self.accumulator)

    def _unshard(self, local: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        lay = self.layout
        replica = self.replica if self.kind == "replica" else None  # stage 1 computes with its local view
        return Unshard.apply(
            local, replica, pending, self.kind, lay.rows, lay.chunk, lay.world,
            self.state.group_name, self.param_dtype, self.reduce_dtype,
        )  # fmt: skip

    # ---- gradient accumulation without sync --------------------------------------------

    def make_accumulator(self) -> None:
        """The leaf that receives the unreduced gradient without sync: a broadcast zero
        (no memory) of the parameter's full shape, in ``reduce_dtype``; autograd gives it a
        full-size ``.grad``."""
        if self.accumulator is None and self.param.requires_grad:
            dtype = self.reduce_dtype or self.dtype
            base = torch.zeros((), dtype=dtype, device=self.device)
            self.accumulator = base.expand(self.shape).requires_grad_()

    def _take_pending(self) -> torch.Tensor | None:
        pending, self.pending = self.pending, None
        return pending

    def settle_accumulated(self) -> None:
        """Move the gradient accumulated without sync to ``pending``: the next backward
        with sync adds it before reducing."""
        acc = self.accumulator
        if acc is None or acc.grad is None:
            return
        self.pending = acc.grad if self.pending is None else self.pending + acc.grad
        acc.grad = None

    def discard_accumulated(self) -> None:
        if self.accumulator is not None:
            self.accumulator.grad = None
        self.pending = None

    def has_unreduced(self) -> bool:
        """Gradient accumulated without sync that no backward has reduced yet."""
        acc = self.accumulator
        return self.pending is not None or (acc is not None and acc.grad is not None)


@torch.no_grad()
def gather_replicas(handles: Iterable[ShardedParam], bucket_bytes: int = GATHER_BUCKET_BYTES) -> int:
    """All-gather every rank's rows into the replicas of ``handles`` (stages 1 and 2;
    handles without a replica are skipped), in order, one collective per bucket of
    consecutive parameters on one mesh with one dtype and at most ``bucket_bytes`` of
    full tensors (``0``: one per parameter). A bucket concatenates each parameter's
    padded piece, gathers the flat buffer and copies each rank's part back into place
    (as FSDP2's copy-out): the same bytes as gathering one by one. Holds at most one
    bucket's gathered buffer at a time. Returns the number of collectives issued."""
    buckets: list[list[ShardedParam]] = []
    size = 0
    for handle in handles:
        if handle.replica is None:
            continue
        nbytes = handle.replica.numel() * handle.replica.element_size()
        last = buckets[-1] if buckets else None
        joins = (
            last is not None and bucket_bytes > 0 and size + nbytes <= bucket_bytes
            and last[0].state.mesh is handle.state.mesh and last[0].replica.dtype == handle.replica.dtype  # type: ignore[union-attr]
        )  # fmt: skip
        if joins:
            last.append(handle)  # type: ignore[union-attr]
            size += nbytes
        else:
            buckets.append([handle])
            size = nbytes
    for bucket in buckets:
        _gather_bucket(bucket)
    return len(buckets)


def _gather_bucket(bucket: list[ShardedParam]) -> None:
    group = bucket[0].state.mesh.get_group()
    if len(bucket) == 1:
        (handle,) = bucket
        _all_gather_single(handle.replica, handle.own_piece().clone(), group)  # type: ignore[arg-type]
        return
    pieces = [h.own_piece().reshape(-1) for h in bucket]
    flat = torch.cat(pieces)
    world = bucket[0].state.world
    gathered = flat.new_empty(world * flat.numel())  # gloo splits the output along dim 0 like the input
    _all_gather_single(gathered, flat, group)
    gathered = gathered.view(world, flat.numel())
    offset = 0
    for handle, piece in zip(bucket, pieces):
        n = piece.numel()
        handle.replica.view(world, n).copy_(gathered[:, offset : offset + n])  # type: ignore[union-attr]
        offset += n
