"""Solvers for the staged rematerialization problem (see memopt/plan/remat_problem.py).

Inputs are arrays ``S, F, P, C`` of shape ``[K, O]`` (segments x options). A choice
picks one option per segment. Its modelled peak is::

    max_k  max(F[k, o_k], P[k, o_k]) + sum_{j<k} S[j, o_j]

`solve_milp` minimizes recompute cost ``sum C[k, o_k]`` subject to that peak being at
most a budget (scipy's HiGHS, with a time limit); `solve_min_peak` minimizes the peak
itself; `solve_greedy` is the fallback heuristic.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

import numpy as np

log = logging.getLogger("memopt.plan")

__all__ = ["solve_milp", "solve_min_peak", "solve_greedy", "modelled_peak", "solver_stdout"]


@contextlib.contextmanager
def solver_stdout() -> Iterator[None]:
    """Capture what native code writes to file descriptor 1 meanwhile, and sort it.

    HiGHS prints some diagnostics from C++ to stdout even with ``disp=False``
    ("HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();"), which
    would mix into a program's own output (``memopt report --json``) and reads like an
    error. Lines that name HiGHS go to the ``memopt.plan`` logger at DEBUG
    (``MEMOPT_LOGS=debug`` shows them); any other line written meanwhile (another
    thread's output) goes to descriptor 2, so nothing is lost. Where descriptor 1
    cannot be redirected (no real stdout) or no temporary file can be made, nothing
    changes."""
    try:
        captured = tempfile.TemporaryFile()
    except OSError:  # no writable temporary directory: leave descriptor 1 alone
        yield
        return
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        captured.close()
        yield
        return
    try:
        libc: ctypes.CDLL | None = ctypes.CDLL(None)
    except (OSError, TypeError):  # no C library to flush (Windows)
        libc = None
    with captured:
        try:
            os.dup2(captured.fileno(), 1)
            yield
        finally:
            if libc is not None:
                libc.fflush(None)  # C stdio buffers still hold what was written meanwhile
            os.dup2(saved, 1)
            os.close(saved)
            captured.seek(0)
            _sort_solver_output(captured.read().decode(errors="replace"))


def _sort_solver_output(text: str) -> None:
    other = []
    for line in text.splitlines():
        if "highs" in line.lower():
            log.debug("HiGHS: %s", line.strip())
        elif line.strip():
            other.append(line + "\n")
    if other:
        os.write(2, "".join(other).encode())


def modelled_peak(S: np.ndarray, F: np.ndarray, P: np.ndarray, choice: list[int]) -> float:
    peak, earlier = 0.0, 0.0
    for k, o in enumerate(choice):
        peak = max(peak, F[k, o] + earlier, P[k, o] + earlier)
        earlier += S[k, o]
    return peak


def _constraints(S: np.ndarray, F: np.ndarray, P: np.ndarray, extra_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows: one-option-per-segment equalities, then the F and P rows (without rhs)."""
    K, O = S.shape
    n = K * O + extra_cols
    eq = np.zeros((K, n))
    for k in range(K):
        eq[k, k * O : (k + 1) * O] = 1
    rows = []
    for table in (F, P):
        for k in range(K):
            row = np.zeros(n)
            row[k * O : (k + 1) * O] = table[k]
            for j in range(k):
                row[j * O : (j + 1) * O] += S[j]
            rows.append(row)
    return eq, np.array(rows)


def _decode(x: np.ndarray, K: int, O: int) -> list[int]:
    return [int(np.argmax(x[k * O : (k + 1) * O])) for k in range(K)]


def solve_milp(
    S: np.ndarray, F: np.ndarray, P: np.ndarray, C: np.ndarray, budget: float, time_limit: float = 5.0,
    gap: float = 1e-4,
) -> tuple[list[int] | None, str]:
    """The cheapest choice whose modelled peak fits ``budget``; ``(None, why)`` if the
    model has none or the solver gave up. Ties in cost go to the lower memory."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    K, O = S.shape
    eq, rows = _constraints(S, F, P, 0)
    scale = max(float(C.max()), 1e-12)
    tie = 1e-6 * scale / max(float(S.sum()), 1.0)
    cost = (C + tie * S).reshape(-1)
    with solver_stdout():
        result = milp(
            cost,
            constraints=[LinearConstraint(eq, 1, 1), LinearConstraint(rows, -np.inf, budget)],
            integrality=np.ones(K * O),
            bounds=Bounds(0, 1),
            options={"time_limit": time_limit, "disp": False, "mip_rel_gap": gap},
        )
    if result.x is None:
        return None, result.message
    return _decode(result.x, K, O), "milp"


def solve_min_peak(
    S: np.ndarray, F: np.ndarray, P: np.ndarray, C: np.ndarray, time_limit: float = 5.0
) -> list[int]:
    """The choice with the smallest modelled peak (ties: least recompute cost)."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:  # pragma: no cover - scipy is a planner dependency
        return [int(np.argmin(F[k] + P[k] + S[k])) for k in range(S.shape[0])]
    K, O = S.shape
    eq, rows = _constraints(S, F, P, 1)
    rows[:, -1] = -1.0  # row . z - M <= 0
    scale = max(float(C.sum()), 1e-12)
    cost = np.concatenate([1e-9 * C.reshape(-1) / scale, [1.0 / max(float(S.sum() + F.max()), 1.0)]])
    upper = np.concatenate([np.ones(K * O), [np.inf]])
    with solver_stdout():
        result = milp(
            cost,
            constraints=[LinearConstraint(eq, 1, 1), LinearConstraint(rows, -np.inf, 0)],
            integrality=np.concatenate([np.ones(K * O), [0]]),
            bounds=Bounds(np.zeros(K * O + 1), upper),
            options={"time_limit": time_limit, "disp": False},
        )
    if result.x is None:
        return solve_greedy(S, F, P, C, 0.0)
    return _decode(result.x, K, O)


def solve_greedy(S: np.ndarray, F: np.ndarray, P: np.ndarray, C: np.ndarray, budget: float) -> list[int]:
    """Start from the cheapest option everywhere; while the modelled peak exceeds the
    budget, make the switch with the best peak reduction per added second."""
    K, O = S.shape
    choice = [int(np.argmin(C[k])) for k in range(K)]
    peak = modelled_peak(S, F, P, choice)
    while peak > budget:
        best: tuple[float, int, int, float] | None = None
        for k in range(K):
            for o in range(O):
                if o == choice[k]:
                    continue
                trial = choice.copy()
                trial[k] = o
                new_peak = modelled_peak(S, F, P, trial)
                gain = peak - new_peak
                if gain <= 0:
                    continue
                added = max(C[k, o] - C[k, choice[k]], 1e-12)
                ratio = gain / added
                if best is None or ratio > best[0]:
                    best = (ratio, k, o, new_peak)
        if best is None:
            break
        _, k, o, peak = best
        choice[k] = o
    return choice
