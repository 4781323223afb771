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

A warning about the options themselves (an option the others make inert, such as
``offload_dir`` without ``offload``) is the same for every region compiled with them:
`said_since_reset` says it once for all frames, until the next ``torch._dynamo.reset()``
(seen as frame 0's first compile). It was repeated for every region of a model with a
graph break and at every recompile (unfreezing a layer between steps recompiles).
"""

from __future__ import annotations

__all__ = ["frame_compile_started", "said_before", "said_since_reset"]

_SAID: dict[str, set[str]] = {}
"""Per frame id, the keys of what its compiles warned since its first compile."""

_SAID_SINCE_RESET: set[str] = set()
"""The keys of what any compile warned since Dynamo's caches were last reset."""


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
        if frame == "0":  # the process's first compile, or the first after torch._dynamo.reset()
            _SAID_SINCE_RESET.clear()


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


def said_since_reset(key: str) -> bool:
    """Whether a compile since the last ``torch._dynamo.reset()`` (or since the process
    started) warned ``key``; records ``key`` otherwise. Precondition:
    `frame_compile_started` was called for the region compiling now."""
    if key in _SAID_SINCE_RESET:
        return True
    _SAID_SINCE_RESET.add(key)
    return False
