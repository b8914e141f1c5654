"""HD-PiSSA on real megatron-core parallel layers (multi-process, gloo) against the dense
single-process reference of the equations, over a TP x DP grid."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import reference, toy
from tests.helpers.distributed import run_distributed

STEPS, MICRO, R, ALPHA, LR = 5, 2, 2, 4.0, 2e-3


def train_toy(tp: int, virtual: int, fused: bool, steps: int, weight_decay: float = 0.0):
    """Runs inside each spawned rank; returns the logical weights and per-step DP checks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, active_slice, apply_hd_pissa
    from megatron_hdpissa.peft.common import peft_method

    torch.manual_seed(0)
    w0 = toy.logical_weights()
    model = toy.MegatronToy(w0, tp)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    data = toy.make_data(steps, dp * virtual, MICRO)
    x = data[0][0][0][0]
    before = model(x).detach().clone()
    cfg = HDPiSSAConfig(rank=R, alpha=ALPHA, virtual_ranks=virtual, fused_decomposition=fused,
                        consistency_check_interval=1)
    apply_hd_pissa(model, cfg, progress=False)
    after = model(x).detach().clone()
    opt = HDPiSSAOptimizer(model, lr=LR, weight_decay=weight_decay)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for step in range(steps):
        for v in range(virtual):
            with active_slice(model, v):
                micro = data[step][dp_rank * virtual + v]
                for xb, target in micro:
                    (toy.loss_fn(model(xb), target) / len(micro)).backward()
        opt.step()  # includes the DP consistency check (interval 1)
        opt.zero_grad()
    return {
        "weights": model.logical_weights(),
        "forward_unchanged": torch.equal(before, after),
        "trainable": trainable,
        "bytes": opt.last_step_bytes,
        "world": dist.get_world_size(),
        "method": peft_method(model),
    }


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def check_against_reference(results, dp, virtual, fused, steps=STEPS, weight_decay=0.0):
    w0 = toy.logical_weights()
    data = toy.make_data(steps, dp * virtual, MICRO)
    ref = reference.hd_pissa_reference(w0, data, R, ALPHA / R, LR, steps, weight_decay=weight_decay, fused=fused)
    for res in results:
        assert res["forward_unchanged"], "wrapping changed the forward output"
        assert res["method"] == "hd-pissa"
        assert all(".hd_pissa." in n for n in res["trainable"]), res["trainable"]
    first = results[0]["weights"]
    for res in results[1:]:  # every rank (all DP and TP ranks) ends with the same logical W
        for name in first:
            assert torch.equal(first[name], res["weights"][name]), name
    for name, w in first.items():
        delta_ref = ref[name] - w0[name].double()
        delta = w.double() - w0[name].double()
        assert delta_ref.norm() > 1e-3 * w0[name].norm(), f"{name}: reference barely moved"
        assert _rel(w.double(), ref[name]) < 1e-5, name
        assert _rel(delta, delta_ref) < 2e-4, f"{name}: update differs from reference by {_rel(delta, delta_ref):.2e}"


@pytest.mark.parametrize("tp,dp", [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2)])
def test_matches_dense_reference(tp, dp):
    results = run_distributed(train_toy, tp * dp, tp, args=(tp, 1, False, STEPS))
    check_against_reference(results, dp, 1, fused=False)


def test_fused_decomposition_matches_reference():
    results = run_distributed(train_toy, 2, 1, args=(1, 1, True, STEPS))
    check_against_reference(results, 2, 1, fused=True)


def test_weight_decay_matches_reference():
    results = run_distributed(train_toy, 2, 1, args=(1, 1, False, 3, 0.1))
    check_against_reference(results, 2, 1, fused=False, steps=3, weight_decay=0.1)


def test_tp_invariance():
    """TP=2 x DP=2 and TP=1 x DP=2 give the same weights from the same data."""
    tp1 = run_distributed(train_toy, 2, 1, args=(1, 1, False, STEPS))[0]["weights"]
    tp2 = run_distributed(train_toy, 4, 2, args=(2, 1, False, STEPS))[0]["weights"]
    for name in tp1:
        assert _rel(tp2[name], tp1[name]) < 1e-6, name
        d1, d2 = tp1[name] - toy.logical_weights()[name], tp2[name] - toy.logical_weights()[name]
        assert _rel(d2, d1) < 1e-4, name


def test_virtual_ranks_equal_real_ranks():
    """One process with 2 virtual ranks x DP 2 equals 4 real DP ranks (and the reference)."""
    virtual = run_distributed(train_toy, 2, 1, args=(1, 2, False, 3))
    real = run_distributed(train_toy, 4, 1, args=(1, 1, False, 3))
    for name in real[0]["weights"]:
        assert _rel(virtual[0]["weights"][name], real[0]["weights"][name]) < 1e-6, name
    check_against_reference(virtual, 2, 2, fused=False, steps=3)
