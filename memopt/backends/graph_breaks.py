"""What Dynamo did with the code around memopt's regions, read from its counters
(torch's private ``torch._dynamo.utils.counters``): the graph breaks that split the
code into regions, and the frames it skipped whole, which never reach memopt.

A graph break inside a ``for``/``while`` loop (a ``print`` or ``.item()`` in a layer
loop) cannot be resumed after: Dynamo skips the whole frame and runs it eagerly
("graph break in loop"), so nothing in it is compiled, planned or budgeted, and no
backend is called to notice. `memopt.explain` and `memopt.record` report such frames,
and, when nothing reached memopt at all, the unsupported constructs Dynamo met (an
``nn.LSTM`` makes it run its caller's frame eagerly without naming the frame).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

__all__ = ["DynamoCounts", "dynamo_counts"]

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
