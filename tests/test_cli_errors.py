"""``memopt report`` / ``memopt fit`` on bad input: each user error is one
"memopt: error:" message naming the value and the fix, exit status 2, no traceback
through memopt (docs/memory.md, "The command line"; docs/fit.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import memopt.cli.main as cli
from memopt.cli.main import main as cli_main

COMMANDS = [["report"], ["fit", "--budget", "3MiB"]]
ROOT = Path(__file__).resolve().parent.parent


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli_main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "source, raised, line",
    [
        ("def build(:\n    pass\n", "SyntaxError: invalid syntax", "line 1"),
        ("import memopt_no_such_dependency\n\ndef build():\n    pass\n",
         "ModuleNotFoundError: No module named 'memopt_no_such_dependency'", "line 1, in <module>"),
        ("def build():\n    pass\n\nSIZES = {}['batch']\n", "KeyError: 'batch'", "line 4, in <module>"),
    ],
)  # fmt: skip
def test_a_factory_file_that_fails_to_import_is_an_error_naming_what_it_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], source: str, raised: str, line: str
) -> None:
    """A syntax error, a missing dependency or failing top-level code in FILE.py was a
    traceback through memopt's loader and importlib, exit status 1."""
    bad = tmp_path / "model.py"
    bad.write_text(source)
    code, err = _run([command[0], f"{bad}:build", "--quiet", *command[1:]], capsys)
    assert code == 2, err
    assert err.startswith(f"memopt: error: importing {bad} raised {raised}"), err
    assert f'File "{bad}", {line}' in err, err
    assert "memopt/_factory.py" not in err and "memopt/cli" not in err and "importlib" not in err, err
    assert "memopt_user_model" not in sys.modules  # a broken module is not left half-imported


def test_a_module_that_fails_to_import_a_dependency_is_not_reported_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``package.module:FACTORY`` whose module exists but imports something missing: the
    error names the missing dependency and the module's line, not "cannot import module
    'package.module' ... run from the folder that holds the package", which sent the
    user looking for their own package."""
    package = tmp_path / "userpkg_cli"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text("import memopt_no_such_dependency\n\ndef build():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = _run(["report", "userpkg_cli.model:build", "--quiet"], capsys)
    assert code == 2
    assert err.startswith(
        "memopt: error: importing userpkg_cli.model raised ModuleNotFoundError: No module named 'memopt_no_such_dependency'"
    ), err
    assert f'File "{package / "model.py"}", line 1, in <module>' in err and "run from the folder" not in err
    code, err = _run(["report", "userpkg_cli.nothing:build", "--quiet"], capsys)  # really missing: as before
    assert code == 2 and "cannot import module 'userpkg_cli.nothing'" in err and "run from the folder" in err


def test_plot_without_matplotlib_is_refused_before_the_compile(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without matplotlib, ``--plot`` compiled the model, printed the report, then died
    with an ImportError traceback (exit status 1)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(cli, "load_factory", lambda spec: pytest.fail("the factory ran before --plot was checked"))
    code, err = _run(["report", "examples/report_model.py:build", "--plot", str(tmp_path / "m.png"), "--quiet"], capsys)
    assert code == 2
    assert err.startswith(f"memopt: error: --plot '{tmp_path / 'm.png'}': memopt's plots need matplotlib: "
                          "pip install 'memopt[plot]'"), err  # fmt: skip
    assert "Traceback" not in err


MODELS = '''
import torch


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # reads a value: a graph break, then the branch runs on fake tensors
            y = y * 2
        return y.sum()


def data_dependent():
    return Branchy(), torch.randn(4, 8)


def wrong_shape():
    return torch.nn.Linear(8, 4), torch.randn(2, 5)
'''


def test_a_model_that_raises_while_memopt_compiles_it_is_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model's own exception (inputs of the wrong shape; a branch on a tensor's
    value, which fake tensors cannot take) was a traceback of a hundred torch frames,
    exit status 1. Now: what it raised, the model's own frames, and ``--real`` where a
    value was read; ``--real`` then runs the data-dependent model."""
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    torch._dynamo.reset()
    code, err = _run(["report", f"{path}:data_dependent", "--quiet"], capsys)
    assert code == 2
    assert err.startswith(f"memopt: error: the model of {path}:data_dependent raised DataDependentOutputException "
                          "while memopt compiled and ran it (on fake tensors: a model that reads tensor values "
                          "needs --real)"), err  # fmt: skip
    assert f'File "{path}", line 12, in forward\n    if y.sum() > 0:' in err and "Traceback" not in err, err
    torch._dynamo.reset()
    assert cli_main(["report", f"{path}:data_dependent", "--quiet", "--real"]) == 0
    capsys.readouterr()
    torch._dynamo.reset()
    code, err = _run(["report", f"{path}:wrong_shape", "--quiet"], capsys)
    assert code == 2
    assert f"memopt: error: the model of {path}:wrong_shape raised TorchRuntimeError" in err, err
    assert "[2, 5] X [8, 4]" in err and "--real" not in err and "Traceback" not in err, err


