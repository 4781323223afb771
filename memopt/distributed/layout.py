"""Where each rank's piece of a parameter lies: dim-0 chunks as DTensor's ``Shard(0)``
cuts them (``torch.chunk``: ``ceil(rows / world)`` rows per rank, the last ranks get the
remainder or nothing).

Collectives need equal pieces, so a gathered or reduced parameter is padded to
``chunk * world`` rows and the padding is cut off again; uneven first dimensions cost
those padding rows in flight, never a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ShardLayout"]


@dataclass(frozen=True)
class ShardLayout:
    """The dim-0 split of a tensor of ``rows`` rows over ``world`` ranks, seen from
    ``rank``."""

    rows: int
    world: int
    rank: int

    @property
    def chunk(self) -> int:
        """Rows of a full piece (every piece is padded to this for collectives)."""
        return -(-self.rows // self.world)

    @property
    def padded_rows(self) -> int:
        """Rows of the padded gathered tensor: ``chunk * world``."""
        return self.chunk * self.world

    @property
    def start(self) -> int:
        """First row of this rank's piece (``rows`` when the piece is empty)."""
        return min(self.rank * self.chunk, self.rows)

    @property
    def length(self) -> int:
        """Rows this rank holds (0 for ranks past the last row)."""
        return max(0, min(self.chunk, self.rows - self.start))

    @property
    def padded_start(self) -> int:
        """First row of this rank's piece in the padded tensor: ``rank * chunk``."""
        return self.rank * self.chunk
