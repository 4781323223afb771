"""Every optimizer validates its options (constructor and param-group overrides) with a
ValueError that names the option, the bad value and what is allowed."""

from __future__ import annotations

import pytest

from memopt.optim import AdamW8bit, GaLoreAdamW, MeZO, SubspaceAdamW
from optim_testing import tiny_mlp

ADAM_FAMILY = [GaLoreAdamW, SubspaceAdamW, AdamW8bit]
BAD_ADAM_OPTIONS = [
    ({"lr": -1e-3}, "lr=-0.001"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\]=1.0"),
    ({"betas": (0.9,)}, "betas="),
    ({"eps": 0.0}, "eps=0.0"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ({"kernel": "cuda"}, "kernel='cuda'"),
]
BAD_LOWRANK_OPTIONS = [
    ({"rank": 0}, "rank=0"),
    ({"rank": 2.5}, "rank=2.5"),
    ({"update_proj_gap": 0}, "update_proj_gap=0"),
    ({"scale": 0.0}, "scale=0.0"),
    ({"proj_type": "reverse_std"}, "proj_type='reverse_std'"),
    ({"lowrank": "yes"}, "lowrank='yes'"),
    ({"seed": -1}, "seed=-1"),
]


@pytest.mark.parametrize("cls", ADAM_FAMILY, ids=lambda c: c.__name__)
@pytest.mark.parametrize("options, message", BAD_ADAM_OPTIONS, ids=lambda x: str(x))
def test_bad_adam_options(cls: type, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"{cls.__name__}: {message}.*expected"):
        cls(tiny_mlp().parameters(), **options)


@pytest.mark.parametrize("cls", [GaLoreAdamW, SubspaceAdamW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("options, message", BAD_LOWRANK_OPTIONS, ids=lambda x: str(x))
def test_bad_lowrank_options_in_constructor_and_group(cls: type, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(tiny_mlp().parameters(), **options)
    model = tiny_mlp()
    opt = cls([model[0].weight], rank=4)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [model[2].weight], **options})
    assert len(opt.param_groups) == 1  # the bad group was not added


@pytest.mark.parametrize("cls", [GaLoreAdamW, SubspaceAdamW])
def test_galore_reference_proj_type_name_points_to_min_state(cls: type) -> None:
    """A setting ported from GaLore's code, ``proj_type="reverse_std"``, is refused with
    the name memopt gives that rule (it listed the valid names only)."""
    with pytest.raises(ValueError, match="proj_type='reverse_std'.*proj_type='min_state'"):
        cls(tiny_mlp().parameters(), rank=4, proj_type="reverse_std")


def test_galore_svd_choice_is_checked() -> None:
    with pytest.raises(ValueError, match="svd='qr'.*expected one of"):
        GaLoreAdamW(tiny_mlp().parameters(), svd="qr")


@pytest.mark.parametrize("options, message", [({"lr": -1.0}, "lr=-1.0"), ({"eps": 0}, "eps=0"), ({"seed": 1.5}, "seed=1.5")])
def test_bad_mezo_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MeZO(tiny_mlp().parameters(), **options)
