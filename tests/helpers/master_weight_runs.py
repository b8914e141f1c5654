"""HD-PiSSA training runs of the toy block under several master-weight modes and aggregation paths
(called inside `run_distributed` ranks), shared by the aggregation and master-weight tests."""
from __future__ import annotations

import torch

from tests.helpers import toy

R, MICRO = 2, 2


def train(tp, dtype, lr, steps, master, aggregation, start_bf16):
    from megatron.core import parallel_state as ps

    from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa

    w0 = toy.logical_weights()
    if start_bf16:  # the fp32 reference of a bf16 run starts from the same rounded weights
        w0 = {k: v.to(torch.bfloat16).float() for k, v in w0.items()}
    model = toy.MegatronToy(w0, tp, dtype=dtype)
    apply_hd_pissa(model, HDPiSSAConfig(rank=R, alpha=4.0, master_weights=master, aggregation=aggregation,
                                        consistency_check_interval=1), progress=False)
    opt = HDPiSSAOptimizer(model, lr=lr)
    dp_rank = ps.get_data_parallel_rank()
    data = toy.make_data(steps, ps.get_data_parallel_world_size(), MICRO)
    for step in range(steps):
        for x, target in data[step][dp_rank]:
            (toy.loss_fn(model(x.to(dtype)).float(), target) / MICRO).backward()
        opt.step()
        opt.zero_grad()
    opt.finish_param_gather()
    out = {"weights": {k: v.float() for k, v in model.logical_weights().items()},
           "bytes": dict(opt.last_step_bytes), "mode": opt.master_mode,
           "paths": sorted({e.path for e in opt.entries})}
    # What each mode holds at full precision, read back as fp32 logical weights
    if opt.master_mode == "sharded-fp32":
        import torch.distributed as dist

        for m in opt.masters:
            assert torch.equal(m.weight[m.lo:m.hi], m.data.to(m.weight.dtype))  # W = round(master)
            blk = torch.zeros(m.block, m.weight.shape[1])
            blk[: m.hi - m.lo] = m.data
            parts = [torch.empty_like(blk) for _ in range(ps.get_data_parallel_world_size())]
            dist.all_gather(parts, blk, group=ps.get_data_parallel_group())
            m.weight.data = torch.cat(parts)[: m.weight.shape[0]]
    elif opt.master_mode == "compensated-bf16":
        for w, c in zip(opt.weight_store.weights, opt.compensation):  # Kahan: exact sum = value - compensation
            w.data = w.float() - c.float()
    out["full_precision"] = {k: v.float() for k, v in model.logical_weights().items()}
    return out


def modes_worker(tp, dtype_name, lr, steps, modes, start_bf16=False):
    dtype = getattr(torch, dtype_name)
    return {f"{m}/{a}": train(tp, dtype, lr, steps, m, a, start_bf16) for m, a in modes}


def rel(a, b) -> float:
    """|a - b| / |b| (Frobenius), guarded against b = 0."""
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
