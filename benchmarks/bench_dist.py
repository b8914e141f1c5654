"""bench_dist: HD-PiSSA under REAL data parallelism (one process per rank, torch.distributed: gloo on
CPU, NCCL on CUDA) in every master-weight mode and aggregation path, against LoRA, full
fine-tuning, the frozen-base floor and the published formulation, in one run. Per method: step
time, peak memory per rank, bytes each rank hands to collectives per optimizer step (counted by
the optimizers, next to the value of a formula computed from the layer shapes), and init
(decomposition) time.

The model is bench_step.py's LLaMA-shaped stack of megatron-core parallel linears (imported from
it). Every method runs in its own fresh set of processes. Run from the repository root:

    .venv/bin/python benchmarks/bench_dist.py                         # CPU defaults: 2 ranks, fp32 and bf16
    .venv/bin/python benchmarks/bench_dist.py --device cuda --dtype bf16 --llama7b --nproc 1
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
for _p in (ROOT, BENCH):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_step as bs  # noqa: E402  (the model, data, loss, published adapter, clocks)

HD_MODES = ("fp32-base", "sharded-fp32", "compensated-bf16", "none")
HD_PATHS = ("factors", "dense", "auto")
OTHER_METHODS = ("lora", "pissa", "full", "floor", "published")
DEFAULT_METHODS = ("hd-pissa:fp32-base:factors", "hd-pissa:fp32-base:dense",
                   "hd-pissa:sharded-fp32:factors", "hd-pissa:sharded-fp32:dense",
                   "hd-pissa:compensated-bf16:factors", "hd-pissa:none",
                   "lora", "full", "floor", "published")
REFS = ("lora", "full", "floor", "published")
# HDPiSSAOptimizer methods whose time is the aggregation (communication included; with sharded
# masters also the parameter all-gather, whose wait happens in the next forward)
AGG_METHODS = ("_aggregate_factors", "_aggregate_dense", "_launch_param_gather", "finish_param_gather")


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
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
    bs.add_shape_args(p, "model shape (bench_step.py's block)", hidden=512, ffn=1408, heads=8, groups=4,
                      mixer_help="between linear_qkv and linear_proj: cheap gate or causal GQA attention")
    bs.add_batch_args(p, "tokens per optimizer step and rank = micro-batch x seq x grad-accum", seq=512)
    meth = p.add_argument_group("methods")
    meth.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                      help="comma list: hd-pissa:<mode>[:<path>] with mode in "
                           f"{HD_MODES} and path in {HD_PATHS} (auto: the package's per-layer "
                           f"choice), or {OTHER_METHODS}")
    bs.add_adapter_args(meth, rank_help="adapter rank r (per slice, LoRA, published)", virtual_ranks=1,
                        virtual_ranks_help="HD-PiSSA slices per process (K = dp x this); micro-batch i feeds "
                                           "local slice i %% L",
                        svd_help="decomposition at set-up (timed as init) of HD-PiSSA, PiSSA and published "
                                 "(exact: published runs the full SVD of every projection, as its code; "
                                 "randomized: the top K*r components, for quick runs at large shapes)")
    meth.add_argument("--no-svd-retime", action="store_true",
                      help="skip re-timing the decomposition warm after the timed steps of the first "
                           "HD-PiSSA method (exact and randomized; with --svd randomized only randomized)")
    bs.add_loss_arg(meth)
    run = p.add_argument_group("run")
    run.add_argument("--nproc", type=int, default=2, help="processes (world size); DP = nproc / tp")
    run.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    bs.add_run_args(run, device_help="cpu or cuda (one GPU per process)", dtypes=("fp32", "bf16", "both"),
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
    bs.add_output_args(run, ("--worker-dtype", {"default": None}),
                       ("--worker-retime", {"action": "store_true"}))
    args = p.parse_args(argv)
    bs.shape_defaults(args)
    try:
        args.method_specs = [parse_method(m) for m in args.methods.split(",") if m]
    except ValueError as e:
        p.error(f"--methods: {e}")
    if args.nproc < 1 or args.tp < 1 or args.nproc % args.tp:
        p.error(f"--tp {args.tp} must divide --nproc {args.nproc}")
    bs.check_heads_and_basis(p, args)
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


tokens_per_rank = bs.tokens_per_step  # micro-batch x seq x grad-accum, per rank


# ---------------------------------------------------------------------------------------------
# model with tensor parallelism: bench_step's block, attention mixer on the local heads
# ---------------------------------------------------------------------------------------------
def localise_mixer(model, args, tp: int) -> None:
    """bench_step.build_model's attention reshapes the fused QKV output with the global head
    counts; at TP > 1 each rank holds groups / tp query groups, so rebind the mixer to those
    (the parallel linears themselves are built with the global sizes and shard by TP)."""
    hd, groups = args.head_dim, args.groups // tp
    qpg = args.heads // args.groups

    def forward(self, x):
        return bs.attention_forward(self, x, args.mixer, groups, qpg, hd)

    for layer in model.decoder.layers:
        att = layer.self_attention
        att.forward = types.MethodType(forward, att)


# ---------------------------------------------------------------------------------------------
# the published formulation with K real ranks (MuLabPKU/HD-PiSSA hd_pissa.py)
# ---------------------------------------------------------------------------------------------
class DistPublishedAdapter(bs.PublishedAdapter):
    """bench_step's PublishedAdapter (dense `B A` scaled by 1e-16 in a second fp32 linear on every
    forward) with data-parallel rank k's slice: like the published code, every rank runs the full
    SVD of each projection itself and keeps components k*r .. (k+1)*r - 1. With `svd="randomized"`
    (`--svd randomized`, for quick runs at large shapes) the top K*r components come from the
    package's randomized decomposition instead of the full SVD."""

    def __init__(self, target, rank, scale, dp_rank, dp_size, svd="exact", seed=0):  # noqa: D401
        self.dp_rank, self.dp_size, self.svd, self.seed = dp_rank, dp_size, svd, seed
        super().__init__(target, rank, scale)

    def components(self, full, i):
        from megatron_hdpissa.peft.decomposition import top_singular

        if self.svd == "exact":  # the published code: torch.svd(W), all components
            u, s, v = top_singular(full, min(full.shape), "exact")
        else:
            u, s, v = top_singular(full, self.dp_size * self.rank, "randomized", seed=self.seed + i)
        lo, hi = self.dp_rank * self.rank, (self.dp_rank + 1) * self.rank
        return u[:, lo:hi], s[lo:hi], v[:, lo:hi]


