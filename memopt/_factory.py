"""Load the function a user names on a command line: ``path/to/file.py:NAME`` (the
file's folder is put on ``sys.path``, as ``python file.py`` would) or
``package.module:NAME``. Used by ``memopt report``/``memopt fit`` (FACTORY) and by
`memopt.testing.fresh_process` (the workload of a fresh process)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["FactoryError", "load_factory", "split_spec"]


class FactoryError(ValueError):
    """The named function cannot be loaded; the message says why and what to write."""


def split_spec(spec: str) -> tuple[str, str]:
    """``(file or module, function name)`` of ``spec``; `FactoryError` if malformed."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise FactoryError(
            f"expected FILE.py:FACTORY or package.module:FACTORY, got {spec!r} (e.g. examples/report_model.py:build)"
        )
    return target, name


def load_factory(spec: str) -> Callable[..., Any]:
    """The function ``spec`` names. Raises `FactoryError` for a malformed spec, a
    missing file or module, a missing name (listing the file's functions), or a name
    that is not callable."""
    target, name = split_spec(spec)
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise FactoryError(
                f"no such file: {target!r} (from {spec!r}); give the path of the .py file, relative to "
                f"{os.getcwd()!r} or absolute"
            )
        module = _import_file(target)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` would: the console script leaves it out
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise FactoryError(
                f"cannot import module {target!r} (from {spec!r}): {exc}; run from the folder that holds "
                f"the package, or name the file instead (path/to/module.py:{name})"
            ) from None
    factory = getattr(module, name, None)
    if factory is None:
        public = sorted(
            n
            for n, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == module.__name__ and not n.startswith("_")
        )
        raise FactoryError(
            f"{target} has no function {name!r}; functions defined there: {', '.join(public) or '(none)'}"
        )
    if not callable(factory):
        raise FactoryError(f"{target}:{name} is a {type(factory).__name__}, not a function")
    return factory  # type: ignore[no-any-return]


def _import_file(path: str) -> ModuleType:
    module_name = "memopt_user_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise FactoryError(f"cannot import {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec.loader.exec_module(module)
    return module
