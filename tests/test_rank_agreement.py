"""The ranks' agreement channel (`memopt.backends.agreement`) on one in-memory store,
each rank a thread: rank 0's value on every rank, in order, whoever comes first; a rank
that comes alone raises `MemoptRanksError` after its bound, naming the region, the
ranks that did not come, how its inputs changed and the fix, instead of waiting for
ever; a verdict that an earlier process group left in the store is not taken. The
same on two processes: `tests/distributed/test_shard_ranks.py`."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.distributed as dist

from memopt.backends.agreement import KEY_PREFIX, Channel
from memopt.errors import MemoptRanksError

BEFORE = ["region 0/0", "primals_1: torch.float32", "primals_2: torch.float32 (4, 16)"]
AFTER = ["region 0/1", "primals_1: torch.float32", "s0: -", "primals_2: torch.float32 (s0, 16)"]


def _on_ranks(calls: list[Callable[[], Any]]) -> list[Any]:
    """``calls[r]()`` on a thread per rank: what each returned, or the exception it raised."""
    results: list[Any] = [None] * len(calls)

    def run(rank: int) -> None:
        try:
            results[rank] = calls[rank]()
        except Exception as exc:  # noqa: BLE001 - returned to the test
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def _channels(world: int = 2) -> tuple[Any, list[Channel]]:
    store = dist.HashStore()
    return store, [Channel(store, rank, world) for rank in range(world)]


def _late(seconds: float, call: Callable[[], Any]) -> Callable[[], Any]:
    return lambda: (time.sleep(seconds), call())[1]


def test_every_rank_gets_rank_0s_value_in_order_and_the_keys_go():
    """Three agreements, rank 1 late to the second: each returns rank 0's value on both
    ranks; only the last verdict stays in the store."""
    store, (zero, one) = _channels()
    for n, late in enumerate((0.0, 0.3, 0.0)):
        results = _on_ranks([
            lambda n=n: zero.agree("0/0", BEFORE, "the plan", {"plan": n}, 10.0),
            _late(late, lambda: one.agree("0/0", BEFORE, "the plan", {"plan": "rank 1's"}, 10.0)),
        ])  # fmt: skip
        assert [r["value"] for r in results] == [{"plan": n}, {"plan": n}], results
        assert [a["signature"] for a in results[1]["arrivals"]] == [BEFORE, BEFORE]
    assert store.num_keys() == 1 and store.check([f"{KEY_PREFIX}2/verdict"])


@pytest.mark.parametrize("alone", [0, 1])
def test_a_rank_that_compiles_alone_raises_after_its_bound(alone):
    """The ranks agreed on region 0/0 with 4 rows; then one rank alone compiles 0/1
    with a dynamic batch: it raises after 0.5 s naming the other rank, the shapes and
    the fixes (the other rank, running its step, is not there to agree)."""
    _, channels = _channels()
    _on_ranks([lambda c=c: c.agree("0/0", BEFORE, "the plan", 1, 10.0) for c in channels])
    for channel in channels:
        channel.remember("0/0", BEFORE)
    start = time.monotonic()
    with pytest.raises(MemoptRanksError) as info:
        channels[alone].agree("0/1", AFTER, "the plan", 2, 0.5)
    assert 0.5 <= time.monotonic() - start < 2.0
    other = 1 - alone
    message = str(info.value)
    assert re.match(
        rf"region 0/1: rank {alone} compiled it under a memory_budget and waited \d\.\d s for rank {other} to "
        rf"compile it too \(agreement 1 of this process group; rank {alone} arrived\)\. ", message
    ), message
    for fragment in (
        f"Rank {alone} compiles it again for inputs float32 (s0, 16) where the ranks last agreed on float32 (4, 16) "
        "(region 0/0): its inputs changed while the others' did not.",
        "inputs of the same shapes", "torch._dynamo.mark_dynamic(x, 0)", "or drop memory_budget",
        "raise options['rank_agreement_timeout'] (now 0.5 s)",
    ):  # fmt: skip
        assert fragment in message, message


def test_a_guard_that_failed_on_one_rank_is_named_as_such():
    """A rank compiles a frame again alone with the shapes the ranks agreed on: the
    message says a guard on something else failed there."""
    _, (zero, one) = _channels()
    one.remember("0/0", BEFORE)
    with pytest.raises(MemoptRanksError, match=r"a guard on something else failed on rank 1 alone \(TORCH_LOGS="):
        one.agree("0/1", ["region 0/1", *BEFORE[1:]], "the plan", 0, 0.2)


def test_a_slow_rank_is_waited_for_and_the_wait_is_said_once(caplog):
    """Rank 1 comes 0.6 s after rank 0, within rank 0's bound of 1.2 s: no error, and
    rank 0 said once (at a third of its bound) that it waits."""
    _, (zero, one) = _channels()
    with caplog.at_level(logging.WARNING, logger="memopt"):
        results = _on_ranks([
            lambda: zero.agree("0/0", BEFORE, "the plan", "rank 0's", 1.2),
            _late(0.6, lambda: one.agree("0/0", BEFORE, "the plan", "rank 1's", 1.2)),
        ])  # fmt: skip
    assert [r["value"] for r in results] == ["rank 0's", "rank 0's"], results
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and re.fullmatch(
        r"memopt: rank 0 has waited 0\.\d s for the other ranks to compile it too \(region 0/0, under a "
        r"memory_budget\); it gives up after 1\.2 s \(options\['rank_agreement_timeout'\]\)", notices[0]
    ), notices


def test_a_verdict_left_by_an_earlier_process_group_is_not_taken():
    """A store that outlives a process group (torchrun's agent store) may hold the
    verdict of its agreement 0: rank 1 waits for this group's own."""
    store, (zero, one) = _channels()
    stale = {"arrivals": [{"nonce": "old", "signature": BEFORE, "topic": "the plan"}] * 2, "value": "stale"}
    store.set(f"{KEY_PREFIX}0/verdict", json.dumps(stale))
    results = _on_ranks([
        _late(0.3, lambda: zero.agree("0/0", BEFORE, "the plan", "fresh", 5.0)),
        lambda: one.agree("0/0", BEFORE, "the plan", None, 5.0),
    ])  # fmt: skip
    assert [r["value"] for r in results] == ["fresh", "fresh"], results


def test_a_failing_store_raises_the_ranks_error():
    """The store's host is gone (rank 0's process died): the rank says so."""

    class Gone:
        def set(self, key: str, value: str) -> None:
            raise dist.DistStoreError("Connection reset by peer")

    with pytest.raises(MemoptRanksError, match=r"rank 1 could not agree on the plan .* store failed \(Connection reset"):
        Channel(Gone(), 1, 2).agree("0/0", BEFORE, "the plan", None, 5.0)


def test_the_default_bound_is_half_the_process_groups_timeout(tmp_path):
    """`default_wait_seconds` reads the timeout ``init_process_group`` gave its store."""
    from datetime import timedelta

    from memopt.backends.agreement import default_wait_seconds

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=42))  # fmt: skip
    try:
        assert default_wait_seconds() == 21.0
        assert Channel.current() is Channel.current() and Channel.current().world == 1
    finally:
        dist.destroy_process_group()
