"""``memopt fit FILE.py:FACTORY --budget 24GiB``: the largest batch that fits a budget.

FACTORY is a function of no arguments in FILE.py returning ``(model, make_inputs)`` or
``(model, make_inputs, optimizer)``: ``model`` is an ``nn.Module`` (or a callable of
tensors) and ``make_inputs(batch)`` (or ``make_inputs(batch, seq)`` when ``--seq`` is
given or ``--search seq``) returns the inputs of one training call: a tensor, a tuple of
positional arguments or a dict of keyword arguments. With an optimizer (over
``model.parameters()``) the plan counts its state, and ``--in-backward`` plans each
update inside backward (``optimizer_in_backward``) instead of a separate ``opt.step()``.
The factory runs under a FakeTensorMode and so does every probe: nothing of the model
or the step is allocated, and a model larger than this machine can be fitted
(``--real`` builds the model on real tensors, for an initialisation that reads values;
fit copies it to fake ones). One line per probe goes to stderr; the result to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

__all__ = ["add_parser", "run"]

FIT_HELP = """\
memopt fit FILE.py:FACTORY --budget 24GiB: the largest batch (or sequence) that fits.

FACTORY is a function of no arguments in FILE.py (or package.module:FACTORY)
returning (model, make_inputs) or (model, make_inputs, optimizer); make_inputs(batch)
(or make_inputs(batch, seq) with --seq or --search seq) returns one training call's
inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments.
Everything runs on fake tensors: nothing is allocated, so a model larger than this
machine can be fitted (--real builds the model on real tensors instead, for a model
whose initialisation reads tensor values; the probes stay fake). One line per probe
goes to stderr, the result to stdout.
"""


def add_parser(sub: Any) -> None:
    """Register the ``fit`` subcommand on ``sub`` (an argparse subparsers object)."""
    fit = sub.add_parser("fit", help="largest batch (or sequence) of FILE.py:FACTORY that fits a budget",
                         description=FIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("target", help="FILE.py:FACTORY, a function returning (model, make_inputs[, optimizer])")
    fit.add_argument("--budget", required=True, help="memory budget, e.g. 24GiB, 512MB or bytes")
    fit.add_argument("--seq", type=_positive, help="fixed sequence length: make_inputs(batch, seq) is called")
    fit.add_argument("--search", choices=["batch", "seq"], default="batch", help="dimension to search (default batch)")
    fit.add_argument("--batch", type=_positive, help="fixed batch for --search seq (default 1)")
    fit.add_argument("--step", type=_positive, default=1, help="probe multiples of this size (e.g. 64 for sequences)")
    fit.add_argument("--global-batch", type=_positive, help="samples per optimizer step: report the accumulation steps")
    fit.add_argument("--max-batch", "--max-size", dest="max_size", type=_positive, help="largest size to probe")
    fit.add_argument("--reserve", help="bytes kept outside the step (e.g. optimizer state), e.g. 2GiB")
    fit.add_argument("--in-backward", action="store_true",
                     help="plan FACTORY's optimizer inside backward (optimizer_in_backward) instead of opt.step()")
    fit.add_argument("--options", metavar="JSON", help='memopt options as JSON, e.g. \'{"precision": "bf16"}\'')
    fit.add_argument("--plan", action="store_true",
                     help="also print memopt's report of the fitted step (with --json: its Explanation.to_dict() as \"plan\")")
    fit.add_argument("--json", action="store_true", help="print the result as JSON (FitResult.to_dict())")
    fit.add_argument("--real", action="store_true",
                     help="build FACTORY's model on real tensors (fit copies it to fake ones): for a model whose "
                          "initialisation reads tensor values")
    fit.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _positive(text: str) -> int:
    """A size flag's value: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; give a whole number >= 1")
    return value


