"""The operating system's view of a step's memory: growth of the resident set (Linux).

The resident set's high-water mark (``VmHWM`` in ``/proc/self/status``) is reset to the
current resident set by writing ``5`` to ``/proc/self/clear_refs`` (Linux 4.0+). The
step's OS-view peak growth is ``VmHWM`` after the step minus ``VmRSS`` before it.

It only means something when glibc hands freed memory back to the OS: by default
glibc's mmap threshold grows as large blocks are freed (up to 32 MiB), after which
freed tensors stay in the heap and the resident set keeps them. Fixing the threshold
(`MALLOC_ENV`) makes every block of 64 KiB or more its own mapping, unmapped on free.
glibc reads these variables once, at the process's first ``malloc``, so they must be in
the environment *before the process starts*; `malloc_env_note` checks the process's
initial environment (``/proc/self/environ``), which setting ``os.environ`` later does
not change. `memopt.testing.measure.measure_in_fresh_process` starts a process with
them set.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

__all__ = [
    "MALLOC_ENV", "OsSample", "OsViewUnavailable", "malloc_env_note", "read_status_kib", "reset_peak_rss", "trim_heap",
]

MALLOC_ENV: dict[str, str] = {
    # Blocks of 64 KiB and more get their own mapping, returned to the OS on free.
    # Setting it also stops glibc from raising the threshold as blocks are freed.
    "MALLOC_MMAP_THRESHOLD_": "65536",
    # Give the heap's free top back to the OS once it exceeds 128 KiB...
    "MALLOC_TRIM_THRESHOLD_": "131072",
    # ...and grow the heap by no more than asked.
    "MALLOC_TOP_PAD_": "0",
}

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_ENVIRON = "/proc/self/environ"
_SLACK = 4 * 2**20


@dataclass(frozen=True)
class OsSample:
    """Resident-set figures of this process, in bytes, read from ``/proc/self/status``."""

    rss: int
    hwm: int


def read_status_kib(path: str = _STATUS) -> OsSample:
    """``VmRSS`` and ``VmHWM`` of this process (the file reports KiB)."""
    fields: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    if len(fields) != 2:
        raise OSError(f"{path} has no VmRSS/VmHWM lines")
    return OsSample(rss=fields["VmRSS"], hwm=fields["VmHWM"])


class OsViewUnavailable(OSError):
    """This process cannot give the OS view; the message says why."""


def reset_peak_rss() -> OsSample:
    """Reset this process's resident-set high-water mark to its current resident set and
    return the figures just after the reset.

    Raises `OsViewUnavailable` saying why where that cannot be done: not Linux,
    ``/proc`` not readable or ``clear_refs`` not writable, or a kernel that ignores the
    reset."""
    if not sys.platform.startswith("linux"):
        raise OsViewUnavailable(f"the OS view needs Linux's /proc (platform is {sys.platform})")
    try:
        before = read_status_kib()
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        sample = read_status_kib()
    except OSError as e:
        raise OsViewUnavailable(f"cannot reset the resident-set peak through {_CLEAR_REFS}: {e}") from e
    # A reset brings the mark down to the resident set. Only a mark well above the
    # resident set shows whether it happened (the kernel's counters are approximate).
    if before.hwm > before.rss + _SLACK and sample.hwm >= before.hwm:
        raise OsViewUnavailable(
            f"writing 5 to {_CLEAR_REFS} did not reset VmHWM (still {sample.hwm} B, VmRSS {sample.rss} B); "
            f"the kernel predates Linux 4.0 or emulates /proc"
        )
    return sample


def trim_heap() -> bool:
    """Give the free pages inside glibc's heaps back to the OS (``malloc_trim(0)``);
    False where there is no glibc.

    Freed blocks below the mmap threshold stay in the heap, resident, wherever a live
    block above them stops the heap's top from shrinking. A step then reuses them
    without growing the resident set, so its OS view depends on what earlier code
    freed (ViT after a recompile: 21 MiB free in the heap, the OS view 17% below the
    allocator's). Trimming before the step makes the view independent of that history."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return False
    return True


def malloc_env_note(environ_path: str = _ENVIRON) -> str:
    """Empty if this process started with `MALLOC_ENV` fixed, else the caveat to record
    with an OS-view figure (freed memory may stay resident, so the figure can miss frees
    or count memory an earlier step left behind)."""
    try:
        with open(environ_path, "rb") as f:
            entries = f.read().split(b"\0")
    except OSError as e:
        return f"cannot read the process's initial environment ({e}); glibc malloc settings unknown"
    initial = dict(e.decode(errors="replace").partition("=")[::2] for e in entries if b"=" in e)
    missing = [k for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k not in initial]
    if not missing:
        return ""
    return (
        f"process started without {', '.join(missing)}: glibc may keep freed blocks resident, "
        f"so the OS view can differ from the memory the step needed; measure with "
        f"memopt.testing.measure.measure_in_fresh_process (sets {', '.join(MALLOC_ENV)})"
    )
