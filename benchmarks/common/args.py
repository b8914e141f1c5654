"""Argument groups the benchmark scripts share (model shape, batch, adapter, run, outputs)."""
from __future__ import annotations

import argparse


def add_shape_args(p, title="model shape", *, hidden=1024, ffn=2816, heads=16, groups=4,
                   mixer_help="what sits between linear_qkv and linear_proj: a cheap elementwise "
                              "gate (q * sigmoid(k) + v per query group) or causal GQA attention"):
    """The model-shape group (bench_step's block), with the given defaults; finish with shape_defaults."""
    shape = p.add_argument_group(title)
    shape.add_argument("--layers", type=int, default=1)
    shape.add_argument("--hidden", type=int, default=hidden)
    shape.add_argument("--ffn", type=int, default=ffn)
    shape.add_argument("--heads", type=int, default=heads)
    shape.add_argument("--groups", type=int, default=groups, help="query groups (KV heads, GQA)")
    shape.add_argument("--head-dim", type=int, default=None, help="default hidden / heads")
    shape.add_argument("--llama7b", action="store_true",
                       help="LLaMA-7B layer shapes: hidden 4096, FFN 11008, 32 heads, 32 groups")
    shape.add_argument("--mixer", choices=("gate", "sdpa"), default="gate", help=mixer_help)
    return shape


def shape_defaults(args) -> None:
    """After parsing: --llama7b's shapes and the default head dim."""
    if args.llama7b:
        args.hidden, args.ffn, args.heads, args.groups = 4096, 11008, 32, 32
    if args.head_dim is None:
        args.head_dim = args.hidden // args.heads


def add_batch_args(p, title="tokens per optimizer step = micro-batch x seq x grad-accum", *, seq=1024):
    batch = p.add_argument_group(title)
    batch.add_argument("--micro-batch", type=int, default=1)
    batch.add_argument("--seq", type=int, default=seq)
    batch.add_argument("--grad-accum", type=int, default=8)
    return batch


def tokens_per_step(args) -> int:
    """micro-batch x seq x grad-accum (per process)."""
    return args.micro_batch * args.seq * args.grad_accum


def add_adapter_args(meth, *, rank_help, virtual_ranks, virtual_ranks_help, svd_help):
    """--rank, --alpha, --virtual-ranks, --lr, --svd into the methods group."""
    meth.add_argument("--rank", type=int, default=16, help=rank_help)
    meth.add_argument("--alpha", type=float, default=16.0)
    meth.add_argument("--virtual-ranks", type=int, default=virtual_ranks, help=virtual_ranks_help)
    meth.add_argument("--lr", type=float, default=2e-5)
    meth.add_argument("--svd", choices=("exact", "randomized"), default="exact", help=svd_help)


def add_loss_arg(meth) -> None:
    meth.add_argument("--loss", choices=("mse", "sum"), default="mse")


def add_run_args(run, *, device_help, dtypes, dtype_default, dtype_help, threads_help, iters, rounds,
                 rounds_help, basis_help):
    """--device, --dtype, --threads, --warmup, --iters, --rounds, --basis, --seed into the run group."""
    run.add_argument("--device", default="cpu", help=device_help)
    run.add_argument("--dtype", choices=dtypes, default=dtype_default, help=dtype_help)
    run.add_argument("--threads", type=int, default=1, help=threads_help)
    run.add_argument("--warmup", type=int, default=1)
    run.add_argument("--iters", type=int, default=iters, help="timed optimizer steps (median reported)")
    run.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    run.add_argument("--basis", choices=("wall", "cpu"), default=None, help=basis_help)
    run.add_argument("--seed", type=int, default=1234)


def add_output_args(run, *worker_flags) -> None:
    """--markdown-out, --json-out and the hidden --worker, --worker-out (and worker_flags, hidden)."""
    run.add_argument("--markdown-out", default=None)
    run.add_argument("--json-out", default=None)
    run.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    run.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    for flag, kw in worker_flags:
        run.add_argument(flag, help=argparse.SUPPRESS, **kw)


def check_heads_and_basis(p, args) -> None:
    """--heads divisible by --groups; --basis defaults to wall on CUDA, CPU time elsewhere."""
    if args.heads % args.groups:
        p.error("--heads must be divisible by --groups")
    if args.basis is None:
        args.basis = "wall" if args.device.startswith("cuda") else "cpu"


def json_args(args) -> dict:
    """The parsed arguments for a JSON record, without the hidden worker flags."""
    return {k: v for k, v in vars(args).items() if not k.startswith("worker")}
