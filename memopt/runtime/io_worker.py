"""`IOWorker`: the background I/O thread of an offload store.

Each store (`memopt.runtime.offload_store.OffloadStore`) owns one: a daemon thread
that runs the store's jobs (writes, reads, discards of dead handles) in the order they
were submitted, from an unbounded queue. How many moves may run ahead of the step is
the store's business (its ``max_pending`` slots), not the worker's.

Jobs may be submitted from anywhere, finalizers included (`queue.SimpleQueue.put` is
reentrant). Where the thread is gone (interpreter exit, a forked child) or was never
started (`memopt.runtime.store_registry.synchronous_io`), `IOWorker.flush` and
`IOWorker.stop` run the queued jobs on the calling thread instead.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

__all__ = ["IOWorker"]

log = logging.getLogger("memopt.offload")


class IOWorker:
    """One daemon thread that runs submitted jobs in order. ``submit`` may be called
    from a finalizer (`queue.SimpleQueue.put` is reentrant)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                job()
            except Exception:  # jobs report their own errors; this is a bug in one
                log.exception("memopt offload: a background job failed")
            del job

    def _run_inline(self) -> None:
        """Run what is queued on this thread (the worker is gone: exit, fork)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job()

    def flush(self) -> None:
        """Wait until every job submitted so far has run."""
        if not self.alive():
            self._run_inline()
            return
        done = threading.Event()
        self.submit(done.set)
        while not done.wait(0.5):
            if not self.alive():
                self._run_inline()
                return

    def stop(self, timeout: float) -> None:
        """Finish the queued jobs and end the thread (waiting at most ``timeout`` s)."""
        if self.alive():
            self._queue.put(None)
            assert self._thread is not None
            self._thread.join(timeout)
        else:
            self._run_inline()
