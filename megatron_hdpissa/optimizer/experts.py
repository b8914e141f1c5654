"""Expert linears in the optimizer step: merged, mastered and checked over their own groups (the
expert-DP replicas of each expert shard), and counted once each in the global gradient norm."""
from __future__ import annotations

from typing import Optional

from megatron_hdpissa.distributed.collectives import all_gather_object
from megatron_hdpissa.optimizer.aggregation import DeltaAggregator, check_consistency, gather_factors
from megatron_hdpissa.optimizer.master_weights import MasterWeights


def expert_groups(entry):
    """The expert groups of an entry's adapter (`ExpertAdapter.expert_groups`), None for a dense layer."""
    return getattr(entry.adapter, "expert_groups", None)


def split_entries(entries) -> tuple[list, list]:
    """(dense entries, expert entries), each in model order."""
    return ([e for e in entries if expert_groups(e) is None], [e for e in entries if expert_groups(e) is not None])


def norm_pair(adapter, sharded: bool, grad) -> Optional[tuple[bool, object]]:
    """How a factor's gradient enters the global norm (`clip_grads.global_grad_norm`'s per-rank
    list: a pair flagged as a TP shard is summed over TP, then everything over PP and DP).
    Dense: (is a TP shard, grad). Expert: every (expert, slice, expert-TP shard) lives on exactly
    one rank of the world, so flagged True its square is summed over the whole world once; a
    factor replicated over expert-TP is counted on expert-TP rank 0 only (None elsewhere)."""
    eg = getattr(adapter, "expert_groups", None)
    if eg is None:
        return sharded and adapter.tp_size > 1, grad
    if sharded and eg.tp_size > 1 or eg.tp_rank == 0:
        return True, grad
    return None


class ExpertDomain:
    """The expert entries' own master weights and aggregator: the K slices of an expert are spread
    over its expert-DP group (each replica holds the slices of the data shards it serves), so the
    sum of their deltas is all-gathered (or reduced) over that group, and lands in every replica."""

    def __init__(self, entries, mode: str, bucket_size: int, update_factors: bool):
        groups = {(id(expert_groups(e).tp_group), id(expert_groups(e).dp_group)) for e in entries}
        if len(groups) != 1:
            raise ValueError(f"expert linears with {len(groups)} different expert group layouts")
        self.entries = entries
        self.groups = expert_groups(entries[0])
        self.weight_store = MasterWeights(entries, mode, self.groups, bucket_size)
        if mode == "sharded-fp32":
            modules = {id(e.module): e.module for e in entries}.values()
            self.weight_store.wait_before_forward(modules, self.weight_store.finish_param_gather)
        self.aggregator = DeltaAggregator(self.weight_store, self.groups, bucket_size, update_factors)

    def check_consistency(self, step: int) -> None:
        """`aggregation.check_consistency` over the expert groups, its verdict then shared by the
        whole world: an expert shard's expert-DP x expert-TP x PP grid leaves out the other EP
        ranks (other experts), which would otherwise wait in the next collective while it raises."""
        message = None
        try:
            check_consistency(self.entries, self.groups, step)
        except RuntimeError as e:
            message = str(e)
        everyone = [m for m in all_gather_object(message) if m is not None]
        if everyone:  # the message naming the layer first (the others say "found on global rank")
            raise RuntimeError(sorted(everyone, key=lambda m: "found on global rank" in m)[0])

    def gather_factors(self) -> None:
        gather_factors(self.entries, self.groups)


def route_items(items, dense_aggregator, experts: Optional[ExpertDomain]):
    """(aggregator, its items) for the dense and the expert entries of a step's (entry, dA, dB) items."""
    if experts is None:
        return [(dense_aggregator, items)]
    return [(dense_aggregator, [it for it in items if expert_groups(it[0]) is None]),
            (experts.aggregator, [it for it in items if expert_groups(it[0]) is not None])]
