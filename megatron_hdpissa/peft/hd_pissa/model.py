"""apply_hd_pissa: find targeted megatron-core parallel linears, attach adapters, decompose."""
from __future__ import annotations

import functools
from typing import Iterator, Optional

import torch
from torch import nn

from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.models.recompute import ensure_block_input_requires_grad
from megatron_hdpissa.peft.common import (
    HD_PISSA, ROW, attach_adapter, check_components, find_targets, freeze_base, freeze_target, iter_children,
    record_method, shard_factors,
)
from megatron_hdpissa.peft.decomposition import Unit, decompose_units, slice_factors
from megatron_hdpissa.peft.hd_pissa.config import HDPiSSAConfig
from megatron_hdpissa.peft.hd_pissa.experts import (
    ExpertAdapter, build_expert_adapter, check_trainable_experts, decompose_expert, is_expert_linear,
)
from megatron_hdpissa.peft.hd_pissa.layer import CHILD, HDPiSSAAdapter


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module, HDPiSSAAdapter]]:
    """(layer name, base layer, adapter) for every adapted layer, in module order."""
    return iter_children(model, CHILD, HDPiSSAAdapter)


def apply_hd_pissa(model: nn.Module, config: HDPiSSAConfig, groups: Optional[ParallelGroups] = None,
                   progress: bool = True, decompose: bool = True) -> nn.Module:
    """Wrap matching megatron-core Column/RowParallelLinear layers in place, freeze the base,
    decompose the full weights once (after the base checkpoint is loaded) and hand each
    data-parallel rank (and virtual rank) its slice of the singular components.

    `decompose=False` only attaches the adapters (zero factors): for resuming, where the factors
    come from the checkpoint (then call `HDPiSSAOptimizer.refresh_gathered_factors()`)."""
    groups = groups or ParallelGroups.from_megatron()
    local_slices = config.virtual_ranks
    num_slices = groups.dp_size * local_slices
    first_slice = groups.dp_rank * local_slices
    targets = find_targets(model, config.target_modules, groups.tp_size, config.fused_decomposition)
    freeze_base(model, config.trainable_modules)
    check_trainable_experts(model, groups)
    what = (f"{groups.dp_size} data-parallel ranks x {local_slices} virtual ranks x "
            f"{{name}} {config.rank}")
    layouts: dict = {}  # per MoE layer: its expert layout and routing capture
    for t in targets:
        check_components(t, num_slices * config.rank, what)
        module = t.module
        if is_expert_linear(module):
            attach_adapter(module, CHILD, build_expert_adapter(model, t, config, groups, layouts))
            freeze_target(t, config.trainable_modules)
            continue
        adapter = HDPiSSAAdapter(
            layer_name=t.name, kind=t.kind, parts=t.parts, rank=config.rank, scale=config.scale,
            local_slices=local_slices, num_slices=num_slices, first_slice=first_slice,
            in_features_local=t.in_local, part_rows_local=t.rows_local, tp_group=groups.tp_group,
            tp_rank=groups.tp_rank, tp_size=groups.tp_size,
            gather_output=bool(getattr(module, "gather_output", False)),
            sequence_parallel=bool(getattr(module, "sequence_parallel", False)),
        ).to(device=module.weight.device)
        adapter.scatter_input = t.kind == ROW and not getattr(module, "input_is_parallel", True)
        attach_adapter(module, CHILD, adapter)
        freeze_target(t, config.trainable_modules)
    record_method(model, HD_PISSA, config, groups)
    model.hd_pissa_config = config
    model.hd_pissa_groups = groups
    ensure_block_input_requires_grad(model)
    if decompose:
        decompose_hd_pissa(model, progress=progress)
    return model


def decompose_hd_pissa(model: nn.Module, progress: bool = False) -> None:
    """Fill the attached adapters' factors from the current weights (collective over all ranks):
    what `apply_hd_pissa` does last, separate for callers that load the base afterwards."""
    config: HDPiSSAConfig = model.hd_pissa_config
    groups: ParallelGroups = model.hd_pissa_groups
    adapters = {name: ad for name, _, ad in iter_adapters(model)}
    units, experts = [], []
    for t in find_targets(model, config.target_modules, groups.tp_size, config.fused_decomposition):
        ad = adapters[t.name]
        if isinstance(ad, ExpertAdapter):
            experts.append((ad, t))
            continue
        for part, (m, n) in zip(t.parts, t.shapes):
            fill = functools.partial(fill_hd_pissa, ad, part.name, groups)
            units.append(Unit(t.kind, t.module.weight, part, m, n, ad.num_slices * ad.rank, fill))
    decompose_units(units, groups, config.svd_method, config.svd_oversampling, config.svd_niter,
                    config.seed, progress=progress)
    for ad, t in experts:
        decompose_expert(ad, t, config)


def fill_hd_pissa(ad: HDPiSSAAdapter, part: str, groups: ParallelGroups, u, s, v) -> None:
    """Give the adapter all K slices' factors (TP-sharded) and its own local slices."""
    a_all, b_all = shard_factors(ad.kind, *slice_factors(u, s, v, ad.num_slices, ad.rank),
                                 groups.tp_rank, groups.tp_size)
    buf_a, buf_b = ad.all_factors(part)
    with torch.no_grad():
        buf_a.copy_(a_all)
        buf_b.copy_(b_all)
        lo, hi = ad.first_slice, ad.first_slice + ad.local_slices
        ad.a[part].copy_(a_all[lo:hi])
        ad.b[part].copy_(b_all[lo:hi])


class active_slice:
    """Context manager: route gradients of every adapter in `model` to local slice `index`
    (virtual ranks: feed slice l only its own micro-batches)."""

    def __init__(self, model: nn.Module, index: int):
        self.adapters = [ad for _, _, ad in iter_adapters(model)]
        self.index = index

    def __enter__(self):
        for ad in self.adapters:
            if not 0 <= self.index < ad.local_slices:
                raise IndexError(f"virtual rank {self.index} out of range 0..{ad.local_slices - 1}")
            ad.active_slice = self.index
        return self

    def __exit__(self, *exc):
        for ad in self.adapters:
            ad.active_slice = 0
        return False
