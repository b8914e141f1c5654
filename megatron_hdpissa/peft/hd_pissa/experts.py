"""HD-PiSSA on megatron-core's MoE experts: a replica holds one slice per data shard it serves and
trains each slice on that shard's tokens only, whatever the expert-parallel layout (DESIGN §1a)."""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_hdpissa.distributed.collectives import all_gather_list, all_gather_object
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.peft.common import COLUMN, ConfigError, Target, global_layer_name, shard_factors
from megatron_hdpissa.peft.decomposition import slice_factors, top_singular
from megatron_hdpissa.peft.hd_pissa.layer import HDPiSSAAdapter, thin_grads

EXPERT_LINEAR = re.compile(r"^(?P<moe>.+)\.experts\.local_experts\.(?P<index>\d+)\.linear_fc[12]$")


def is_expert_linear(module: nn.Module) -> bool:
    return bool(getattr(module, "is_expert", False))


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


@dataclass
class ExpertLayout:
    """Where an MoE layer's dispatched tokens come from and which slices this rank's replicas hold.

    Sources are the dispatcher's chunks (expert-TP rank t, EP rank j), t-major (megatron-core's
    order after the all-to-all and the expert-TP all-gather); `source_shards[s]` is the data shard
    (dense DP rank) of source s. The replica serves `shards` (sorted) and holds, for each shard d
    and virtual rank v, slice d V + v at local position `shards.index(d) V + v`. `slice_order` lists
    the global slice of each position of the expert-DP gather (replica by replica), the order in
    which the adapter's `a_all` / `b_all` hold all K slices."""

    groups: ParallelGroups  # tp: expert-TP, dp: expert-DP (replicas of the same expert shard)
    source_shards: list[int]
    source_ranks: list[int]  # rank of each source inside the dispatcher's tp_ep group
    shards: list[int]
    virtual_ranks: int
    slice_order: list[int]

    @property
    def local_slices(self) -> int:
        return len(self.shards) * self.virtual_ranks

    def slot(self, source: int, virtual: int) -> int:
        return self.shards.index(self.source_shards[source]) * self.virtual_ranks + virtual



def check_trainable_experts(model: nn.Module, groups: ParallelGroups) -> None:
    """HD-PiSSA averages its other trainable parameters over DP (or megatron-core DDP's dense
    buffer), which is wrong for expert weights whenever replicas of one expert shard are not the
    whole DP group (EP > 1 or expert-TP != TP): refuse them there, naming the parameter."""
    if getattr(groups, "ep_size", 1) == 1 and getattr(groups, "etp_size", groups.tp_size) == groups.tp_size:
        return
    for name, module in model.named_modules():
        if is_expert_linear(module):
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    raise ConfigError("trainable_modules", (
                        f"{name}.{pname} is an expert weight: {{name}} cannot train expert weights beside HD-PiSSA "
                        f"at expert-parallel size {groups.ep_size} / expert-TP {groups.etp_size} != TP "
                        f"{groups.tp_size} (use --peft full or lora, or leave the experts out)"))


def expert_layout(moe_layer: nn.Module, groups: ParallelGroups, virtual_ranks: int) -> ExpertLayout:
    """The layout of `moe_layer` (collective over its groups): which data shard each dispatcher
    source is, and the checks that every data shard is served by exactly one expert-DP replica."""
    disp, experts = moe_layer.token_dispatcher, moe_layer.experts
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    if not isinstance(disp, MoEAlltoAllTokenDispatcher):
        raise ConfigError("target_modules", (
            f"HD-PiSSA on experts needs megatron-core's all-to-all token dispatcher "
            f"(moe_token_dispatcher_type='alltoall'), the model has {type(disp).__name__}; "
            "or leave the expert linears out of {name}"))
    if getattr(disp, "drop_and_pad", False):
        raise ConfigError("target_modules", (
            "HD-PiSSA on experts does not support moe_pad_expert_input_to_capacity (padded expert "
            "inputs have no source order); or leave the expert linears out of {name}"))
    if not isinstance(experts, SequentialMLP):
        raise ConfigError("target_modules", (
            f"HD-PiSSA on experts needs SequentialMLP local experts (moe_grouped_gemm=False), "
            f"the model has {type(experts).__name__}"))
    tp_ep, etp_group, edp_group = disp.tp_ep_group, disp.tp_group, experts.dp_group
    me = (_rank(etp_group), _rank(disp.ep_group), groups.dp_rank)
    infos = all_gather_object(me, tp_ep) if _size(tp_ep) > 1 else [me]
    by_source = {(t, j): (d, i) for i, (t, j, d) in enumerate(infos)}
    etp, ep = disp.tp_size, disp.ep_size
    order = [(t, j) for t in range(etp) for j in range(ep)]
    source_shards = [by_source[s][0] for s in order]
    source_ranks = [by_source[s][1] for s in order]
    shards = sorted(set(source_shards))
    edp_size = _size(edp_group)
    served = all_gather_object(shards, edp_group) if edp_size > 1 else [shards]
    slice_order = [d * virtual_ranks + v for rank_shards in served for d in rank_shards for v in range(virtual_ranks)]
    k = groups.dp_size * virtual_ranks
    if sorted(slice_order) != list(range(k)) or len({len(s) for s in served}) != 1:
        raise ConfigError("target_modules", (
            f"HD-PiSSA on experts: the expert-data-parallel replicas of an expert serve data shards "
            f"{served}, which are not each of the {groups.dp_size} data shards exactly once (an "
            "expert-tensor-parallel size below the tensor-parallel size, or context parallelism, "
            "splits a shard over replicas); use expert-TP = TP, or leave the expert linears out of {name}"))
    eg = ParallelGroups(tp_group=etp_group, dp_group=edp_group, tp_rank=_rank(etp_group), tp_size=etp,
                        dp_rank=_rank(edp_group), dp_size=edp_size, pp_group=groups.pp_group,
                        pp_rank=groups.pp_rank, pp_size=groups.pp_size)
    return ExpertLayout(eg, source_shards, source_ranks, shards, virtual_ranks, slice_order)


