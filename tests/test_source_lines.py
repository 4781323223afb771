"""Which source line a decision names (`memopt.graph.meta.source_location`): the line
of the model's code, not the shared helper of an installed library that ran the op
(docs/memory.md, "The report")."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import pytest
import torch

import memopt
from memopt.graph import meta

EAGER = {"codegen": "eager"}

HELPER = '''
import torch


def squash(x):
    return torch.tanh(x) * x  # the helper's line: tanh and mul are made here


def squash_sum(x):
    return squash(x).sum()
'''

USER_MODEL = '''
import torch
from helperlib_src_lines import squash


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = squash(self.fc(x))  # the user's line
        return h.sum()
'''


def _decision_lines(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[str, int]]:
    torch._dynamo.reset()
    explanation = memopt.explain(model, x, options=EAGER)
    return {d.node_name: (Path(d.source_file or "").name, d.source_line or 0) for d in explanation.decisions()}


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder named like an environment's site-packages, on sys.path."""
    site = tmp_path / "env" / "site-packages"
    site.mkdir(parents=True)
    (site / "helperlib_src_lines.py").write_text(HELPER)
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in [m for m in sys.modules if m.startswith(("helperlib_src_lines", "usermodel_src_lines", "zoo_src_lines"))]:
        del sys.modules[name]


def test_a_value_made_in_an_installed_helper_names_the_users_line_that_called_it(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tanh and mul run inside an installed library's function: the decisions named
    that library's file (``helperlib_src_lines.py:5``), a line every model calling it
    shares. They name the user's line that called it, as for torch's own modules."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "usermodel_src_lines.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(user))
    net = importlib.import_module("usermodel_src_lines").Net()
    lines = _decision_lines(net, torch.randn(8, 16))
    assert lines["tanh"] == ("usermodel_src_lines.py", 12), lines
    assert all(f != "helperlib_src_lines.py" for f, _ in lines.values()), lines


def test_a_librarys_model_definition_is_the_models_code(installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model defined inside an installed library's model folder (as
    ``transformers/models/gpt2/modeling_gpt2.py``) is the model's code: its line that
    called the helper is named, not the helper's, nor an outer frame of the user's."""
    models = installed / "zoo_src_lines" / "models"
    models.mkdir(parents=True)
    (installed / "zoo_src_lines" / "__init__.py").write_text("")
    (models / "__init__.py").write_text("")
    (models / "modeling_net.py").write_text(USER_MODEL)
    monkeypatch.setattr(meta, "_LIBRARY_MODELS", ("/zoo_src_lines/models/",))
    net = importlib.import_module("zoo_src_lines.models.modeling_net").Net()
    lines = _decision_lines(net, torch.randn(8, 16))
    assert lines["tanh"] == ("modeling_net.py", 12), lines


def test_only_library_helpers_name_the_innermost_helper(installed: Path) -> None:
    """When every frame outside torch is a library helper (a model compiled straight
    from an installed package with no model folder), the innermost helper line is
    still named rather than nothing."""
    helper = importlib.import_module("helperlib_src_lines")
    lines = _decision_lines(helper.squash_sum, torch.randn(8, 16, requires_grad=True))
    assert lines["tanh"] == ("helperlib_src_lines.py", 6), lines


def test_hugging_face_gpt2_values_name_lines_of_modeling_gpt2() -> None:
    """Default-config GPT-2: the MLP's matmul runs in ``transformers/pytorch_utils.py``
    (``Conv1D``), its GELU in ``activations.py`` and attention in
    ``integrations/sdpa_attention.py``; each value names the ``modeling_gpt2.py`` line
    that called them, whose code is that call."""
    pytest.importorskip("transformers")
    from memopt.testing.hf import build

    torch._dynamo.reset()
    model, inputs = build("gpt2", batch=2, seq=16)
    decisions = memopt.explain(model, options=EAGER, **inputs).decisions()
    assert decisions
    files = {Path(d.source_file or "").name for d in decisions}
    assert not files & {"pytorch_utils.py", "activations.py", "sdpa_attention.py"}, files
    by_module = {d.module: d for d in decisions if d.module}
    c_fc = by_module["transformer.h.0.mlp.c_fc"]
    assert Path(c_fc.source_file or "").name == "modeling_gpt2.py" and "self.c_fc(" in (c_fc.source or ""), c_fc


class _DropBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop = torch.nn.Linear(64, 64), torch.nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.fc(x) @ x.transpose(-1, -2), -1)
        return self.drop(a) @ x


class _DropNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_DropBlock() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.pow(2).mean()


@pytest.mark.parametrize("extra", [{}, {"precision": "bf16"}], ids=["budget", "budget+bf16"])
def test_values_a_pass_makes_name_the_module_of_the_value_they_stand_for(extra: dict[str, str]) -> None:
    """The rule: a value memopt's passes make in place of the model's (a dropout's saved
    RNG state and its rescaled output, replayed in backward; precision's casts) names the
    module of the value it stands for, as every value of the model does: each decision
    of a two-block model with dropout under a budget has a module, the layer's. They
    were None (the report's module column blank, the JSON's ``"module": null``)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)  # 0.5 is below the floor: the smallest-peak plan
        explanation = memopt.explain(_DropNet(), torch.randn(4, 32, 64), options={**EAGER, "memory_budget": 0.5, **extra})
    decisions = explanation.to_dict()["decisions"]
    assert decisions
    missing = [d["name"] for d in decisions if d["module"] is None]
    assert not missing, missing
    assert all(d["module"].startswith(("blocks.0", "blocks.1")) for d in decisions)
