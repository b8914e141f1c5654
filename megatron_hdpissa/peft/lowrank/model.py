"""LoRA and PiSSA baselines on the same megatron-core parallel layers: identical adapters on every
data-parallel rank, forward `W_res x + s B A x`, gradients averaged over DP."""
from __future__ import annotations

import functools
import math
import re
import zlib
from typing import Optional

import torch
from torch import nn

from megatron_hdpissa.peft.hd_pissa.layer import COLUMN, ROW
from megatron_hdpissa.peft.hd_pissa.model import check_components, find_targets, freeze_base
from megatron_hdpissa.peft.hd_pissa.config import HDPiSSAConfig
from megatron_hdpissa.peft.decomposition import Unit, decompose_units
from megatron_hdpissa.distributed.groups import ParallelGroups, average_over_dp_, grads_for_norm, squared_norms
from megatron_hdpissa.models.recompute import ensure_block_input_requires_grad

LORA, PISSA = "lora", "pissa"


class LowRankAdapter(nn.Module):
    """Trainable `A_p` (r x n_local) and `B_p` (m_local x r) per part, registered as the `lora`
    child of the base layer; the forward hook adds `s B A x` with megatron-core's TP mappings."""

    def __init__(self, layer_name, kind, parts, rank, scale, in_local, rows_local, tp_group, tp_size,
                 gather_output, sequence_parallel=False):
        super().__init__()
        self.layer_name, self.kind, self.parts = layer_name, kind, parts
        self.rank, self.scale = rank, scale
        self.tp_group, self.tp_size, self.gather_output = tp_group, tp_size, gather_output
        self.sequence_parallel = sequence_parallel
        self.scatter_input = False  # row-parallel layer that splits its full input itself
        self.a = nn.ParameterDict({p.name: nn.Parameter(torch.zeros(rank, in_local)) for p in parts})
        self.b = nn.ParameterDict({p.name: nn.Parameter(torch.zeros(m, rank)) for p, m in zip(parts, rows_local)})
        self.out_local = sum(rows_local) if parts[0].rows is not None else rows_local[0]
        for p in parts:  # TP shards (for gradient-norm clipping): column-parallel B, row-parallel A
            self.b[p.name].tensor_model_parallel = kind == COLUMN and tp_size > 1
            self.a[p.name].tensor_model_parallel = kind != COLUMN and tp_size > 1

    def thin_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, B) with `s B A x = h @ B^T`: h = s x A^T (tokens x P r, TP-reduced as the layout
        needs) and B the parts' factors placed in their local output rows (m_local x P r), so the
        adapter adds one thin GEMM and no full-size temporaries."""
        from megatron.core.tensor_parallel import mappings

        g, dtype = self.tp_group, x.dtype
        sp = self.sequence_parallel and self.tp_size > 1
        if self.kind == COLUMN:
            a_cat = torch.cat([self.a[p.name] for p in self.parts], 0).to(dtype)
            if sp:
                # x is this rank's sequence shard: gather the thin h over the sequence (backward:
                # reduce-scatter of dL/dh, summed over TP); dL/dA then covers only local tokens,
                # so A (replicated) gets its gradient summed over TP in backward.
                a_cat = mappings.copy_to_tensor_model_parallel_region(a_cat, group=g)
                h = mappings.gather_from_sequence_parallel_region(
                    (x @ a_cat.t()) * self.scale, tensor_parallel_output_grad=True, group=g)
            else:
                # dL/dh differs per TP rank (B is row-sharded): sum it over TP in backward
                h = mappings.copy_to_tensor_model_parallel_region((x @ a_cat.t()) * self.scale, group=g)
            if self.parts[0].rows is None:
                return h, self.b[self.parts[0].name].to(dtype)
            placed = [torch.zeros(self.out_local, self.rank, dtype=dtype, device=x.device)
                      .index_copy(0, p.rows.to(x.device), self.b[p.name].to(dtype)) for p in self.parts]
            return h, torch.cat(placed, 1)
        (p,) = self.parts
        if self.scatter_input and self.tp_size > 1:
            x = mappings.scatter_to_tensor_model_parallel_region(x, group=g)
        if sp:
            # The output is reduce-scattered along the sequence: h likewise, and B (replicated)
            # then sees only local tokens, so its gradient is summed over TP in backward.
            h = mappings.reduce_scatter_to_sequence_parallel_region(
                (x @ self.a[p.name].to(dtype).t()) * self.scale, group=g)
            return h, mappings.copy_to_tensor_model_parallel_region(self.b[p.name], group=g).to(dtype)
        h = mappings.reduce_from_tensor_model_parallel_region((x @ self.a[p.name].to(dtype).t()) * self.scale, group=g)
        return h, self.b[p.name].to(dtype)

    def add_to_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + s B A x, as one addmm on the thin factors."""
        from megatron.core.tensor_parallel import mappings

        h, b = self.thin_factors(x)
        if self.kind == COLUMN and self.gather_output and self.tp_size > 1:
            delta = mappings.gather_from_tensor_model_parallel_region(h @ b.t(), group=self.tp_group)
            return out + delta
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t()).view_as(out)

    @torch.no_grad()
    def merged_delta(self, part) -> torch.Tensor:
        """s B A of one part, in the local weight's row layout of that part."""
        return (self.b[part.name] @ self.a[part.name]) * self.scale


