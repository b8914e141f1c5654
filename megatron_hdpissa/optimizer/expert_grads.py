"""Expert parameters in the baselines' optimizer (LoRA, PiSSA and full fine-tuning on MoE models):
gradients summed over the expert-data-parallel group and divided by the DP size, and each expert
shard counted once in the global gradient norm (docs/DESIGN.md §1a).

A replica of an expert (shard) receives the tokens of every rank of its expert-parallel x expert-TP
group, so its gradient already sums those ranks' losses; the expert-DP replicas together cover every
data shard once. Summing over expert-DP and dividing by DP gives (1/DP) sum_d dL_d/dW, what the
DP average gives a dense weight and what EP = 1 gives the expert."""
from __future__ import annotations

import torch
from torch import nn

from megatron_hdpissa.distributed.collectives import sum_then_divide_
from megatron_hdpissa.distributed.groups import ParallelGroups

EXPERT_PARAM = "expert_data_parallel"  # the parameter attribute `tag_expert_params` sets


def tag_expert_params(model: nn.Module) -> int:
    """Mark every parameter of megatron-core's expert linears (`is_expert`; their adapters
    included) as reduced over expert-DP. megatron-core marks expert weights `allreduce = False`
    only at EP > 1, but at EP = 1 with expert-TP != TP the expert-TP shards differ across DP ranks
    too. Returns how many parameters were marked."""
    count = 0
    for module in model.modules():
        if getattr(module, "is_expert", False):
            for p in module.parameters():
                setattr(p, EXPERT_PARAM, True)
                count += 1
    return count


def is_expert_param(p: torch.Tensor) -> bool:
    """Tagged by `tag_expert_params`, or marked by megatron-core as not DP-reduced (`allreduce = False`,
    its expert weights at EP > 1)."""
    return bool(getattr(p, EXPERT_PARAM, False)) or getattr(p, "allreduce", True) is False


def average_expert_grads_(grads: list[torch.Tensor], groups: ParallelGroups) -> int:
    """Expert gradients summed over the expert-DP group and divided by the DP size, in place (one
    flat fp32 all-reduce). Returns the bytes handed to the collective."""
    if groups.dp_size == 1 and groups.expert_dp_size == 1:
        return 0
    return sum_then_divide_(grads, groups.expert_dp_group, groups.expert_dp_size, groups.dp_size)


def expert_norm_pairs(params, grads, groups: ParallelGroups) -> list[tuple[bool, torch.Tensor]]:
    """The expert gradients' entries of the global norm's per-rank list (`clip_grads.global_grad_norm`:
    flagged True, summed over TP, DP and PP, i.e. over every rank once). After the reduction every
    expert-DP replica holds the same gradient: counted on expert-DP rank 0 only; a tensor split over
    expert-TP (`tensor_model_parallel`) on each expert-TP rank, one replicated over it on rank 0."""
    if groups.expert_dp_rank != 0:
        return []
    return [(True, g) for p, g in zip(params, grads)
            if groups.etp_rank == 0 or (getattr(p, "tensor_model_parallel", False) and groups.etp_size > 1)]
