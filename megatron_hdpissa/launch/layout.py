"""Rank layouts: SLURM / torchrun disagreements, this process's rank variables or a per-node torchrun plan, runtime defaults."""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from megatron_hdpissa.launch.environ import LaunchError, SlurmTask, TorchrunVars, env_int, job_port

LOCALHOST = "127.0.0.1"
TORCHRUN_DEFAULT_PORT = 29500  # torchrun's own --master-port default
# Where a RankEnv's numbers came from.
SLURM, TORCHRUN, ENVIRONMENT, SINGLE = "slurm", "torchrun", "environment", "single"

# Settings Megatron users expect; each is set only when the user has not set it.
RUNTIME_DEFAULTS = {
    # Megatron's TP/SP overlap relies on kernels being issued in order on one hardware queue.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    # 4.096 us * 2**22 ~ 17 s before an InfiniBand retry fails: survives short fabric hiccups.
    "NCCL_IB_TIMEOUT": "22",
    # Tear the job down when a collective fails or times out instead of hanging.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}


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


@dataclass(frozen=True)
class RankEnv:
    """The variables one training process needs (read by `distributed.initialize`)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int | None  # None: a single process picks a free port itself
    source: str  # SLURM, TORCHRUN, ENVIRONMENT or SINGLE

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
            env_int(environ, "MASTER_PORT", default=job_port(slurm.job_id)))


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
        master_addr = env.master_addr or (_slurm_master(environ, slurm)[0] if slurm else LOCALHOST)
        errors, warnings = check_agreement(slurm, env, master_addr)
        warnings = _raise_or_warn(errors, warnings, allow_mismatch)
        master_port = env.master_port
        if master_port is None and env.world_size > 1:
            master_port = job_port(slurm.job_id) if slurm else TORCHRUN_DEFAULT_PORT
        local_world_size = env.local_world_size or (slurm.tasks_on_node if slurm and slurm.in_step else 1)
        return RankEnv(
            rank=env.rank,
            local_rank=env.local_rank if env.local_rank is not None else (slurm.local_id if slurm else 0),
            world_size=env.world_size,
            local_world_size=local_world_size,
            master_addr=master_addr,
            master_port=master_port,
            source=TORCHRUN if env.elastic else ENVIRONMENT,
        ), warnings
    if slurm is not None and slurm.in_step:
        master_addr, master_port = _slurm_master(environ, slurm)
        errors, warnings = check_agreement(slurm, None, master_addr)
        warnings = _raise_or_warn(errors, warnings, allow_mismatch)
        return RankEnv(slurm.proc_id, slurm.local_id, slurm.ntasks, slurm.tasks_on_node,
                       master_addr, master_port, SLURM), warnings
    warnings = []
    if slurm is not None and slurm.ntasks > 1:
        warnings.append(
            f"running in the batch script, outside srun: this is one process (world size 1) although the "
            f"job has SLURM_NTASKS={slurm.ntasks}. Start it with srun, or pass --nproc-per-node."
        )
    return RankEnv(0, 0, 1, 1, environ.get("MASTER_ADDR") or LOCALHOST, env_int(environ, "MASTER_PORT"),
                   SINGLE), warnings


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
    master_port = env_int(environ, "MASTER_PORT")
    if master_port is None:
        if slurm is not None:
            master_port = job_port(slurm.job_id)
        else:
            from megatron_hdpissa.distributed.groups import free_port

            master_port = free_port()
    return NodePlan(1, 0, nproc_per_node, environ.get("MASTER_ADDR") or LOCALHOST, master_port), warnings


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
