"""LowRankConfig: the baselines' own settings, errors naming its parameters, old checkpoints' dicts."""
from __future__ import annotations

import pytest

from megatron_hdpissa import HDPiSSAConfig, LowRankConfig
from megatron_hdpissa.peft.common import ConfigError


@pytest.mark.parametrize("kwargs,param,text", [
    (dict(method="dora"), "method", "method must be one of ('lora', 'pissa'), got 'dora'"),
    (dict(rank=-2), "rank", "rank must be a positive integer, got -2"),
    (dict(alpha=-1.0), "alpha", "alpha must be > 0"),
    (dict(target_modules=[]), "target_modules", "target_modules is empty"),
    (dict(svd_method="lanczos"), "svd_method", "svd_method must be one of"),
])
def test_errors_name_the_parameter(kwargs, param, text):
    with pytest.raises(ConfigError) as err:
        LowRankConfig(**kwargs)
    assert err.value.param == param and str(err.value).startswith(text), str(err.value)


def test_scale_and_round_trip():
    cfg = LowRankConfig("pissa", rank=8, alpha=4, target_modules="linear_qkv,linear_fc2")
    assert cfg.scale == 0.5 and LowRankConfig(rank=3).scale == 1.0 and LowRankConfig().method == "lora"
    assert cfg.target_modules == ("linear_qkv", "linear_fc2")
    assert LowRankConfig.from_dict(cfg.to_dict()) == cfg


def test_from_an_hd_pissa_config_dict():
    """Baseline checkpoints written before LowRankConfig recorded an HDPiSSAConfig dict."""
    old = HDPiSSAConfig(rank=6, alpha=3, target_modules=["linear_proj"], svd_method="randomized",
                        virtual_ranks=1, trainable_modules=["norm"], seed=7).to_dict()
    cfg = LowRankConfig.from_dict(old, method="pissa")
    assert cfg == LowRankConfig("pissa", rank=6, alpha=3, target_modules=("linear_proj",),
                                svd_method="randomized", trainable_modules=("norm",), seed=7)


def test_apply_lowrank_takes_its_own_config():
    from torch import nn

    from megatron_hdpissa import apply_lowrank

    with pytest.raises(TypeError, match="LowRankConfig"):
        apply_lowrank(nn.Linear(2, 2), HDPiSSAConfig(rank=2))
