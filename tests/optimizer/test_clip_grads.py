"""Global gradient norm under pipeline parallelism (multi-process, gloo): 4 ranks = 2 stages x 2 DP
ranks, each stage a block of megatron-core parallel linears with HD-PiSSA, activations sent between
stages, an embedding-like weight tied between the first and the last stage. The optimizer's norm
must equal the norm of every stage's gradients computed here in one process, clipping must use that
one coefficient on every stage, an inf on one stage must skip the step on all, and a divergence on
one stage must fail the consistency check on every rank."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import toy
from tests.helpers.distributed import run_distributed

R, CLIP, SCALE = 2, 0.05, 4.0


def _pipeline_step(model, opt, x, target, pp_group, pp_rank):
    """Forward and backward through both stages (the first sends its output, the last its input
    gradient), then the tied weight's gradients summed between the stages, as megatron-core's
    `finalize_model_grads` does for tied embeddings."""
    import torch.distributed as dist

    peer = dist.get_global_rank(pp_group, 1 - pp_rank)
    if pp_rank == 0:
        out = model(x * model.tied)
        dist.send(out.detach().contiguous(), peer)
        grad = torch.empty_like(out)
        dist.recv(grad, peer)
        out.backward(grad)
    else:
        h = torch.empty_like(target)
        dist.recv(h, peer)
        h.requires_grad_()
        opt.scale_loss(toy.loss_fn(model(h) * model.tied, target)).backward()
        dist.send(h.grad.contiguous(), peer)
    dist.all_reduce(model.tied.grad, group=pp_group)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _pp_worker():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa
    from megatron_hdpissa.models.compat import ensure_cpu_compat

    ensure_cpu_compat()  # the scaler's bookkeeping tensors on the CPU
    pp_group, pp_rank = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank()
    model = toy.MegatronToy(toy.logical_weights(), 1)  # the same base block on both stages
    apply_hd_pissa(model, HDPiSSAConfig(rank=R, alpha=4.0), progress=False)
    model.tied = torch.nn.Parameter(torch.linspace(0.5, 1.5, toy.H))  # input scale / output scale
    if pp_rank == 1:  # megatron-core's marks on the last stage's copy of a tied embedding
        model.tied.shared = model.tied.shared_embedding = True
    scaler = DynamicGradScaler(initial_scale=SCALE, min_scale=1.0, growth_factor=2.0, backoff_factor=0.5,
                               growth_interval=1000, hysteresis=1)
    opt = HDPiSSAOptimizer(model, lr=1e-3, clip_grad=CLIP, grad_scaler=scaler)
    data = toy.make_data(2, 2, 1)
    out = {"pp": pp_rank, "dp": dp_rank, "steps": []}
    for step in range(2):
        x, target = data[step][dp_rank][0]
        _pipeline_step(model, opt, x, target, pp_group, pp_rank)
        if step == 1 and pp_rank == 1 and dp_rank == 0:  # an overflow on the last stage only
            model.linear_fc1.hd_pissa.a["up"].grad[0, 0, 0] = float("inf")
        raw, scale, before = _grads(model), float(scaler.scale), model.linear_qkv.weight.detach().clone()
        opt.step()
        out["steps"].append({"raw": raw, "scale": scale, "after": _grads(model), "norm": opt.last_grad_norm,
                             "skipped": opt.last_step_skipped, "scale_after": float(scaler.scale),
                             "unchanged": torch.equal(before, model.linear_qkv.weight)})
        opt.zero_grad()
    if pp_rank == 1 and dp_rank == 1:  # a divergence on the last stage only
        with torch.no_grad():
            model.linear_fc2.weight[0, 0] += 1e-3
    try:
        opt.check_consistency()
        out["consistency"] = "no error"
    except RuntimeError as e:
        out["consistency"] = str(e)
    out["world_rank"] = dist.get_rank()
    return out


def _reference_norm(results, step):
    """sqrt of: every rank's unscaled factor gradients squared, plus per stage the DP-averaged
    gradient of each other parameter, the tied weight counted once (its two copies are equal)."""
    total = 0.0
    for stage in (0, 1):
        ranks = [r["steps"][step] for r in results if r["pp"] == stage]
        for name in ranks[0]["raw"]:
            grads = [s["raw"][name].double() / s["scale"] for s in ranks]
            if "hd_pissa" in name:
                total += sum(float(g.square().sum()) for g in grads)
            elif stage == 0:  # the last stage's tied copy is the same gradient
                total += float((sum(grads) / len(grads)).square().sum())
    return total ** 0.5


@pytest.fixture(scope="module")
def pp_results():
    return run_distributed(_pp_worker, 4, tp=1, pp=2)


def test_global_norm_spans_stages_and_clips_with_one_coefficient(pp_results):
    assert sorted((r["pp"], r["dp"]) for r in pp_results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first, last = ([r for r in pp_results if r["pp"] == s] for s in (0, 1))
    for a, b in zip(first, last):  # the tied weight's gradient was summed between the stages
        assert torch.equal(a["steps"][0]["raw"]["tied"], b["steps"][0]["raw"]["tied"])
    norm = _reference_norm(pp_results, 0)
    coef = CLIP / (norm + 1e-6)
    assert coef < 0.5, norm  # clipping is active
    for r in pp_results:
        st = r["steps"][0]
        assert not st["skipped"]
        assert st["norm"] == pytest.approx(norm, rel=1e-6), (r["pp"], r["dp"], st["norm"], norm)
        dp_mean = {n: sum(o["steps"][0]["raw"][n] for o in pp_results if o["pp"] == r["pp"]) / 2
                   for n in st["raw"]}
        for name, g in st["after"].items():
            unclipped = (st["raw"][name] if "hd_pissa" in name else dp_mean[name]) / st["scale"]
            torch.testing.assert_close(g, unclipped * coef, rtol=1e-5, atol=1e-9)


def test_overflow_on_one_stage_skips_every_stage(pp_results):
    for r in pp_results:
        st = r["steps"][1]
        assert st["skipped"] and st["unchanged"], (r["pp"], r["dp"])
        assert not math.isfinite(st["norm"])
        assert st["scale_after"] == SCALE / 2  # every stage's scaler backed off


def test_divergence_on_one_stage_fails_every_rank(pp_results):
    last_stage = {r["world_rank"] for r in pp_results if r["pp"] == 1}
    for r in pp_results:
        msg = r["consistency"]
        assert "divergence" in msg, (r["pp"], r["dp"], msg)
        if r["pp"] == 1:  # the stage that diverged names the layer
            assert "linear_fc2" in msg, msg
        else:  # the others learn where it was found
            assert any(f"found on global rank {w}" in msg for w in last_stage), msg
