"""Process groups (torch.distributed and megatron-core's model-parallel groups) and the collectives on them."""
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


def grads_for_norm(params, grads) -> list[tuple[bool, torch.Tensor]]:
    """(is a TP shard, gradient) of each parameter the global norm counts. A parameter megatron-core
    marks `shared` (the last stage's copy of a tied embedding, whose gradient `finalize_model_grads`
    has already summed with the first stage's) is left out, as in megatron-core's own norm, so the
    tied weight is counted once."""
    return [(bool(getattr(p, "tensor_model_parallel", False)), x) for p, x in zip(params, grads)
            if not getattr(p, "shared", False)]


def squared_norms(tensor_lists: list[list[tuple[bool, torch.Tensor]]], groups: ParallelGroups) -> torch.Tensor:
    """Sum of squares of each list of (is a TP shard, tensor) over the whole model: TP shards
    summed over the TP group, tensors replicated over TP counted once, then every pipeline stage's
    sums added over the PP group (one all-reduce each for all lists). Float64, one entry per list,
    the same on every rank of the TP x PP grid; non-finite where any tensor on any of them is."""
    device = next((x.device for pairs in tensor_lists for _, x in pairs), None) or _collective_device()
    sq = torch.zeros(2, len(tensor_lists), dtype=torch.float64, device=device)  # [shards; replicas]
    for i, pairs in enumerate(tensor_lists):
        for row, want in ((0, True), (1, False)):
            norms = [_norm(x) for shard, x in pairs if shard == want]
            if norms:
                sq[row, i] = torch.stack(norms).double().square().sum()
    if groups.tp_size > 1:
        dist.all_reduce(sq[0], group=groups.tp_group)
    total = sq.sum(0)
    if groups.pp_size > 1:  # each stage holds only its own layers
        dist.all_reduce(total, group=groups.pp_group)
    return total


def any_rank(flag: bool, groups: ParallelGroups, value: int = 1) -> int:
    """The largest `value` among the ranks whose `flag` is set, over the whole DP x TP x PP grid
    (0 if none): a decision one rank takes that every rank must follow."""
    device = _collective_device()
    t = torch.tensor([value if flag else 0], dtype=torch.int64, device=device)
    for size, group in ((groups.dp_size, groups.dp_group), (groups.tp_size, groups.tp_group),
                        (groups.pp_size, groups.pp_group)):
        if size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t)


def _collective_device() -> torch.device:
    """Where a small tensor must live for a collective of the default backend."""
    nccl = dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


# newer torch deprecates all_gather_into_tensor in favour of all_gather_single (same semantics)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_over_dp(flat: torch.Tensor, groups: ParallelGroups, async_op: bool = False):
    """Every DP rank's `flat` as the rows of a (dp, numel) tensor, and the collective's handle
    (None when it ran synchronously or there is one DP rank)."""
    if groups.dp_size == 1:
        return flat.view(1, -1), None
    out = torch.empty(groups.dp_size * flat.numel(), dtype=flat.dtype, device=flat.device)
    handle = _all_gather_flat(out, flat, group=groups.dp_group, async_op=async_op)
    return out.view(groups.dp_size, -1), handle


def all_gather_into(out: torch.Tensor, local: torch.Tensor, groups: ParallelGroups) -> None:
    """`out` (dp x local's shape) <- every DP rank's `local`, in DP-rank order."""
    if groups.dp_size == 1:
        out.copy_(local)
    else:
        _all_gather_flat(out, local.detach().contiguous(), group=groups.dp_group)


def reduce_scatter_over_dp(flat: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Row `dp_rank` of the sum over DP of `flat` (viewed as dp rows)."""
    mine = torch.empty(flat.numel() // groups.dp_size, dtype=flat.dtype, device=flat.device)
    _reduce_scatter_flat(mine, flat.reshape(-1), group=groups.dp_group)
    return mine


def buckets(items, size_of, limit: int):
    """Consecutive groups of `items` whose `size_of` sums stay within `limit` (an item larger
    than `limit` gets a bucket of its own): one collective each."""
    bucket, size = [], 0
    for item in items:
        n = size_of(item)
        if bucket and size + n > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += n
    if bucket:
        yield bucket


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
    global _SINGLETON_GROUP
    from megatron.core import parallel_state as ps

    _SINGLETON_GROUP = None  # belongs to the process group destroyed below
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