class DistPublishedOptimizer(bs.PublishedOptimizer):
    """The published optimizer step, per projection: gradients x 1e16, hand-written Adam, then
    four blocking all-gathers (dA, dB, and the factors A, B themselves) of every rank's r x n and
    m x r tensors, and `W -= sum_i (dB_i A_i + B_i dA_i - dB_i dA_i)` as a dense fp32 m x n sum
    added to W in W's dtype. The factors stay fixed (the published code never changes A, B)."""

    def __init__(self, adapters, lr, group, dp_size, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(adapters, lr, betas, eps)
        self.group, self.dp = group, dp_size
        self.bytes = {"factors+deltas": 0, "loss": 0}

    def _gather(self, t):
        import torch
        import torch.distributed as dist

        if self.dp == 1:
            return [t]
        out = [torch.zeros_like(t) for _ in range(self.dp)]
        dist.all_gather(out, t, group=self.group)
        self.bytes["factors+deltas"] += t.numel() * t.element_size()
        return out

    def step(self):
        import torch

        self.bytes["factors+deltas"] = 0
        with torch.no_grad():
            for w, part, a, b, d_a, d_b in self.updates():
                d_a_all, d_b_all = self._gather(d_a), self._gather(d_b)
                a_all, b_all = self._gather(a.data), self._gather(b.data)
                delta = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float32, device=a.device)
                for k in range(len(a_all)):
                    delta -= d_b_all[k] @ a_all[k] + b_all[k] @ d_a_all[k] - d_b_all[k] @ d_a_all[k]
                bs.add_delta(w, part, delta)


