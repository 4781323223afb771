"""``memopt report FILE.py:FACTORY``: a compile-time memory report for a user's model
(and ``memopt fit``, `memopt.cli.fit`).

The factory is a function of no arguments in FILE.py returning ``(model, inputs)``
(or ``(model, inputs, optimizer)``, planned as ``options={"optimizer": optimizer}``):
``model`` is an ``nn.Module`` or any callable, ``inputs`` a tensor, a tuple/list of
positional arguments or a dict of keyword arguments (a Hugging Face model's
``input_ids=..., labels=...``). By default the factory runs under a FakeTensorMode, so
the model and its inputs are fake tensors: nothing real is allocated, and a model
larger than this machine's memory can be estimated. ``--real`` runs it on real tensors
instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from memopt.cli.inputs import CLIError, call_factory, load_factory, parse_options

__all__ = ["main"]

REPORT_HELP = """\
memopt report FILE.py:FACTORY: a compile-time memory report for a model.

FACTORY is a function of no arguments in FILE.py (or package.module:FACTORY, an
importable module) returning (model, inputs) or (model, inputs, optimizer): model is an
nn.Module or any callable, inputs a tensor, a tuple of positional arguments or a dict of
keyword arguments, optimizer one over the model's parameters, whose state and update
the report then counts (options={"optimizer": opt}). The
factory runs under a FakeTensorMode by default, so nothing real is allocated and a
model larger than this machine can be estimated; --real builds it on real tensors
instead.
"""


def _unpack(result: Any, spec: str) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Any]:
    """(model, positional inputs, keyword inputs, optimizer or None) of a factory's
    ``(model, inputs)`` or ``(model, inputs, optimizer)``."""
    import torch

    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise CLIError(
            f"{spec} must return (model, inputs) or (model, inputs, optimizer); got {type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        )
    model, inputs, optimizer = (*result, None) if len(result) == 2 else result
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise CLIError(
            f"{spec} returned a {type(optimizer).__name__} as the optimizer; expected a torch.optim.Optimizer over "
            f"the model's parameters (or return (model, inputs))"
        )
    if not callable(model):
        raise CLIError(f"{spec} returned a {type(model).__name__} as the model; expected an nn.Module or callable")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, dict) and all(isinstance(k, str) for k in inputs):
        return model, (), dict(inputs), optimizer
    if not isinstance(inputs, (tuple, list)):
        raise CLIError(
            f"{spec} returned inputs of type {type(inputs).__name__}; expected a tensor, a tuple of "
            "positional arguments or a dict of keyword arguments"
        )
    return model, tuple(inputs), {}, optimizer


class _Progress:
    """Stage messages on stderr, with a heartbeat while a stage runs long."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"[memopt {time.perf_counter() - self.start:5.1f}s] {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, message: str, every: float = 10.0) -> Iterator[None]:
        self.say(message + " ...")
        done = threading.Event()

        def beat() -> None:
            while not done.wait(every):
                self.say(f"still {message.lower()}")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def _run_report(args: argparse.Namespace) -> int:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memopt.explain import backward_with_forward

    progress = _Progress(args.quiet)
    options = parse_options(args.options)
    options.setdefault("codegen", "eager")
    for path in (args.plot, args.snapshot):
        _check_output(path)
    if args.plot and os.path.splitext(args.plot)[1].lower() not in (".png", ".svg", ".pdf"):
        raise CLIError(f"--plot {args.plot!r}: write a .png, .svg or .pdf file")
    if args.plot:
        from memopt.plan.plot import pyplot

        try:
            pyplot()
        except ImportError as exc:
            raise CLIError(f"--plot {args.plot!r}: {exc}; or drop --plot") from None
    with progress.stage(f"importing {args.target}"):
        factory = load_factory(args.target)
    mode: Any = contextlib.nullcontext() if args.real else FakeTensorMode()
    kind = "real" if args.real else "fake (nothing is allocated)"
    # under the fake mode AOTAutograd's lazy backward cannot copy a graph holding a real constant
    lowering = contextlib.nullcontext() if args.real else backward_with_forward()
    with mode, lowering:
        with progress.stage(f"building the model and inputs on {kind} tensors"):
            hint = "" if args.real else " (it ran on fake tensors: one that reads tensor values needs --real)"
            model, inputs, kwargs, optimizer = _unpack(call_factory(factory, args.target, hint), args.target)
        if optimizer is not None:  # its state (predicted before a step) and update are planned and reported
            options.setdefault("optimizer", optimizer)
        with progress.stage("compiling forward and backward with memopt"):
            explanation = explain_model(model, inputs, kwargs, options, args.target, fake=not args.real)
    progress.say(f"done: {len(explanation.regions)} region(s)")
    if args.json:
        print(json.dumps(explanation.to_dict(), indent=2, default=str))
    else:
        print(explanation.report(top=args.top))
    if args.plot:
        explanation.plot(args.plot, title=f"memopt: {args.target}")
        progress.say(f"wrote {args.plot}")
    if args.snapshot:
        explanation.save_memory_snapshot(args.snapshot)
        progress.say(f"wrote {args.snapshot} (open it at https://pytorch.org/memory_viz)")
    del torch
    return 0


