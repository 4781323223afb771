"""`MemoptConfig`: the typed form of ``torch.compile(..., options={...})``.

The config is built once per compile from the user's ``options`` dict and is then
read-only. Passes read it through their ``PassContext``; no pass reads a global or
an environment variable. Environment variables only switch debugging aids, and they
are resolved here, in one place (`MEMOPT_DUMP_DIR`, `MEMOPT_VERIFY`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["MemoptConfig", "CODEGENS", "PRECISIONS", "COMPRESSION_FORMATS"]

CODEGENS: tuple[str, ...] = ("inductor", "eager")
PRECISIONS: tuple[str, ...] = ("bf16", "fp16")
COMPRESSION_FORMATS: tuple[str, ...] = ("bf16", "fp8", "int8")


@dataclass(frozen=True)
class MemoptConfig:
    """Options of the memopt backend. Build it with `MemoptConfig.from_options`."""

    codegen: str = "inductor"
    """How the rewritten graphs run: ``"inductor"`` (Inductor's inner compile: Triton on
    GPU, C++ on CPU) or ``"eager"`` (the FX graphs run op by op; compiles fast)."""

    strict: bool = False
    """If True, a failing memopt pass raises `PassFailure` instead of falling back to the
    unoptimized graph with a warning. Tests use it."""

    disable_passes: tuple[str, ...] = ()
    """Names of passes to skip (see ``memopt.passes.default_pipeline``). An unknown name
    raises ``ValueError`` when the pipeline is built."""

    dump_dir: str | None = None
    """If set, every graph is written there after each pass as readable Python,
    ``<dump_dir>/<region>/<graph>/NNN_<pass>.py``. Default: ``$MEMOPT_DUMP_DIR``."""

    verify: bool = False
    """Verify every graph after each pass: FX lint, fake-tensor metadata re-check and
    memopt's invariants. Costs compile time. Default: ``$MEMOPT_VERIFY`` is set to 1."""

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
    ``None`` (default): saved values are stored as computed. Changes numerics."""

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
            values[key] = _VALIDATORS[key](key, raw)
        return cls(**values)

    def replace(self, **changes: Any) -> MemoptConfig:
        """A copy with ``changes`` applied and validated."""
        merged = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in changes:
            if key not in merged:
                raise ValueError(_unknown_key_message(key, list(merged)))
        merged.update({k: _VALIDATORS[k](k, v) for k, v in changes.items()})
        return dataclasses.replace(self, **merged)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view of the config."""
        out = dataclasses.asdict(self)
        out["disable_passes"] = list(self.disable_passes)
        return out


def _unknown_key_message(key: object, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1)
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


def _optional_path(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"memopt option {key}={value!r} must be a directory path or None.")
    return os.fspath(value)


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "codegen": _choice(CODEGENS),
    "strict": _bool,
    "disable_passes": _names,
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
    }
)

assert set(_VALIDATORS) == {f.name for f in fields(MemoptConfig)}, "every option needs a validator"
