"""HD-PiSSA under megatron-core's DistributedDataParallel (and, for ordinary trainable
parameters, megatron-core's optimizer), on real processes with gloo: against the dense reference
with gradient clipping, and fp16 loss scaling with an overflow on one rank."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import reference, toy
from tests.helpers.distributed import run_distributed

STEPS, MICRO, R, ALPHA, LR = 3, 2, 2, 4.0, 2e-3
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1")  # linear_fc2 stays an ordinary trainable weight


def _config(**kw):
    from megatron_hdpissa import HDPiSSAConfig

    return HDPiSSAConfig(rank=R, alpha=ALPHA, target_modules=TARGETS, trainable_modules=("linear_fc2",),
                         consistency_check_interval=1, **kw)


def train_ddp(tp: int, clip: float, others: str, steps: int = STEPS):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_hdpissa import HDPiSSAOptimizer, apply_hd_pissa
    from megatron_hdpissa.distributed.ddp import wrap_ddp

    torch.manual_seed(0)
    model = toy.MegatronToy(toy.logical_weights(), tp)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    data = toy.make_data(steps, dp, MICRO)
    apply_hd_pissa(model, _config(), progress=False)
    ddp = wrap_ddp(model)
    opt = HDPiSSAOptimizer(ddp, lr=LR, clip_grad=clip, others_optimizer=others)
    norms, factor_grads = [], []
    for step in range(steps):
        opt.zero_grad()
        micro = data[step][dp_rank]
        for xb, target in micro:
            (toy.loss_fn(ddp(xb), target) / len(micro)).backward()
        ddp.finish_grad_sync()
        if step == 0:  # what the optimizer will use: this rank's own factor gradient
            a = model.linear_qkv.hd_pissa.a["q"]
            factor_grads.append(a.main_grad.clone() * opt._factor_grad_unscale)
        opt.step()
        norms.append(opt.last_grad_norm)
    return {
        "weights": model.logical_weights(),
        "norms": norms,
        "others_optimizer": type(opt.others_optimizer).__name__ if opt.others_optimizer else None,
        "unscale": opt._factor_grad_unscale,
        "grad_q": factor_grads[0],
        "world": dist.get_world_size(),
    }


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("tp,dp,others", [(1, 2, "megatron"), (2, 2, "megatron"), (1, 2, "builtin")])
def test_ddp_with_clipping_matches_reference(tp, dp, others):
    clip = 0.05
    results = run_distributed(train_ddp, world_size=tp * dp, tp=tp, args=(tp, clip, others))
    w0 = toy.logical_weights()
    data = toy.make_data(STEPS, dp, MICRO)
    ref_norms = []
    ref = reference.hd_pissa_reference(w0, data, R, ALPHA / R, LR, STEPS, untargeted=("fc2",),
                                       clip_grad=clip, norms=ref_norms)
    unclipped = reference.hd_pissa_reference(w0, data, R, ALPHA / R, LR, STEPS, untargeted=("fc2",))
    for res in results:
        assert res["unscale"] == pytest.approx(dp), "DDP's 1/dp pre-scaling of the factor gradients"
        # megatron-core's own optimizer (get_megatron_optimizer) steps fc2, or the built-in AdamW
        assert res["others_optimizer"] == {"megatron": "ChainedOptimizer", "builtin": None}[others]
        # the global norm is the reference's (all ranks' factors + averaged fc2), on every rank
        for got, want in zip(res["norms"], ref_norms):
            assert got == pytest.approx(want, rel=1e-4)
    assert all(n > clip for n in ref_norms), "clipping must bind for this test to mean anything"
    # DP ranks trained different slices: their factor gradients differ (not averaged by DDP)
    if dp > 1:
        assert not torch.allclose(results[0]["grad_q"], results[-1]["grad_q"])
    first = results[0]["weights"]
    for res in results[1:]:
        for name in first:
            assert torch.equal(first[name], res["weights"][name]), name
    for name, w in first.items():
        delta_ref = ref[name] - w0[name].double()
        delta = w.double() - w0[name].double()
        assert delta_ref.norm() > 1e-4 * w0[name].norm(), f"{name}: reference barely moved"
        assert _rel(delta, delta_ref) < 2e-4, f"{name}: {_rel(delta, delta_ref):.2e}"
        if name != "fc2":  # clipping changed the result: the test tells clipped from unclipped
            assert _rel(unclipped[name] - w0[name].double(), delta_ref) > 1e-2, name


def train_fp16(inject_rank: int, steps: int, lr: float):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa
    from megatron_hdpissa.distributed.ddp import wrap_ddp

    torch.manual_seed(0)
    model = toy.MegatronToy(toy.logical_weights(), 1, dtype=torch.float16)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    data = toy.make_data(steps + 1, dp, MICRO)
    apply_hd_pissa(model, HDPiSSAConfig(rank=R, alpha=ALPHA, consistency_check_interval=1), progress=False)
    ddp = wrap_ddp(model)
    scaler = DynamicGradScaler(initial_scale=2.0 ** 12, min_scale=1.0, growth_factor=2.0,
                               backoff_factor=0.5, growth_interval=1000, hysteresis=1)
    opt = HDPiSSAOptimizer(ddp, lr=lr, grad_scaler=scaler, master_weights="sharded-fp32")
    log = []
    data_step = 0
    for step in range(steps + 1):
        opt.zero_grad()
        micro = data[data_step][dp_rank]
        for xb, target in micro:
            opt.scale_loss(toy.loss_fn(ddp(xb.half()), target.half()) / len(micro)).backward()
        ddp.finish_grad_sync()
        before = model.logical_weights()
        if step == 0 and dp_rank == inject_rank:  # an overflow in one rank's factor gradients only
            model.linear_fc1.hd_pissa.a["up"].main_grad[0, 0, 0] = float("inf")
        opt.step()
        opt.finish_param_gather()
        after = model.logical_weights()
        log.append({"skipped": opt.last_step_skipped, "scale": float(scaler.scale), "norm": opt.last_grad_norm,
                    "unchanged": all(torch.equal(before[n], after[n]) for n in before)})
        if not opt.last_step_skipped:
            data_step += 1
    sd = opt.state_dict()
    return {"log": log, "weights": model.logical_weights(), "scaler_state": sd["hd_pissa_grad_scaler"],
            "world": dist.get_world_size()}


def test_fp16_loss_scaling_overflow_on_one_rank_skips_everywhere():
    steps, lr = 3, 1e-2
    results = run_distributed(train_fp16, world_size=2, args=(1, steps, lr))
    for res in results:
        first = res["log"][0]
        assert first["skipped"] and first["unchanged"], "an overflow on DP rank 1 must skip DP rank 0 too"
        assert first["scale"] == 2.0 ** 11
        assert not any(e["skipped"] for e in res["log"][1:])
        assert not any(e["unchanged"] for e in res["log"][1:])
        assert float(res["scaler_state"]["scale"]) == 2.0 ** 11
    for name in results[0]["weights"]:
        assert torch.equal(results[0]["weights"][name], results[1]["weights"][name]), name
    # the steps that ran equal the fp32 reference to fp16 accuracy
    w0 = toy.logical_weights()
    data = toy.make_data(steps + 1, 2, MICRO)
    ref_norms = []
    ref = reference.hd_pissa_reference(w0, data[:steps], R, ALPHA / R, lr, steps, norms=ref_norms)
    for res in results:  # the unscaled gradient norm (what clipping would use) is the fp32 one
        got = [e["norm"] for e in res["log"][1:]]
        assert got == pytest.approx(ref_norms, rel=2e-2), (got, ref_norms)
    for name, w in results[0]["weights"].items():
        w_fp16_0 = w0[name].half().double()
        delta = w.double() - w_fp16_0
        delta_ref = ref[name] - w0[name].double()
        assert _rel(delta, delta_ref) < 5e-2, f"{name}: {_rel(delta, delta_ref):.2e}"
