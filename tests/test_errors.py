"""Bad input gets a clear error naming the layer or flag."""
from __future__ import annotations

import pytest

from megatron_hdpissa import HDPiSSAConfig
from megatron_hdpissa import layout
from tests import toy
from tests.dist_utils import run_distributed


@pytest.mark.parametrize("alpha", [0, -1.0])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match="--hd-pissa-alpha"):
        HDPiSSAConfig(rank=4, alpha=alpha)


def test_rank_and_method_validated():
    with pytest.raises(ValueError, match="--hd-pissa-rank"):
        HDPiSSAConfig(rank=0)
    with pytest.raises(ValueError, match="--hd-pissa-svd"):
        HDPiSSAConfig(rank=2, svd_method="qr")


def test_alpha_below_rank_still_trains():
    # The published code floors alpha // r, so alpha < r silently trains nothing.
    assert HDPiSSAConfig(rank=16, alpha=8).scale == 0.5


def test_tp_must_take_whole_query_groups():
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size 3 does not divide num_query_groups 2"):
        layout.qkv_parts(num_heads=4, num_query_groups=2, head_dim=8, tp_size=3, layer="decoder.layers.0.linear_qkv")


def _apply_with(cfg_kwargs):
    from megatron_hdpissa import apply_hd_pissa

    model = toy.MegatronToy(toy.logical_weights(), 1)
    try:
        apply_hd_pissa(model, HDPiSSAConfig(**cfg_kwargs), progress=False)
    except Exception as e:  # noqa: BLE001 - the message is what is tested
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_errors_in_real_process_groups():
    # one spawn, several checks: DP=2, so K = 2 x r
    msgs = run_distributed(_errors_worker, 2, 1)[0]
    too_big, nothing, tp_bad = msgs
    assert "linear_qkv (part k)" in too_big and "= 20 singular components" in too_big and "16x32" in too_big
    assert "--hd-pissa-target-modules ['nonexistent'] matched no parallel linear" in nothing
    assert "linear_qkv" in nothing  # lists what exists
    assert tp_bad == "no error"


def _errors_worker():
    return [
        _apply_with(dict(rank=10)),  # k has 16 rows: 2 ranks x 10 > 16
        _apply_with(dict(rank=2, target_modules=["nonexistent"])),
        _apply_with(dict(rank=2)),
    ]
