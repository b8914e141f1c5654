"""The optimizers' named step phases: the hook wraps the work it names, in step order, and each phase
is a profiler range (multi-process launch, one rank)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from tests.helpers import toy
from tests.helpers.distributed import run_distributed

R = 2


def _recorder(model, log):
    """A phase hook logging (phase, the fc2 weight changed while inside)."""
    @contextlib.contextmanager
    def hook(name):
        w = model.linear_fc2.weight.detach().clone()
        yield
        log.append((name, not torch.equal(w, model.linear_fc2.weight)))
    return hook


def _step(model, opt, dtype):
    x, target = toy.make_data(1, 1, 1)[0][0][0]
    toy.loss_fn(model(x.to(dtype)).float(), target).backward()
    opt.step()
    opt.zero_grad()
    return x.to(dtype)


def _phases_worker():
    from torch.profiler import ProfilerActivity, profile

    from megatron_hdpissa import DataParallelAdamW, HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa, apply_lowrank
    from megatron_hdpissa.peft.lowrank.config import LowRankConfig

    out = {}
    for key, dtype, master in (("hd-pissa/fp32-base", torch.float32, "fp32-base"),
                               ("hd-pissa/sharded-fp32", torch.bfloat16, "sharded-fp32")):
        model = toy.MegatronToy(toy.logical_weights(), 1, dtype=dtype)
        apply_hd_pissa(model, HDPiSSAConfig(rank=R, master_weights=master), progress=False)
        opt = HDPiSSAOptimizer(model, lr=1e-2, clip_grad=1.0)
        log = []
        opt.phase_hook = _recorder(model, log)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            x = _step(model, opt, dtype)
        model(x)  # sharded masters: the first forward waits for the parameter all-gather
        out[key] = {"log": log, "ranges": sorted({e.name for e in prof.events() if e.name.startswith("hd_pissa.")})}
    model = toy.MegatronToy(toy.logical_weights(), 1)
    apply_lowrank(model, LowRankConfig(method="lora", rank=R), progress=False)
    opt = DataParallelAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, clip_grad=1.0)
    log = []
    opt.phase_hook = _recorder(model, log)
    _step(model, opt, torch.float32)
    out["lora"] = {"log": log}
    return out


@pytest.fixture(scope="module")
def phases():
    return run_distributed(_phases_worker, 1)[0]


def test_hook_wraps_each_phase_in_step_order(phases):
    # fp32-base: the merge into W happens inside "aggregate" and nowhere else
    assert phases["hd-pissa/fp32-base"]["log"] == [("clip", False), ("adam", False), ("aggregate", True)]
    # sharded masters: "aggregate" updates the fp32 masters, W is written when the gather finishes
    assert phases["hd-pissa/sharded-fp32"]["log"] == [
        ("clip", False), ("adam", False), ("aggregate", False), ("param_gather", False), ("param_gather", True)]
    # the baseline: the gradient average, clipping, then torch's AdamW (LoRA's factors, not W)
    assert [name for name, _ in phases["lora"]["log"]] == ["aggregate", "clip", "adam"]


def test_phases_are_profiler_ranges(phases):
    assert phases["hd-pissa/fp32-base"]["ranges"] == [
        "hd_pissa.optimizer.adam", "hd_pissa.optimizer.aggregate", "hd_pissa.optimizer.clip"]
    assert phases["hd-pissa/sharded-fp32"]["ranges"] == [
        "hd_pissa.optimizer.adam", "hd_pissa.optimizer.aggregate", "hd_pissa.optimizer.clip",
        "hd_pissa.optimizer.param_gather"]
