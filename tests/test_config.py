"""MemoptConfig: options are validated with messages that name the fix."""

from __future__ import annotations

import pytest
import torch

from memopt import MemoptConfig


def test_defaults():
    config = MemoptConfig.from_options(None)
    assert config.codegen == "inductor"
    assert config.strict is False
    assert config.disable_passes == ()


def test_unknown_key_names_valid_keys_and_closest():
    with pytest.raises(ValueError) as info:
        MemoptConfig.from_options({"codgen": "eager"})
    message = str(info.value)
    assert "'codgen'" in message
    assert "Did you mean 'codegen'?" in message
    for key in ("codegen", "strict", "disable_passes", "dump_dir", "verify"):
        assert key in message


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"codegen": "triton"}, "'triton' is not allowed; choose one of 'inductor', 'eager'"),
        ({"strict": "yes"}, "strict='yes' must be True or False"),
        ({"disable_passes": 3}, "must be a list of pass names"),
        ({"dump_dir": 5}, "must be a directory path"),
    ],
)
def test_bad_values_name_value_and_allowed(options, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        MemoptConfig.from_options(options)


def test_disable_passes_accepts_comma_string():
    assert MemoptConfig.from_options({"disable_passes": "dce, foo"}).disable_passes == ("dce", "foo")


def test_env_switches_debug_aids(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMOPT_DUMP_DIR", str(tmp_path))
    monkeypatch.setenv("MEMOPT_VERIFY", "1")
    config = MemoptConfig.from_options({})
    assert config.dump_dir == str(tmp_path)
    assert config.verify is True
    # an explicit option wins over the environment
    assert MemoptConfig.from_options({"verify": False}).verify is False


def test_unknown_option_raises_through_torch_compile():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="memopt", options={"budget": 1})
    with pytest.raises(Exception, match="unknown memopt option 'budget'"):
        compiled(torch.randn(2, 4))


@pytest.mark.parametrize("value, expected", [("50%", 0.5), (" 12.5 %", 0.125), ("100%", 1.0), (0.4, 0.4), ("6GiB", 6 << 30)])
def test_memory_budget_takes_bytes_fractions_and_percentages(value, expected):
    assert MemoptConfig.from_options({"memory_budget": value}).memory_budget == expected


@pytest.mark.parametrize("value", ["0%", "150%", "-5%", "half%", "%"])
def test_a_percentage_out_of_range_names_the_range(value):
    with pytest.raises(ValueError, match=r"must be a number in \(0, 100\] followed by '%'"):
        MemoptConfig.from_options({"memory_budget": value})
