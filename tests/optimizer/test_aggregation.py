"""Aggregation paths: the dense-reduce and sharded-master paths equal the factor all-gather path,
bytes per step equal the formula, and the DP consistency guard names a diverged layer
(multi-process, gloo)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import toy
from tests.helpers.distributed import run_distributed
from tests.helpers.master_weight_runs import R, modes_worker, rel


@pytest.mark.parametrize("tp,dp", [(1, 2), (2, 2)])
def test_dense_and_sharded_paths_equal_factor_path(tp, dp):
    modes = [("fp32-base", "factors"), ("fp32-base", "dense"), ("sharded-fp32", "factors"), ("sharded-fp32", "dense")]
    res = run_distributed(modes_worker, tp * dp, tp, args=(tp, "float32", 2e-3, 3, modes))
    w0 = toy.logical_weights()
    ref = res[0]["fp32-base/factors"]["weights"]
    for rank_res in res:
        for key, r in rank_res.items():
            for name in ref:
                d, d_ref = r["weights"][name] - w0[name], ref[name] - w0[name]
                assert d_ref.norm() > 0
                assert rel(d, d_ref) < 1e-5, (key, name, rel(d, d_ref))
    assert res[0]["fp32-base/dense"]["paths"] == ["dense"]
    assert res[0]["sharded-fp32/factors"]["mode"] == "sharded-fp32"


def test_bytes_per_step_equal_formula():
    tp, dp = 2, 2
    modes = [("fp32-base", "factors"), ("fp32-base", "dense"), ("sharded-fp32", "factors"), ("sharded-fp32", "dense")]
    res = run_distributed(modes_worker, tp * dp, tp, args=(tp, "float32", 1e-3, 1, modes))[0]
    # local (TP-sharded) shapes of every logical matrix: column parts (rows / tp, n), row layers (m, n / tp)
    parts = [(toy.HEADS * toy.HD // tp, toy.H), (toy.GROUPS * toy.HD // tp, toy.H), (toy.GROUPS * toy.HD // tp, toy.H),
             (toy.H, toy.QKV_OUT // tp), (toy.FFN // tp, toy.H), (toy.FFN // tp, toy.H), (toy.H, toy.FFN // tp)]
    fp32 = 4
    assert res["fp32-base/factors"]["bytes"] == {"deltas": fp32 * R * sum(m + n for m, n in parts), "dense": 0, "params": 0}
    assert res["fp32-base/dense"]["bytes"] == {"deltas": 0, "dense": fp32 * sum(m * n for m, n in parts), "params": 0}
    weights = [(toy.QKV_OUT // tp, toy.H), (toy.H, toy.QKV_OUT // tp), (2 * toy.FFN // tp, toy.H), (toy.H, toy.FFN // tp)]
    params = fp32 * sum(-(-m // dp) * n for m, n in weights)  # each rank's padded row block
    assert res["sharded-fp32/factors"]["bytes"]["params"] == params
    # dense path with sharded masters: one reduce-scatter of each weight's padded dp x block rows
    assert res["sharded-fp32/dense"]["bytes"] == {"deltas": 0, "dense": dp * params, "params": params}


def _corrupt_worker():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa

    model = toy.MegatronToy(toy.logical_weights(), 1)
    apply_hd_pissa(model, HDPiSSAConfig(rank=R, consistency_check_interval=1), progress=False)
    opt = HDPiSSAOptimizer(model, lr=1e-3)
    if ps.get_data_parallel_rank() == 1:
        with torch.no_grad():
            model.linear_fc2.weight[0, 0] += 1e-3
    x, t = toy.make_data(1, 2, 1)[0][dist.get_rank()][0]
    toy.loss_fn(model(x), t).backward()
    try:
        opt.step()
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_consistency_guard_names_the_layer():
    msgs = run_distributed(_corrupt_worker, 2, 1)
    for m in msgs:
        assert "divergence" in m and "linear_fc2" in m, m