# ---------------------------------------------------------------------------------------------
# byte formulas (from the layer shapes, independent of what the optimizers count)
# ---------------------------------------------------------------------------------------------
def hd_formula(model, spec, dp: int) -> tuple[dict, dict]:
    """Bytes this rank hands to each collective per optimizer step, by formula, and the paths.

    deltas (all-gather input): per factor-path part, this rank's L slices of dA (r x n_loc) and
    dB (m_loc x r): L r (m_loc + n_loc) elements of the factor dtype (fp32). The all-gather's
    output is dp times that: K r (m_loc + n_loc), DESIGN.md section 3's per-layer figure.
    dense (all-reduce buffer): per dense-path part, this rank's m_loc x n_loc update (fp32); with
    sharded-fp32 (reduce-scatter input): per weight with a dense-path part, its update in weight
    rows padded to dp x ceil(m_w / dp) rows, x n_w (fp32).
    params (all-gather input, sharded-fp32): per targeted weight, this rank's padded row block
    ceil(m_w / dp) x n_w in the weight's dtype."""
    from megatron_hdpissa.peft.hd_pissa.model import iter_adapters

    out = {"deltas": 0, "dense": 0, "params": 0}
    paths = {"factors": 0, "dense": 0}
    sharded = spec["mode"] == "sharded-fp32" and dp > 1
    for _, module, ad in iter_adapters(model):
        dense_weight = False
        for part in ad.parts:
            slices, m, r = ad.b[part.name].shape
            n = ad.a[part.name].shape[-1]
            k = ad.num_slices
            path = spec["path"]
            if path == "auto":  # the rule stated in HDPiSSAConfig / DESIGN.md: the smaller payload
                path = "dense" if m * n < k * r * (m + n) else "factors"
            paths[path] += 1
            esize = ad.a[part.name].element_size()
            if path == "factors":
                out["deltas"] += slices * r * (m + n) * esize
            elif sharded:
                dense_weight = True
            else:
                out["dense"] += m * n * esize
        m_w, n_w = module.weight.shape
        if dense_weight:  # one reduce-scatter buffer per weight (4 bytes: fp32 updates)
            out["dense"] += dp * -(-m_w // dp) * n_w * 4
        if spec["mode"] == "sharded-fp32":
            out["params"] += -(-m_w // dp) * n_w * module.weight.element_size()
    if dp == 1:
        out = {key: 0 for key in out}
    return out, paths


# ---------------------------------------------------------------------------------------------
# one method on one rank (a process started by the driver)
# ---------------------------------------------------------------------------------------------
def run_worker(args) -> dict:
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    from megatron_hdpissa.models import compat
    from megatron_hdpissa.distributed import groups as distributed

    spec = parse_method(args.worker)
    dtype_name = args.worker_dtype
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    cuda = args.device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not cuda:
        compat.ensure_cpu_compat()
    groups = distributed.initialize(tensor_model_parallel_size=args.tp, backend="nccl" if cuda else "gloo")
    dp, dp_rank = groups.dp_size, groups.dp_rank

    sync = bs.device_sync(cuda)

    def barrier():
        sync()
        if dist.get_world_size() > 1:
            dist.barrier()

    model = bs.build_model(args, device, dtype)  # same weights on every rank (fixed seed, CPU init)
    if groups.tp_size > 1:
        localise_mixer(model, args, groups.tp_size)
    data_args = argparse.Namespace(**vars(args))
    data_args.seed = args.seed + 7919 * dp_rank  # each DP rank its own micro-batches; TP peers share them
    data = bs.make_data(data_args, device, dtype)
    sync()
    mem_base = bs.memory_baseline(cuda)

    kind = spec["kind"]
    opt = published = None
    agg_acc = [0.0, 0.0]
    slices = 1
    formula, paths, collectives = {}, {}, {}
    barrier()
    t_init = bs._now()
    if kind == "hd-pissa":
        from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa

        slices = args.virtual_ranks
        cfg = HDPiSSAConfig(rank=args.rank, alpha=args.alpha, virtual_ranks=slices, svd_method=args.svd,
                            seed=args.seed, master_weights=spec["mode"], aggregation=spec["path"])
        apply_hd_pissa(model, cfg, progress=False)
        sync()
        t_apply = bs._since(t_init)
        opt = HDPiSSAOptimizer(model, lr=args.lr, master_weights=spec["mode"], aggregation=spec["path"])
        for name in AGG_METHODS:
            setattr(opt, name, bs._timed(getattr(opt, name), agg_acc, sync))
        formula, paths = hd_formula(model, spec, dp)
        collectives = {"deltas": "all_gather", "params": "all_gather",
                       "dense": "reduce_scatter" if spec["mode"] == "sharded-fp32" and dp > 1 else "all_reduce"}
    elif kind in ("lora", "pissa"):
        from megatron_hdpissa import HDPiSSAConfig
        from megatron_hdpissa.peft.lowrank.model import DataParallelAdamW, apply_lowrank

        cfg = HDPiSSAConfig(rank=args.rank, alpha=args.alpha, seed=args.seed, svd_method=args.svd)
        apply_lowrank(model, cfg, kind, progress=False)
        sync()
        t_apply = bs._since(t_init)
        opt = DataParallelAdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    elif kind == "full":
        from megatron_hdpissa.peft.lowrank.model import DataParallelAdamW

        bs.set_trainable(model, True)
        t_apply = bs._since(t_init)
        opt = DataParallelAdamW(list(model.parameters()), lr=args.lr)
    elif kind == "floor":
        bs.make_floor(model)  # as bench_step: backward = the input-gradient GEMMs only
        t_apply = bs._since(t_init)
    elif kind == "published":
        adapters = [DistPublishedAdapter(t, args.rank, args.alpha / args.rank, dp_rank, dp, args.svd, args.seed)
                    for t in bs.published_targets(model)]
        sync()
        t_apply = bs._since(t_init)
        published = DistPublishedOptimizer(adapters, args.lr, groups.dp_group, dp)
        fd = sum(2 * (a.numel() + b.numel()) * a.element_size() for ad in adapters for a, b in zip(ad.a, ad.b))
        formula = {"factors+deltas": fd if dp > 1 else 0,
                   "loss": 4 * args.grad_accum if dp > 1 else 0}
        collectives = {"factors+deltas": "all_gather", "loss": "all_reduce"}
    else:
        raise ValueError(kind)
    sync()
    init = bs._since(t_init)
    if kind in ("lora", "pissa", "full"):
        n_grad = sum(p.numel() for g in opt.param_groups for p in g["params"])
        formula = {"grads": 4 * n_grad if dp > 1 else 0}  # DataParallelAdamW all-reduces fp32 grads
        collectives = {"grads": "all_reduce"}
    mem_setup = bs.mem_mb(cuda)
    trainable = bs.count_trainable(model, published)

    loss_bytes = [0]

    def one_step():
        barrier()  # ranks start each step together; not timed
        t0 = bs._now()
        for i, (x, target) in enumerate(data):
            loss = bs.forward_backward(model, x, target, i, slices, args.loss, len(data))
            if published is not None and dp > 1:  # the published loop all-reduces every micro-batch's loss
                avg = loss.detach().clone()
                dist.all_reduce(avg, group=groups.dp_group)
                loss_bytes[0] += avg.numel() * avg.element_size()
        sync()
        t1 = bs._now()
        barrier()  # timed apart: waiting for the slowest rank, so the optimizer time is its own
        t1b = bs._now()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        elif published is not None:
            published.step()
        sync()
        t2 = bs._now()
        agg = tuple(agg_acc)
        agg_acc[:] = [0.0, 0.0]
        if kind == "hd-pissa":
            counted = dict(opt.last_step_bytes)
        elif published is not None:
            counted = dict(published.bytes, loss=loss_bytes[0])
        elif opt is not None:
            counted = {"grads": opt.last_step_bytes}
        else:
            counted = {}
        loss_bytes[0] = 0
        return {"step": bs._since(t0, t2), "fwd_bwd": bs._since(t0, t1), "wait": bs._since(t1, t1b),
                "opt": bs._since(t1b, t2),
                "agg": agg, "bytes": counted, "loss": float(loss.detach()) * len(data)}

    steps = [one_step() for _ in range(args.warmup + args.iters)]
    timed = steps[args.warmup:]
    mem_peak = bs.mem_mb(cuda)

    consistency = None
    retime = {}
    if kind == "hd-pissa":
        opt.finish_param_gather()
        try:
            opt.check_consistency()
            consistency = "identical" if dp > 1 else "single DP rank"
        except RuntimeError as e:
            consistency = f"DIVERGED: {e}"
        if args.worker_retime:  # warm decomposition of the same matrices, both methods
            from megatron_hdpissa.peft.hd_pissa.model import decompose_hd_pissa

            # with --svd randomized the exact SVD (slow at large shapes) is left to bench_decompose.py
            for method in (("exact", "randomized") if args.svd == "exact" else ("randomized",)):
                model.hd_pissa_config.svd_method = method
                barrier()
                t0 = bs._now()
                decompose_hd_pissa(model, progress=False)
                sync()
                retime[method] = bs._since(t0)
                barrier()
    res = {
        "method": spec["name"], "dtype": dtype_name, "rank": dist.get_rank(), "dp_rank": dp_rank,
        "dp": dp, "tp": groups.tp_size, "slices": slices, "trainable_params": trainable,
        "init": init, "init_apply": t_apply, "retime": retime,
        "series": {key: [st[key] for st in timed] for key in ("step", "fwd_bwd", "wait", "opt", "agg")},
        "bytes_steps": [st["bytes"] for st in steps],
        "formula": formula, "collectives": collectives, "paths": paths,
        "final_loss": timed[-1]["loss"],
        "mem_base_mb": mem_base, "mem_setup_peak_mb": mem_setup, "mem_peak_mb": mem_peak,
        "mem_delta_mb": mem_peak - mem_base, "consistency": consistency,
        "has_agg": kind == "hd-pissa",
    }
    distributed.shutdown()
    return res


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def run_method(name: str, dtype: str, argv: list, args, retime: bool) -> dict:
    """Start `nproc` fresh processes for one method; return {"ranks": [per-rank results],
    "wall_s": ...} or the failure."""
    from megatron_hdpissa.distributed.groups import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs, logs = [], []
        t0 = time.perf_counter()
        for rank in range(args.nproc):
            env = bs.worker_env(args.threads)
            env.update(RANK=str(rank), WORLD_SIZE=str(args.nproc), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name, "--worker-dtype", dtype,
                   "--worker-out", os.path.join(tmp, f"rank{rank}.json")] + (["--worker-retime"] if retime else [])
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        error = None
        deadline = t0 + args.timeout
        try:
            while any(p.poll() is None for p in procs):
                if any(p.returncode not in (None, 0) for p in procs):
                    error = "a rank failed"
                    break
                if time.perf_counter() > deadline:
                    error = f"timed out after {args.timeout:.0f} s"
                    break
                time.sleep(0.2)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): take the ranks started here down too
            for p in procs:
                if p.poll() is None:
                    p.kill()
            raise
        if error is None and any(p.returncode != 0 for p in procs):
            error = "a rank failed"
        if error:
            for p in procs:  # only the processes started here, by their own handles
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            tails = []
            for rank, (p, log) in enumerate(zip(procs, logs)):
                log.seek(0)
                tails.append(f"--- rank {rank} (rc {p.returncode}) ---\n{log.read()[-3000:]}")
            for log in logs:
                log.close()
            return {"method": name, "dtype": dtype, "error": error, "log": "\n".join(tails),
                    "wall_s": time.perf_counter() - t0}
        for log in logs:
            log.close()
        ranks = []
        for rank in range(args.nproc):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
    return {"ranks": ranks, "wall_s": time.perf_counter() - t0}


def combine(rounds: list[list[dict]], wall_s: float, args) -> dict:
    """One method's result over its ranks and rounds (fresh process sets): per timed step the
    slowest rank (the step is done when every rank is done), median over the steps of all
    rounds; memory the maximum over ranks and rounds; init the per-rank maximum, median over
    rounds."""
    ranks = rounds[0]
    r0 = ranks[0]
    res = {key: r0[key] for key in ("method", "dtype", "dp", "tp", "slices", "trainable_params", "formula",
                                     "collectives", "paths", "has_agg")}
    res["wall_s"] = wall_s
    res["rounds"] = len(rounds)
    res["ms"], res["min_ms"] = {}, {}

    def per_step(key, ci):  # the slowest rank of every timed step, all rounds
        return [max(r["series"][key][i][ci] for r in rr) for rr in rounds for i in range(len(rr[0]["series"][key]))]

    for ci, clock in enumerate(("wall", "cpu")):
        ms = {}
        for key in ("step", "fwd_bwd", "wait", "opt", "agg"):
            values = per_step(key, ci)
            ms[key] = 1e3 * statistics.median(values) if values else None
        if not r0["has_agg"]:
            ms["agg"] = None
        res["ms"][clock] = ms
        res["min_ms"][clock] = 1e3 * min(per_step("step", ci))
    res["steps_wall_ms"] = [round(1e3 * x) for x in per_step("step", 0)]
    res["steps_cpu_ms"] = [round(1e3 * x) for x in per_step("step", 1)]
    everyone = [r for rr in rounds for r in rr]
    res["mem_delta_mb"] = max(r["mem_delta_mb"] for r in everyone)
    res["mem_delta_mb_per_rank"] = [round(max(rr[i]["mem_delta_mb"] for rr in rounds), 1) for i in range(len(ranks))]
    res["mem_peak_mb"] = max(r["mem_peak_mb"] for r in everyone)
    for key, src, ci in (("init_ms", "init", 0), ("init_cpu_ms", "init", 1), ("init_apply_ms", "init_apply", 0)):
        res[key] = 1e3 * statistics.median(max(r[src][ci] for r in rr) for rr in rounds)
    with_retime = [rr for rr in rounds if rr[0]["retime"]]
    rt = with_retime[0] if with_retime else ranks
    res["retime_ms"] = {m: 1e3 * max(r["retime"][m][0] for r in rt) for m in rt[0]["retime"]}
    res["retime_cpu_ms"] = {m: 1e3 * max(r["retime"][m][1] for r in rt) for m in rt[0]["retime"]}
    res["final_loss_mean"] = statistics.mean(r["final_loss"] for r in ranks)
    states = {r.get("consistency") for r in everyone}
    res["consistency"] = "; ".join(sorted(str(x) for x in states)) if states != {None} else None
    # bytes: every rank, every round and every step (warm-up included) must count the same
    seen = {json.dumps(b, sort_keys=True) for r in everyone for b in r["bytes_steps"]}
    counted = r0["bytes_steps"][-1]
    res["bytes_counted"] = counted
    res["bytes_uniform"] = len(seen) <= 1
    keys = sorted(set(counted) | set(res["formula"]))
    res["bytes_match"] = all(counted.get(k, 0) == res["formula"].get(k, 0) for k in keys) and res["bytes_uniform"]
    res["bytes_total"] = sum(counted.values())
    res["formula_total"] = sum(res["formula"].values())
    dp = res["dp"]
    wire = 0.0
    for key, n in counted.items():  # a ring algorithm's bytes sent per rank
        op = res["collectives"].get(key)
        wire += {"all_gather": (dp - 1) * n, "reduce_scatter": (dp - 1) / dp * n}.get(op, 2 * (dp - 1) / dp * n)
    res["wire_bytes_est"] = wire
    res["payload_bytes"] = sum(dp * n if res["collectives"].get(k) == "all_gather" else n for k, n in counted.items())
    return res


def summarise(results: list[dict], args) -> None:
    """Ratios against lora / full / floor / published of the same dtype, on args.basis."""
    by = {(r["dtype"], r["method"]): r for r in results if "error" not in r and "skipped" not in r}
    tokens = tokens_per_rank(args) * args.dp
    for r in results:
        if "error" in r or "skipped" in r:
            continue
        t = r["ms"][args.basis]["step"]
        for ref in REFS:
            other = by.get((r["dtype"], ref))
            r[f"vs_{ref}"] = t / other["ms"][args.basis]["step"] if other else None
        pub = by.get((r["dtype"], "published"))
        r["published_speedup"] = pub["ms"][args.basis]["step"] / t if pub else None
        r["tokens_per_s"] = tokens / (t / 1e3)


fmt = bs.fmt


def mb(n):
    return f"{n / 2**20:.3f}" if n else "0"


def render_markdown(results, info, args, command) -> str:
    cuda = args.device.startswith("cuda")
    k = args.dp * args.virtual_ranks
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {bs.describe_machine(info, ' per process')}, backend {'nccl' if cuda else 'gloo'}.",
        "",
        f"Parallelism: {args.nproc} processes = DP {args.dp} x TP {args.tp}; HD-PiSSA K = {k} slices "
        f"({args.dp} DP ranks x {args.virtual_ranks} per process), r = {args.rank}, alpha = {args.alpha:g}, "
        f"init SVD {args.svd}.",
        f"Model: {bs.describe_model(args)}, {args.loss} loss.",
        f"Tokens per optimizer step: {args.micro_batch} x {args.seq} x {args.grad_accum} = {tokens_per_rank(args)} "
        f"per rank, {tokens_per_rank(args) * args.dp} in all; {args.warmup} warm-up + {args.iters} timed steps; "
        "each method in its own fresh set of processes"
        + (f"; {args.rounds} rounds (method order alternating), timed steps pooled." if args.rounds > 1 else "."),
        "",
        f"Times: per timed step the slowest rank, median over steps. Ratios, fwd+bwd, optimizer, aggregation "
        f"and tokens/s on **{'process CPU time' if args.basis == 'cpu' else 'wall-clock time'}**"
        + ("" if cuda else " (other jobs on a shared machine inflate wall time far more; CPU time counts the "
           "work of gloo's threads but not idle waiting)") + ". "
        "wait (wall) = a barrier between backward and optimizer: the time a rank waits for the slowest one, "
        "kept out of the optimizer time; the step includes it. aggregation = time inside the HD-PiSSA "
        "optimizer's aggregation methods (communication included; with sharded masters also the parameter "
        "all-gather, whose wait falls into the next forward, so that part is also inside fwd+bwd).",
        "",
    ]
    for dtype in args.dtypes:
        rows = [r for r in results if r["dtype"] == dtype]
        lines += [f"### {dtype}", "",
                  "| method | step wall ms (min) | step CPU ms | fwd+bwd ms | wait ms | optimizer ms | aggregation ms "
                  "| x LoRA | x full | x floor | published / this | tokens/s | peak mem MB (max rank) | init ms wall / CPU "
                  "| trainable / rank |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['method']} | skipped: {r['skipped']} ||||||||||||||")
                continue
            if "error" in r:
                lines.append(f"| {r['method']} | FAILED: {r['error']} ||||||||||||||")
                continue
            t = r["ms"][args.basis]
            lines.append(
                f"| {r['method']} | {fmt(r['ms']['wall']['step'])} ({fmt(r['min_ms']['wall'])}) | "
                f"{fmt(None if cuda else r['ms']['cpu']['step'])} | {fmt(t['fwd_bwd'])} | {fmt(r['ms']['wall']['wait'])} | "
                f"{fmt(t['opt'])} | "
                f"{fmt(t['agg'], '.1f')} | {fmt(r['vs_lora'], '.2f')} | {fmt(r['vs_full'], '.2f')} | "
                f"{fmt(r['vs_floor'], '.2f')} | {fmt(r['published_speedup'], '.2f')} | {fmt(r['tokens_per_s'])} | "
                f"{fmt(r['mem_delta_mb'])} | {fmt(r['init_ms'])} / {fmt(r['init_cpu_ms'])} | {r['trainable_params']:,} |")
        lines += ["", "Communication per rank per optimizer step (MiB; counted = what the optimizer handed to "
                  "the collective: the all-gather input / the all-reduce buffer):", "",
                  "| method | paths (parts) | collective: counted / formula | counted total | formula total | "
                  "match | all-gather output + all-reduce buffer | ring estimate sent | DP weights |",
                  "|---|---|---|---:|---:|---|---:|---:|---|"]
        for r in rows:
            if "skipped" in r or "error" in r:
                continue
            keys = [key for key in sorted(set(r["bytes_counted"]) | set(r["formula"]))]
            detail = "; ".join(f"{key} ({r['collectives'].get(key, '?')}) {mb(r['bytes_counted'].get(key, 0))} / "
                               f"{mb(r['formula'].get(key, 0))}" for key in keys
                               if r["bytes_counted"].get(key, 0) or r["formula"].get(key, 0)) or "none"
            paths = ", ".join(f"{p} {n}" for p, n in r["paths"].items() if n) or "-"
            match = "yes" if r["bytes_match"] else "**NO**"
            lines.append(f"| {r['method']} | {paths} | {detail} | {mb(r['bytes_total'])} | {mb(r['formula_total'])} | "
                         f"{match} | {mb(r['payload_bytes'])} | {mb(r['wire_bytes_est'])} | {r['consistency'] or '-'} |")
        lines.append("")
    lines += notes(results, args)
    return "\n".join(lines) + "\n"


