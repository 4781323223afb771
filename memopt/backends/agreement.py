"""The channel through which the ranks of a sharded step agree on a plan: the default
process group's store (`memopt.backends.ranks` says what is agreed and why).

The store is the c10d key-value store ``init_process_group`` rendezvoused on (a
TCPStore under torchrun, a FileStore for ``file://``), not a collective of the group:
a rank that compiles alone (a guard failed on it only) would otherwise enter its
collective while the others run their step, whose collectives would pair with it
(gloo aborted on the mismatched sizes; with sizes that match, a hang until the group's
timeout, or wrong bytes).

The n-th agreement of a process (per process group) has keys under
``memopt/agree/<n>/``: ``<rank>``, each rank's arrival (a nonce, its graphs' signature,
what it asks for), and ``verdict``, which rank 0 writes once every rank has arrived
(every arrival, and rank 0's value). Rank 0 deletes the arrivals once read, and the
previous verdict once every rank has arrived at the next agreement (so has read it).

A rank waits at most a bound (``rank_agreement_timeout``; by default half the group's
timeout, so that it speaks before the other ranks' collectives, which wait for it,
time out), says once on the ``memopt`` logger that it still waits, then raises
`MemoptRanksError` naming the region, the ranks that did not come, how its inputs
differ from those the ranks last agreed on, and the fix.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch.distributed as dist

from memopt.errors import MemoptRanksError

__all__ = ["KEY_PREFIX", "NOTICE_AFTER_S", "Channel", "default_wait_seconds"]

T = TypeVar("T")

log = logging.getLogger("memopt")

KEY_PREFIX = "memopt/agree/"
"""The prefix of the agreement keys in the default process group's store."""

NOTICE_AFTER_S = 30.0
"""A rank still waiting after this long (or a third of its bound, if shorter) says so
once, on the ``memopt`` logger at warning level."""

_POLL_S = (0.001, 0.05)
"""The store is polled with ``check`` (its ``wait`` logs a C++ warning at each time-out)
every 1 ms at first, the pause doubling up to 50 ms."""


def default_wait_seconds() -> float:
    """How long a rank waits for the others by default: half the timeout of the default
    process group's store, which ``init_process_group`` sets to the group's timeout
    (torch's default: 30 minutes for gloo, 10 for NCCL). Half, so that the rank that
    waits raises its error before the other ranks' collectives, which wait for it, time
    out with theirs (they entered them at most a compile earlier)."""
    from torch.distributed.distributed_c10d import _get_default_store

    seconds = _get_default_store().timeout.total_seconds()
    return seconds / 2 if seconds > 0 else 900.0


@dataclass
class Channel:
    """This process's agreements over one store (``world`` ranks, this one ``rank``).

    Preconditions: every rank calls `agree` at the same points, in the same order (the
    n-th call on one rank pairs with the n-th on every other). Guarantees: `agree`
    returns the same verdict on every rank, or raises `MemoptRanksError` on a rank that
    waited past its bound; keys are left behind only by an agreement that failed."""

    store: Any  # torch.distributed.Store
    rank: int
    world: int
    count: int = 0
    """Agreements begun (the next one's number)."""
    agreed: dict[str, list[str]] = field(default_factory=dict)
    """Per Dynamo frame (``"0"`` of region ``"0/1"``), the signature the ranks last agreed on."""

    @staticmethod
    def current() -> Channel:
        """The channel of the default process group (a new one after a new
        ``init_process_group``: its count starts at 0 on every rank)."""
        from torch.distributed.distributed_c10d import _get_default_store

        global _CURRENT
        store = _get_default_store()
        if _CURRENT is None or _CURRENT.store is not store:
            _CURRENT = Channel(store, dist.get_rank(), dist.get_world_size())
        return _CURRENT

    def agree(self, region: str, signature: list[str], topic: str, value: Any, wait_s: float) -> dict[str, Any]:
        """The next agreement's verdict: ``{"arrivals": [{"signature", "topic",
        "nonce"} per rank], "value": rank 0's value}`` (``value`` is JSON-able). A nonce
        per arrival tells this agreement's verdict from one that a process group before
        left in a store that outlived it (torchrun's agent store).

        Raises `MemoptRanksError` after ``wait_s`` seconds without the other ranks, or
        when the store fails (its host, rank 0 or torchrun's agent, is gone)."""
        wait = _Wait(self, region, signature, self.count, wait_s)
        self.count += 1
        try:
            return self._agree(wait, topic, value)
        except dist.DistError as exc:
            raise MemoptRanksError(
                f"region {region}: rank {self.rank} could not agree on {topic} with the other ranks under a "
                f"memory_budget: the process group's store failed ({exc}). Another rank has likely failed: see "
                "its error"
            ) from exc

    def remember(self, region: str, signature: list[str]) -> None:
        """The ranks agreed on ``signature`` for ``region``: what a later error compares to."""
        self.agreed[_frame(region)] = signature

    def _agree(self, wait: _Wait, topic: str, value: Any) -> dict[str, Any]:
        prefix = f"{KEY_PREFIX}{wait.n}/"
        nonce = secrets.token_hex(8)
        self.store.set(f"{prefix}{self.rank}", json.dumps({"nonce": nonce, "signature": wait.signature, "topic": topic}))
        if self.rank == 0:
            arrivals = [f"{prefix}{r}" for r in range(self.world)]
            wait.poll(lambda: True if self.store.check(arrivals) else None, "the other ranks to compile it too")
            verdict = {"arrivals": [json.loads(self.store.get(key)) for key in arrivals], "value": value}
            self.store.set(f"{prefix}verdict", json.dumps(verdict))
            for key in arrivals:  # read by rank 0 alone
                self.store.delete_key(key)
            if wait.n > 0:
                self.store.delete_key(f"{KEY_PREFIX}{wait.n - 1}/verdict")
            return verdict

        def ready() -> dict[str, Any] | None:
            if not self.store.check([f"{prefix}verdict"]):
                return None
            verdict: dict[str, Any] = json.loads(self.store.get(f"{prefix}verdict"))
            return verdict if verdict["arrivals"][self.rank]["nonce"] == nonce else None

        return wait.poll(ready, "rank 0's plan")


