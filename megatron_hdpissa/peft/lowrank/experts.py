"""LoRA / PiSSA on megatron-core's MoE experts: one adapter per expert, split over the expert's own
tensor-parallel group, initialised by the expert's GLOBAL name, so the method is the same at every
expert-parallel (EP) and expert-TP size (docs/DESIGN.md §1a)."""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.peft.common import ConfigError, Target, global_layer_name
from megatron_hdpissa.peft.decomposition import Unit, top_singular

# SequentialMLP's local experts, as inside a GPT layer: <moe>.experts.local_experts.<j>.linear_fc1/2
EXPERT_LINEAR = re.compile(r"^(?P<moe>.+)\.experts\.local_experts\.(?P<index>\d+)\.(?P<leaf>linear_fc[12])$")


@dataclass(frozen=True)
class ExpertSite:
    """Where an expert linear lives: its global name (local expert j of EP rank p is expert
    `moe.local_expert_indices[j]`, the layer by its global number) and its groups (tp: the
    expert-TP group it is split over, dp: the expert-DP group holding its replicas)."""

    global_name: str
    groups: ParallelGroups


def _rank_size(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def expert_site(model: nn.Module, t: Target, groups: ParallelGroups) -> ExpertSite:
    """The site of expert linear `t` (megatron-core's SequentialMLP layout only)."""
    m = EXPERT_LINEAR.match(t.name)
    moe = model.get_submodule(m.group("moe")) if m else None
    if moe is None or not hasattr(moe, "local_expert_indices"):
        raise ConfigError("target_modules", (
            f"{t.name}: LoRA / PiSSA on experts needs megatron-core's SequentialMLP local experts "
            "(...mlp.experts.local_experts.<i>.linear_fc1/2, moe_grouped_gemm=False); or leave the expert "
            "linears out of {name}"))
    index = moe.local_expert_indices[int(m.group("index"))]
    name = f"{m.group('moe')}.experts.local_experts.{index}.{m.group('leaf')}"
    tp_group = getattr(t.module, "tp_group", None)
    dp_group = getattr(getattr(moe, "experts", None), "dp_group", None)
    (tp_rank, tp_size), (dp_rank, dp_size) = _rank_size(tp_group), _rank_size(dp_group)
    eg = ParallelGroups(tp_group=tp_group, dp_group=dp_group, tp_rank=tp_rank, tp_size=tp_size,
                        dp_rank=dp_rank, dp_size=dp_size, pp_group=groups.pp_group, pp_rank=groups.pp_rank,
                        pp_size=groups.pp_size)
    return ExpertSite(global_layer_name(model, name), eg)


def init_stream_key(model: nn.Module, t: Target, site, part: str) -> str:
    """The key of LoRA's A stream for one part: the layer's global name (global expert for an
    expert linear), so every pipeline and expert layout draws the same A for the same matrix."""
    return f"{site.global_name if site is not None else global_layer_name(model, t.name)}/{part}"


def decompose_expert_units(units: list[tuple[Unit, ExpertSite]], config) -> None:
    """PiSSA's decomposition of expert linears, each on every rank that holds it (gathered over its
    expert-TP group): replicas agree (the exact SVD, or a randomized one seeded by the expert's
    global name), and no rank waits for an expert it does not hold."""
    for unit, site in units:
        full = unit.gather_full(site.groups)
        seed = config.seed + zlib.crc32(f"{site.global_name}/{unit.part.name}".encode())
        u, s, v = top_singular(full, unit.components, config.svd_method, config.svd_oversampling,
                               config.svd_niter, seed=seed)
        unit.fill(u, s, v)
