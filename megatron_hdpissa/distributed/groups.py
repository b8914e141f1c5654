"""Process groups: torch.distributed and megatron-core's model-parallel groups, set up and torn down."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

_SINGLETON_GROUP: Optional[dist.ProcessGroup] = None


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups HD-PiSSA needs, passed around explicitly (megatron-core style)."""

    tp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    # Pipeline stage of this rank; DP and TP groups above are those of this stage.
    pp_group: dist.ProcessGroup | None = None
    pp_rank: int = 0
    pp_size: int = 1
    # Mixture of experts: expert-parallel (EP), expert-tensor-parallel (ETP) and expert-data-parallel
    # groups (megatron-core's; each rank holds E / ep_size experts, each split over etp_size ranks).
    ep_group: dist.ProcessGroup | None = None
    ep_rank: int = 0
    ep_size: int = 1
    etp_group: dist.ProcessGroup | None = None
    etp_rank: int = 0
    etp_size: int = 1
    expert_dp_group: dist.ProcessGroup | None = None
    expert_dp_rank: int = 0
    expert_dp_size: int = 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @classmethod
    def from_megatron(cls) -> "ParallelGroups":
        """Read the groups megatron-core's `parallel_state` holds (single process if uninitialised)."""
        from megatron.core import parallel_state as ps

        if not (dist.is_available() and dist.is_initialized()) or not ps.model_parallel_is_initialized():
            return cls(None, None, 0, 1, 0, 1)
        return cls(
            tp_group=ps.get_tensor_model_parallel_group(),
            dp_group=ps.get_data_parallel_group(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            pp_group=ps.get_pipeline_model_parallel_group(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            ep_group=ps.get_expert_model_parallel_group(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            ep_size=ps.get_expert_model_parallel_world_size(),
            etp_group=ps.get_expert_tensor_parallel_group(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            expert_dp_group=ps.get_expert_data_parallel_group(),
            expert_dp_rank=ps.get_expert_data_parallel_rank(),
            expert_dp_size=ps.get_expert_data_parallel_world_size(),
        )


def singleton_group() -> Optional[dist.ProcessGroup]:
    """A process group holding only this rank (created collectively, once per process; `shutdown`
    forgets it with the process group it belongs to)."""
    global _SINGLETON_GROUP
    if _SINGLETON_GROUP is None and dist.is_initialized():
        _SINGLETON_GROUP, _ = dist.new_subgroups(group_size=1)
    return _SINGLETON_GROUP


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    backend: str | None = None,
    timeout_minutes: int = 30,
    *,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
) -> ParallelGroups:
    """Initialise torch.distributed from the usual env vars (RANK, WORLD_SIZE, MASTER_ADDR, ...)
    and megatron-core's model-parallel groups. Works with gloo on CPU and NCCL on GPU. The expert
    sizes (MoE models) default to EP = 1 and expert-TP = TP."""
    from megatron.core import parallel_state as ps

    backend = backend or default_backend()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()) if world_size == 1 else "29500")
        if backend == "nccl":
            # LOCAL_RANK modulo the visible devices: with --gpus-per-task=1 each task sees one GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world_size = dist.get_world_size()
    mp = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % mp != 0:
        raise ValueError(
            f"--tensor-model-parallel-size {tensor_model_parallel_size} x "
            f"--pipeline-model-parallel-size {pipeline_model_parallel_size} does not divide "
            f"the world size {world_size}"
        )
    check_expert_layout(world_size, tensor_model_parallel_size, pipeline_model_parallel_size,
                        expert_model_parallel_size, expert_tensor_parallel_size)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
            create_gloo_process_groups=(backend != "gloo"),
        )
    groups = ParallelGroups.from_megatron()
    etp = tensor_model_parallel_size if expert_tensor_parallel_size is None else expert_tensor_parallel_size
    if (groups.ep_size, groups.etp_size) != (expert_model_parallel_size, etp):  # set up before this call
        raise ValueError(f"megatron-core is initialised with expert-parallel size {groups.ep_size}, expert-TP "
                         f"{groups.etp_size}, but the flags ask for --expert-model-parallel-size "
                         f"{expert_model_parallel_size} --expert-tensor-parallel-size {etp}")
    return groups


def check_expert_layout(world_size: int, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> None:
    """megatron-core's expert layout: per pipeline stage the world / PP ranks are split as
    expert-TP x EP x expert-DP (as TP x DP for the dense part), so expert-TP x EP must divide them."""
    etp = tp if etp is None else etp
    if ep < 1 or etp < 1:
        raise ValueError(f"--expert-model-parallel-size ({ep}) and --expert-tensor-parallel-size ({etp}) "
                         "must be >= 1")
    per_stage = world_size // pp
    if per_stage % (etp * ep):
        raise ValueError(
            f"--expert-tensor-parallel-size {etp} x --expert-model-parallel-size {ep} does not divide the "
            f"{per_stage} ranks of a pipeline stage (world size {world_size} / "
            f"--pipeline-model-parallel-size {pp})")


def shutdown() -> None:
    global _SINGLETON_GROUP
    from megatron.core import parallel_state as ps

    _SINGLETON_GROUP = None  # belongs to the process group destroyed below
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
