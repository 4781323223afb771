"""MemoptConfig: options are validated with messages that name the fix."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from memopt import MemoptConfig, MemoptWarning


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
    "key, meant",
    [("compress", "compress_activations"), ("prefetch", "collective_prefetch"), ("time_limit", "planner_time_limit"),
     ("remat", "memory_budget"), ("checkpoint", "memory_budget"), ("bf16", "precision"), ("dtype", "precision")],
)
def test_unknown_key_names_the_option_a_newcomer_meant(key, meant):
    """A part of an option's name, or another tool's word for it, named no option: the
    newcomer had to read the list of nineteen."""
    with pytest.raises(ValueError, match=rf"unknown memopt option '{key}'\. Did you mean '{meant}'\?"):
        MemoptConfig.from_options({key: 1})


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"codegen": "triton"}, "'triton' is not allowed; choose one of 'inductor', 'eager'"),
        ({"strict": "yes"}, "strict='yes' must be True or False"),
        ({"disable_passes": 3}, "must be a list of pass names"),
        ({"dump_dir": 5}, "must be a directory path"),
        ({"rank_agreement_timeout": 0}, "rank_agreement_timeout=0 must be a positive, finite number of seconds, or None"),
        ({"rank_agreement_timeout": "10"}, "rank_agreement_timeout='10' must be a positive, finite number"),
        ({"rank_agreement_timeout": float("inf")}, "rank_agreement_timeout=inf must be a positive, finite number"),
        ({"rank_agreement_timeout": True}, "rank_agreement_timeout=True must be a positive, finite number"),
    ],
)
def test_bad_values_name_value_and_allowed(options, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        MemoptConfig.from_options(options)


def test_rank_agreement_timeout_takes_seconds_or_none():
    assert MemoptConfig.from_options({"rank_agreement_timeout": 5}).rank_agreement_timeout == 5.0
    assert MemoptConfig.from_options({"rank_agreement_timeout": None}).rank_agreement_timeout is None
    assert MemoptConfig().rank_agreement_timeout is None


def test_disable_passes_accepts_comma_string():
    assert MemoptConfig.from_options({"disable_passes": "remat, dce"}).disable_passes == ("dce", "remat")


def test_an_unknown_pass_name_is_refused_with_the_options():
    """A misspelled pass must not leave that pass on: it is refused with the options, as
    a ValueError naming the valid passes and the closest one (it used to surface in the
    compile as a fallback that turned every pass of the region off)."""
    with pytest.raises(ValueError, match=r"unknown pass\(es\) \['remta'\]; memopt's passes are: .*remat.*Did you mean 'remat'"):
        MemoptConfig.from_options({"disable_passes": ["dce", "remta"]})
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="memopt", options={"codegen": "eager", "disable_passes": "nope"})
    with pytest.raises(Exception, match=r"unknown pass\(es\) \['nope'\]"):
        compiled(torch.randn(2, 4))


@pytest.mark.parametrize("value", ["0.5", "1.5", " 100 "])
def test_a_memory_budget_number_string_without_a_unit_is_refused(value):
    """'1.5' was read as 1 byte; a unitless string under 1 KiB names both readings."""
    with pytest.raises(ValueError, match=r"number without a unit.*0\.5, '50%'.*GiB'\)"):
        MemoptConfig.from_options({"memory_budget": value})


@pytest.mark.parametrize("value", [1, 2, 512, 1023])
def test_a_memory_budget_int_under_a_kib_is_refused(value):
    """``memory_budget=1`` (meant as the whole peak) was a 1-byte budget: every region
    planned its smallest peak and warned it was infeasible. An int under 1 KiB is refused
    as the unitless string is, naming both readings."""
    with pytest.raises(ValueError, match=rf"memory_budget={value} is an int under 1 KiB.*'100%'.*'{value}GiB'\)"):
        MemoptConfig.from_options({"memory_budget": value})
    assert MemoptConfig.from_options({"memory_budget": 1024}).memory_budget == 1024


@pytest.mark.parametrize("value", ["1000B", "0.5KB", "1000 b"])
def test_a_memory_budget_size_under_a_kib_is_refused(value):
    """No model's parameters fit in under 1 KiB; refused as the int is, so a stored
    budget is always at least 1024 (``__post_init__`` checks stored values again)."""
    with pytest.raises(ValueError, match=r"under 1 KiB: below the parameters of any model.*'50%'"):
        MemoptConfig.from_options({"memory_budget": value})
    assert MemoptConfig.from_options({"memory_budget": "1KiB"}).replace(strict=True).memory_budget == 1024


@pytest.mark.parametrize("value", [0, -1])
def test_a_memory_budget_not_positive_names_the_forms(value):
    with pytest.raises(ValueError, match=rf"memory_budget={value} must be positive: .*'6GiB'.*'50%'"):
        MemoptConfig.from_options({"memory_budget": value})


@pytest.mark.parametrize("value, expected", [("1e9", 10**9), ("4096", 4096), ("1.5KiB", 1536)])
def test_a_memory_budget_number_string_of_whole_bytes_is_bytes(value, expected):
    assert MemoptConfig.from_options({"memory_budget": value}).memory_budget == expected


def test_size_options_take_size_strings_and_name_themselves_when_wrong():
    config = MemoptConfig.from_options({"offload_min_bytes": "1MiB", "collective_bucket_bytes": "16MiB"})
    assert (config.offload_min_bytes, config.collective_bucket_bytes) == (1 << 20, 16 << 20)
    with pytest.raises(ValueError, match=r"offload_min_bytes='1 meg': memory size '1 meg' not understood"):
        MemoptConfig.from_options({"offload_min_bytes": "1 meg"})
    with pytest.raises(ValueError, match=r"'2\.5' has no unit, so it is bytes, and bytes are whole"):
        MemoptConfig.from_options({"offload_min_bytes": "2.5"})


def test_host_offload_with_an_offload_dir_is_refused_when_the_options_are_read(tmp_path):
    """Host offload writes no files: the directory was ignored without a word (before,
    the host store refused it mid-compile, on a GPU only). "auto" may pick disk, so it
    keeps the directory."""
    with pytest.raises(ValueError, match=r"offload='host' and offload_dir=.*Fix: drop offload_dir, or use offload='disk'"):
        MemoptConfig.from_options({"offload": "host", "offload_dir": str(tmp_path)})
    assert MemoptConfig.from_options({"offload": "auto", "offload_dir": str(tmp_path)}).offload_dir == str(tmp_path)


@pytest.mark.parametrize("key", ["offload_dir", "dump_dir"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_directory_option_is_refused(key, value):
    """``offload_dir=""`` became the working directory (``Path("")`` is "."): offload
    files and the stale-directory sweep went there, where nobody asked for them."""
    options = {key: value, **({"offload": "disk"} if key == "offload_dir" else {})}
    with pytest.raises(ValueError, match=rf"{key}='\s*' is empty. Fix: give a directory path, or leave {key} unset"):
        MemoptConfig.from_options(options)


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


def test_numpy_numbers_are_read_as_the_int_or_float_they_hold():
    """A budget computed with NumPy (``np.int64``, ``np.float32``) is the int or float it
    holds, stored as a Python number (the config stays JSON-able); it was refused as
    "must be bytes (int)" although it is one. The checks still apply to its value."""
    config = MemoptConfig.from_options({
        "memory_budget": np.int64(6 << 30), "offload_min_bytes": np.int32(4096),
        "planner_time_limit": np.float32(2.0), "collective_prefetch": np.int64(2),
    })  # fmt: skip
    assert (config.memory_budget, config.offload_min_bytes, config.planner_time_limit) == (6 << 30, 4096, 2.0)
    assert type(config.memory_budget) is int and type(config.collective_prefetch) is int
    json.dumps(config.to_dict())
    assert MemoptConfig.from_options({"memory_budget": np.float32(0.5)}).memory_budget == 0.5
    assert MemoptConfig(memory_budget=np.int64(2048)).replace(offload_min_bytes=np.uint8(0)).memory_budget == 2048
    with pytest.raises(ValueError, match="memory_budget=-3 must be positive"):
        MemoptConfig.from_options({"memory_budget": np.int64(-3)})


@pytest.mark.parametrize("value", ["0%", "150%", "-5%", "half%", "%"])
def test_a_percentage_out_of_range_names_the_range(value):
    with pytest.raises(ValueError, match=r"must be a number in \(0, 100\] followed by '%'"):
        MemoptConfig.from_options({"memory_budget": value})


def test_constructor_checks_values_as_from_options_does():
    """``MemoptConfig(...)`` built directly (the pass-testing recipe in docs/usage.md)
    refuses what ``from_options`` refuses, naming the value and the closest pass, and
    normalizes what it accepts: a misspelled pass name must not leave the pass on."""
    with pytest.raises(ValueError, match=r"\['shedule'\].*Did you mean 'schedule'"):
        MemoptConfig(disable_passes=("shedule",))
    with pytest.raises(ValueError, match="codegen='eagr'"):
        MemoptConfig(codegen="eagr")
    assert MemoptConfig(disable_passes="remat,dce").disable_passes == ("dce", "remat")
    assert MemoptConfig(memory_budget="1KiB").memory_budget == 1024
    assert MemoptConfig(memory_budget="50%").replace(strict=True).memory_budget == 0.5


@pytest.mark.parametrize("size", ["-1GiB", " -512MB", "-4096"])
def test_a_negative_size_is_refused_as_negative_not_as_not_understood(size: str) -> None:
    with pytest.raises(ValueError, match=rf"memory_budget='{size}': memory size '{size}' is negative; a size is positive, e\.g\. '{size.strip()[1:]}'"):
        MemoptConfig.from_options({"memory_budget": size})


@pytest.mark.parametrize(("size", "example"), [("-1", "1GiB"), ("-0.5", "0.5GiB"), (" -24 ", "24GiB")])
def test_a_negative_size_names_a_fix_that_is_accepted(size: str, example: str) -> None:
    """``"-1"`` was told "e.g. '1'", which memory_budget then refuses (a number
    without a unit under 1 KiB); the example now carries a unit."""
    with pytest.raises(ValueError, match=rf"is negative; a size is positive, e\.g\. '{example}'"):
        MemoptConfig.from_options({"memory_budget": size})
    assert MemoptConfig.from_options({"memory_budget": example}).memory_budget > 0
    from memopt.errors import MemoptFitError
    from memopt.fit import budget_bytes

    with pytest.raises(MemoptFitError, match=rf"e\.g\. '{example}'"):
        budget_bytes(size)


@pytest.mark.parametrize("value", ["0", "0.0", " 0 "])
def test_a_zero_size_string_is_not_told_to_become_zero_gib(value: str) -> None:
    """The rule: the fix a refusal names must itself be accepted. ``"0"`` was told
    "add a unit ('0GiB')", which is refused next (under 1 KiB); it now asks for a
    positive size, and so does ``memopt fit --budget 0``."""
    with pytest.raises(ValueError, match=r"give a positive size with a unit, e\.g\. '24GiB'") as info:
        MemoptConfig.from_options({"memory_budget": value})
    assert "0GiB" not in str(info.value) and "0.0GiB" not in str(info.value)
    from memopt.errors import MemoptFitError
    from memopt.fit import budget_bytes

    with pytest.raises(MemoptFitError, match="give a positive size with a unit") as info:
        budget_bytes(value)
    assert "0GiB" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"offload_dir": "/tmp"}, r"memopt ignores offload_dir='/tmp': offload is None"),
        ({"compress_activations": "int8", "disable_passes": ["compress_activations"]},
         r"memopt ignores compress_activations='int8': disable_passes names 'compress_activations'"),
        ({"offload": "disk", "disable_passes": "offload"}, r"memopt ignores offload='disk': disable_passes names 'offload'"),
    ],
)
def test_an_option_that_can_do_nothing_warns(options: dict, message: str) -> None:
    """An option the others make inert (offload_dir without offload; an option whose
    pass is disabled) warns once, naming it and the fix (they were silent)."""
    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="memopt", options={"codegen": "eager", **options})
    with pytest.warns(MemoptWarning, match=message):
        compiled(torch.randn(2, 4)).sum().backward()
    torch._dynamo.reset()


class _TwoRegions(torch.nn.Module):
    """Two layers with a graph break between them: two compiled regions."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).relu()
        torch._dynamo.graph_break()
        return self.b(h)


def test_an_inert_option_warns_once_across_regions_and_recompiles() -> None:
    """Fine-tuning that unfreezes a layer between steps recompiles (Dynamo guards on
    ``requires_grad``), and a graph break compiles two regions: the inert option was
    warned for each of those compiles, 4 times here for one ``torch.compile``. It is
    said once, and again after ``torch._dynamo.reset()`` (a fresh start)."""
    torch._dynamo.reset()
    model = _TwoRegions()
    model.a.requires_grad_(False)
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "offload_dir": "/tmp"})

    def inert_warnings(steps: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(steps):
                if step == 1:
                    model.a.requires_grad_(True)  # unfreeze: region 0 compiles again
                compiled(torch.randn(2, 4)).sum().backward()
        return sum("memopt ignores offload_dir='/tmp'" in str(w.message) for w in caught)

    assert inert_warnings(3) == 1
    torch._dynamo.reset()
    model.a.requires_grad_(False)
    assert inert_warnings(2) == 1
    torch._dynamo.reset()
