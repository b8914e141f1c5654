"""HDPiSSAOptimizer: per-rank AdamW on the factors, then the summed low-rank update merged into W."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .adapter import HDPiSSAAdapter
from .apply import iter_adapters
from .distributed import ParallelGroups


@dataclass
class _Entry:
    """One (layer, part) whose deltas travel in the aggregation all-gather."""

    name: str
    adapter: HDPiSSAAdapter
    part: object
    weight: torch.Tensor
    a: nn.Parameter
    b: nn.Parameter


def _adam_deltas(params, grads, states, lr, beta1, beta2, eps, weight_decay):
    """What AdamW would subtract from each parameter (torch.optim.AdamW's formula), updating the
    moments in place. Returns one step tensor per parameter."""
    deltas = []
    for p, g, st in zip(params, grads, states):
        st["step"] += 1
        step = st["step"]
        exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias1 = 1 - beta1 ** step
        bias2 = 1 - beta2 ** step
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
        delta = exp_avg / denom
        delta.mul_(lr / bias1)
        if weight_decay:
            delta.add_(p.detach(), alpha=lr * weight_decay)
        deltas.append(delta)
    return deltas


class HDPiSSAOptimizer(torch.optim.Optimizer):
    """AdamW on each rank's own factors (no data-parallel reduction of their gradients); every
    `step()` then merges `sum_k [(B_k - dB_k)(A_k - dA_k) - B_k A_k]` into each targeted weight,
    identically on all data-parallel ranks. Only the deltas `dA_k, dB_k` travel (one bucketed
    all-gather over the DP group); the factors of all ranks were gathered at init.

    Other trainable parameters (e.g. unfrozen norms) are ordinary data parallel: gradients are
    averaged over the DP group, then AdamW.

    Parameter group 0 holds the factors, group 1 (if any) the other parameters, so LR
    schedulers (`torch.optim.lr_scheduler`, megatron's) work as usual.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, bucket_size: int = 1 << 24,
                 groups: Optional[ParallelGroups] = None):
        if lr < 0:
            raise ValueError(f"--lr must be >= 0, got {lr}")
        entries = []
        for name, module, ad in iter_adapters(model):
            for part in ad.parts:
                entries.append(_Entry(name, ad, part, module.weight, ad.a[part.name], ad.b[part.name]))
        if not entries:
            raise ValueError("the model has no HD-PiSSA adapters: call apply_hd_pissa(model, config) first")
        factor_ids = {id(e.a) for e in entries} | {id(e.b) for e in entries}
        factors = [p for e in entries for p in (e.a, e.b)]
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in factor_ids]
        param_groups = [{"params": factors, "hd_pissa": True}]
        if others:
            param_groups.append({"params": others, "hd_pissa": False})
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(param_groups, defaults)
        self.model = model
        self.entries = entries
        self.groups = groups or getattr(model, "hd_pissa_groups", None) or ParallelGroups.from_megatron()
        cfg = getattr(model, "hd_pissa_config", None)
        self.update_factors = bool(getattr(cfg, "update_factors", False))
        self.check_interval = int(getattr(cfg, "consistency_check_interval", 0))
        self.bucket_size = bucket_size
        self.num_steps = 0
        self.last_step_bytes = 0

    # -- state ------------------------------------------------------------------------------
    def _state_for(self, p):
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def state_dict(self):
        sd = super().state_dict()
        sd["hd_pissa_num_steps"] = self.num_steps
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.num_steps = int(state_dict.pop("hd_pissa_num_steps", 0))
        super().load_state_dict(state_dict)
        if self.update_factors:
            self.refresh_gathered_factors()

    # -- step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["hd_pissa"]:
                self._step_factors(group)
            else:
                self._step_others(group)
        self.num_steps += 1
        if self.check_interval and self.num_steps % self.check_interval == 0:
            self.check_consistency()
        return loss

    def _step_others(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        g = self.groups
        if g.dp_size > 1:
            flat = torch.cat([x.reshape(-1).float() for x in grads])
            dist.all_reduce(flat, group=g.dp_group)
            flat.div_(g.dp_size)
            off = 0
            for x in grads:
                x.copy_(flat[off:off + x.numel()].view_as(x))
                off += x.numel()
        beta1, beta2 = group["betas"]
        deltas = _adam_deltas(params, [x.float() for x in grads], [self._state_for(p) for p in params],
                              group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        for p, d in zip(params, deltas):
            p.sub_(d.to(p.dtype))

    def _step_factors(self, group):
        beta1, beta2 = group["betas"]
        entries = self.entries
        params = [p for e in entries for p in (e.a, e.b)]
        has_grad = [p.grad is not None for p in params]
        live = [p for p, h in zip(params, has_grad) if h]
        deltas_live = _adam_deltas(live, [p.grad.float() for p in live], [self._state_for(p) for p in live],
                                   group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        it = iter(deltas_live)
        deltas = [next(it) if h else torch.zeros_like(p) for p, h in zip(params, has_grad)]
        self._aggregate(list(zip(entries, deltas[0::2], deltas[1::2])))

    # -- aggregation ------------------------------------------------------------------------
    def _buckets(self, items):
        bucket, size = [], 0
        for item in items:
            n = item[1].numel() + item[2].numel()
            if bucket and size + n > self.bucket_size:
                yield bucket
                bucket, size = [], 0
            bucket.append(item)
            size += n
        if bucket:
            yield bucket

    def _launch(self, bucket):
        g = self.groups
        flat = torch.cat([t.reshape(-1) for _, da, db in bucket for t in (da, db)])
        if g.dp_size == 1:
            return flat.view(1, -1), None
        out = torch.empty(g.dp_size * flat.numel(), dtype=flat.dtype, device=flat.device)
        handle = dist.all_gather_into_tensor(out, flat, group=g.dp_group, async_op=True)
        self.last_step_bytes += flat.numel() * flat.element_size()
        return out.view(g.dp_size, -1), handle

    def _aggregate(self, items):
        self.last_step_bytes = 0
        buckets = list(self._buckets(items))
        pending = self._launch(buckets[0]) if buckets else None
        for i, bucket in enumerate(buckets):
            gathered, handle = pending
            if i + 1 < len(buckets):  # overlap the next bucket's all-gather with these GEMMs
                pending = self._launch(buckets[i + 1])
            if handle is not None:
                handle.wait()
            off = 0
            for entry, da, db in bucket:
                na, nb = da.numel(), db.numel()
                d_a_all = gathered[:, off:off + na].reshape(-1, *da.shape[1:])
                d_b_all = gathered[:, off + na:off + na + nb].reshape(-1, *db.shape[1:])
                off += na + nb
                self._merge(entry, d_a_all, d_b_all, da, db)

    def _merge(self, entry: _Entry, d_a_all, d_b_all, da_local, db_local):
        """W += sum_k [(B_k - dB_k)(A_k - dA_k) - B_k A_k] = -[dB | B - dB] @ [A ; dA]: one GEMM
        with inner dimension 2Kr and no cancellation between two large products."""
        a_all, b_all = entry.adapter.all_factors(entry.part.name)
        k, m, r = b_all.shape
        left = torch.cat([d_b_all, b_all - d_b_all], 0).permute(1, 0, 2).reshape(m, 2 * k * r)
        right = torch.cat([a_all, d_a_all], 0).reshape(2 * k * r, -1)
        w = entry.weight
        part = entry.part
        if w.dtype == torch.float32 and (part.rows is None or part.row_range is not None):
            part.select(w).addmm_(left, right, alpha=-1.0)
        else:
            update = (left @ right).neg_()
            if part.rows is None:
                w.copy_((w.float() + update).to(w.dtype))
            else:
                rows = part.rows.to(w.device)
                w.index_copy_(0, rows, (w.index_select(0, rows).float() + update).to(w.dtype))
        if self.update_factors:
            a_all.sub_(d_a_all)
            b_all.sub_(d_b_all)
            entry.a.sub_(da_local)
            entry.b.sub_(db_local)

    # -- reliability ------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_gathered_factors(self) -> None:
        """Re-gather all slices' factors from the local parameters (after loading moved factors)."""
        g = self.groups
        for e in self.entries:
            a_all, b_all = e.adapter.all_factors(e.part.name)
            for local, full in ((e.a, a_all), (e.b, b_all)):
                if g.dp_size == 1:
                    full.copy_(local)
                else:
                    dist.all_gather_into_tensor(full, local.detach().contiguous(), group=g.dp_group)

    @torch.no_grad()
    def check_consistency(self) -> None:
        """Fail loudly, naming the layer, if data-parallel ranks hold different weights."""
        g = self.groups
        if g.dp_size == 1:
            return
        names, prints = [], []
        seen = set()
        for e in self.entries:
            if id(e.weight) in seen:
                continue
            seen.add(id(e.weight))
            w = e.weight.detach().double().reshape(-1)
            idx = torch.arange(w.numel(), device=w.device, dtype=torch.float64).remainder_(1009)
            prints.append(torch.stack([w.sum(), (w * w).sum(), (w * idx).sum()]))
            names.append(e.name)
        local = torch.stack(prints)
        gathered = [torch.empty_like(local) for _ in range(g.dp_size)]
        dist.all_gather(gathered, local, group=g.dp_group)
        for rank, other in enumerate(gathered):
            diff = (other != local).any(dim=1)
            if bool(diff.any()):
                i = int(diff.nonzero()[0])
                raise RuntimeError(
                    f"data-parallel divergence after optimizer step {self.num_steps}: layer "
                    f"{names[i]} differs between DP rank {g.dp_rank} and DP rank {rank}"
                )