def source_counts(disp, tokens_per_expert, layout: ExpertLayout) -> torch.Tensor:
    """Rows per (source, local expert) of the tokens the local experts receive, as an int64
    (sources x local experts) tensor, read from what the dispatcher computed for this forward."""
    sources, local = len(layout.source_shards), disp.num_local_experts
    if sources == 1:
        return torch.as_tensor(tokens_per_expert).reshape(1, local).long().cpu()
    if local > 1:
        return torch.as_tensor(disp.num_global_tokens_per_local_expert).reshape(sources, local).long().cpu()
    if disp.tp_size == 1:
        return torch.as_tensor(disp.output_splits).reshape(sources, 1).long().cpu()
    if disp.ep_size == 1:
        return torch.as_tensor(disp.output_splits_tp).reshape(sources, 1).long().cpu()
    # one local expert under EP x expert-TP: megatron-core keeps only this rank's row; gather
    local_counts = disp.routing_map.sum(dim=0).long()
    gathered = all_gather_list(local_counts, disp.tp_ep_group, _size(disp.tp_ep_group))
    expert = disp.local_expert_indices[0]
    return torch.stack([gathered[r][expert] for r in layout.source_ranks]).reshape(sources, 1).cpu()


class ExpertRouting:
    """Captures, before each forward of an MoE layer's experts, how many of each local expert's
    rows came from each dispatcher source (the experts' forward pre-hook)."""

    def __init__(self, moe_layer: nn.Module, layout: ExpertLayout):
        self.layout = layout
        self.counts: Optional[torch.Tensor] = None
        disp = moe_layer.token_dispatcher

        def hook(module, args, kwargs):
            tokens_per_expert = args[1] if len(args) > 1 else kwargs["tokens_per_expert"]
            self.counts = source_counts(disp, tokens_per_expert, layout)

        self.handle = moe_layer.experts.register_forward_pre_hook(hook, with_kwargs=True)


class _ExpertFactorGrad(torch.autograd.Function):
    """Identity on the expert linear's output; its backward computes every local slice's factor
    gradients from the rows of the sources that slice serves (the rows come source by source)."""

    @staticmethod
    def forward(ctx, out, x, adapter, segments, *factors):
        ctx.adapter, ctx.segments = adapter, segments
        ctx.save_for_backward(x, *factors)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, d_out):
        x, *factors = ctx.saved_tensors
        ad, (counts, slots) = ctx.adapter, ctx.segments
        dtype = d_out.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        dy2 = d_out.reshape(-1, d_out.shape[-1])
        rows: dict[int, list[torch.Tensor]] = {}
        start = 0
        for count, slot in zip(counts, slots):
            if count:
                rows.setdefault(slot, []).append(torch.arange(start, start + count, device=x2.device))
            start += count
        grads = [torch.zeros_like(f) for f in factors]
        for slot in sorted(rows):  # the same slots, in the same order, on every expert-TP rank
            idx = torch.cat(rows[slot])
            a_list = [f[slot].to(dtype) for f in factors[0::2]]
            b_list = [f[slot].to(dtype) for f in factors[1::2]]
            for g, part in zip(grads, thin_grads(ad, x2.index_select(0, idx), dy2.index_select(0, idx),
                                                 a_list, b_list)):
                g[slot] += part.to(g.dtype)
        return (d_out, None, None, None, *grads)