def _hook(module, args, kwargs, output):
    x = args[0] if args else kwargs.get("input_", kwargs.get("input"))
    out, bias = output if isinstance(output, tuple) else (output, None)
    out = module.lora.add_to_output(out, x)
    return (out, bias) if isinstance(output, tuple) else out


def global_layer_name(model: nn.Module, name: str) -> str:
    """`name` with a pipeline stage's local `decoder.layers.<i>` index replaced by the global one
    (megatron-core's `layer_number`, 1-based)."""
    m = re.search(r"(^|\.)decoder\.layers\.(\d+)\.", name)
    if m is None:
        return name
    layers = model.get_submodule(name[:m.end() - 1].rsplit(".", 1)[0])
    number = getattr(layers[int(m.group(2))], "layer_number", int(m.group(2)) + 1)
    return f"{name[:m.start(2)]}{number - 1}{name[m.end(2):]}"


def apply_lowrank(model: nn.Module, config: HDPiSSAConfig, method: str,
                  groups: Optional[ParallelGroups] = None, progress: bool = True,
                  decompose: bool = True) -> nn.Module:
    """LoRA (Kaiming-uniform A, zero B) or PiSSA (A, B from the top-r singular components,
    scaled so that s B A equals them, and W_res = W - s B A) on the matching parallel linears.
    Uses the same targets, fused-layer parts and scale `s = alpha / r` as HD-PiSSA.
    `decompose=False` (resuming) leaves W untouched; factors and W_res come from the checkpoint."""
    if method not in (LORA, PISSA):
        raise ValueError(f"--peft must be one of hd-pissa, {PISSA}, {LORA}, full; got {method!r}")
    groups = groups or ParallelGroups.from_megatron()
    targets = find_targets(model, config.target_modules, groups.tp_size, config.fused_decomposition)
    freeze_base(model, config.trainable_modules)
    units = []
    for t in targets:
        module = t.module
        ad = LowRankAdapter(t.name, t.kind, t.parts, config.rank, config.scale, t.in_local, t.rows_local,
                            groups.tp_group, groups.tp_size, bool(getattr(module, "gather_output", False)),
                            bool(getattr(module, "sequence_parallel", False)))
        ad.to(device=module.weight.device)
        ad.scatter_input = t.kind == ROW and not getattr(module, "input_is_parallel", True)
        module.add_module("lora", ad)
        module._lora_hook = module.register_forward_hook(_hook, with_kwargs=True)
        module.weight.requires_grad_(False)
        for part, (m, n) in zip(t.parts, t.shapes):
            if method == LORA:
                # Full-size A drawn identically on every rank, then sharded like the weight; the
                # stream is keyed by the layer's global name, so every pipeline layout draws the
                # same A for the same layer.
                gen = torch.Generator().manual_seed(
                    config.seed + zlib.crc32(f"{global_layer_name(model, t.name)}/{part.name}".encode()))
                a_full = torch.empty(config.rank, n)
                nn.init.kaiming_uniform_(a_full, a=math.sqrt(5), generator=gen)
                _load_part(ad, part.name, t.kind, groups, a_full, None)
            else:
                check_components(t, config.rank, "--hd-pissa-rank")
                fill = functools.partial(_fill_pissa, ad, module.weight, part, t.kind, groups)
                units.append(Unit(t.kind, module.weight, part, m, n, config.rank, fill))
    if units and decompose:
        decompose_units(units, groups, config.svd_method, config.svd_oversampling, config.svd_niter,
                        config.seed, progress=progress)
    model.hd_pissa_config = config
    model.hd_pissa_groups = groups
    model.peft_method = method
    ensure_block_input_requires_grad(model)
    return model


