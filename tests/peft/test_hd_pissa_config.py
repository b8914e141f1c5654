"""HDPiSSAConfig: validation naming the library's parameters, defaults defined once, round trip."""
from __future__ import annotations

import pytest

from megatron_hdpissa import HDPiSSAConfig
from megatron_hdpissa.peft.common import ConfigError
from megatron_hdpissa.peft.hd_pissa.config import BUCKET_SIZE, CONSISTENCY_CHECK_INTERVAL


@pytest.mark.parametrize("kwargs,param,text", [
    (dict(rank=0), "rank", "rank must be a positive integer, got 0"),
    (dict(rank=2.0), "rank", "rank must be a positive integer, got 2.0"),
    (dict(alpha=0), "alpha", "alpha must be > 0 (the scale is alpha / rank), got 0"),
    (dict(svd_method="qr"), "svd_method", "svd_method must be one of ('exact', 'randomized'), got 'qr'"),
    (dict(svd_oversampling=-1), "svd_oversampling", "svd_oversampling must be >= 0, got -1"),
    (dict(svd_niter=-1), "svd_niter", "svd_niter must be >= 0, got -1"),
    (dict(virtual_ranks=0), "virtual_ranks", "virtual_ranks must be >= 1, got 0"),
    (dict(master_weights="fp8"), "master_weights", "master_weights must be one of"),
    (dict(aggregation="ring"), "aggregation", "aggregation must be one of ('auto', 'factors', 'dense')"),
    (dict(target_modules=""), "target_modules", "target_modules is empty"),
    (dict(consistency_check_interval=-1), "consistency_check_interval", "consistency_check_interval must be >= 0"),
    (dict(bucket_size=0), "bucket_size", "bucket_size must be >= 1"),
])
def test_errors_name_the_parameter(kwargs, param, text):
    with pytest.raises(ConfigError) as err:
        HDPiSSAConfig(**kwargs)
    assert err.value.param == param and str(err.value).startswith(text), str(err.value)
    assert "--" not in str(err.value)  # flags are the trainer's business


def test_defaults_are_the_cli_defaults():
    from megatron_hdpissa.training.arguments import hd_pissa_config, parse_args

    cfg = HDPiSSAConfig()
    assert cfg.consistency_check_interval == CONSISTENCY_CHECK_INTERVAL == 50
    assert cfg.bucket_size == BUCKET_SIZE == 1 << 24
    cli = hd_pissa_config(parse_args(["--data-path", "d", "--train-iters", "1", "--pretrained-checkpoint", "b"]))
    assert cli.to_dict() == cfg.to_dict()


def test_patterns_scale_and_round_trip():
    cfg = HDPiSSAConfig(rank=4, alpha=2, target_modules="linear_qkv,re:.*fc1", trainable_modules="norm,")
    assert cfg.target_modules == ("linear_qkv", "re:.*fc1") and cfg.trainable_modules == ("norm",)
    assert cfg.scale == 0.5 and HDPiSSAConfig(rank=4).scale == 1.0
    assert HDPiSSAConfig.from_dict(cfg.to_dict()) == cfg
