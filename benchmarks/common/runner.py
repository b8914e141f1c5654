"""Driver and worker processes: each method runs in fresh processes of the same script (`--worker`)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from benchmarks.common.machine import machine_info, worker_env


def command_line(script: str, argv) -> str:
    """The command as typed from the current directory (the venv's python relative to it)."""
    cwd = os.getcwd()
    python = os.path.relpath(sys.executable, cwd) if sys.executable.startswith(cwd) else sys.executable
    return " ".join(shlex.quote(a) for a in [python, os.path.relpath(os.path.abspath(script), cwd), *argv])


def start(argv, script, parse_args, run_worker):
    """Parse argv (default: sys.argv[1:]). In a worker process (--worker): run it, write its
    result to --worker-out and return None. In the driver: print the command line and the
    machine; return (argv, args, command, machine info)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        res = run_worker(args)
        with open(args.worker_out, "w") as f:
            json.dump(res, f)
        return None
    command = command_line(script, argv)
    info = machine_info(args.threads, args.device, args.dtype)
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return argv, args, command, info


def run_one(script: str, method: str, argv, threads: int, timeout: float) -> dict:
    """`script argv --worker method` in one fresh process; its result with the process's wall_s."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(script), *argv, "--worker", method, "--worker-out", out]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=worker_env(threads), capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"method {method} failed (rc {proc.returncode}):\n{tail}")
        with open(out) as f:
            res = json.load(f)
    res["wall_s"] = wall
    return res


def run_ranks(script: str, worker_args: list, argv, nproc: int, threads: int, timeout: float) -> dict:
    """`script argv --worker ... worker_args` in `nproc` fresh processes (torch.distributed env:
    RANK, WORLD_SIZE, LOCAL_RANK, a free port); {"ranks": [per-rank results], "wall_s": ...} or
    {"error": ..., "log": the ranks' output tails, "wall_s": ...}."""
    from megatron_hdpissa.distributed.groups import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs, logs = [], []
        t0 = time.perf_counter()
        for rank in range(nproc):
            env = worker_env(threads)
            env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            cmd = [sys.executable, os.path.abspath(script), *argv, *worker_args,
                   "--worker-out", os.path.join(tmp, f"rank{rank}.json")]
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        error = _wait(procs, t0 + timeout, timeout)
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
            return {"error": error, "log": "\n".join(tails), "wall_s": time.perf_counter() - t0}
        for log in logs:
            log.close()
        ranks = []
        for rank in range(nproc):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
    return {"ranks": ranks, "wall_s": time.perf_counter() - t0}


def _wait(procs, deadline: float, timeout: float):
    """Wait for every process; the reason to stop them early (a failed rank, the deadline) or None."""
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                return "a rank failed"
            if time.perf_counter() > deadline:
                return f"timed out after {timeout:.0f} s"
            time.sleep(0.2)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): take the ranks started here down too
        for p in procs:
            if p.poll() is None:
                p.kill()
        raise
    return "a rank failed" if any(p.returncode != 0 for p in procs) else None