def _load_part(ad: LowRankAdapter, part: str, kind: str, groups: ParallelGroups, a_full, b_full):
    t, tp = groups.tp_rank, groups.tp_size
    with torch.no_grad():
        if kind == COLUMN:
            ad.a[part].copy_(a_full)
            if b_full is not None:
                m_t = b_full.shape[0] // tp
                ad.b[part].copy_(b_full[t * m_t:(t + 1) * m_t])
        else:
            n_t = a_full.shape[1] // tp
            ad.a[part].copy_(a_full[:, t * n_t:(t + 1) * n_t])
            if b_full is not None:
                ad.b[part].copy_(b_full)


def _fill_pissa(ad: LowRankAdapter, weight, part, kind, groups, u, s, v):
    sq = (s.clamp_min(0) / ad.scale).sqrt()
    _load_part(ad, part.name, kind, groups, sq[:, None] * v.t(), u * sq[None, :])
    with torch.no_grad():  # W_res = W - s B A on this rank's shard
        delta = ad.merged_delta(part)
        if part.rows is None:
            weight.sub_(delta.to(weight.dtype))
        else:
            rows = part.rows.to(weight.device)
            weight.index_copy_(0, rows, weight.index_select(0, rows) - delta.to(weight.dtype))


def iter_lowrank(model: nn.Module):
    for name, module in model.named_modules():
        ad = module._modules.get("lora") if hasattr(module, "_modules") else None
        if isinstance(ad, LowRankAdapter):
            yield name, module, ad


@torch.no_grad()
def merge_lowrank(model: nn.Module) -> nn.Module:
    """Fold s B A into each base weight and remove the adapters (for export)."""
    for _, module, ad in list(iter_lowrank(model)):
        w = module.weight
        for part in ad.parts:
            delta = ad.merged_delta(part).to(w.dtype)
            if part.rows is None:
                w.add_(delta)
            else:
                rows = part.rows.to(w.device)
                w.index_copy_(0, rows, w.index_select(0, rows) + delta)
        module._lora_hook.remove()
        del module._lora_hook
        del module._modules["lora"]
    return model


class DataParallelAdamW(torch.optim.AdamW):
    """torch AdamW after averaging gradients over the data-parallel group (one flat all-reduce)
    and, with `clip_grad` > 0, clipping their global L2 norm (TP shards summed over TP, tensors
    replicated over TP counted once): the optimizer for LoRA, PiSSA and full fine-tuning
    baselines in the same trainer."""

    def __init__(self, params, groups: Optional[ParallelGroups] = None, clip_grad: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.groups = groups or ParallelGroups.from_megatron()
        self.clip_grad = float(clip_grad)
        self.last_step_bytes = 0
        self.last_grad_norm: Optional[float] = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        self.last_step_bytes = average_over_dp_(grads, self.groups)
        if self.clip_grad > 0:  # on every rank: the norm's all-reduce spans the pipeline stages
            sq = squared_norms([grads_for_norm(params, grads)], self.groups)
            self.last_grad_norm = float(sq[0].sqrt())
            coef = self.clip_grad / (self.last_grad_norm + 1e-6)
            if coef < 1.0:
                for x in grads:
                    x.mul_(coef)
        return super().step(closure)