def explain_model(
    model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any], spec: str,
    *, fake: bool = False,
) -> Any:
    """``memopt.explain.explain_settled(model, *args, options=options, **kwargs)``: the step as
    a training loop plans it, a step split by graph breaks planned as a whole under a
    ``memory_budget`` (the step runs until that plan is made: two or three times). An exception the
    model's own code raises there (a shape mismatch, a missing config attribute, a value
    read on ``fake`` tensors, which names ``--real``) becomes a `CLIError` naming it,
    with the frames of the code outside torch and memopt; a budget memopt cannot meet
    under ``strict`` too. A failure inside memopt or torch's compiler
    (`MemoptInternalError`, Dynamo's internal errors) propagates with its traceback,
    for a bug report."""
    import torch._dynamo.exc as dynamo_exc

    from memopt.errors import MemoptBudgetError, MemoptInternalError
    from memopt.explain import explain_settled

    try:
        return explain_settled(model, *args, options=options, **kwargs)
    except (MemoptInternalError, dynamo_exc.InternalTorchDynamoError):
        raise
    except dynamo_exc.BackendCompilerFailed as exc:
        if isinstance(exc.inner_exception, MemoptBudgetError):
            raise CLIError(str(exc.inner_exception)) from None
        raise
    except MemoptBudgetError as exc:
        raise CLIError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the model's code: say what it raised, exit 2
        frames = _outside_torch(exc)
        reads = "DataDependent" in type(exc).__name__ or "data-dependent" in str(exc).lower()
        hint = " (on fake tensors: a model that reads tensor values needs --real)" if fake and reads else ""
        raise CLIError(
            f"the model of {spec} raised {type(exc).__name__} while memopt compiled and ran it{hint}: {exc}"
            + (f"\nits frames outside torch and memopt (most recent call last):\n{frames}" if frames else "")
        ) from None


def _outside_torch(exc: BaseException) -> str:
    """The frames of ``exc``'s traceback in neither torch nor memopt, formatted."""
    import traceback

    import torch

    skip = tuple(os.path.dirname(os.path.abspath(m.__file__ or "")) + os.sep for m in (torch, sys.modules["memopt"]))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not os.path.abspath(f.filename).startswith(skip)]
    return "".join(traceback.format_list(frames)).rstrip()


def _check_output(path: str | None) -> None:
    """Refuse an output path whose folder does not exist, before the compile."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"cannot write {path!r}: folder {folder!r} does not exist")


def _count(text: str) -> int:
    """``--top``: a whole number of at least 0 (``-3`` listed all values but three)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count; give a whole number >= 0 (0 lists none)")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memopt", description="memopt: memory reports for torch.compile")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="compile-time memory report of FILE.py:FACTORY", description=REPORT_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("target", help="FILE.py:FACTORY, a function returning (model, inputs[, optimizer])")
    report.add_argument("--json", action="store_true", help="print the report as JSON (Explanation.to_dict())")
    report.add_argument("--plot", metavar="OUT.png", help="write the memory timeline plot (png/svg/pdf)")
    report.add_argument("--snapshot", metavar="OUT.pickle", help="write a PyTorch memory snapshot of the estimate")
    report.add_argument("--options", metavar="JSON", help='memopt options as JSON, e.g. \'{"codegen": "eager"}\'')
    report.add_argument("--real", action="store_true", help="build the model on real tensors instead of fake ones")
    report.add_argument("--top", type=_count, default=10, help="how many saved values, and source lines, to list (default 10)")
    report.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    from memopt.cli import fit

    fit.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status: 0, 2 for an error it names (`CLIError`),
    130 when interrupted (Ctrl-C: one line on stderr, no traceback; a ``memopt fit``
    stopped midway prints no result, its probes so far are the progress lines above)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "report":
            return _run_report(args)
        if args.command == "fit":
            from memopt.cli import fit

            return fit.run(args)
    except CLIError as exc:
        print(f"memopt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memopt {args.command}: interrupted (Ctrl-C); stopped before a result", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped
    except BrokenPipeError:  # stdout closed early (`memopt report ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 1
