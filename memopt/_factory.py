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

__all__ = ["FactoryError", "load_factory", "split_spec", "user_traceback"]


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
    missing file or module, a file or module that raises while it is imported (with
    its exception and traceback), a missing name (listing the file's functions), or a
    name that is not callable."""
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
            if exc.name is None or not _names_part_of(exc.name, target):
                raise _import_failed(target, exc) from None  # found, but an import inside it failed
            raise FactoryError(
                f"cannot import module {target!r} (from {spec!r}): {exc}; run from the folder that holds "
                f"the package, or name the file instead (path/to/module.py:{name})"
            ) from None
        except Exception as exc:  # noqa: BLE001 - the user's module: say what it raised
            raise _import_failed(target, exc) from None
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
        raise FactoryError(f"{target}:{name} is {type(factory).__name__} {factory!r}, not a function")
    return factory  # type: ignore[no-any-return]


def _names_part_of(missing: str, target: str) -> bool:
    """Whether the module that could not be found is ``target`` or a package above it
    (``pkg`` of ``pkg.mod``): the spec names nothing importable, rather than a module
    that was found and failed to import one of its own dependencies."""
    return target == missing or target.startswith(missing + ".")


def _import_failed(target: str, exc: BaseException) -> FactoryError:
    """The error for a module or file that was found but raised while it was imported
    (a syntax error, a missing dependency, code at its top level that fails): the
    exception and the traceback from the user's code on, none of memopt's frames."""
    return FactoryError(f"importing {target} raised {type(exc).__name__}: {exc}\n{user_traceback(exc)}")


def user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback without its leading frames in the code that loads and calls
    the user's function (this module, memopt's CLI, importlib's machinery): it starts
    at the user's code (a `SyntaxError`'s own lines name the file, line and column)."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and _is_loader_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()


_LOADERS = (
    os.path.abspath(__file__),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli") + os.sep,
    os.path.dirname(os.path.abspath(importlib.__file__)) + os.sep,
)


def _is_loader_frame(filename: str) -> bool:
    return filename.startswith(_LOADERS) or filename.startswith("<frozen importlib")


def _import_file(path: str) -> ModuleType:
    module_name = "memopt_user_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise FactoryError(f"cannot import {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file: say what it raised
        del sys.modules[module_name]
        raise _import_failed(path, exc) from None
    return module
