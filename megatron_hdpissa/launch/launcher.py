"""Launcher command line: derive RANK / WORLD_SIZE / MASTER_ADDR from SLURM or torchrun, then run a script.

    python -m megatron_hdpissa.launch [--nproc-per-node N] -- -m megatron_hdpissa.finetune ARGS
    python -m megatron_hdpissa.launch [--nproc-per-node N] --selftest --out result.json

One task per GPU (`srun --ntasks-per-node=G`): the launcher derives this task's rank from
SLURM, exports it and execs the script. One task per node (`srun --ntasks-per-node=1` with
`--nproc-per-node G`): it execs torchrun (`torch.distributed.run`, static rendezvous) with the
node rank and master SLURM gives, and torchrun starts G copies of this launcher, one per rank.
Under torchrun the launcher checks torchrun's numbers against SLURM's; torchrun's win.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from megatron_hdpissa.launch.environ import LaunchError, SlurmTask
from megatron_hdpissa.launch.layout import SLURM, resolve_node, resolve_rank, runtime_defaults
from megatron_hdpissa.launch.selftest import selftest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_hdpissa.launch",
        description="Derive ranks from SLURM or torchrun, export them, and run a script: "
                    "launch [options] -- SCRIPT.py ARGS | -m MODULE ARGS",
    )
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="start this many processes per task through torchrun (one SLURM task per node); "
                        "omit to run this task as one rank (one SLURM task per GPU)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="report SLURM/torchrun disagreements as warnings instead of stopping")
    p.add_argument("--no-python", action="store_true", help="SCRIPT is an executable, not a Python file")
    p.add_argument("--dry-run", action="store_true", help="print the derived variables as JSON and exit")
    p.add_argument("--selftest", action="store_true",
                   help="instead of a script: initialise distributed, all-reduce, report (unknown flags ignored)")
    p.add_argument("--out", default=None, help="--selftest: JSON result file (written by rank 0)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="--selftest: megatron TP size")
    p.add_argument("--backend", default=None, help="--selftest: gloo or nccl (default: nccl if CUDA)")
    return p


def _say(message: str) -> None:
    print(f"[megatron_hdpissa.launch {socket.gethostname()}] {message}", file=sys.stderr, flush=True)


def _worker_argv(args: argparse.Namespace, script: list[str]) -> list[str]:
    """What torchrun runs in each process: this launcher again, which checks torchrun against SLURM."""
    worker = ["-m", "megatron_hdpissa.launch"] + (["--allow-mismatch"] if args.allow_mismatch else [])
    if not args.selftest:
        return worker + (["--no-python"] if args.no_python else []) + ["--", *script]
    worker += ["--selftest", "--tensor-model-parallel-size", str(args.tensor_model_parallel_size)]
    worker += ["--out", args.out] if args.out else []
    return worker + (["--backend", args.backend] if args.backend else [])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, script = argv[:split], argv[split + 1:]
    else:  # torchrun drops a "--" right after the module name: the script starts at -m / *.py
        split = next((i for i, a in enumerate(argv) if a == "-m" or (a.endswith(".py") and not a.startswith("-")
                      and (i == 0 or argv[i - 1] != "--out"))), len(argv))
        own, script = argv[:split], argv[split:]
    parser = _parser()
    args, unknown = parser.parse_known_args(own)
    if unknown and not args.selftest:
        parser.error(f"unknown options {unknown} (put the script and its arguments after '--')")
    if args.selftest and script:
        parser.error("--selftest replaces the script; give one or the other")
    if not args.selftest and not script and not args.dry_run:
        parser.error("nothing to run: give '-- SCRIPT ARGS' or --selftest")

    try:
        if args.nproc_per_node is not None:
            plan, warnings = resolve_node(args.nproc_per_node, os.environ, args.allow_mismatch)
            slurm = SlurmTask.from_environ(os.environ)
            cpus = slurm.cpus_per_task if slurm and slurm.in_step else None
            defaults = runtime_defaults(os.environ, cpus, plan.nproc_per_node, plan.nproc_per_node)
            command = plan.torchrun_argv(_worker_argv(args, script))
            exported, show_on = {}, True  # the only launcher on its node
            layout = {"mode": "torchrun per node", **plan.__dict__}
        else:
            rank_env, warnings = resolve_rank(os.environ, args.allow_mismatch)
            slurm = SlurmTask.from_environ(os.environ)
            cpus = slurm.cpus_per_task if slurm and slurm.in_step and rank_env.source == SLURM else None
            defaults = runtime_defaults(os.environ, cpus, 1, rank_env.local_world_size)
            exported = rank_env.as_environ()
            command = None if args.selftest else (
                script if args.no_python else [sys.executable, *script])
            show_on = rank_env.local_rank == 0
            layout = {"mode": "one process per task", **rank_env.__dict__}
    except LaunchError as e:
        _say(f"error: {e}")
        return 2

    if show_on:
        for w in warnings:
            _say(f"warning: {w}")
    if args.dry_run:
        print(json.dumps({"layout": layout, "export": exported, "defaults": defaults, "command": command},
                         sort_keys=True))
        return 0
    os.environ.update(defaults)
    os.environ.update(exported)
    if command is None:
        result = selftest(args.out, args.tensor_model_parallel_size, args.backend)
        return 0 if result["ok"] else 1
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as e:
        _say(f"error: cannot run {command[0]!r}: {e}")
        return 127


if __name__ == "__main__":
    sys.exit(main())