def notes(results, args) -> list[str]:
    cuda = args.device.startswith("cuda")
    out = []
    for r in results:
        if r.get("retime_ms"):
            rt, rc = r["retime_ms"], r["retime_cpu_ms"]
            timed = ", ".join(f"{m} {rt[m]:.0f} / {rc[m]:.0f} ms" for m in rt)
            out.append(f"- Decomposition of all targeted matrices re-timed warm after {r['dtype']} {r['method']}'s "
                       f"steps (top K*r = {args.dp * args.virtual_ranks * args.rank} components, spread over the "
                       f"{args.nproc} ranks, max over ranks, wall / CPU): {timed} (randomized: sketch q = 2Kr; "
                       "the exact SVD replaces it where q > min(m, n) / 2).")
    out.append("- init (cold, first call in a fresh process): apply (TP gather, decomposition spread over the "
               "ranks, broadcast) + optimizer construction; published: " +
               ("a full SVD of every projection on every rank, as the published code." if args.svd == "exact"
                else "the top K*r components by the randomized decomposition on every rank (--svd randomized; "
                     "the published code runs a full SVD)."))
    bad = [r for r in results if "bytes_match" in r and not r["bytes_match"]]
    if bad:
        out.append("- **BYTES MISMATCH** (counted != formula, or not the same on every rank and step): "
                   + ", ".join(f"{r['dtype']} {r['method']}" for r in bad) + ".")
    elif any("bytes_match" in r for r in results):
        out.append("- Counted bytes equal the formula for every method, on every rank and every step.")
    out += [
        "- Formulas (per part of each targeted layer, local shapes m x n; K = all slices, L = slices per "
        "process): deltas L r (m + n) x 4 B (fp32 factor deltas; the all-gather output is K r (m + n), "
        "DESIGN.md section 3); dense m n x 4 B (fp32 update, all-reduced); params ceil(m_w / DP) n_w x the "
        "weight's bytes (sharded-fp32: the low-precision row blocks, all-gathered; per weight); grads "
        "(LoRA, PiSSA, full) trainable x 4 B (DataParallelAdamW's fp32 all-reduce); published 2 r (m + n) "
        "x 4 B (four all-gathers per projection: dA, dB and the factors A, B, as the published code) plus "
        "4 B per micro-batch (its loss all-reduce). With one DP rank nothing is sent: all zero.",
        "- ring estimate: bytes a rank sends in a ring algorithm, (DP - 1) x input for an all-gather, "
        "(DP - 1) / DP x buffer for a reduce-scatter (the dense path with sharded-fp32) and "
        "2 (DP - 1) / DP x buffer for an all-reduce.",
        ("- peak memory: `torch.cuda.max_memory_allocated()` delta after `reset_peak_memory_stats()` once "
         "the base model and data were on the device; the largest of the ranks." if cuda else
         "- peak memory: max RSS (`ru_maxrss`) of each rank's fresh process minus its RSS once the base model "
         "and data were built (decomposition, adapters, activations, gradients, optimizer state, communication "
         "buffers); the largest of the ranks. glibc keeps freed heap: take +-20 %."),
        "- floor: frozen base, forward + input-gradient backward (from layer 0's linear_qkv output), no "
        "optimizer, no communication. full: every weight trainable, DataParallelAdamW (fp32 gradient all-reduce, "
        "torch AdamW on the weights in their dtype). lora: the package's `apply_lowrank` + DataParallelAdamW.",
        "- published: the published formulation (MuLabPKU/HD-PiSSA hd_pissa.py) on the same megatron-core layers, "
        "one rank per slice: full SVD of each projection on every rank, a second full-size fp32 linear "
        "scaled by 1e-16 with the dense B A on every forward, gradients x1e16, manual Adam, per projection "
        "blocking all-gathers of dA, dB, A, B and `W -= sum_k (dB_k A_k + B_k dA_k - dB_k dA_k)` in fp32, "
        "added to W in W's dtype.",
        "- DP weights: `HDPiSSAOptimizer.check_consistency()` after the timed steps.",
    ]
    return out


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
    bs.write_files(args, md, {"command": command, "machine": info, "partial": partial, "args": bs.json_args(args),
                              "tokens_per_rank": tokens_per_rank(args), "results": results}, default=str)
    return md


