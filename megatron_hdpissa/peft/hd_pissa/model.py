"""apply_hd_pissa: find targeted megatron-core parallel linears, attach adapters, decompose."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from megatron_hdpissa.peft import layout
from megatron_hdpissa.peft.hd_pissa.layer import COLUMN, ROW, HDPiSSAAdapter, attach
from megatron_hdpissa.peft.hd_pissa.config import HDPiSSAConfig
from megatron_hdpissa.peft.decomposition import Unit, decompose_units, fill_hd_pissa
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.models.recompute import ensure_block_input_requires_grad


def _parallel_linear_types():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear


def matches(name: str, patterns: Sequence[str]) -> bool:
    """PEFT-style matching: exact name, a `.`-suffix, or `re:<regex>` on the full name."""
    for pat in patterns:
        if pat.startswith("re:"):
            if re.fullmatch(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module, HDPiSSAAdapter]]:
    """(layer name, base layer, adapter) for every adapted layer, in module order."""
    for name, module in model.named_modules():
        adapter = module._modules.get("hd_pissa") if hasattr(module, "_modules") else None
        if isinstance(adapter, HDPiSSAAdapter):
            yield name, module, adapter


def _layer_parts(name: str, module: nn.Module, kind: str, fused: bool, tp_size: int) -> list[layout.Part]:
    if kind == ROW or fused:
        return layout.whole()
    cfg = getattr(module, "config", None)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "linear_qkv" and getattr(cfg, "num_attention_heads", None):
        heads = cfg.num_attention_heads
        groups = cfg.num_query_groups or heads
        head_dim = cfg.kv_channels or cfg.hidden_size // heads
        expected = (heads + 2 * groups) * head_dim
        if module.output_size != expected:
            raise ValueError(f"{name}: output size {module.output_size} is not the fused QKV size {expected}")
        return layout.qkv_parts(heads, groups, head_dim, tp_size, name)
    if leaf == "linear_fc1" and getattr(cfg, "gated_linear_unit", False):
        return layout.gate_up_parts(module.output_size_per_partition, name)
    return layout.whole()


@dataclass
class Target:
    """A targeted parallel linear and the logical matrices (parts) inside its weight."""

    name: str
    module: nn.Module
    kind: str  # COLUMN or ROW
    parts: list
    rows_local: list  # local output rows of each part
    in_local: int  # local input features
    shapes: list  # full logical (m, n) of each part


def find_targets(model: nn.Module, patterns: Sequence[str], tp_size: int, fused: bool) -> list[Target]:
    """Match `--hd-pissa-target-modules` (or the baselines' equivalent) against the model's
    megatron-core parallel linears; clear errors for nothing matched or unsupported layers."""
    column_t, row_t = _parallel_linear_types()
    targets, linear_names = [], []
    for name, module in model.named_modules():
        if isinstance(module, (column_t, row_t)):
            linear_names.append(name)
            if matches(name, patterns):
                targets.append(_target(name, module, COLUMN if isinstance(module, column_t) else ROW, tp_size, fused))
        elif matches(name, patterns) and isinstance(getattr(module, "weight", None), torch.Tensor):
            raise TypeError(
                f"{name}: --hd-pissa-target-modules matched a {type(module).__name__}, but only "
                "megatron-core ColumnParallelLinear/RowParallelLinear layers are supported"
            )
    if not targets:
        shown = ", ".join(linear_names[:8]) + (" ..." if len(linear_names) > 8 else "")
        raise ValueError(
            f"--hd-pissa-target-modules {list(patterns)} matched no parallel linear "
            f"layer; the model has: {shown or 'no megatron-core parallel linear layers'}"
        )
    return targets


def _target(name: str, module: nn.Module, kind: str, tp: int, fused: bool) -> Target:
    if module.weight is None:
        raise ValueError(f"{name}: layer has no weight (skip_weight_param_allocation)")
    m_full, n_full = module.output_size, module.input_size
    if kind == COLUMN and m_full % tp or kind == ROW and n_full % tp:
        raise ValueError(f"{name}: --tensor-model-parallel-size {tp} does not divide the layer ({m_full}x{n_full})")
    parts = _layer_parts(name, module, kind, fused, tp)
    w_local = module.weight
    if kind == COLUMN:
        rows_local = [p.num_rows if p.rows is not None else w_local.shape[0] for p in parts]
        shapes = [(r_loc * tp, n_full) for r_loc in rows_local]
    else:
        rows_local, shapes = [w_local.shape[0]], [(m_full, n_full)]
    return Target(name, module, kind, parts, rows_local, w_local.shape[1], shapes)


def freeze_base(model: nn.Module, trainable_modules: Sequence[str]) -> None:
    """Freeze every parameter except those matching `trainable_modules` (by module or full name)."""
    for pname, param in model.named_parameters():
        param.requires_grad_(matches(pname.rsplit(".", 1)[0], trainable_modules)
                             or matches(pname, trainable_modules))


def check_components(t: Target, need: int, what: str) -> None:
    for part, (m, n) in zip(t.parts, t.shapes):
        if need > min(m, n):
            raise ValueError(
                f"{t.name}" + (f" (part {part.name})" if part.name != "w" else "") +
                f": {what} = {need} singular components, but the {m}x{n} matrix has only {min(m, n)}"
            )


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
    what = (f"{groups.dp_size} data-parallel ranks x {local_slices} virtual ranks x "
            f"--hd-pissa-rank {config.rank}")
    for t in targets:
        check_components(t, num_slices * config.rank, what)
        module = t.module
        adapter = HDPiSSAAdapter(
            layer_name=t.name, kind=t.kind, parts=t.parts, rank=config.rank, scale=config.scale,
            local_slices=local_slices, num_slices=num_slices, first_slice=first_slice,
            in_features_local=t.in_local, part_rows_local=t.rows_local, tp_group=groups.tp_group,
            tp_rank=groups.tp_rank, tp_size=groups.tp_size,
            gather_output=bool(getattr(module, "gather_output", False)),
            sequence_parallel=bool(getattr(module, "sequence_parallel", False)),
        ).to(device=module.weight.device)
        adapter.scatter_input = t.kind == ROW and not getattr(module, "input_is_parallel", True)
        attach(module, adapter)
        module.weight.requires_grad_(False)
        if getattr(module, "bias", None) is not None and isinstance(module.bias, torch.Tensor):
            module.bias.requires_grad_(matches(t.name + ".bias", config.trainable_modules))
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
    units = []
    for t in find_targets(model, config.target_modules, groups.tp_size, config.fused_decomposition):
        ad = adapters[t.name]
        for part, (m, n) in zip(t.parts, t.shapes):
            fill = functools.partial(fill_hd_pissa, ad, part.name, groups)
            units.append(Unit(t.kind, t.module.weight, part, m, n, ad.num_slices * ad.rank, fill))
    decompose_units(units, groups, config.svd_method, config.svd_oversampling, config.svd_niter,
                    config.seed, progress=progress)


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
