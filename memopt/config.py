"""`MemoptConfig`: the typed form of ``torch.compile(..., options={...})``.

The config is built once per compile from the user's ``options`` dict and is then
read-only. Passes read it through their ``PassContext``; no pass reads a global or
an environment variable. Environment variables only switch debugging aids, and they
are resolved here, in one place (`MEMOPT_DUMP_DIR`, `MEMOPT_VERIFY`).
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["MemoptConfig", "CODEGENS", "PRECISIONS", "COMPRESSION_FORMATS", "OFFLOAD_TARGETS", "parse_size", "require_unit"]

CODEGENS: tuple[str, ...] = ("inductor", "eager")
PRECISIONS: tuple[str, ...] = ("bf16", "fp16")
COMPRESSION_FORMATS: tuple[str, ...] = ("bf16", "fp8", "int8")
OFFLOAD_TARGETS: tuple[str, ...] = ("host", "disk", "auto")


@dataclass(frozen=True)
class MemoptConfig:
    """Options of the memopt backend: `MemoptConfig.from_options` (which also reads the
    debugging environment variables) or ``MemoptConfig(**options)``; both check every
    value and raise ``ValueError`` naming it and what is allowed."""

    codegen: str = "inductor"
    """How the rewritten graphs run: ``"inductor"`` (Inductor's inner compile: Triton on
    GPU, C++ on CPU) or ``"eager"`` (the FX graphs run op by op; compiles fast)."""

    strict: bool = False
    """If True, a failure inside memopt raises instead of falling back with a warning:
    `MemoptInternalError` for any stage memopt owns (`PassFailure` for a pass), and
    `MemoptBudgetError` for an infeasible budget. Tests use it."""

    disable_passes: tuple[str, ...] = ()
    """Names of passes to skip (`memopt.passes.pass_names` lists them, the pre-autograd
    ``precision`` and ``blocked_cross_entropy`` included). An unknown name
    raises ``ValueError`` with the options."""

    dump_dir: str | None = None
    """If set, every graph is written there after each pass as readable Python,
    ``<dump_dir>/<region>/<graph>/NNN_<pass>.py``. Default: ``$MEMOPT_DUMP_DIR``."""

    verify: bool = False
    """Verify every graph after each pass: FX lint, fake-tensor metadata re-check and
    memopt's invariants. Costs compile time. Default: on when ``$MEMOPT_VERIFY`` is set to anything but
    empty or ``0``."""

    memory_budget: int | float | None = None
    """Cap on the estimated peak memory of the step (see docs/remat.md): bytes as an
    int or a string (``"6GiB"``, ``"512MB"``), or a float in (0, 1] meaning that
    fraction of the unoptimized estimated peak. None: no budget."""

    plan_across_graph_breaks: bool = True
    """Under a memory budget, plan a training step split by graph breaks as a whole:
    a region is planned with the earlier regions' saved values in place, and once a
    step has run, the regions before a graph break are compiled once more with the
    later regions known (docs/remat.md, "Graph breaks"). False: each region is
    planned alone, assuming the caller keeps its outputs through its backward."""

    planner_time_limit: float = 5.0
    """Seconds the budget planner's MILP solver may spend per solve before memopt
    falls back to its greedy heuristic."""

    rank_agreement_timeout: float | None = None
    """Under a memory budget, the seconds a rank of a sharded step (a region holding
    collectives, several ranks) waits for the other ranks to compile the same region:
    every rank runs rank 0's plan (docs/sharding.md). Past it the rank raises
    `MemoptRanksError` naming the region and the ranks that did not come (one rank alone
    compiled again), instead of a hang. None: half the default process group's timeout
    (``init_process_group(timeout=...)``; torch's default 30 minutes for gloo, 10 for
    NCCL), so that the error comes before the other ranks' collectives time out."""

    # -- precision (numerics-changing, opt-in; docs/precision.md) --------------------

    precision: str | None = None
    """``"bf16"`` or ``"fp16"``: run matmuls, convolutions and attention in that dtype
    and keep norms, softmax, reductions and losses in fp32, per the op policy table
    (``memopt.passes.precision_policy``); parameters stay fp32 masters and receive fp32
    gradients. ``None`` (default): no lowering. Changes numerics."""

    precision_policy: Mapping[str, str] = field(default_factory=lambda: _empty_policy())
    """Overrides of the precision policy table, ``{op name: mode}`` with modes
    ``"low"``, ``"fp32"``, ``"fp32_low_out"``, ``"follow"``, e.g. ``{"softmax":
    "fp32"}``. Only read when ``precision`` is set."""

    compress_activations: str | None = None
    """``"bf16"``, ``"fp8"`` (e4m3, per-block scales) or ``"int8"`` (per-block scales):
    store every eligible saved activation compressed between forward and backward
    (never parameters, inputs or views of them; never bool/integer or tiny tensors).
    ``None`` (default): saved values are stored as computed. Changes numerics.
    Under a ``memory_budget`` only the values the peak needs are compressed."""

    # -- offload (numerics-preserving; docs/offload.md) ------------------------------

    offload: str | None = None
    """Where saved activations may wait for backward: ``"host"`` (accelerator tensors
    to pinned host memory), ``"disk"`` (files under ``offload_dir``) or ``"auto"``
    (host where there is an accelerator, else disk). Without a ``memory_budget`` every
    eligible saved value of at least ``offload_min_bytes`` whose reload the cost model
    can hide is offloaded; with one, the planner chooses per value among save,
    recompute, compress and offload at the least modelled step time. ``None``
    (default): nothing is offloaded. Exact: values come back bit for bit."""

    offload_dir: str | None = None
    """Directory under which ``offload="disk"`` (or ``"auto"`` on a CPU) makes its
    private one (mode 0700, removed at exit); ``~`` is expanded and a relative path is
    taken from the current directory at compile time. Default: the system's temporary
    directory. Unused where ``"auto"`` picks host memory; refused with ``"host"``."""

    offload_bandwidth: float | None = None
    """Bytes per second to and from the offload target, used by the planner's cost
    model. Default: measured once per process and target (a short transfer)."""

    offload_min_bytes: int = 1 << 20
    """Saved values smaller than this are never offloaded (a transfer's fixed cost
    outweighs them)."""

    # -- collectives of a sharded model (docs/sharding.md) -----------------------------

    collective_bucket_bytes: int = 4 << 20
    """Largest bucket of all-gathers (of parameter shards), reduce-scatters or
    all-reduces (of gradients: stages 2-3 and 0-1) merged into one collective, in bytes of the full, gathered tensors; an
    int or a size string (``"16MiB"``). Merging amortizes each collective's fixed cost
    over small tensors (biases, norms); a bucket's buffer is live on top of the
    parameters copied out of it, so the default (4 MiB) stays near one layer of a
    small model, and larger tensors travel alone. 0 turns bucketing off. Under
    ``memory_budget``, a kind of collective this cap puts over the budget gets the
    largest halved cap that fits (docs/sharding.md). Exact."""

    collective_prefetch: int = 1
    """At most how many all-gathers ahead the step fetches parameters (each starts right
    after the wait of an earlier one), and at most how many reductions
    (reduce-scatters, all-reduces) a gradient's reduction may stay in flight behind.
    Within that bound each collective moves the fewest places at which the cost
    model's compute hides its network time (the device model's network bandwidth, one
    collective at a time per process group), or the whole bound when none does. 0:
    every collective is waited right after it starts, as traced. Under
    ``memory_budget``, each collective moves that far or as far as the budget allows
    (docs/sharding.md). Exact."""

    # -- the optimizer update inside backward (docs/whole_step.md) ------------------

    optimizer_in_backward: Any = None
    """An optimizer over the compiled model's parameters (``torch.optim.AdamW``,
    ``SGD``, memopt's ``GaLoreAdamW``, ``SubspaceAdamW``, ``AdamW8bit``, ...): each
    parameter it holds is updated inside the backward graph right after its gradient
    is complete, and the gradient is freed there instead of living until the end of
    backward. ``opt.step()`` then skips those parameters (``opt.zero_grad()`` has
    nothing to clear); the math is the optimizer's own (bitwise equal to ``step()``
    on CPU). Global-norm clipping, GradScaler and gradient accumulation cannot be
    combined with it (they raise). It also informs the plan as ``optimizer`` does,
    with each gradient dying at its update. ``None`` (default): gradients are returned
    as usual. Exact."""

    optimizer: Any = None
    """The training step's optimizer when the user calls ``opt.step()`` separately
    (read-only: memopt never steps it). It only informs the plan and the report: the
    memory timeline counts its state (measured, or predicted before its first step:
    `memopt.optim.state_size`) as live throughout the step, and the separate update
    after backward (gradients, state and the update's temporaries), so
    ``memory_budget`` is planned against what the device holds. With
    ``optimizer_in_backward`` set this may be omitted or must be the same object.
    ``None`` (default): optimizer state is not in the estimate (docs/whole_step.md)."""

    def __post_init__(self) -> None:
        # Built directly (``MemoptConfig(disable_passes=...)``, as pass tests do), each
        # value is checked as `from_options` checks it: a misspelled pass name must not
        # silently leave the pass on.
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not f.default:
                object.__setattr__(self, f.name, _validate(f.name, value))
        if self.offload == "host" and self.offload_dir is not None:
            raise ValueError(
                f"memopt options offload='host' and offload_dir={self.offload_dir!r}: host offload keeps "
                "values in pinned host memory and writes no files. Fix: drop offload_dir, or use "
                "offload='disk' (files under offload_dir) or 'auto' (host beside an accelerator, disk on a CPU)."
            )
        fused, stepped = self.optimizer_in_backward, self.optimizer
        if fused is not None and stepped is not None and fused is not stepped:
            raise ValueError(
                f"memopt options optimizer={type(stepped).__name__} and optimizer_in_backward="
                f"{type(fused).__name__} name two different optimizers; the step has one. Fix: pass the "
                "optimizer as optimizer_in_backward alone (it also informs the plan), or drop one."
            )

    @property
    def step_optimizer(self) -> Any:
        """The optimizer whose memory the plan counts: ``optimizer_in_backward`` if set,
        else ``optimizer`` (None if neither)."""
        return self.optimizer_in_backward if self.optimizer_in_backward is not None else self.optimizer

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any] | MemoptConfig | None = None
    ) -> MemoptConfig:
        """Build a config from a ``torch.compile`` options dict.

        Raises ``ValueError`` for an unknown key (naming the valid keys and the closest
        one) and for a value of the wrong type or range (naming the value and what is
        allowed).
        """
        if isinstance(options, MemoptConfig):
            return options
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise TypeError(
                f"memopt options must be a dict, got {type(options).__name__}: {options!r}"
            )
        valid = [f.name for f in fields(cls)]
        for key in options:
            if key not in valid:
                raise ValueError(_unknown_key_message(key, valid))
        values: dict[str, Any] = {"dump_dir": os.environ.get("MEMOPT_DUMP_DIR") or None}
        values["verify"] = os.environ.get("MEMOPT_VERIFY", "") not in ("", "0")
        for key, raw in options.items():
            values[key] = _validate(key, raw)
        return cls(**values)

    def replace(self, **changes: Any) -> MemoptConfig:
        """A copy with ``changes`` applied and validated."""
        merged = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in changes:
            if key not in merged:
                raise ValueError(_unknown_key_message(key, list(merged)))
        merged.update({k: _validate(k, v) for k, v in changes.items()})
        return dataclasses.replace(self, **merged)

    def budget_bytes(self, unoptimized_peak: int) -> int | None:
        """The budget in bytes for a region whose unoptimized estimated peak is
        ``unoptimized_peak`` (fractions are taken of it); None without a budget."""
        if self.memory_budget is None:
            return None
        if isinstance(self.memory_budget, float):
            return int(self.memory_budget * unoptimized_peak)
        return int(self.memory_budget)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view of the config."""
        out = dataclasses.asdict(dataclasses.replace(self, optimizer_in_backward=None, optimizer=None))
        out["disable_passes"] = list(self.disable_passes)
        for key in ("optimizer_in_backward", "optimizer"):
            opt = getattr(self, key)
            out[key] = None if opt is None else type(opt).__name__
        return out


# What a user coming from other tools calls an option memopt names otherwise.
_CONCEPTS = {
    "remat": "memory_budget", "rematerialization": "memory_budget", "checkpoint": "memory_budget",
    "checkpointing": "memory_budget", "activation_checkpointing": "memory_budget",
    "dtype": "precision", "bf16": "precision", "fp16": "precision", "amp": "precision",
    "autocast": "precision", "quantize": "compress_activations", "cpu_offload": "offload",
}  # fmt: skip


def _unknown_key_message(key: object, valid: list[str]) -> str:
    """The refusal of an unknown option: the closest spelling, else the one valid name
    containing it (``compress`` -> ``compress_activations``), else the option for what
    other tools call it (``remat`` -> ``memory_budget``), then every valid name."""
    name = str(key)
    close = difflib.get_close_matches(name, valid, n=1)
    containing = [v for v in valid if name and name.lower() in v]
    if not close and len(containing) == 1:
        close = containing
    if not close and name.lower() in _CONCEPTS:
        close = [_CONCEPTS[name.lower()]]
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"unknown memopt option {key!r}.{hint} Valid options: {', '.join(sorted(valid))}."
    )


def _choice(allowed: Iterable[str]) -> Callable[[str, Any], str]:
    allowed = tuple(allowed)

    def check(key: str, value: Any) -> str:
        if value not in allowed:
            raise ValueError(
                f"memopt option {key}={value!r} is not allowed; choose one of "
                f"{', '.join(repr(a) for a in allowed)}."
            )
        return str(value)

    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"memopt option {key}={value!r} must be True or False.")
    return value


def _names(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
        isinstance(v, str) for v in value
    ):
        raise ValueError(
            f"memopt option {key}={value!r} must be a list of pass names "
            f"(or one comma-separated string)."
        )
    return tuple(sorted(set(value)))


def _pass_names(key: str, value: Any) -> tuple[str, ...]:
    """`_names`, each one a pass of memopt's pipelines: a misspelled name must not
    silently leave the pass on."""
    from memopt.passes.pipeline import pass_names

    names = _names(key, value)
    known = pass_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        close = {n: difflib.get_close_matches(n, known, n=1) for n in unknown}
        hints = "".join(f" Did you mean {c[0]!r} for {n!r}?" for n, c in close.items() if c)
        raise ValueError(
            f"memopt option {key} names unknown pass(es) {unknown}; memopt's passes are: {', '.join(known)}.{hints}"
        )
    return names


def _optional_path(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"memopt option {key}={value!r} must be a directory path or None.")
    path = os.fspath(value)
    if not str(path).strip():  # Path("") is the working directory: never what an empty setting meant
        raise ValueError(
            f"memopt option {key}={value!r} is empty. Fix: give a directory path, or leave {key} unset "
            "(None) for the default."
        )
    return path


_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"6GiB"`` -> 6442450944; ``"512MB"`` -> 512000000; ``"1e9"`` -> 10**9."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    magnitude = _SIZE.match(text.strip()[1:]) if text.strip().startswith("-") else None
    if magnitude is not None:
        # the example must itself be accepted: a bare number under 1 KiB is refused as a
        # budget (`require_unit`), so '-1' is told '1GiB', not '1'
        example = magnitude.group(0).strip()
        if not magnitude.group(2) and float(magnitude.group(1)) < MIN_BUDGET_BYTES:
            example = f"{magnitude.group(1)}GiB"
        raise ValueError(f"memory size {text!r} is negative; a size is positive, e.g. {example!r}.")
    if match is None or unit not in _UNITS and unit != "":
        raise ValueError(
            f"memory size {text!r} not understood; write a number with an optional unit, "
            f"e.g. '6GiB', '512MB', '1.5GB' (units: {', '.join(k for k in _UNITS if len(k) > 1)})."
        )
    number = float(match.group(1))
    if unit == "" and not number.is_integer():
        raise ValueError(
            f"memory size {text!r} has no unit, so it is bytes, and bytes are whole; add a unit "
            f"(e.g. '{match.group(1)}GiB')."
        )
    return int(number * _UNITS.get(unit, 1))


MIN_BUDGET_BYTES = 1024
"""The smallest ``memory_budget`` in bytes (1 KiB): below the parameters of any model,
and under it an int is almost surely a unitless fraction or size (``1``, ``24``)."""


def require_unit(text: str, other_reading: str = "") -> None:
    """Refuse a size string that is a number under `MIN_BUDGET_BYTES` without a unit:
    almost surely not meant as bytes. ``other_reading`` names what the caller would read instead."""
    match = _SIZE.match(text)
    if match is not None and match.group(2) == "" and float(match.group(1)) < MIN_BUDGET_BYTES:
        number = text.strip()
        fix = f"add a unit ('{number}GiB')" if float(match.group(1)) > 0 else "give a positive size with a unit, e.g. '24GiB'"
        raise ValueError(
            f"{text!r} is a number without a unit, which would mean {number} bytes; {other_reading}for a size {fix}."
        )


def _budget(key: str, value: Any) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"memopt option {key}={value!r} must be a size or a fraction, not a bool.")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(
                f"memopt option {key}={value!r} must be positive: bytes (an int such as 6 * 2**30, "
                f"or a size string such as '6GiB'), or a fraction of the unoptimized peak (0.5, '50%')."
            )
        if value < MIN_BUDGET_BYTES:
            raise ValueError(
                f"memopt option {key}={value!r} is an int under 1 KiB, which would mean {value} "
                f"byte(s), almost surely not meant; for a fraction of the unoptimized peak give a "
                f"float or a percentage (1.0 or '100%' is the whole peak, 0.5 or '50%' half); for a "
                f"size add a unit ('{value}GiB')."
            )
        return value
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"memopt option {key}={value!r}: a float is a fraction of the unoptimized peak "
                f"and must be in (0, 1]; for an absolute size use an int of bytes or a string "
                f"such as '6GiB'."
            )
        return value
    if isinstance(value, str) and value.strip().endswith("%"):
        return _percent(key, value)
    if isinstance(value, str):
        try:
            require_unit(value, "for a fraction of the unoptimized peak give a float or a percentage (0.5, '50%'); ")
        except ValueError as exc:
            raise ValueError(f"memopt option {key}={exc}") from None
        size = _option_size(key, value)
        if size <= 0:
            raise ValueError(f"memopt option {key}={value!r} must be a positive size.")
        if size < MIN_BUDGET_BYTES:  # also keeps the stored int valid when __post_init__ checks it again
            raise ValueError(
                f"memopt option {key}={value!r} is {size} byte(s), under 1 KiB: below the parameters "
                f"of any model, so no plan could meet it; give a size of at least 1 KiB ('6GiB') or a "
                f"fraction of the unoptimized peak (0.5, '50%')."
            )
        return size
    raise ValueError(
        f"memopt option {key}={value!r} must be bytes (int), a size string like '6GiB', "
        f"or a fraction in (0, 1] (a float, or a percentage string like '50%')."
    )


def _option_size(key: str, value: str) -> int:
    """`parse_size`, its error naming the option."""
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ValueError(f"memopt option {key}={value!r}: {exc}") from None


def _percent(key: str, value: str) -> float:
    """``"50%"`` -> 0.5: a budget as a share of the unoptimized peak, in (0%, 100%]."""
    try:
        share = float(value.strip()[:-1])
    except ValueError:
        share = float("nan")
    if not 0.0 < share <= 100.0:  # also refuses nan
        raise ValueError(
            f"memopt option {key}={value!r}: a percentage is a share of the unoptimized peak "
            f"and must be a number in (0, 100] followed by '%', e.g. '50%'."
        )
    return share / 100.0


def _positive_seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"memopt option {key}={value!r} must be a positive number of seconds.")
    return float(value)


def _optional_seconds(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(
            f"memopt option {key}={value!r} must be a positive, finite number of seconds, or None for half the "
            "process group's timeout."
        )
    return float(value)


def _validate(key: str, value: Any) -> Any:
    """Option ``key``'s checked value. A NumPy number (``np.int64(6 * 2**30)``, a size
    computed with NumPy; ``np.float32(0.5)``) is read as the Python int or float it
    holds: each check asks for ``int``/``float``, and refused one as "must be bytes (int)"."""
    return _VALIDATORS[key](key, _plain_number(value))


def _plain_number(value: Any) -> Any:
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "memory_budget": _budget,
    "planner_time_limit": _positive_seconds,
    "rank_agreement_timeout": _optional_seconds,
    "plan_across_graph_breaks": _bool,
    "codegen": _choice(CODEGENS),
    "strict": _bool,
    "disable_passes": _pass_names,
    "dump_dir": _optional_path,
    "verify": _bool,
}


# -- precision options (see docs/precision.md) -------------------------------------


def _optional_choice(allowed: Iterable[str]) -> Callable[[str, Any], str | None]:
    allowed = tuple(allowed)

    def check_optional(key: str, value: Any) -> str | None:
        if value is not None and value not in allowed:
            raise ValueError(
                f"memopt option {key}={value!r} is not allowed; choose one of "
                f"{', '.join(repr(a) for a in allowed)}, or None to turn it off."
            )
        return value if value is None else str(value)

    return check_optional


def _optional_positive(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"memopt option {key}={value!r} must be a positive number (bytes per second), or None to measure it.")
    return float(value)


def _bytes(zero_means: str) -> Callable[[str, Any], int]:
    """A size option: bytes as an int or a size string (`parse_size`), at least 0."""

    def check_bytes(key: str, value: Any) -> int:
        size = _option_size(key, value) if isinstance(value, str) else value
        what = f"number of bytes (an int, or a size string such as '16MiB'); {zero_means}"
        return _at_least_zero(key, value, size, what)

    return check_bytes


def _count(key: str, value: Any) -> int:
    return _at_least_zero(key, value, value, "int (collectives in flight); 0 waits every collective right after it starts")


def _at_least_zero(key: str, given: Any, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"memopt option {key}={given!r} must be a non-negative {what}.")
    return value


def _optimizer(key: str, value: Any) -> Any:
    if value is None:
        return None
    from memopt.optim.in_backward import check_fusable

    check_fusable(value)
    return value


def _stepped_optimizer(key: str, value: Any) -> Any:
    import torch

    if value is None or isinstance(value, torch.optim.Optimizer):
        return value
    raise TypeError(
        f"memopt option {key}={type(value).__name__} must be a torch.optim.Optimizer over the compiled "
        "model's parameters (the one your loop steps), or None."
    )


def _precision_policy(key: str, value: Any) -> Mapping[str, str]:
    from memopt.passes.precision_policy import validate_overrides

    return validate_overrides(key, value)


def _empty_policy() -> Mapping[str, str]:
    from memopt.passes.precision_policy import PolicyOverrides

    return PolicyOverrides()


_VALIDATORS.update(
    {
        "precision": _optional_choice(PRECISIONS),
        "precision_policy": _precision_policy,
        "compress_activations": _optional_choice(COMPRESSION_FORMATS),
        "offload": _optional_choice(OFFLOAD_TARGETS),
        "offload_dir": _optional_path,
        "offload_bandwidth": _optional_positive,
        "offload_min_bytes": _bytes("0 lets every eligible value qualify"),
        "collective_bucket_bytes": _bytes("0 turns collective bucketing off"),
        "collective_prefetch": _count,
        "optimizer_in_backward": _optimizer,
        "optimizer": _stepped_optimizer,
    }
)

assert set(_VALIDATORS) == {f.name for f in fields(MemoptConfig)}, "every option needs a validator"
