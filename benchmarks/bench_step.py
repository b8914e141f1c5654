"""bench_step: time of one optimizer step (forward + backward over all micro-batches + optimizer)
for HD-PiSSA, LoRA, full fine-tuning, the frozen-base floor and the published formulation, on a
stack of LLaMA-shaped blocks built from real megatron-core parallel linears (TP=1, one process).

Every method runs in its own fresh subprocess (so peak-memory numbers do not mix), on the same
model weights and the same data (both drawn from fixed seeds). Run from the repository root:

    .venv/bin/python benchmarks/bench_step.py                       # CPU defaults
    .venv/bin/python benchmarks/bench_step.py --device cuda --dtype bf16 --llama7b --layers 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.common import args as cargs  # noqa: E402
from benchmarks.common.markdown import write_files  # noqa: E402
from benchmarks.common.runner import run_one, start  # noqa: E402
from benchmarks.step_report import dp_projection, reduce_runs, render_markdown, summarise  # noqa: E402

METHODS = ("hd-pissa", "hd-pissa-k1", "lora", "lora-lean", "full", "floor", "published")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cargs.add_shape_args(p)
    cargs.add_batch_args(p)
    meth = p.add_argument_group("methods")
    meth.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {METHODS}")
    cargs.add_adapter_args(meth, rank_help="adapter rank r (HD-PiSSA per slice, LoRA, published)", virtual_ranks=8,
                           virtual_ranks_help="K for `hd-pissa`: slices held by this one process (micro-batch i "
                                              "feeds slice i %% K)",
                           svd_help="decomposition at set-up (not timed)")
    cargs.add_loss_arg(meth)
    run = p.add_argument_group("run")
    cargs.add_run_args(run, device_help="cpu or cuda", dtypes=("fp32", "bf16"), dtype_default="fp32",
                       dtype_help="base weights and activations",
                       threads_help="torch intra-op threads (also OMP/MKL). 1 is the steady choice on a shared "
                                    "machine: with 2 OpenMP threads on 2 busy cores, one descheduled thread "
                                    "stalls the other at every barrier",
                       iters=2, rounds=2,
                       rounds_help="run the whole method list this many times (alternating order, fresh "
                                   "processes) and pool the timed steps: steadier on a busy machine",
                       basis_help="clock for the ratios: wall-clock, or process CPU time (default: cpu on CPU, "
                                  "where other jobs on a shared machine inflate wall time; wall on GPU)")
    run.add_argument("--profile", default="",
                     help="comma list of methods to run one extra step under torch.profiler for")
    run.add_argument("--timeout", type=float, default=1800, help="seconds per method subprocess")
    cargs.add_output_args(run)
    args = p.parse_args(argv)
    cargs.shape_defaults(args)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {METHODS}")
    args.method_list = methods
    cargs.check_heads_and_basis(p, args)
    return args


def set_up_method(method, model, args, timer):
    """Adapters and optimizer of one method on the built model: (optimizer, published optimizer,
    slices); HD-PiSSA's phases are timed by `timer` through the optimizer's phase_hook."""
    from benchmarks.common.lean_lora import LeanLoRA
    from benchmarks.common.model import make_floor, make_full
    from benchmarks.common.published import PublishedAdapter, PublishedOptimizer, published_targets

    if method in ("hd-pissa", "hd-pissa-k1"):
        from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa

        slices = args.virtual_ranks if method == "hd-pissa" else 1
        cfg = HDPiSSAConfig(rank=args.rank, alpha=args.alpha, virtual_ranks=slices,
                            svd_method=args.svd, seed=args.seed)
        apply_hd_pissa(model, cfg, progress=False)
        opt = HDPiSSAOptimizer(model, lr=args.lr)
        timer.attach(opt)  # the aggregation share of the step: its "aggregate" and "param_gather" phases
        return opt, None, slices
    if method in ("lora", "lora-lean"):
        from megatron_hdpissa.optimizer.data_parallel import DataParallelAdamW
        from megatron_hdpissa.peft.lowrank.config import LowRankConfig
        from megatron_hdpissa.peft.lowrank.model import apply_lowrank, iter_lowrank

        cfg = LowRankConfig(method="lora", rank=args.rank, alpha=args.alpha, seed=args.seed)
        apply_lowrank(model, cfg, progress=False)
        if method == "lora-lean":  # same parameters and initial values, leaner forward
            for _, module, adapter in iter_lowrank(model):
                LeanLoRA(module, adapter)
        return DataParallelAdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr), None, 1
    if method == "full":
        return make_full(model, args.lr), None, 1
    if method == "floor":
        make_floor(model)
        return None, None, 1
    if method == "published":
        adapters = [PublishedAdapter(t, args.rank, args.alpha / args.rank) for t in published_targets(model)]
        return None, PublishedOptimizer(adapters, lr=args.lr), 1
    raise ValueError(method)


def run_worker(args) -> dict:
    """One method in this (fresh) process: set-up, warm-up and timed steps, memory, optional profile."""
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks.common.memory import mem_mb, memory_baseline
    from benchmarks.common.model import build_model, count_trainable, forward_backward, make_data
    from benchmarks.common.timing import AGGREGATION_PHASES, PhaseTimer, device_sync, now, run_profile, since
    from megatron_hdpissa.distributed.groups import initialize, shutdown

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", device.index or 0)  # "cuda" alone has no index to set
        torch.cuda.set_device(device)
    initialize(tensor_model_parallel_size=1, backend="nccl" if cuda else "gloo")

    sync = device_sync(cuda)
    method = args.worker
    model = build_model(args, device, dtype)
    data = make_data(args, device, dtype)
    sync()
    mem_base = memory_baseline(cuda)

    t_setup = time.perf_counter()
    timer = PhaseTimer(sync)
    opt, published, slices = set_up_method(method, model, args, timer)
    sync()
    setup_s = time.perf_counter() - t_setup
    mem_setup = mem_mb(cuda)
    trainable = count_trainable(model, published)
    agg_s = []
    slices_method = method.startswith("hd-pissa")

    def one_step():
        sync()
        t0 = now()
        for i, (x, target) in enumerate(data):
            loss = forward_backward(model, x, target, i, slices, args.loss, len(data))
        sync()
        t1 = now()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
            if slices_method and timer.attached:
                agg_s.append(timer.take(*AGGREGATION_PHASES))
        elif published is not None:
            published.step(sync)
        sync()
        t2 = now()
        return {"step": since(t0, t2), "fwd_bwd": since(t0, t1), "opt": since(t1, t2),
                "loss": float(loss.detach()) * len(data)}

    steps = [one_step() for _ in range(args.warmup + args.iters)]
    timed = steps[args.warmup:]
    series = {key: [st[key] for st in timed] for key in ("step", "fwd_bwd", "opt")}
    series["agg"] = agg_s[args.warmup:]
    series["merge"] = published.merge_s[args.warmup:] if published is not None else []

    mem_peak = mem_mb(cuda)  # before profiling
    profile = None
    if method in [m for m in args.profile.split(",") if m]:
        profile = run_profile(one_step, cuda)
    res = {
        "method": method,
        "slices": slices,
        "trainable_params": trainable,
        "setup_s": setup_s,
        "series": series,  # key -> [(wall s, cpu s) per timed step]
        "final_loss": timed[-1]["loss"],
        "mem_base_mb": mem_base,
        "mem_setup_peak_mb": mem_setup,
        "mem_peak_mb": mem_peak,
        "mem_delta_mb": mem_peak - mem_base,
        "profile": profile,
    }
    shutdown()
    return res


def main(argv=None):
    started = start(argv, __file__, parse_args, run_worker)
    if started is None:
        return
    argv, args, command, info = started
    tokens = cargs.tokens_per_step(args)
    print(f"tokens per optimizer step: {tokens}")
    if tokens < 8192:
        print("note: fewer than 8192 tokens per optimizer step; the LoRA target is stated at >= 8k")
    runs = {m: [] for m in args.method_list}
    for rnd in range(args.rounds):
        order = args.method_list if rnd % 2 == 0 else args.method_list[::-1]
        for m in order:
            raw = run_one(__file__, m, argv, args.threads, args.timeout)
            runs[m].append(raw)
            res = reduce_runs([raw])
            w, c = res["ms"]["wall"], res["ms"]["cpu"]
            extra = f", aggregation {w['agg']:.1f}" if w["agg"] is not None else ""
            print(f"[{m}{f' round {rnd + 1}' if args.rounds > 1 else ''}] step {w['step']:.0f} ms wall "
                  f"(fwd+bwd {w['fwd_bwd']:.0f}, optimizer {w['opt']:.0f}{extra}), {c['step']:.0f} ms CPU, "
                  f"set-up {res['setup_s']:.1f} s, peak mem +{res['mem_delta_mb']:.0f} MB, steps "
                  f"{[round(1e3 * x[0]) for x in res['series']['step']]} ms wall, subprocess {res['wall_s']:.0f} s",
                  flush=True)
            if res.get("profile"):
                print(f"[{m}] profile of one step:\n{res['profile']}")
    results = {m: reduce_runs(r) for m, r in runs.items()}
    rows = summarise(results, args)
    projection = dp_projection(results, args)
    md = render_markdown(rows, info, args, command, projection)
    print()
    print(md)
    write_files(args, md, {"command": command, "machine": info, "args": cargs.json_args(args),
                           "tokens_per_step": tokens, "results": rows, "dp_projection": projection})


if __name__ == "__main__":
    main()