def run(args: argparse.Namespace) -> int:
    """Build FACTORY's model on fake tensors, fit, print the result; returns the exit status."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import memopt
    from memopt.cli.inputs import CLIError, call_factory, load_factory

    options = _checked_options(args)
    factory = load_factory(args.target)
    hint = "" if args.real else " (it ran on fake tensors: one that reads tensor values needs --real)"
    with contextlib.nullcontext() if args.real else FakeTensorMode(allow_non_fake_inputs=True):
        built = call_factory(factory, args.target, hint)
    if not isinstance(built, (tuple, list)) or len(built) not in (2, 3):
        raise CLIError(
            f"{args.target} must return (model, make_inputs) or (model, make_inputs, optimizer) with "
            f"make_inputs(batch) a function; got {type(built).__name__}"
            + (f" of length {len(built)}" if isinstance(built, (tuple, list)) else "")
        )
    if not callable(built[1]):
        raise CLIError(
            f"{args.target} returned a {type(built[1]).__name__} as make_inputs; fit calls make_inputs(batch) "
            f"(make_inputs(batch, seq) with --seq or --search seq) for each size it probes, so return a function "
            f"that builds one call's inputs at that size"
            + (" (a factory returning (model, inputs) is memopt report's)" if len(built) == 2 else "")
        )
    model, make_inputs, optimizer = (*built, None) if len(built) == 2 else built
    if args.in_backward and optimizer is None:
        raise CLIError(f"--in-backward plans an optimizer's update in backward, but {args.target} returns none; "
                       f"return (model, make_inputs, optimizer) or drop --in-backward.")
    if optimizer is not None:
        options["optimizer_in_backward" if args.in_backward else "optimizer"] = optimizer
    try:
        result = memopt.fit(
            model, make_inputs, args.budget, search=args.search, batch=args.batch or 1, seq=args.seq,
            global_batch=args.global_batch, max_size=args.max_size, step=args.step,
            reserve=args.reserve or 0, options=options,
            progress=None if args.quiet else sys.stderr,
        )
    except memopt.MemoptFitError as exc:
        raise CLIError(str(exc)) from None
    plan = result.explanation if args.plan else None
    if args.json:  # one JSON document: the plan inside it, not a report after it
        print(json.dumps({**result.to_dict(), **({"plan": plan.to_dict()} if plan else {})}, indent=2, default=str))
        return 0
    print(result.report())
    if plan is not None:
        print()
        print(plan.report())
    return 0


def _checked_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--options`` as a dict, after every flag is checked: before the factory runs,
    which may take long (a large model on fake tensors still runs its initialisation)."""
    from memopt.cli.inputs import CLIError, parse_options
    from memopt.errors import MemoptFitError
    from memopt.fit import budget_and_reserve, budget_bytes

    _check_flags(args)

    def no_budget(options: dict[str, Any]) -> None:  # before its value is checked: it must go, whatever it is
        if "memory_budget" in options:
            raise CLIError(f"--options sets memory_budget={options['memory_budget']!r}, but fit plans every probe "
                           f"under --budget {args.budget} (less --reserve); drop memory_budget from --options.")

    options = parse_options(args.options, no_budget)
    for flag, value, name in (("--budget", args.budget, "budget"), ("--reserve", args.reserve, "reserve")):
        try:
            if value is not None:
                budget_bytes(value, name=name)
        except MemoptFitError as exc:
            raise CLIError(f"{flag}: {exc}") from None
    try:
        budget_and_reserve(args.budget, args.reserve or 0)
    except MemoptFitError as exc:
        raise CLIError(f"--reserve {args.reserve} --budget {args.budget}: {exc}") from None
    return options


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that the chosen search ignores or contradicts, naming the flags."""
    from memopt.cli.inputs import CLIError

    if args.search == "batch" and args.batch is not None:
        raise CLIError(f"--batch {args.batch} fixes the batch of --search seq, but --search batch searches the batch; "
                       f"drop --batch (--max-batch {args.batch} caps the search) or add --search seq.")
    if args.search == "seq" and args.seq is not None:
        raise CLIError(f"--seq {args.seq} fixes the sequence length, but --search seq searches it; drop --seq "
                       f"(--max-size {args.seq} caps the search) or drop --search seq.")
