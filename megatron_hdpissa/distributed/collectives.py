"""The package's collectives over ParallelGroups: DP sums and averages, norms, gathers, reduce-scatter, buckets."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_hdpissa.distributed.groups import ParallelGroups

# newer torch deprecates all_gather_into_tensor in favour of all_gather_single (same semantics)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def collective_device() -> torch.device:
    """Where a small tensor must live for a collective of the default backend."""
    nccl = dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def sum_over_dp_(t: torch.Tensor, groups: ParallelGroups) -> None:
    """`t` <- its sum over the data-parallel group, in place (nothing with one DP rank)."""
    if groups.dp_size > 1:
        dist.all_reduce(t, group=groups.dp_group)


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
        dist.all_reduce(sq[0], group=groups.tp_group)
    total = sq.sum(0)
    if groups.pp_size > 1:  # each stage holds only its own layers
        dist.all_reduce(total, group=groups.pp_group)
    return total


def any_rank(flag: bool, groups: ParallelGroups, value: int = 1) -> int:
    """The largest `value` among the ranks whose `flag` is set, over the whole DP x TP x PP grid
    (0 if none): a decision one rank takes that every rank must follow."""
    t = torch.tensor([value if flag else 0], dtype=torch.int64, device=collective_device())
    for size, group in ((groups.dp_size, groups.dp_group), (groups.tp_size, groups.tp_group),
                        (groups.pp_size, groups.pp_group)):
        if size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t)


def all_gather_over_dp(flat: torch.Tensor, groups: ParallelGroups, async_op: bool = False):
    """Every DP rank's `flat` as the rows of a (dp, numel) tensor, and the collective's handle
    (None when it ran synchronously or there is one DP rank)."""
    if groups.dp_size == 1:
        return flat.view(1, -1), None
    out = torch.empty(groups.dp_size * flat.numel(), dtype=flat.dtype, device=flat.device)
    handle = _all_gather_flat(out, flat, group=groups.dp_group, async_op=async_op)
    return out.view(groups.dp_size, -1), handle


def all_gather_into(out: torch.Tensor, local: torch.Tensor, groups: ParallelGroups) -> None:
    """`out` <- every DP rank's `local` concatenated along dim 0, in DP-rank order."""
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
