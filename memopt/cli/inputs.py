"""What both ``memopt`` subcommands (`memopt.cli.main`'s ``report``, `memopt.cli.fit`)
read from the command line: the factory (``FILE.py:FACTORY``) and ``--options``, and
`CLIError`, the error a bad one raises (printed without a traceback, exit status 2)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

from memopt._factory import FactoryError, user_traceback
from memopt._factory import load_factory as _load

__all__ = ["CLIError", "call_factory", "load_factory", "parse_options"]


class CLIError(Exception):
    """A problem with the command line's input; printed without a traceback."""


def load_factory(spec: str) -> Callable[[], Any]:
    """``"path/to/file.py:factory"`` (or ``"package.module:factory"``) -> the factory
    function, which must take no arguments."""
    try:
        factory = _load(spec)
    except FactoryError as exc:
        raise CLIError(str(exc)) from None
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise CLIError(
            f"{spec}{inspect.signature(factory)} takes arguments; FACTORY is called with none: "
            f"give its parameters defaults or wrap it in a function of no arguments"
        ) from None
    except ValueError:  # no signature to read (a builtin): let the call say
        pass
    return factory


def call_factory(factory: Callable[[], Any], spec: str, hint: str = "") -> Any:
    """``factory()``; an exception it raises becomes a `CLIError` naming it, with the
    traceback from the factory's own frame on (none of the CLI's) and ``hint``."""
    try:
        return factory()
    except Exception as exc:  # noqa: BLE001 - the user's code: say what it raised, exit 2
        raise CLIError(f"{spec} raised {type(exc).__name__}: {exc}{hint}\n{user_traceback(exc)}") from None


def parse_options(text: str | None, check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``--options`` JSON as a dict of memopt options, checked before any work starts:
    first by ``check`` (the subcommand's own rules, such as an option it sets itself),
    then as memopt options."""
    from memopt.config import MemoptConfig

    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--options is not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise CLIError(f"--options must be a JSON object of memopt options, e.g. '{{\"codegen\": \"eager\"}}'; got {text!r}")
    if check is not None:
        check(options)
    try:
        MemoptConfig.from_options(options)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"--options: {exc}") from None
    return options
