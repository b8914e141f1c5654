"""apply_lowrank / merge_lowrank: LoRA or PiSSA adapters on megatron-core parallel linears, and their merge."""
from __future__ import annotations

import functools
import math
import zlib
from typing import Iterator, Optional

import torch
from torch import nn

from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.models.recompute import ensure_block_input_requires_grad
from megatron_hdpissa.optimizer.expert_grads import tag_expert_params
from megatron_hdpissa.peft.common import (
    LORA, ROW, add_part_delta_, attach_adapter, check_components, detach_adapter, find_targets,
    freeze_base, freeze_target, iter_children, record_method, shard_factors,
)
from megatron_hdpissa.peft.decomposition import Unit, decompose_units
from megatron_hdpissa.peft.lowrank.config import LowRankConfig
from megatron_hdpissa.peft.lowrank.experts import decompose_expert_units, expert_site, init_stream_key
from megatron_hdpissa.peft.lowrank.layer import CHILD, LowRankAdapter


def iter_lowrank(model: nn.Module) -> Iterator[tuple[str, nn.Module, LowRankAdapter]]:
    """(layer name, base layer, adapter) for every LoRA / PiSSA layer, in module order."""
    return iter_children(model, CHILD, LowRankAdapter)


def apply_lowrank(model: nn.Module, config: LowRankConfig, groups: Optional[ParallelGroups] = None,
                  progress: bool = True, decompose: bool = True) -> nn.Module:
    """LoRA (Kaiming-uniform A, zero B) or PiSSA (A, B from the top-r singular components,
    scaled so that s B A equals them, and W_res = W - s B A) on the matching parallel linears,
    as `config.method` says. The same targets and fused-layer parts as HD-PiSSA. MoE expert
    linears get one adapter per expert at any expert-parallel / expert-TP size: split over the
    expert-TP group, A's stream keyed by the global expert, PiSSA decomposing each expert where it
    lives (`experts.py`); their factors are tagged for the expert-DP reduction (`expert_grads`).
    `decompose=False` (resuming) leaves W untouched; factors and W_res come from the checkpoint."""
    if not isinstance(config, LowRankConfig):
        raise TypeError(f"apply_lowrank takes a LowRankConfig, got {type(config).__name__}")
    groups = groups or ParallelGroups.from_megatron()
    targets = find_targets(model, config.target_modules, groups.tp_size, config.fused_decomposition)
    freeze_base(model, config.trainable_modules)
    units, expert_units = [], []
    for t in targets:
        module = t.module
        # expert linears: split over their expert-TP group, named by their global expert (experts.py)
        site = expert_site(model, t, groups) if getattr(module, "is_expert", False) else None
        tp = site.groups if site is not None else groups
        ad = LowRankAdapter(t.name, t.kind, t.parts, config.rank, config.scale, t.in_local, t.rows_local,
                            tp.tp_group, tp.tp_size, bool(getattr(module, "gather_output", False)),
                            site is None and bool(getattr(module, "sequence_parallel", False)),
                            tp_rank=tp.tp_rank, expert_site=site)
        ad.to(device=module.weight.device)
        ad.scatter_input = site is None and t.kind == ROW and not getattr(module, "input_is_parallel", True)
        attach_adapter(module, CHILD, ad)
        freeze_target(t, config.trainable_modules)
        for part, (m, n) in zip(t.parts, t.shapes):
            if config.method == LORA:
                # Full-size A drawn identically on every rank, then sharded like the weight; the
                # stream is keyed by the layer's global name (and global expert), so every pipeline
                # and expert layout draws the same A for the same matrix.
                gen = torch.Generator().manual_seed(
                    config.seed + zlib.crc32(init_stream_key(model, t, site, part.name).encode()))
                a_full = torch.empty(config.rank, n)
                nn.init.kaiming_uniform_(a_full, a=math.sqrt(5), generator=gen)
                _load_part(ad, part.name, a_full, None)
            else:
                check_components(t, config.rank, "{name}")
                fill = functools.partial(_fill_pissa, ad, module.weight, part)
                unit = Unit(t.kind, module.weight, part, m, n, config.rank, fill)
                if site is None:
                    units.append(unit)
                else:
                    expert_units.append((unit, site))
    tag_expert_params(model)  # expert factors: reduced over expert-DP (optimizer/expert_grads.py)
    if units and decompose:
        decompose_units(units, groups, config.svd_method, config.svd_oversampling, config.svd_niter,
                        config.seed, progress=progress)
    if expert_units and decompose:
        decompose_expert_units(expert_units, config)
    record_method(model, config.method, config, groups)
    ensure_block_input_requires_grad(model)
    return model


def _load_part(ad: LowRankAdapter, part: str, a_full, b_full):
    a, b = shard_factors(ad.kind, a_full, b_full, ad.tp_rank, ad.tp_size)
    with torch.no_grad():
        ad.a[part].copy_(a)
        if b is not None:
            ad.b[part].copy_(b)


def _fill_pissa(ad: LowRankAdapter, weight, part, u, s, v):
    sq = (s.clamp_min(0) / ad.scale).sqrt()
    _load_part(ad, part.name, sq[:, None] * v.t(), u * sq[None, :])
    with torch.no_grad():  # W_res = W - s B A on this rank's shard
        add_part_delta_(weight, part, -ad.merged_delta(part))


@torch.no_grad()
def merge_lowrank(model: nn.Module) -> nn.Module:
    """Fold s B A into each base weight and remove the adapters (for export)."""
    for _, module, ad in list(iter_lowrank(model)):
        for part in ad.parts:
            add_part_delta_(module.weight, part, ad.merged_delta(part))
        detach_adapter(module, CHILD)
    return model
