"""What the environment says about this process: SLURM's variables and compressed lists, torchrun's variables."""
from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

# Below Linux's ephemeral range (32768-60999), so a job's port does not collide with
# the outgoing connections of other jobs on the same node.
PORT_BASE = 20000
PORT_SPAN = 12000


class LaunchError(RuntimeError):
    """The environment cannot give a consistent rank layout; the message says how to fix it."""


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


# What the environment says
def env_int(environ: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
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
        job_id = env_int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
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
        ntasks = env_int(environ, *(("SLURM_STEP_NUM_TASKS",) if in_step else ()), "SLURM_NTASKS", "SLURM_NPROCS",
                      default=1)
        node_id = env_int(environ, "SLURM_NODEID", default=0)
        per_node_spec = environ.get("SLURM_STEP_TASKS_PER_NODE" if in_step else "SLURM_TASKS_PER_NODE") or \
            environ.get("SLURM_TASKS_PER_NODE")
        per_node = expand_tasks_per_node(per_node_spec) if per_node_spec else []
        if node_id < len(per_node):
            tasks_on_node = per_node[node_id]
        else:
            tasks_on_node = env_int(environ, "SLURM_NTASKS_PER_NODE", default=-(-ntasks // len(nodes)))
        task = cls(
            job_id=job_id,
            in_step=in_step,
            proc_id=env_int(environ, "SLURM_PROCID", default=0),
            local_id=env_int(environ, "SLURM_LOCALID", default=0),
            node_id=node_id,
            ntasks=ntasks,
            nodes=nodes,
            tasks_on_node=tasks_on_node,
            gpus_on_node=env_int(environ, "SLURM_GPUS_ON_NODE"),
            cpus_per_task=env_int(environ, "SLURM_CPUS_PER_TASK"),
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
        rank, world_size = env_int(environ, "RANK"), env_int(environ, "WORLD_SIZE")
        if rank is None and world_size is None:
            return None
        if rank is None or world_size is None:
            raise LaunchError("RANK and WORLD_SIZE must be set together (only one of them is set)")
        if not 0 <= rank < world_size:
            raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
        return cls(
            rank=rank,
            local_rank=env_int(environ, "LOCAL_RANK"),
            world_size=world_size,
            local_world_size=env_int(environ, "LOCAL_WORLD_SIZE"),
            group_world_size=env_int(environ, "GROUP_WORLD_SIZE"),
            master_addr=environ.get("MASTER_ADDR") or None,
            master_port=env_int(environ, "MASTER_PORT"),
            elastic="TORCHELASTIC_RUN_ID" in environ,
        )
