"""The package's collectives, the only module that calls torch.distributed's collectives (a test
checks the source). Every tensor goes to a device its group's backend serves first (NCCL: CUDA;
gloo: CPU) and results are copied back, so a CPU flag or loss sum is legal under NCCL and a CUDA
tensor under gloo (docs/DESIGN.md §10). On top: DP sums and averages, norms, gathers,
reduce-scatter, buckets over ParallelGroups."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_hdpissa.distributed.groups import ParallelGroups

_dist = dist  # every raw collective below goes through this name (tests put a checking proxy here)
SUM, MAX, MIN = dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN
# device types each backend serves; a backend not listed (ucc, fake, ...) is trusted with any
_SERVES = {"nccl": {"cuda"}, "gloo": {"cpu"}, "mpi": {"cpu"}}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def served_devices(group=None) -> set[str] | None:
    """Device types `group`'s backend takes tensors on (a device map such as `cpu:gloo,cuda:nccl`
    serves each of its types); None when any device will do (unknown backend, no process group)."""
    if not initialized():
        return None
    backend = str(dist.get_backend(group))
    if ":" in backend:
        return {part.split(":")[0].strip() for part in backend.split(",")}
    return _SERVES.get(backend)


def collective_device(group=None) -> torch.device:
    """Where a new small tensor for a collective over `group` should live: the current CUDA device
    when the backend serves only CUDA (NCCL), else the CPU."""
    served = served_devices(group)
    if served is not None and "cpu" not in served and "cuda" in served:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _placed(t: torch.Tensor, group) -> torch.Tensor:
    """`t` itself when `group`'s backend serves its device, else a copy on `collective_device`."""
    served = served_devices(group)
    if served is None or t.device.type in served:
        return t
    return t.to(collective_device(group))


def _back(t: torch.Tensor, placed: torch.Tensor) -> torch.Tensor:
    if placed is not t:
        t.copy_(placed)
    return t


# ---- the raw collectives, placed ----------------------------------------------------------------
def all_reduce_(t: torch.Tensor, group=None, op=SUM) -> torch.Tensor:
    """`t` <- its reduction over `group` in place (nothing without a process group); returns `t`."""
    if initialized():
        placed = _placed(t, group)
        _dist.all_reduce(placed, op=op, group=group)
        _back(t, placed)
    return t


def broadcast_(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """`t` <- global rank `src`'s `t`, in place (nothing without a process group); returns `t`."""
    if initialized():
        placed = _placed(t, group)
        _dist.broadcast(placed, src=src, group=group)
        _back(t, placed)
    return t


def all_gather_list(local: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    """Every rank's `local` (same shape on each) in group-rank order, on `local`'s device."""
    placed = _placed(local.contiguous(), group)
    shards = [torch.empty_like(placed) for _ in range(size)]
    _dist.all_gather(shards, placed, group=group)
    return [s.to(local.device) for s in shards]


def _flat_op(raw, out: torch.Tensor, t: torch.Tensor, group, async_op: bool):
    p_out, p_in = _placed(out, group), _placed(t.contiguous(), group)
    if p_out is out and p_in is t:
        return raw(out, t, group=group, async_op=async_op)
    raw(p_out, p_in, group=group)  # moved: synchronously, so the copy back sees the result
    _back(out, p_out)
    return None


def all_gather_flat_(out: torch.Tensor, t: torch.Tensor, group=None, async_op: bool = False):
    """`out` <- every rank's `t` concatenated along dim 0; the handle when it runs asynchronously."""
    raw = getattr(_dist, "all_gather_single", None) or _dist.all_gather_into_tensor  # newer name, same op
    return _flat_op(raw, out, t, group, async_op)


def reduce_scatter_flat_(out: torch.Tensor, t: torch.Tensor, group=None, async_op: bool = False):
    """`out` <- this rank's block of the sum over `group` of `t` (dim 0 split in rank order)."""
    raw = getattr(_dist, "reduce_scatter_single", None) or _dist.reduce_scatter_tensor
    return _flat_op(raw, out, t, group, async_op)


def barrier(group=None) -> None:
    """A barrier over `group` (nothing without a process group)."""
    if initialized():
        _dist.barrier(group=group)


def all_gather_object(obj, group=None) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] without a process group)."""
    if not initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    _dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    """Global rank `src`'s picklable `obj` on every rank (`obj` without a process group)."""
    if not initialized():
        return obj
    box = [obj]
    _dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


# ---- over ParallelGroups ----------------------------------------------------------------------------
def sum_over_dp_(t: torch.Tensor, groups: ParallelGroups) -> None:
    """`t` <- its sum over the data-parallel group, in place (nothing with one DP rank)."""
    if groups.dp_size > 1:
        all_reduce_(t, groups.dp_group)