def progress_line(res: dict) -> str:
    w, c = res["ms"]["wall"], res["ms"]["cpu"]
    agg = f", aggregation {w['agg']:.1f}" if w["agg"] is not None else ""
    flag = "match" if res["bytes_match"] else "!!! MISMATCH !!!"
    return (f"step {w['step']:.0f} ms wall (fwd+bwd {w['fwd_bwd']:.0f}, wait {w['wait']:.0f}, optimizer "
            f"{w['opt']:.0f}{agg}), {c['step']:.0f} ms CPU; steps {res['steps_wall_ms']} ms wall, "
            f"{res['steps_cpu_ms']} ms CPU; peak mem +{res['mem_delta_mb']:.0f} MB (ranks "
            f"{res['mem_delta_mb_per_rank']}); sent {res['bytes_total']:,} B/step (formula "
            f"{res['formula_total']:,}: {flag}) {res['bytes_counted']}; init {res['init_ms']:.0f} ms"
            + (" (re-timed warm: " + ", ".join(f"{m} {t:.0f} ms" for m, t in res["retime_ms"].items()) + ")"
               if res["retime_ms"] else "")
            + (f"; DP weights {res['consistency']}" if res["consistency"] else "")
            + f"; {res['wall_s']:.0f} s")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    warnings.filterwarnings("ignore")  # megatron-core's "Transformer Engine and Apex are not installed"
    started = bs.start(argv, __file__, parse_args, run_worker)
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
            out = run_method(spec["name"], dtype, argv, args, retime)
            tag = f"[{dtype} {spec['name']}{f' round {rnd + 1}' if args.rounds > 1 else ''}]"
            if "error" in out:
                errors[key] = out
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