class ExpertAdapter(HDPiSSAAdapter):
    """The HD-PiSSA adapter of one local expert's linear. Its L local slices are those of the data
    shards its replica serves (`ExpertLayout`); `first_slice` and the `a_all` / `b_all` buffers
    follow the expert-DP gather order (`layout.slice_order`), so the aggregation of the dense
    layers applies over the expert-DP group. `active_slice` is the virtual rank being fed."""

    def __init__(self, layout: ExpertLayout, routing: ExpertRouting, local_expert: int, global_name: str, **kw):
        super().__init__(**kw)
        self.layout, self.routing, self.local_expert, self.global_name = layout, routing, local_expert, global_name
        self.expert_groups = layout.groups

    def add_to_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return out
        counts = self.routing.counts
        if counts is None:
            raise RuntimeError(f"{self.layer_name}: called outside its MoE layer (no routing captured)")
        counts = counts[:, self.local_expert].tolist()
        rows = x.numel() // x.shape[-1]
        if sum(counts) != rows:
            raise RuntimeError(f"{self.layer_name}: {rows} rows, but the dispatcher sent {counts} per source")
        slots = [self.layout.slot(s, self.active_slice) for s in range(len(counts))]
        factors = [f for p in self.parts for f in (self.a[p.name], self.b[p.name])]
        return _ExpertFactorGrad.apply(out, x, self, (counts, slots), *factors)


def build_expert_adapter(model: nn.Module, t: Target, config, groups: ParallelGroups, layouts: dict) -> ExpertAdapter:
    """The adapter of expert linear `t` (its layout and routing capture shared per MoE layer)."""
    m = EXPERT_LINEAR.match(t.name)
    if m is None:
        raise ConfigError("target_modules", f"{t.name}: an expert linear outside megatron-core's "
                                            "SequentialMLP layout (...experts.local_experts.<i>.linear_fc1/2)")
    moe = model.get_submodule(m.group("moe"))
    if id(moe) not in layouts:  # one layout per set of expert groups, one routing capture per layer
        key = (id(moe.token_dispatcher.tp_ep_group), id(moe.experts.dp_group))
        if key not in layouts:
            layouts[key] = expert_layout(moe, groups, config.virtual_ranks)
        layouts[id(moe)] = (layouts[key], ExpertRouting(moe, layouts[key]))
    layout, routing = layouts[id(moe)]
    local = int(m.group("index"))
    ep_rank = _rank(moe.token_dispatcher.ep_group)
    global_index = ep_rank * moe.token_dispatcher.num_local_experts + local
    # the global expert and the global layer (PP stage offset): the checkpoint key and the SVD seed
    global_name = global_layer_name(model, t.name.replace(f".local_experts.{local}.",
                                                          f".local_experts.{global_index}."))
    eg = layout.groups
    module = t.module
    return ExpertAdapter(
        layout, routing, local, global_name,
        layer_name=t.name, kind=t.kind, parts=t.parts, rank=config.rank, scale=config.scale,
        local_slices=layout.local_slices, num_slices=groups.dp_size * config.virtual_ranks,
        first_slice=eg.dp_rank * layout.local_slices, in_features_local=t.in_local,
        part_rows_local=t.rows_local, tp_group=eg.tp_group, tp_rank=eg.tp_rank, tp_size=eg.tp_size,
    ).to(device=module.weight.device)


def decompose_expert(ad: ExpertAdapter, t: Target, config) -> None:
    """Decompose each part of expert linear `t` on this rank (gathered over its expert-TP group;
    every replica computes the same factors: exact SVD, or a randomized one seeded by the expert's
    global name) and fill the adapter: all K slices in gather order, and its own."""
    g = ad.layout.groups
    order = torch.tensor(ad.layout.slice_order)
    for part, (m, n) in zip(t.parts, t.shapes):
        w = t.module.weight.detach()
        local = part.select(w) if t.kind == COLUMN else w
        full = local if g.tp_size == 1 else torch.cat(all_gather_list(local, g.tp_group, g.tp_size),
                                                       0 if t.kind == COLUMN else 1)
        seed = config.seed + zlib.crc32(f"{ad.global_name}:{part.name}".encode())
        u, s, v = top_singular(full, ad.num_slices * ad.rank, config.svd_method, config.svd_oversampling,
                               config.svd_niter, seed=seed)
        a, b = slice_factors(u, s, v, ad.num_slices, ad.rank)
        a_all, b_all = shard_factors(t.kind, a[order], b[order], g.tp_rank, g.tp_size)
        buf_a, buf_b = ad.all_factors(part.name)
        with torch.no_grad():
            buf_a.copy_(a_all)
            buf_b.copy_(b_all)
            lo, hi = ad.first_slice, ad.first_slice + ad.local_slices
            ad.a[part.name].copy_(a_all[lo:hi])
            ad.b[part.name].copy_(b_all[lo:hi])