def average_over_dp_(grads: list[torch.Tensor], groups: ParallelGroups) -> int:
    """Average gradients over the data-parallel group in place, with one flat fp32 all-reduce.
    Returns the bytes handed to the collective (0 with one DP rank)."""
    if groups.dp_size == 1 or not grads:
        return 0
    return sum_then_divide_(grads, groups.dp_group, groups.dp_size, groups.dp_size)


def sum_then_divide_(grads: list[torch.Tensor], group, group_size: int, divisor: int) -> int:
    """`grads` <- their sum over `group` (skipped when `group_size` is 1) divided by `divisor`, in
    place, through one flat fp32 all-reduce. Returns the bytes handed to the collective."""
    if not grads:
        return 0
    flat = torch.cat([x.reshape(-1).float() for x in grads])
    if group_size > 1:
        all_reduce_(flat, group)
    flat.div_(divisor)
    off = 0
    for x in grads:
        x.copy_(flat[off:off + x.numel()].view_as(x))
        off += x.numel()
    return flat.numel() * flat.element_size() if group_size > 1 else 0


def _norm(x: torch.Tensor) -> torch.Tensor:
    low = x.dtype in (torch.float16, torch.bfloat16)  # accumulate and return in fp32 at least
    return torch.linalg.vector_norm(x, dtype=torch.float32 if low else None)


def squared_norms(tensor_lists: list[list[tuple[bool, torch.Tensor]]], groups: ParallelGroups) -> torch.Tensor:
    """Sum of squares of each list of (is a TP shard, tensor) over the whole model: TP shards
    summed over the TP group, tensors replicated over TP counted once, then every pipeline stage's
    sums added over the PP group (one all-reduce each for all lists). Float64, one entry per list,
    the same on every rank of the TP x PP grid; non-finite where any tensor on any of them is."""
    device = next((x.device for pairs in tensor_lists for _, x in pairs), None) or collective_device()
    sq = torch.zeros(2, len(tensor_lists), dtype=torch.float64, device=device)  # [shards; replicas]
    for i, pairs in enumerate(tensor_lists):
        for row, want in ((0, True), (1, False)):
            norms = [_norm(x) for shard, x in pairs if shard == want]
            if norms:
                sq[row, i] = torch.stack(norms).double().square().sum()
    if groups.tp_size > 1:
        all_reduce_(sq[0], groups.tp_group)
    total = sq.sum(0)
    if groups.pp_size > 1:  # each stage holds only its own layers
        all_reduce_(total, groups.pp_group)
    return total


def any_rank(flag: bool, groups: ParallelGroups, value: int = 1) -> int:
    """The largest `value` among the ranks whose `flag` is set, over the whole DP x TP x PP grid
    (0 if none): a decision one rank takes that every rank must follow."""
    t = torch.tensor([value if flag else 0], dtype=torch.int64, device=collective_device(groups.dp_group))
    for size, group in ((groups.dp_size, groups.dp_group), (groups.tp_size, groups.tp_group),
                        (groups.pp_size, groups.pp_group)):
        if size > 1:
            all_reduce_(t, group, MAX)
    return int(t)


def sum_over_grid(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """`t` summed over the whole DP x TP x PP grid, in place (one all-reduce per group of size > 1);
    NaN or inf on any rank makes it non-finite on every rank."""
    for size, group in ((groups.dp_size, groups.dp_group), (groups.tp_size, groups.tp_group),
                        (groups.pp_size, groups.pp_group)):
        if size > 1:
            all_reduce_(t, group)
    return t


def all_gather_over_dp(flat: torch.Tensor, groups: ParallelGroups, async_op: bool = False):
    """Every DP rank's `flat` as the rows of a (dp, numel) tensor, and the collective's handle
    (None when it ran synchronously or there is one DP rank)."""
    if groups.dp_size == 1:
        return flat.view(1, -1), None
    out = torch.empty(groups.dp_size * flat.numel(), dtype=flat.dtype, device=flat.device)
    handle = all_gather_flat_(out, flat, groups.dp_group, async_op=async_op)
    return out.view(groups.dp_size, -1), handle


def all_gather_into(out: torch.Tensor, local: torch.Tensor, groups: ParallelGroups) -> None:
    """`out` <- every DP rank's `local` concatenated along dim 0, in DP-rank order."""
    if groups.dp_size == 1:
        out.copy_(local)
    else:
        all_gather_flat_(out, local.detach(), groups.dp_group)


def reduce_scatter_over_dp(flat: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Row `dp_rank` of the sum over DP of `flat` (viewed as dp rows)."""
    mine = torch.empty(flat.numel() // groups.dp_size, dtype=flat.dtype, device=flat.device)
    reduce_scatter_flat_(mine, flat.reshape(-1), groups.dp_group)
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