_CURRENT: Channel | None = None


@dataclass
class _Wait:
    """One rank waiting at agreement ``n`` for ``region``: the bound, the notice, the error."""

    channel: Channel
    region: str
    signature: list[str]
    n: int
    wait_s: float

    def poll(self, ready: Callable[[], T | None], what: str) -> T:
        """``ready()`` once it is not None, polling until then; says once that it still
        waits; raises `MemoptRanksError` after ``wait_s`` seconds."""
        start = time.monotonic()
        pause, noticed = _POLL_S[0], False
        while (result := ready()) is None:
            waited = time.monotonic() - start
            if waited >= self.wait_s:
                raise MemoptRanksError(self.message(waited))
            if not noticed and waited >= min(NOTICE_AFTER_S, self.wait_s / 3):
                noticed = True
                log.warning(
                    "memopt: rank %d has waited %.1f s for %s (region %s, under a memory_budget); it gives up "
                    "after %g s (options['rank_agreement_timeout'])",
                    self.channel.rank, waited, what, self.region, self.wait_s,
                )  # fmt: skip
            time.sleep(min(pause, self.wait_s - waited))
            pause = min(pause * 2, _POLL_S[1])
        return result

    def message(self, waited: float) -> str:
        """What went wrong, what differs, the fix."""
        channel = self.channel
        prefix = f"{KEY_PREFIX}{self.n}/"
        came = [r for r in range(channel.world) if r == channel.rank or _present(channel.store, f"{prefix}{r}")]
        missing = [r for r in range(channel.world) if r not in came] or [0]  # else rank 0 read them, then stopped
        who, they = _ranks(missing), "it is" if len(missing) == 1 else "they are"
        return (
            f"region {self.region}: rank {channel.rank} compiled it under a memory_budget and waited {waited:.1f} s "
            f"for {who} to compile it too (agreement {self.n} of this process group; {_ranks(came)} arrived). "
            "Under a budget every rank runs rank 0's plan, so each region holding collectives must be compiled by "
            f"every rank at once; {who} did not: {they} likely running the step, whose collectives wait for rank "
            f"{channel.rank}. {self._cause()} Fix: give every rank inputs of the same shapes at every step (pad to "
            "one length, drop a short last batch), or mark the dimensions that change dynamic on every rank from "
            "the first step (torch._dynamo.mark_dynamic(x, 0)), so that no rank compiles again alone; or drop "
            "memory_budget (each rank then plans its own graphs and nothing is agreed). If a rank is only slower "
            f"to get here, raise options['rank_agreement_timeout'] (now {self.wait_s:g} s)."
        )

    def _cause(self) -> str:
        """How this rank's inputs differ from those the ranks last agreed on for the
        same Dynamo frame, if they did."""
        rank = self.channel.rank
        before = self.channel.agreed.get(_frame(self.region))
        if before is None:
            return f"Rank {rank} compiles this code for the first time under an agreement."
        then, now = _shapes(before), _shapes(self.signature)
        if then == now:
            return (
                f"Its inputs' shapes are those the ranks last agreed on ({before[0]}): a guard on something else "
                f"failed on rank {rank} alone (TORCH_LOGS=recompiles names it)."
            )
        return (
            f"Rank {rank} compiles it again for inputs {', '.join(now)} where the ranks last agreed on "
            f"{', '.join(then)} ({before[0]}): its inputs changed while the others' did not."
        )


def _shapes(signature: list[str]) -> list[str]:
    """The dtypes and shapes of a signature's tensor inputs that are not parameters
    (`memopt.backends.ranks.signature` gives parameters their dtype alone): ``["float32 (4, 16)"]``."""
    return [entry.split(": ", 1)[1].removeprefix("torch.") for entry in signature[1:] if entry.endswith(")")]


def _present(store: Any, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except dist.DistError:  # the store's host is gone: the message is best effort
        return False


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _frame(region: str) -> str:
    """Dynamo's frame of a region (``"0"`` of compile id ``"0/1"``)."""
    return region.split("/")[0]
