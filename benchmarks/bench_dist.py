"""bench_dist: HD-PiSSA under REAL data parallelism (one process per rank, torch.distributed: gloo on
CPU, NCCL on CUDA) in every master-weight mode and aggregation path, against LoRA, full
fine-tuning, the frozen-base floor and the published formulation, in one run. Per method: step
time, peak memory per rank, bytes each rank hands to collectives per optimizer step (counted by
the optimizers, next to the value of a formula computed from the layer shapes), and init
(decomposition) time.

The model is bench_step.py's LLaMA-shaped stack of megatron-core parallel linears
(benchmarks/common/model.py). Every method runs in its own fresh set of processes. Run from the
repository root:

    .venv/bin/python benchmarks/bench_dist.py                         # CPU defaults: 2 ranks, fp32 and bf16
    .venv/bin/python benchmarks/bench_dist.py --device cuda --dtype bf16 --llama7b --nproc 1
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.common import args as cargs  # noqa: E402
from benchmarks.common.args import tokens_per_step as tokens_per_rank  # noqa: E402  (per rank here)
from benchmarks.common.markdown import write_files  # noqa: E402
from benchmarks.common.runner import run_ranks, start  # noqa: E402
from benchmarks.dist_report import combine, progress_line, render_markdown, summarise  # noqa: E402
from benchmarks.dist_worker import run_worker  # noqa: E402

HD_MODES = ("fp32-base", "sharded-fp32", "compensated-bf16", "none")
HD_PATHS = ("factors", "dense", "auto")
OTHER_METHODS = ("lora", "pissa", "full", "floor", "published")
DEFAULT_METHODS = ("hd-pissa:fp32-base:factors", "hd-pissa:fp32-base:dense",
                   "hd-pissa:sharded-fp32:factors", "hd-pissa:sharded-fp32:dense",
                   "hd-pissa:compensated-bf16:factors", "hd-pissa:none",
                   "lora", "full", "floor", "published")


def parse_method(spec: str) -> dict:
    """`hd-pissa:<master mode>[:<aggregation>]` or one of OTHER_METHODS."""
    parts = spec.split(":")
    if parts[0] == "hd-pissa":
        if len(parts) not in (2, 3) or parts[1] not in HD_MODES or (len(parts) == 3 and parts[2] not in HD_PATHS):
            raise ValueError(f"bad method {spec!r}: use hd-pissa:<{'|'.join(HD_MODES)}>[:<{'|'.join(HD_PATHS)}>]")
        return {"name": spec, "kind": "hd-pissa", "mode": parts[1], "path": parts[2] if len(parts) == 3 else "auto"}
    if spec not in OTHER_METHODS or len(parts) != 1:
        raise ValueError(f"bad method {spec!r}: choose hd-pissa:<mode>[:<path>] or one of {OTHER_METHODS}")
    return {"name": spec, "kind": spec, "mode": None, "path": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cargs.add_shape_args(p, "model shape (bench_step.py's block)", hidden=512, ffn=1408, heads=8, groups=4,
                      mixer_help="between linear_qkv and linear_proj: cheap gate or causal GQA attention")
    cargs.add_batch_args(p, "tokens per optimizer step and rank = micro-batch x seq x grad-accum", seq=512)
    meth = p.add_argument_group("methods")
    meth.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                      help="comma list: hd-pissa:<mode>[:<path>] with mode in "
                           f"{HD_MODES} and path in {HD_PATHS} (auto: the package's per-layer "
                           f"choice), or {OTHER_METHODS}")
    cargs.add_adapter_args(meth, rank_help="adapter rank r (per slice, LoRA, published)", virtual_ranks=1,
                        virtual_ranks_help="HD-PiSSA slices per process (K = dp x this); micro-batch i feeds "
                                           "local slice i %% L",
                        svd_help="decomposition at set-up (timed as init) of HD-PiSSA, PiSSA and published "
                                 "(exact: published runs the full SVD of every projection, as its code; "
                                 "randomized: the top K*r components, for quick runs at large shapes)")
    meth.add_argument("--no-svd-retime", action="store_true",
                      help="skip re-timing the decomposition warm after the timed steps of the first "
                           "HD-PiSSA method (exact and randomized; with --svd randomized only randomized)")
    cargs.add_loss_arg(meth)
    run = p.add_argument_group("run")
    run.add_argument("--nproc", type=int, default=2, help="processes (world size); DP = nproc / tp")
    run.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    cargs.add_run_args(run, device_help="cpu or cuda (one GPU per process)", dtypes=("fp32", "bf16", "both"),
                    dtype_default="both",
                    dtype_help="base weights and activations; 'both' runs the method list at fp32, then at "
                               "bf16. Modes that do not fit a dtype are skipped with the reason printed",
                    threads_help="torch intra-op threads per process", iters=3, rounds=1,
                    rounds_help="run the whole method list this many times (alternating order, fresh "
                                "processes) and pool the timed steps: steadier on a busy machine",
                    basis_help="clock for the ratios (default: wall on CUDA; process CPU time on CPU, where "
                               "other jobs on a shared machine inflate wall time far more. CPU time counts "
                               "the communication work of gloo's threads, not idle waiting)")
    run.add_argument("--timeout", type=float, default=1800, help="seconds per method (all its processes)")
    cargs.add_output_args(run, ("--worker-dtype", {"default": None}),
                       ("--worker-retime", {"action": "store_true"}))
    args = p.parse_args(argv)
    cargs.shape_defaults(args)
    try:
        args.method_specs = [parse_method(m) for m in args.methods.split(",") if m]
    except ValueError as e:
        p.error(f"--methods: {e}")
    if args.nproc < 1 or args.tp < 1 or args.nproc % args.tp:
        p.error(f"--tp {args.tp} must divide --nproc {args.nproc}")
    cargs.check_heads_and_basis(p, args)
    if args.groups % args.tp or args.ffn % args.tp:
        p.error("--tp must divide --groups and --ffn")
    args.dp = args.nproc // args.tp
    args.dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    return args


def skip_reason(spec: dict, dtype: str, args) -> str | None:
    """Why a method does not run at this dtype / layout (None: it runs)."""
    mode = spec["mode"]
    if mode == "fp32-base" and dtype != "fp32":
        return "fp32-base needs fp32 base weights (HDPiSSAOptimizer refuses it with bf16)"
    if mode == "compensated-bf16" and dtype != "bf16":
        return "compensated-bf16 is a bf16-weight mode (with fp32 weights it would Kahan-sum fp32)"
    if mode == "none" and dtype != "bf16":
        return "'none' exists to show bf16 losing updates; with fp32 weights it is the fp32-base update"
    if spec["kind"] == "published" and args.tp > 1:
        return "the published formulation is reimplemented for TP=1 only (it has no tensor parallelism)"
    smallest = min(args.hidden, args.groups * args.head_dim, args.heads * args.head_dim, args.ffn)
    if spec["kind"] == "hd-pissa" and args.dp * args.virtual_ranks * args.rank > smallest:
        return f"K*r = {args.dp * args.virtual_ranks * args.rank} exceeds the smallest logical matrix side {smallest}"
    if spec["kind"] == "published" and args.dp * args.rank > smallest:
        return f"K*r = {args.dp * args.rank} exceeds the smallest logical matrix side {smallest}"
    return None


def assemble(args, raw, walls, skipped, errors) -> list[dict]:
    """Results in method-list order (dtype by dtype), with ratios; methods not run yet are left out."""
    results = []
    for dtype in args.dtypes:
        for spec in args.method_specs:
            key = (dtype, spec["name"])
            if key in skipped:
                results.append({"method": spec["name"], "dtype": dtype, "skipped": skipped[key]})
            elif key in errors:
                results.append(errors[key])
            elif raw.get(key):
                results.append(combine(raw[key], walls[key], args))
    summarise(results, args)
    return results


def write_outputs(results, info, args, command, partial=False) -> str:
    md = render_markdown(results, info, args, command)
    if partial:
        md = "**Partial results: the run has not finished.**\n\n" + md
    write_files(args, md, {"command": command, "machine": info, "partial": partial, "args": cargs.json_args(args),
                           "tokens_per_rank": tokens_per_rank(args), "results": results}, default=str)
    return md


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    warnings.filterwarnings("ignore")  # megatron-core's "Transformer Engine and Apex are not installed"
    started = start(argv, __file__, parse_args, lambda a: run_worker(a, parse_method(a.worker)))
    if started is None:
        return 0
    argv, args, command, info = started
    signal.signal(signal.SIGTERM, _terminate)  # e.g. `timeout`: stop this method's ranks, keep partial output
    print(f"processes {args.nproc} = DP {args.dp} x TP {args.tp}; tokens per optimizer step "
          f"{tokens_per_rank(args)} per rank, {tokens_per_rank(args) * args.dp} in all", flush=True)
    jobs, skipped = [], {}
    for dtype in args.dtypes:
        for spec in args.method_specs:
            reason = skip_reason(spec, dtype, args)
            if reason:
                print(f"[{dtype} {spec['name']}] skipped: {reason}", flush=True)
                skipped[(dtype, spec["name"])] = reason
            else:
                jobs.append((dtype, spec))
    raw = {(dtype, spec["name"]): [] for dtype, spec in jobs}
    errors, walls = {}, {key: 0.0 for key in raw}
    retime_done = args.no_svd_retime
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        for dtype, spec in (jobs if rnd % 2 == 0 else jobs[::-1]):
            key = (dtype, spec["name"])
            if key in errors:
                continue
            retime = spec["kind"] == "hd-pissa" and not retime_done
            worker = ["--worker", spec["name"], "--worker-dtype", dtype] + (["--worker-retime"] if retime else [])
            out = run_ranks(__file__, worker, argv, args.nproc, args.threads, args.timeout)
            tag = f"[{dtype} {spec['name']}{f' round {rnd + 1}' if args.rounds > 1 else ''}]"
            if "error" in out:
                errors[key] = {"method": spec["name"], "dtype": dtype, **out}
                print(f"{tag} FAILED ({out['error']}):\n{out['log']}", flush=True)
                continue
            retime_done = retime_done or retime
            raw[key].append(out["ranks"])
            walls[key] += out["wall_s"]
            print(f"{tag} " + progress_line(combine([out["ranks"]], out["wall_s"], args)), flush=True)
            # partial outputs after every method: a run stopped from outside keeps what it measured
            write_outputs(assemble(args, raw, walls, skipped, errors), info, args, command, partial=True)
    results = assemble(args, raw, walls, skipped, errors)
    for r in results:
        if "bytes_match" in r and not r["bytes_match"]:
            print(f"!!! BYTES MISMATCH for {r['dtype']} {r['method']}: counted {r['bytes_counted']} vs formula "
                  f"{r['formula']} (the same on every rank, round and step: {r['bytes_uniform']})", flush=True)
    md = write_outputs(results, info, args, command)
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)\n")
    print(md)
    failed = [r for r in results if "error" in r]
    mismatched = [r for r in results if "bytes_match" in r and not r["bytes_match"]]
    return 1 if failed or mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
