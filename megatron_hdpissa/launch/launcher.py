"""Launcher: turn a SLURM or torchrun environment into RANK / WORLD_SIZE / MASTER_ADDR and run a script.

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
import ipaddress
import json
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

# Below Linux's ephemeral range (32768-60999), so a job's port does not collide with
# the outgoing connections of other jobs on the same node.
PORT_BASE = 20000
PORT_SPAN = 12000

# Settings Megatron users expect; each is set only when the user has not set it.
RUNTIME_DEFAULTS = {
    # Megatron's TP/SP overlap relies on kernels being issued in order on one hardware queue.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    # 4.096 us * 2**22 ~ 17 s before an InfiniBand retry fails: survives short fabric hiccups.
    "NCCL_IB_TIMEOUT": "22",
    # Tear the job down when a collective fails or times out instead of hanging.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}


class LaunchError(RuntimeError):
    """The environment cannot give a consistent rank layout; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# SLURM's compressed lists


def _split_outside_brackets(text: str, what: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in {what} {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unmatched ']' in {what} {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unmatched '[' in {what} {text!r}")
    parts.append(text[start:])
    return parts


def _expand_ranges(body: str, spec: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']; the lower bound's width sets the zero padding."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if m is None:
            raise ValueError(f"bad range {item!r} in hostlist {spec!r} (expected N or N-M)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in hostlist {spec!r}")
        width = len(lo)
        out.extend(f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(spec: str) -> list[str]:
    """Expand a SLURM hostlist: 'node[01-04,07]', 'a-[1-2],b3', 'gpu[1-2]-ib,cpu[003-005]',
    'rack[1-2]-n[1-2]' (cartesian product, leftmost bracket outermost). Order and duplicates kept."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty hostlist")
    hosts = []
    for term in _split_outside_brackets(spec, "hostlist"):
        term = term.strip()
        if not term:
            raise ValueError(f"empty host name in hostlist {spec!r}")
        names = [""]
        for piece in re.findall(r"\[[^\[\]]*\]|[^\[\]]+", term):
            choices = _expand_ranges(piece[1:-1], spec) if piece.startswith("[") else [piece]
            names = [n + c for n in names for c in choices]
        hosts.extend(names)
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE style '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise ValueError(f"bad tasks-per-node list {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def job_port(job_id: int) -> int:
    """A rendezvous port every task of a job computes alike, and different jobs rarely share."""
    return PORT_BASE + job_id % PORT_SPAN


# ---------------------------------------------------------------------------------------------
# What the environment says


def _int(environ: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"{name}={value!r} is not an integer") from None
    return default


@dataclass(frozen=True)
class SlurmTask:
    """This process as SLURM sees it: a task of an srun step, or the batch script (`in_step` False)."""

    job_id: int
    in_step: bool
    proc_id: int  # global task index in the step
    local_id: int  # task index on this node
    node_id: int  # this node's index in `nodes`
    ntasks: int  # tasks in the step (in the batch script: in the job)
    nodes: tuple[str, ...]  # the step's nodes (in the batch script: the job's)
    tasks_on_node: int
    gpus_on_node: int | None
    cpus_per_task: int | None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "SlurmTask | None":
        job_id = _int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
        if job_id is None:
            return None
        # The batch script sees SLURM_PROCID=0 and the job's SLURM_NTASKS but is one process;
        # only srun steps carry a step id.
        in_step = any(environ.get(k, "batch") not in ("", "batch") for k in ("SLURM_STEP_ID", "SLURM_STEPID"))
        names = ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST") if in_step else (
            "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        nodelist = next((environ[n] for n in names if environ.get(n)), None)
        try:
            nodes = tuple(expand_hostlist(nodelist)) if nodelist else (socket.gethostname(),)
        except ValueError as e:
            raise LaunchError(f"cannot read SLURM's node list: {e}") from None
        ntasks = _int(environ, *(("SLURM_STEP_NUM_TASKS",) if in_step else ()), "SLURM_NTASKS", "SLURM_NPROCS",
                      default=1)
        node_id = _int(environ, "SLURM_NODEID", default=0)
        per_node_spec = environ.get("SLURM_STEP_TASKS_PER_NODE" if in_step else "SLURM_TASKS_PER_NODE") or \
            environ.get("SLURM_TASKS_PER_NODE")
        per_node = expand_tasks_per_node(per_node_spec) if per_node_spec else []
        if node_id < len(per_node):
            tasks_on_node = per_node[node_id]
        else:
            tasks_on_node = _int(environ, "SLURM_NTASKS_PER_NODE", default=-(-ntasks // len(nodes)))
        task = cls(
            job_id=job_id,
            in_step=in_step,
            proc_id=_int(environ, "SLURM_PROCID", default=0),
            local_id=_int(environ, "SLURM_LOCALID", default=0),
            node_id=node_id,
            ntasks=ntasks,
            nodes=nodes,
            tasks_on_node=tasks_on_node,
            gpus_on_node=_int(environ, "SLURM_GPUS_ON_NODE"),
            cpus_per_task=_int(environ, "SLURM_CPUS_PER_TASK"),
        )
        if in_step and not (task.proc_id < task.ntasks and task.local_id < task.tasks_on_node
                            and task.node_id < len(task.nodes)):
            raise LaunchError(
                f"inconsistent SLURM variables: SLURM_PROCID={task.proc_id} of SLURM_NTASKS={task.ntasks}, "
                f"SLURM_LOCALID={task.local_id} of {task.tasks_on_node} tasks on this node, "
                f"SLURM_NODEID={task.node_id} of {len(task.nodes)} nodes"
            )
        return task


@dataclass(frozen=True)
class TorchrunVars:
    """RANK / WORLD_SIZE / ... already in the environment: set by torchrun (`elastic`) or by hand."""

    rank: int
    local_rank: int | None
    world_size: int
    local_world_size: int | None
    group_world_size: int | None  # number of torchrun agents (its --nnodes)
    master_addr: str | None
    master_port: int | None
    elastic: bool

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "TorchrunVars | None":
        rank, world_size = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        if rank is None and world_size is None:
            return None
        if rank is None or world_size is None:
            raise LaunchError("RANK and WORLD_SIZE must be set together (only one of them is set)")
        if not 0 <= rank < world_size:
            raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
        return cls(
            rank=rank,
            local_rank=_int(environ, "LOCAL_RANK"),
            world_size=world_size,
            local_world_size=_int(environ, "LOCAL_WORLD_SIZE"),
            group_world_size=_int(environ, "GROUP_WORLD_SIZE"),
            master_addr=environ.get("MASTER_ADDR") or None,
            master_port=_int(environ, "MASTER_PORT"),
            elastic="TORCHELASTIC_RUN_ID" in environ,
        )


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _names_node(addr: str, nodes: tuple[str, ...], max_lookups: int = 8) -> bool:
    """Whether `addr` names one of `nodes`: same name, same short name, or (for an IP) same address."""
    short = addr.split(".")[0]
    if addr in nodes or short in {n.split(".")[0] for n in nodes}:
        return True
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        return False
    for node in nodes[:max_lookups]:  # the master is nearly always among the first nodes
        try:
            if socket.gethostbyname(node) == addr:
                return True
        except OSError:
            continue
    return False


def check_agreement(slurm: SlurmTask | None, env: TorchrunVars | None,
                    master_addr: str | None = None) -> tuple[list[str], list[str]]:
    """(errors, warnings) where SLURM and the torchrun-style variables disagree.
    Errors are layouts that would hang or collide; warnings may be deliberate."""
    errors: list[str] = []
    warnings: list[str] = []
    if slurm is None:
        return errors, warnings
    if env is not None and env.elastic:
        lws = env.local_world_size or 1
        if slurm.in_step:
            expected = slurm.ntasks * lws
            if env.world_size != expected:
                errors.append(
                    f"SLURM runs {slurm.ntasks} task(s) in this step (SLURM_NTASKS) and torchrun starts "
                    f"{lws} process(es) per task (--nproc-per-node), so the world should be "
                    f"{slurm.ntasks} x {lws} = {expected}, but torchrun says WORLD_SIZE={env.world_size}. "
                    f"Start one torchrun per SLURM task with --nnodes={slurm.ntasks}"
                    + (f" (it has --nnodes={env.group_world_size})." if env.group_world_size else ".")
                )
            if slurm.tasks_on_node > 1:
                warnings.append(
                    f"{slurm.tasks_on_node} SLURM tasks on this node each run torchrun, and each torchrun "
                    f"numbers LOCAL_RANK from 0: they would pick the same GPUs unless each task sees only its "
                    f"own (--gpus-per-task). Use srun --ntasks-per-node=1 with torchrun."
                )
        elif len(slurm.nodes) > 1:
            warnings.append(
                f"torchrun runs in the batch script, i.e. on one of the job's {len(slurm.nodes)} nodes only; "
                f"start it with srun --ntasks-per-node=1 to use them all."
            )
    elif env is not None and slurm.in_step and slurm.ntasks > 1 and (env.rank, env.world_size) != (
            slurm.proc_id, slurm.ntasks):
        errors.append(
            f"RANK={env.rank} WORLD_SIZE={env.world_size} are set in the environment, but SLURM says this is "
            f"task {slurm.proc_id} of {slurm.ntasks} (SLURM_PROCID, SLURM_NTASKS) and no torchrun is running. "
            f"They were probably exported in the batch script and inherited by every task, which gives every "
            f"process the same rank: unset RANK, WORLD_SIZE and LOCAL_RANK before srun."
        )
    if master_addr is not None and (slurm.in_step or env is not None):
        if _is_loopback(master_addr) and len(slurm.nodes) > 1:
            errors.append(
                f"MASTER_ADDR={master_addr} is a loopback address but the job spans {len(slurm.nodes)} nodes: "
                f"the other nodes cannot reach it. Unset MASTER_ADDR (the first node, {slurm.nodes[0]}, "
                f"is used) or set it to a node's name."
            )
        elif not _is_loopback(master_addr) and not _names_node(master_addr, slurm.nodes):
            shown = ",".join(slurm.nodes[:8]) + (",..." if len(slurm.nodes) > 8 else "")
            warnings.append(
                f"MASTER_ADDR={master_addr} is not one of this job's nodes ({shown}). Every rank must reach "
                f"it; ignore this if it is another name of a node (e.g. its InfiniBand interface)."
            )
    return errors, warnings


# ---------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class RankEnv:
    """The variables one training process needs (read by `distributed.initialize`)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int | None  # None: a single process picks a free port itself
    source: str  # "slurm", "torchrun", "environment" or "single"

    def as_environ(self) -> dict[str, str]:
        env = {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
        }
        if self.master_port is not None:
            env["MASTER_PORT"] = str(self.master_port)
        return env


@dataclass(frozen=True)
class NodePlan:
    """One torchrun agent per node (or per SLURM task) starting `nproc_per_node` processes."""

    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int

    def torchrun_argv(self, worker_argv: list[str]) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}",
            f"--nproc-per-node={self.nproc_per_node}",
            f"--master-addr={self.master_addr}", f"--master-port={self.master_port}",
            *worker_argv,
        ]


def _slurm_master(environ: Mapping[str, str], slurm: SlurmTask) -> tuple[str, int]:
    return (environ.get("MASTER_ADDR") or slurm.nodes[0],
            _int(environ, "MASTER_PORT", default=job_port(slurm.job_id)))


def _raise_or_warn(errors: list[str], warnings: list[str], allow_mismatch: bool) -> list[str]:
    if errors and not allow_mismatch:
        raise LaunchError("\n".join(errors) + "\n(--allow-mismatch turns these errors into warnings)")
    return errors + warnings


def resolve_rank(environ: Mapping[str, str] = os.environ, allow_mismatch: bool = False
                 ) -> tuple[RankEnv, list[str]]:
    """This process's rank layout and any warnings. Torchrun's variables win over SLURM's;
    disagreements that would hang raise `LaunchError` unless `allow_mismatch`."""
    slurm = SlurmTask.from_environ(environ)
    env = TorchrunVars.from_environ(environ)
    if env is not None:
        master_addr = env.master_addr or (_slurm_master(environ, slurm)[0] if slurm else "127.0.0.1")
        errors, warnings = check_agreement(slurm, env, master_addr)
        warnings = _raise_or_warn(errors, warnings, allow_mismatch)
        master_port = env.master_port
        if master_port is None and env.world_size > 1:
            master_port = job_port(slurm.job_id) if slurm else 29500
        local_world_size = env.local_world_size or (slurm.tasks_on_node if slurm and slurm.in_step else 1)
        return RankEnv(
            rank=env.rank,
            local_rank=env.local_rank if env.local_rank is not None else (slurm.local_id if slurm else 0),
            world_size=env.world_size,
            local_world_size=local_world_size,
            master_addr=master_addr,
            master_port=master_port,
            source="torchrun" if env.elastic else "environment",
        ), warnings
    if slurm is not None and slurm.in_step:
        master_addr, master_port = _slurm_master(environ, slurm)
        errors, warnings = check_agreement(slurm, None, master_addr)
        warnings = _raise_or_warn(errors, warnings, allow_mismatch)
        return RankEnv(slurm.proc_id, slurm.local_id, slurm.ntasks, slurm.tasks_on_node,
                       master_addr, master_port, "slurm"), warnings
    warnings = []
    if slurm is not None and slurm.ntasks > 1:
        warnings.append(
            f"running in the batch script, outside srun: this is one process (world size 1) although the "
            f"job has SLURM_NTASKS={slurm.ntasks}. Start it with srun, or pass --nproc-per-node."
        )
    return RankEnv(0, 0, 1, 1, environ.get("MASTER_ADDR") or "127.0.0.1", _int(environ, "MASTER_PORT"),
                   "single"), warnings


def resolve_node(nproc_per_node: int, environ: Mapping[str, str] = os.environ, allow_mismatch: bool = False
                 ) -> tuple[NodePlan, list[str]]:
    """The torchrun layout for `--nproc-per-node`: SLURM's tasks become torchrun's nodes."""
    if nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    if TorchrunVars.from_environ(environ) is not None:
        raise LaunchError(
            f"--nproc-per-node starts torchrun, but RANK={environ.get('RANK')} WORLD_SIZE="
            f"{environ.get('WORLD_SIZE')} are already set (inside torchrun, or exported by hand). "
            f"Drop --nproc-per-node, or unset RANK and WORLD_SIZE."
        )
    slurm = SlurmTask.from_environ(environ)
    warnings: list[str] = []
    if slurm is not None and slurm.in_step:
        if slurm.tasks_on_node != 1:
            raise LaunchError(
                f"--nproc-per-node {nproc_per_node} needs one SLURM task per node, but this step runs "
                f"{slurm.tasks_on_node} tasks on this node. Use srun --ntasks-per-node=1, or drop "
                f"--nproc-per-node to run one task per GPU."
            )
        master_addr, master_port = _slurm_master(environ, slurm)
        errors, warnings = check_agreement(slurm, None, master_addr)
        warnings = _raise_or_warn(errors, warnings, allow_mismatch)
        if slurm.gpus_on_node and slurm.gpus_on_node != nproc_per_node:
            warnings.append(
                f"SLURM allocated {slurm.gpus_on_node} GPU(s) on this node (SLURM_GPUS_ON_NODE) but "
                f"--nproc-per-node is {nproc_per_node}."
            )
        return NodePlan(slurm.ntasks, slurm.proc_id, nproc_per_node, master_addr, master_port), warnings
    if slurm is not None and len(slurm.nodes) > 1:
        warnings.append(
            f"running in the batch script, outside srun: only this node of the job's {len(slurm.nodes)} is "
            f"used. Start the launcher with srun --ntasks-per-node=1."
        )
    master_port = _int(environ, "MASTER_PORT")
    if master_port is None:
        if slurm is not None:
            master_port = job_port(slurm.job_id)
        else:
            from megatron_hdpissa.distributed.groups import free_port

            master_port = free_port()
    return NodePlan(1, 0, nproc_per_node, environ.get("MASTER_ADDR") or "127.0.0.1", master_port), warnings


def runtime_defaults(environ: Mapping[str, str], cpus_per_task: int | None, procs_per_task: int,
                     procs_on_node: int) -> dict[str, str]:
    """NCCL / CUDA / OpenMP settings the user has not set. OMP threads share this task's CPUs
    (SLURM_CPUS_PER_TASK) among its processes, else the visible CPUs among the node's processes."""
    defaults = {k: v for k, v in RUNTIME_DEFAULTS.items() if k not in environ}
    if "NCCL_ASYNC_ERROR_HANDLING" in environ:  # the older name, honoured by torch
        defaults.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)
    if "OMP_NUM_THREADS" not in environ:
        if cpus_per_task:
            threads = cpus_per_task // procs_per_task
        else:
            threads = len(os.sched_getaffinity(0)) // procs_on_node
        defaults["OMP_NUM_THREADS"] = str(max(1, threads))
    return defaults


# ---------------------------------------------------------------------------------------------
# Self-test


def selftest(out_path: str | None = None, tensor_model_parallel_size: int = 1, backend: str | None = None
             ) -> dict:
    """Initialise distributed + megatron-core groups from the environment, all-reduce (rank + 1) over
    the world, the TP group and the DP group, and gather every rank's view. Rank 0 writes the JSON."""
    import torch
    import torch.distributed as dist

    from megatron_hdpissa.distributed import groups as distributed

    groups = distributed.initialize(tensor_model_parallel_size=tensor_model_parallel_size, backend=backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None

    def summed(group) -> int:
        t = torch.tensor([rank + 1], dtype=torch.int64, device=device)
        dist.all_reduce(t, group=group)
        return int(t.item())

    record = {
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "world_size": world_size,
        "tp_rank": groups.tp_rank, "tp_size": groups.tp_size,
        "dp_rank": groups.dp_rank, "dp_size": groups.dp_size,
        "world_sum": summed(None),
        "tp_sum": summed(groups.tp_group),
        "dp_sum": summed(groups.dp_group),
    }
    print(f"selftest rank {rank}/{world_size} on {socket.gethostname()} (master "
          f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): {json.dumps(record)}", flush=True)
    records: list = [None] * world_size
    dist.all_gather_object(records, record)
    expected = world_size * (world_size + 1) // 2
    result = {
        "world_size": world_size,
        "tensor_model_parallel_size": tensor_model_parallel_size,
        "expected_world_sum": expected,
        "ranks": records,
        "ok": sorted(r["rank"] for r in records) == list(range(world_size))
        and all(r["world_sum"] == expected for r in records),
    }
    if rank == 0 and out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tmp = f"{out_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
        os.replace(tmp, out_path)
    distributed.shutdown()
    return result


# ---------------------------------------------------------------------------------------------
# Command line


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
    print(f"[megatron_hdpissa.launch.launcher {socket.gethostname()}] {message}", file=sys.stderr, flush=True)


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
            cpus = slurm.cpus_per_task if slurm and slurm.in_step and rank_env.source == "slurm" else None
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
