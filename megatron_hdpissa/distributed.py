"""Process-group set-up: torch.distributed plus megatron-core model-parallel groups, CPU or GPU."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        )


def average_over_dp_(grads: list[torch.Tensor], groups: ParallelGroups) -> int:
    """Average gradients over the data-parallel group in place, with one flat fp32 all-reduce.
    Returns the bytes handed to the collective (0 with one DP rank)."""
    if groups.dp_size == 1 or not grads:
        return 0
    flat = torch.cat([x.reshape(-1).float() for x in grads])
    dist.all_reduce(flat, group=groups.dp_group)
    flat.div_(groups.dp_size)
    off = 0
    for x in grads:
        x.copy_(flat[off:off + x.numel()].view_as(x))
        off += x.numel()
    return flat.numel() * flat.element_size()


def _norm(x: torch.Tensor) -> torch.Tensor:
    low = x.dtype in (torch.float16, torch.bfloat16)  # accumulate and return in fp32 at least
    return torch.linalg.vector_norm(x, dtype=torch.float32 if low else None)


def squared_norms(tensor_lists: list[list[tuple[bool, torch.Tensor]]], groups: ParallelGroups) -> torch.Tensor:
    """Sum of squares of each list of (is a TP shard, tensor): TP shards summed over the TP group
    (one all-reduce for all lists), tensors replicated over TP counted once. Float64, one entry
    per list; non-finite where any tensor (on any TP rank, for shards) is."""
    device = next((x.device for pairs in tensor_lists for _, x in pairs), None)
    sq = torch.zeros(2, len(tensor_lists), dtype=torch.float64, device=device)  # [shards; replicas]
    for i, pairs in enumerate(tensor_lists):
        for row, want in ((0, True), (1, False)):
            norms = [_norm(x) for shard, x in pairs if shard == want]
            if norms:
                sq[row, i] = torch.stack(norms).double().square().sum()
    if groups.tp_size > 1:
        dist.all_reduce(sq[0], group=groups.tp_group)
    return sq.sum(0)


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
) -> ParallelGroups:
    """Initialise torch.distributed from the usual env vars (RANK, WORLD_SIZE, MASTER_ADDR, ...)
    and megatron-core's model-parallel groups. Works with gloo on CPU and NCCL on GPU."""
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
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            create_gloo_process_groups=(backend != "gloo"),
        )
    return ParallelGroups.from_megatron()


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    from . import ddp

    ddp._SINGLETON_GROUP = None  # belongs to the process group destroyed below

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
