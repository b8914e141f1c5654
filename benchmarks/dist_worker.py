"""bench_dist's worker: one method on one rank, timed per step, with the bytes it hands to collectives."""
from __future__ import annotations

import argparse
import os
import warnings

from benchmarks.dist_bytes import baseline_formula, hd_formula, published_formula

HD_COLLECTIVES = {"deltas": "all_gather", "params": "all_gather"}


def set_up_method(spec, model, args, groups, timer, applied):
    """Adapters and optimizer of one method: (optimizer, published optimizer, slices, formula bytes,
    parts per aggregation path, collective per byte key); `applied()` is called once the adapters
    are in place. The HD-PiSSA optimizer's phases go to `timer` through its phase_hook."""
    from benchmarks.common.model import make_floor, set_trainable
    from benchmarks.common.published import DistPublishedAdapter, DistPublishedOptimizer, published_targets
    from megatron_hdpissa.optimizer.data_parallel import DataParallelAdamW

    kind, dp = spec["kind"], groups.dp_size
    if kind == "hd-pissa":
        from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa

        cfg = HDPiSSAConfig(rank=args.rank, alpha=args.alpha, virtual_ranks=args.virtual_ranks, svd_method=args.svd,
                            seed=args.seed, master_weights=spec["mode"], aggregation=spec["path"])
        apply_hd_pissa(model, cfg, progress=False)
        applied()
        opt = HDPiSSAOptimizer(model, lr=args.lr, master_weights=spec["mode"], aggregation=spec["path"])
        timer.attach(opt)
        formula, paths = hd_formula(model, spec, dp)
        dense = "reduce_scatter" if spec["mode"] == "sharded-fp32" and dp > 1 else "all_reduce"
        return opt, None, args.virtual_ranks, formula, paths, dict(HD_COLLECTIVES, dense=dense)
    if kind in ("lora", "pissa"):
        from megatron_hdpissa.peft.lowrank.config import LowRankConfig
        from megatron_hdpissa.peft.lowrank.model import apply_lowrank

        cfg = LowRankConfig(method=kind, rank=args.rank, alpha=args.alpha, seed=args.seed, svd_method=args.svd)
        apply_lowrank(model, cfg, progress=False)
        applied()
        opt = DataParallelAdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        return opt, None, 1, baseline_formula(opt, dp), {}, {"grads": "all_reduce"}
    if kind == "full":
        set_trainable(model, True)
        applied()
        opt = DataParallelAdamW(list(model.parameters()), lr=args.lr)
        return opt, None, 1, baseline_formula(opt, dp), {}, {"grads": "all_reduce"}
    if kind == "floor":
        make_floor(model)  # as bench_step: backward = the input-gradient GEMMs only
        applied()
        return None, None, 1, {}, {}, {}
    if kind == "published":
        adapters = [DistPublishedAdapter(t, args.rank, args.alpha / args.rank, groups.dp_rank, dp, args.svd, args.seed)
                    for t in published_targets(model)]
        applied()
        published = DistPublishedOptimizer(adapters, args.lr, groups.dp_group, dp)
        return (None, published, 1, published_formula(adapters, args.grad_accum, dp), {},
                {"factors+deltas": "all_gather", "loss": "all_reduce"})
    raise ValueError(kind)


