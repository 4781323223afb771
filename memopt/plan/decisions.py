"""The typed decision memopt makes for each value the backward needs.

One of four actions, decided in `memopt.plan` and carried out by the passes (which
never decide):

* `Save`: kept in memory from forward to backward (what torch's partition does);
* `Recompute`: not saved; backward recomputes it from saved values (``remat``);
* `Compress`: saved in a smaller format, restored before its first backward use
  (``compress_activations``);
* `Offload`: moved to host memory or disk after its last forward use and reloaded
  (prefetched) before its first backward use (``offload``).

Actions are frozen and JSON-able (`action_to_dict` / `action_from_dict`), so a plan can
be written out, edited by hand and fed back to the passes (tests do that).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Union

__all__ = ["Save", "Recompute", "CAST", "Compress", "Offload", "Action", "ACTION_KINDS", "action_to_dict", "action_from_dict"]


@dataclass(frozen=True)
class Save:
    """Kept in memory from its forward producer to its last backward use."""

    kind: ClassVar[str] = "save"


@dataclass(frozen=True)
class Recompute:
    """Recomputed in backward from saved values. ``segment`` and ``option`` say which
    part of the forward the rematerialization planner recomputes it with; option
    `CAST`: a saved dtype copy cast again from its kept source (``recompute_saved_casts``)."""

    kind: ClassVar[str] = "recompute"
    segment: int | None = None
    option: str = "recompute"

    @property
    def is_cast(self) -> bool:
        """A saved dtype copy cast again in backward, not a planner's recomputation."""
        return self.option == CAST


CAST = "cast"
"""`Recompute.option` of a saved dtype copy cast again in backward."""


@dataclass(frozen=True)
class Compress:
    """Stored as ``format`` (``bf16``, ``fp8``, ``int8``, ``bits``; ``block_size``
    elements share one scale in fp8/int8) from its last forward use to its first
    backward use, where it is restored."""

    kind: ClassVar[str] = "compress"
    format: str = "bf16"
    block_size: int = 64


@dataclass(frozen=True)
class Offload:
    """Moved to ``target`` (``"host"``: pinned host memory; ``"disk"``: a file under
    the store's directory) after its last forward use; the reload starts
    ``reload_lead`` backward nodes before its first backward use (prefetch) and is
    waited for right before that use."""

    kind: ClassVar[str] = "offload"
    target: str = "disk"
    reload_lead: int = 1


Action = Union[Save, Recompute, Compress, Offload]
_BY_KIND: dict[str, type] = {cls.kind: cls for cls in (Save, Recompute, Compress, Offload)}
ACTION_KINDS = tuple(_BY_KIND)


def action_to_dict(action: Action) -> dict[str, Any]:
    return {"kind": action.kind, **asdict(action)}


def action_from_dict(data: dict[str, Any]) -> Action:
    """The action ``data`` describes (the inverse of `action_to_dict`). Raises
    ``ValueError`` for an unknown kind, or a field its kind does not have (naming the
    fields it has)."""
    fields = dict(data)
    kind = fields.pop("kind", None)
    cls = _BY_KIND.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown decision kind {kind!r}; choose one of {ACTION_KINDS}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(
            f"a {kind!r} action has no field {', '.join(map(repr, unknown))}; its fields are "
            f"{', '.join(map(repr, known)) or '(none)'} (memopt.plan.decisions.{cls.__name__})"
        )
    return cls(**fields)  # type: ignore[no-any-return]
