"""What Dynamo did with the code around memopt's regions, read from its counters
(torch's private ``torch._dynamo.utils.counters``): the graph breaks that split the
code into regions, and the frames it skipped whole, which never reach memopt.

A graph break inside a ``for``/``while`` loop (a ``print`` or ``.item()`` in a layer
loop) cannot be resumed after: Dynamo skips the whole frame and runs it eagerly
("graph break in loop"), so nothing in it is compiled, planned or budgeted, and no
backend is called to notice. `memopt.explain` and `memopt.record` report such frames,
and, when nothing reached memopt at all, the unsupported constructs Dynamo met (an
``nn.LSTM`` makes it run its caller's frame eagerly without naming the frame). Outside
them, the next region memopt compiles warns once about each frame skipped since
(`warn_skipped_frames`).
"""

from __future__ import annotations

import re
from collections import Counter
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from memopt.errors import MemoptWarning

__all__ = ["DynamoCounts", "dynamo_counts", "skipped_frames_text", "warn_skipped_frames"]

_SKIPPED = re.compile(r"frame skipped: (.+)")
_CHAINED = "*** While handling this graph break, another graph break occurred: ***"
_CONTEXT = "Developer debug context:"


@dataclass(frozen=True)
class DynamoCounts:
    """Dynamo's graph-break and unsupported-construct reasons at one moment, with counts."""

    graph_break: Counter[str]
    unimplemented: Counter[str]

    def new_graph_breaks(self) -> list[str]:
        """The reasons of the graph breaks since this snapshot: each reason's first line
        and Dynamo's hints (the rest, a developer context and a link, stays in TORCH_LOGS)."""
        return [_summary(reason) for reason in _new(self.graph_break, dynamo_counts().graph_break)]

    def new_skipped_frames(self) -> list[str]:
        """The frames Dynamo skipped since this snapshot (ran eagerly, nothing compiled),
        each as ``"forward (model.py line 12): <the graph break that caused it>"``."""
        out = []
        for reason in _new(self.unimplemented, dynamo_counts().unimplemented):
            frame = _SKIPPED.search(reason)
            if frame is not None:
                cause = reason.split(_CHAINED, 1)[0]
                out.append(f"{frame.group(1).strip()}: {_summary(cause)}")
        return out


    def new_unsupported(self) -> list[str]:
        """Constructs Dynamo did not support since this snapshot that neither broke a
        graph nor skipped a named frame (`new_skipped_frames`): an ``nn.LSTM`` makes
        Dynamo run the frame that calls it eagerly without naming it. A data-dependent
        branch is counted so too, and splits its frame instead: read these only when
        nothing reached memopt. Each as its summary and the debug context that names
        the construct (``LSTM(16, 32, batch_first=True)``)."""
        new = _new(self.unimplemented, dynamo_counts().unimplemented)
        chained = [reason for reason in new if _SKIPPED.search(reason)]
        out = []
        for reason in new:
            if _SKIPPED.search(reason) or any(c.startswith(reason) for c in chained):
                continue
            context = [line.strip() for line in reason.splitlines() if line.strip().startswith(_CONTEXT)]
            named = f" ({context[0][len(_CONTEXT):].strip()})" if context else ""
            out.append(f"{_summary(reason)}{named}")
        return out


def dynamo_counts() -> DynamoCounts:
    """Dynamo's counters now (empty if the private API moved: reports then only lose
    the reasons)."""
    try:
        from torch._dynamo.utils import counters

        return DynamoCounts(Counter(counters["graph_break"]), Counter(counters["unimplemented"]))
    except Exception:  # noqa: BLE001 - a private API
        return DynamoCounts(Counter(), Counter())


def _new(before: Counter[str], now: Counter[str]) -> list[str]:
    return [reason for reason, count in now.items() if count > before.get(reason, 0)]


def _summary(reason: str) -> str:
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    hints = [line for line in lines[1:] if line.startswith("Hint:")]
    return " ".join(lines[:1] + hints)


def skipped_frames_text(skipped_frames: Sequence[str]) -> str:
    """What a user reads about frames Dynamo skipped whole (`DynamoCounts.new_skipped_frames`):
    that memopt did not plan them, why a frame is skipped, and the fix."""
    frames = "; ".join(frame.rstrip(".") for frame in skipped_frames)
    return (
        f"Dynamo skipped {len(skipped_frames)} frame(s) whole and ran them eagerly, without memopt "
        f"(no plan, no memory_budget): {frames}. A graph break inside a for/while loop skips the "
        "function that holds the loop: move the print, .item() or data-dependent branch out of the loop "
        "(docs/remat.md, \"Graph breaks\")" + _checkpointing_advice(skipped_frames)
    )


def _checkpointing_advice(skipped_frames: Sequence[str]) -> str:
    """The fix for frames Dynamo skipped because of a higher-order op it could not trace
    (their reasons start "HOP:"), which in training code is activation checkpointing:
    torch 2.13 skips each layer Hugging Face's ``gradient_checkpointing_enable``
    checkpoints ("HOP: Unsafe side effect"), and the function that loops over layers
    whose checkpointed code writes Python state ("HOP: Non-nullified side effect").
    Else nothing."""
    if not any(": HOP: " in frame for frame in skipped_frames):
        return ""
    return (
        ". A \"HOP:\" reason is a higher-order op Dynamo could not trace, most often activation checkpointing "
        "(torch.utils.checkpoint; Hugging Face's gradient_checkpointing_enable): the code it wraps runs eagerly, "
        "with no plan, budget or precision lowering. Checkpointing and memory_budget do the same job: turn "
        "checkpointing off (model.gradient_checkpointing_disable() on a Hugging Face model) and let memory_budget "
        "choose what to recompute"
    )


_WATCHED = dynamo_counts()
"""Dynamo's counters when `warn_skipped_frames` last looked (first: when memopt was
imported, which ``torch.compile(backend="memopt")`` does before any frame compiles)."""

def warn_skipped_frames(*, recording: bool, stacklevel: int = 2) -> None:
    """Warn about the frames Dynamo skipped whole since the last look (Dynamo skips a
    frame once, until ``torch._dynamo.reset()``, so each is warned once):
    they ran without memopt, which no backend call could otherwise tell the user (a
    step's peak then includes memory no plan saw). Called by the backend for each region
    it compiles, so a frame skipped after the step's last region is told at the next
    compile, or never; ``recording`` (a `memopt.explain` / `memopt.record` is active,
    and its report names the frames) advances the look without warning. Frames skipped
    by another backend's ``torch.compile`` in the same process are counted too: Dynamo's
    counters are process-wide."""
    global _WATCHED
    new = _WATCHED.new_skipped_frames()
    _WATCHED = dynamo_counts()
    if new and not recording:
        warnings.warn("memopt: " + skipped_frames_text(new) + ".", MemoptWarning, stacklevel=stacklevel + 1)