def run_worker(args, spec: dict) -> dict:
    """This rank's part of method `spec` (a fresh process started by the driver)."""
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    from benchmarks.common.memory import mem_mb, memory_baseline
    from benchmarks.common.model import build_model, count_trainable, forward_backward, localise_mixer, make_data
    from benchmarks.common.timing import AGGREGATION_PHASES, PhaseTimer, device_sync, now, since
    from megatron_hdpissa.distributed.groups import initialize, shutdown
    from megatron_hdpissa.models.compat import ensure_cpu_compat

    dtype_name = args.worker_dtype
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    cuda = args.device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not cuda:
        ensure_cpu_compat()
    groups = initialize(tensor_model_parallel_size=args.tp, backend="nccl" if cuda else "gloo")
    dp, dp_rank = groups.dp_size, groups.dp_rank
    sync = device_sync(cuda)

    def barrier():
        sync()
        if dist.get_world_size() > 1:
            dist.barrier()

    model = build_model(args, device, dtype)  # same weights on every rank (fixed seed, CPU init)
    if groups.tp_size > 1:
        localise_mixer(model, args, groups.tp_size)
    data_args = argparse.Namespace(**vars(args))
    data_args.seed = args.seed + 7919 * dp_rank  # each DP rank its own micro-batches; TP peers share them
    data = make_data(data_args, device, dtype)
    sync()
    mem_base = memory_baseline(cuda)

    kind = spec["kind"]
    timer = PhaseTimer(sync)
    barrier()
    t_init = now()
    apply_s = []

    def applied():
        sync()
        apply_s.append(since(t_init))

    opt, published, slices, formula, paths, collectives = set_up_method(spec, model, args, groups, timer, applied)
    sync()
    init = since(t_init)
    mem_setup = mem_mb(cuda)
    trainable = count_trainable(model, published)
    loss_bytes = [0]

    def one_step():
        barrier()  # ranks start each step together; not timed
        t0 = now()
        for i, (x, target) in enumerate(data):
            loss = forward_backward(model, x, target, i, slices, args.loss, len(data))
            if published is not None and dp > 1:  # the published loop all-reduces every micro-batch's loss
                avg = loss.detach().clone()
                dist.all_reduce(avg, group=groups.dp_group)
                loss_bytes[0] += avg.numel() * avg.element_size()
        sync()
        t1 = now()
        barrier()  # timed apart: waiting for the slowest rank, so the optimizer time is its own
        t1b = now()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        elif published is not None:
            published.step()
        sync()
        t2 = now()
        agg = timer.take(*AGGREGATION_PHASES)
        if kind == "hd-pissa":
            counted = dict(opt.last_step_bytes)
        elif published is not None:
            counted = dict(published.bytes, loss=loss_bytes[0])
        elif opt is not None:
            counted = {"grads": opt.last_step_bytes}
        else:
            counted = {}
        loss_bytes[0] = 0
        return {"step": since(t0, t2), "fwd_bwd": since(t0, t1), "wait": since(t1, t1b), "opt": since(t1b, t2),
                "agg": agg, "bytes": counted, "loss": float(loss.detach()) * len(data)}

    steps = [one_step() for _ in range(args.warmup + args.iters)]
    timed = steps[args.warmup:]
    mem_peak = mem_mb(cuda)
    consistency, retime = None, {}
    if kind == "hd-pissa":
        consistency = check_consistency(opt, dp)
        if args.worker_retime:
            retime = retime_decomposition(model, args.svd, barrier, sync)
    res = {
        "method": spec["name"], "dtype": dtype_name, "rank": dist.get_rank(), "dp_rank": dp_rank,
        "dp": dp, "tp": groups.tp_size, "slices": slices, "trainable_params": trainable,
        "init": init, "init_apply": apply_s[0], "retime": retime,
        "series": {key: [st[key] for st in timed] for key in ("step", "fwd_bwd", "wait", "opt", "agg")},
        "bytes_steps": [st["bytes"] for st in steps],
        "formula": formula, "collectives": collectives, "paths": paths,
        "final_loss": timed[-1]["loss"],
        "mem_base_mb": mem_base, "mem_setup_peak_mb": mem_setup, "mem_peak_mb": mem_peak,
        "mem_delta_mb": mem_peak - mem_base, "consistency": consistency,
        "has_agg": kind == "hd-pissa" and timer.attached,
    }
    shutdown()
    return res


def check_consistency(opt, dp: int) -> str:
    """Whether the data-parallel ranks hold the same weights after the timed steps."""
    opt.finish_param_gather()
    try:
        opt.check_consistency()
        return "identical" if dp > 1 else "single DP rank"
    except RuntimeError as e:
        return f"DIVERGED: {e}"


def retime_decomposition(model, svd: str, barrier, sync) -> dict:
    """Warm re-timing of the decomposition of the same matrices: exact and randomized (with
    --svd randomized only randomized: the exact SVD at large shapes is bench_decompose.py's)."""
    from benchmarks.common.timing import now, since
    from megatron_hdpissa.peft.hd_pissa.model import decompose_hd_pissa

    retime = {}
    for method in (("exact", "randomized") if svd == "exact" else ("randomized",)):
        model.hd_pissa_config.svd_method = method
        barrier()
        t0 = now()
        decompose_hd_pissa(model, progress=False)
        sync()
        retime[method] = since(t0)
        barrier()
    return retime