def test_a_budget_strict_cannot_meet_is_an_error_naming_the_floor(capsys: pytest.CaptureFixture[str]) -> None:
    """``strict=True`` turns an infeasible budget into `MemoptBudgetError`, which torch
    wraps in ``BackendCompilerFailed``: the CLI prints memopt's message (the smallest
    reachable peak, what holds it), exit status 2, not torch's wrapper and traceback."""
    torch._dynamo.reset()
    code, err = _run(["report", f"{ROOT / 'examples' / 'report_model.py'}:build", "--quiet",
                      "--options", '{"codegen": "eager", "memory_budget": "2KiB", "strict": true}'], capsys)  # fmt: skip
    assert code == 2
    assert err.startswith("memopt: error: memory_budget 2.00 KiB is infeasible for region 0/0: the smallest peak"), err
    assert "Traceback" not in err and "BackendCompilerFailed" not in err


FIT_MODEL = '''
import torch


def build():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    return model, lambda batch, seq=1: torch.randn(batch, seq, 64)
'''


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch", "5"], "--batch 5 fixes the batch of --search seq, but --search batch searches the batch; drop --batch"),
        (["--search", "seq", "--seq", "32"], "--seq 32 fixes the sequence length, but --search seq searches it; drop --seq"),
    ],
)
def test_fit_refuses_a_flag_the_search_would_ignore(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str
) -> None:
    """``--batch 5`` without ``--search seq`` was silently ignored (the batch searched
    from 1 as if it had not been given); ``--search seq --seq 32`` was refused naming
    ``seq=`` and ``batch=``, fit's Python arguments."""
    monkeypatch.setattr(cli, "load_factory", lambda spec: pytest.fail("the factory ran before the flags were checked"))
    code, err = _run(["fit", "examples/fit_model.py:build", "--budget", "40MiB", *flags], capsys)
    assert code == 2 and err.startswith(f"memopt: error: {message}"), err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--budget", "6GiBB"], "--budget: budget='6GiBB': memory size '6GiBB' not understood"),
        (["--budget", "40MiB", "--reserve", "2GiBB"], "--reserve: reserve='2GiBB': memory size '2GiBB' not understood"),
        (["--budget", "40MiB", "--options", '{"memory_budget": "1GiB"}'],
         "--options sets memory_budget='1GiB', but fit plans every probe under --budget 40MiB"),
        (["--budget", "40MiB", "--options", '{"memory_budget": 0.5}'],
         "--options sets memory_budget=0.5, but fit plans every probe under --budget 40MiB"),
        (["--budget", "40MiB", "--options", '{"memory_budget": 1}'],  # was: give it a unit ('1GiB'): it must go
         "--options sets memory_budget=1, but fit plans every probe under --budget 40MiB"),
        (["--budget", "10MiB", "--reserve", "20MiB"],
         "--reserve 20MiB --budget 10MiB: reserve=20.00 MiB leaves nothing of budget=10.00 MiB for the step"),
    ],
)  # fmt: skip
def test_fit_refuses_a_bad_budget_or_options_before_the_factory_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str
) -> None:
    """Each was found only after FACTORY had built the model (minutes for a large one),
    and the last named fit's Python argument (``budget``) instead of ``--budget``."""
    monkeypatch.setattr(cli, "load_factory", lambda spec: pytest.fail("the factory ran before the flags were checked"))
    code, err = _run(["fit", "examples/fit_model.py:build", *flags], capsys)
    assert code == 2 and err.startswith(f"memopt: error: {message}"), err


