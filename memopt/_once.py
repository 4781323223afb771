"""Warnings said once per Dynamo frame, not again for each recompile of it.

Dynamo compiles a frame again (compile ids ``f/1``, ``f/2``, ...) when a guard of its
earlier compiles fails. Often nothing memopt plans changes: a Hugging Face
classification model sets ``config.problem_type`` on its first call, so its second
call compiles the same graph again, and an infeasible budget was warned twice with the
same figures. A warning already given for an earlier compile of the same frame says
nothing new; memopt logs it instead (``MEMOPT_LOGS=1``).

Compile ids restart at ``0/0`` after ``torch._dynamo.reset()``, so what a frame said is
forgotten when its first compile (``f/0``) starts: `frame_compile_started`, called by
the backend for every region it compiles.
"""

from __future__ import annotations

__all__ = ["frame_compile_started", "said_before"]

_SAID: dict[str, set[str]] = {}
"""Per frame id, the keys of what its compiles warned since its first compile."""


def _frame(region: str) -> tuple[str, bool]:
    """``"3/1"`` -> ``("3", False)``; ``"3/0"`` and a restart of it (``"3/0_1"``) ->
    ``("3", True)``. A name that is not a Dynamo compile id is its own first compile."""
    frame, slash, attempt = region.partition("/")
    return frame, not slash or attempt.split("_")[0] == "0"


def frame_compile_started(region: str) -> None:
    """Forget what ``region``'s frame said when this is the frame's first compile."""
    frame, first = _frame(region)
    if first:
        _SAID.pop(frame, None)


def said_before(region: str, key: str) -> bool:
    """Whether an earlier compile of ``region``'s frame warned ``key`` (since the
    frame's first compile); records ``key`` for later compiles otherwise. The first
    compile of a frame is never told it said something before."""
    frame, first = _frame(region)
    said = _SAID.setdefault(frame, set())
    if key in said and not first:
        return True
    said.add(key)
    return False