@pytest.mark.parametrize("flag", ["--seq", "--batch", "--step", "--global-batch", "--max-batch"])
def test_fit_size_flags_must_be_positive(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    """``--seq -3`` reached fit and was refused as ``seq=-3`` (fit's Python argument),
    after the factory ran; argparse now names the flag."""
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "examples/fit_model.py:build", "--budget", "40MiB", "--search", "seq", flag, "-3"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}" in err and "'-3' is not a size; give a whole number >= 1" in err


def test_fit_names_a_make_inputs_that_is_not_a_function(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A factory returning ``(model, inputs)`` (memopt report's) was refused as "got
    tuple of length 2", the length fit asks for: the message now names what is wrong,
    make_inputs being a dict, and what fit calls it with."""
    path = tmp_path / "model.py"
    path.write_text(
        "import torch\n\ndef build():\n"
        "    return torch.nn.Linear(4, 1), {'input': torch.randn(2, 4)}\n"
    )
    code, err = _run(["fit", f"{path}:build", "--budget", "1MiB"], capsys)
    assert code == 2 and err.startswith(
        f"memopt: error: {path}:build returned a dict as make_inputs; fit calls make_inputs(batch)"
    ), err
    assert "(a factory returning (model, inputs) is memopt report's)" in err


_READS_VALUES = """
import torch


def build():
    model = torch.nn.Linear(8, 1)
    with torch.no_grad():
        if model.weight.abs().max() > 0.5:  # reads a value, as ViT's trunc_normal_ init does
            model.weight.mul_(0.5)
    return model, lambda batch: torch.randn(batch, 8)
"""


def test_fit_real_builds_a_factory_that_reads_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A factory whose initialisation reads tensor values (a default Hugging Face ViT)
    fails on the fake tensors fit builds it on, and fit had no way out (``memopt report``
    has ``--real``): the error now names ``--real``, which builds the model on real
    tensors for fit to copy to fake ones."""
    path = tmp_path / "reads.py"
    path.write_text(_READS_VALUES)
    code, err = _run(["fit", f"{path}:build", "--budget", "4KiB", "--max-batch", "4", "--quiet"], capsys)
    assert code == 2 and "(it ran on fake tensors: one that reads tensor values needs --real)" in err, err
    assert cli_main(["fit", f"{path}:build", "--budget", "4KiB", "--max-batch", "4", "--quiet", "--json", "--real"]) == 0
    assert json.loads(capsys.readouterr().out)["batch"] >= 1


def test_fit_json_with_plan_is_one_json_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--json --plan`` printed the JSON result and then the text report after it:
    not JSON. The plan is now the document's ``"plan"``: the fitted step's
    ``Explanation.to_dict()``, whose peak is the result's planned peak."""
    path = tmp_path / "fit_model.py"
    path.write_text(FIT_MODEL)
    assert cli_main(["fit", f"{path}:build", "--budget", "1MiB", "--max-batch", "2", "--json", "--plan", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["batch"] == 2 and data["plan"]["estimated_peak_bytes"] == data["estimated_peak_bytes"]
    assert data["plan"]["regions"] and data["plan"]["schema_version"] == 1
