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
    """One (layer, part): where its rows sit in the local weight and how its update travels."""

    name: str
    module: nn.Module
    adapter: HDPiSSAAdapter
    part: object
    weight: torch.Tensor
    a: nn.Parameter
    b: nn.Parameter
    rows: torch.Tensor  # local weight rows of this part, in part order
    path: str = "factors"  # or "dense"
    block_sel: Optional[torch.Tensor] = None  # sharded master: positions of the part inside my block
    block_rows: Optional[torch.Tensor] = None  # ... and their rows in the master block


@dataclass
class _Master:
    """DP rank k's fp32 master of rows [lo, hi) of one weight (sharded-fp32 mode)."""

    weight: torch.Tensor
    lo: int
    hi: int
    block: int  # rows per DP rank (the last may be padded)
    data: torch.Tensor


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


# newer torch deprecates all_gather_into_tensor in favour of all_gather_single (same semantics)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _flat_all_gather(flat: torch.Tensor, groups: ParallelGroups, async_op: bool):
    out = torch.empty(groups.dp_size * flat.numel(), dtype=flat.dtype, device=flat.device)
    handle = _all_gather_flat(out, flat, group=groups.dp_group, async_op=async_op)
    return out.view(groups.dp_size, -1), handle


class HDPiSSAOptimizer(torch.optim.Optimizer):
    """AdamW on each rank's own factors (no data-parallel reduction of their gradients); every
    `step()` then merges `sum_k [(B_k - dB_k)(A_k - dA_k) - B_k A_k]` into each targeted weight,
    identically on all data-parallel ranks.

    Per layer the update travels as the deltas `dA_k, dB_k` (bucketed all-gather over DP,
    overlapped with the update GEMMs of the previous bucket; the factors themselves were gathered
    once at init) or, where `m n < K r (m + n)`, as a dense all-reduce of each rank's update.
    With bf16 weights the update accumulates in a DP-sharded fp32 master (each DP rank owns a
    row block; the low-precision blocks are all-gathered, the gather overlapped with the next
    forward as megatron-core's `overlap_param_gather` does) or in Kahan-compensated bf16.

    Other trainable parameters (e.g. unfrozen norms) are ordinary data parallel: gradients are
    averaged over the DP group, then AdamW. Parameter group 0 holds the factors, group 1 (if any)
    the other parameters, so LR schedulers work as usual.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, groups: Optional[ParallelGroups] = None,
                 master_weights: Optional[str] = None, aggregation: Optional[str] = None,
                 bucket_size: Optional[int] = None):
        if lr < 0:
            raise ValueError(f"--lr must be >= 0, got {lr}")
        cfg = getattr(model, "hd_pissa_config", None)
        entries = []
        for name, module, ad in iter_adapters(model):
            for part in ad.parts:
                rows = (torch.arange(module.weight.shape[0]) if part.rows is None else part.rows)
                entries.append(_Entry(name, module, ad, part, module.weight, ad.a[part.name], ad.b[part.name],
                                      rows.to(module.weight.device)))
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
        self.update_factors = bool(getattr(cfg, "update_factors", False))
        self.check_interval = int(getattr(cfg, "consistency_check_interval", 0))
        self.bucket_size = int(bucket_size or getattr(cfg, "bucket_size", 1 << 24))
        self.aggregation = aggregation or getattr(cfg, "aggregation", "auto")
        self.master_mode = self._resolve_master_mode(master_weights or getattr(cfg, "master_weights", "auto"))
        self.num_steps = 0
        self.last_step_bytes = {"deltas": 0, "dense": 0, "params": 0}
        self._choose_paths()
        self._weight_position = {id(w): i for i, w in enumerate(self._weights())}
        self.masters: list[_Master] = []
        self.compensation: list[torch.Tensor] = []
        self._pending: list = []
        self._hooks = []
        if self.master_mode == "sharded-fp32":
            self._init_masters()
        elif self.master_mode == "compensated-bf16":
            self.compensation = [torch.zeros_like(w) for w in self._weights()]

    # -- set-up ---------------------------------------------------------------------------------
    def _weights(self) -> list[torch.Tensor]:
        seen, out = set(), []
        for e in self.entries:
            if id(e.weight) not in seen:
                seen.add(id(e.weight))
                out.append(e.weight)
        return out

    def _resolve_master_mode(self, mode: str) -> str:
        dtypes = {w.dtype for w in self._weights()}
        if mode == "auto":
            return "fp32-base" if dtypes == {torch.float32} else "sharded-fp32"
        if mode == "fp32-base" and dtypes != {torch.float32}:
            raise ValueError(f"--hd-pissa-master-weights fp32-base needs fp32 weights, the targeted layers hold "
                             f"{sorted(map(str, dtypes))}; drop --bf16 or use sharded-fp32 / compensated-bf16")
        if mode not in ("fp32-base", "sharded-fp32", "compensated-bf16", "none"):
            raise ValueError(f"unknown --hd-pissa-master-weights {mode!r}")
        return mode

    def _choose_paths(self) -> None:
        for e in self.entries:
            k, m_loc, r = e.adapter.all_factors(e.part.name)[1].shape
            n_loc = e.a.shape[-1]
            if self.aggregation == "auto":
                e.path = "dense" if m_loc * n_loc < k * r * (m_loc + n_loc) else "factors"
            elif self.aggregation in ("factors", "dense"):
                e.path = self.aggregation
            else:
                raise ValueError(f"unknown --hd-pissa-aggregation {self.aggregation!r}")

    def _init_masters(self) -> None:
        g = self.groups
        index = {}
        for w in self._weights():
            block = -(-w.shape[0] // g.dp_size)
            lo, hi = min(g.dp_rank * block, w.shape[0]), min((g.dp_rank + 1) * block, w.shape[0])
            index[id(w)] = len(self.masters)
            self.masters.append(_Master(w, lo, hi, block, w.detach()[lo:hi].float().clone()))
        for e in self.entries:
            m = self.masters[index[id(e.weight)]]
            inside = (e.rows >= m.lo) & (e.rows < m.hi)
            e.block_sel = inside.nonzero().flatten()
            e.block_rows = e.rows[inside] - m.lo
        # overlap the parameter all-gather with the next forward: each layer waits for its bucket
        for module in {id(e.module): e.module for e in self.entries}.values():
            self._hooks.append(module.register_forward_pre_hook(self._wait_for_params))

    # -- state ----------------------------------------------------------------------------------
    def _state_for(self, p):
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def state_dict(self):
        self.finish_param_gather()
        sd = super().state_dict()
        sd["hd_pissa_num_steps"] = self.num_steps
        sd["hd_pissa_master_mode"] = self.master_mode
        sd["hd_pissa_masters"] = [m.data for m in self.masters]
        sd["hd_pissa_compensation"] = list(self.compensation)
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.num_steps = int(state_dict.pop("hd_pissa_num_steps", 0))
        mode = state_dict.pop("hd_pissa_master_mode", self.master_mode)
        masters = state_dict.pop("hd_pissa_masters", [])
        comp = state_dict.pop("hd_pissa_compensation", [])
        if mode != self.master_mode:
            raise ValueError(f"the checkpoint was written with --hd-pissa-master-weights {mode}, "
                             f"this run uses {self.master_mode}")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for m, saved in zip(self.masters, masters):
                m.data.copy_(saved)
            for c, saved in zip(self.compensation, comp):
                c.copy_(saved)
        if self.update_factors:
            self.refresh_gathered_factors()

    # -- step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.finish_param_gather()
        self.last_step_bytes = {"deltas": 0, "dense": 0, "params": 0}
        for group in self.param_groups:
            if group["hd_pissa"]:
                self._step_factors(group)
            else:
                self._step_others(group)
        if self.master_mode == "sharded-fp32":
            self._launch_param_gather()
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
        params = [p for e in self.entries for p in (e.a, e.b)]
        live = [p for p in params if p.grad is not None]
        deltas_live = _adam_deltas(live, [p.grad.float() for p in live], [self._state_for(p) for p in live],
                                   group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        by_id = {id(p): d for p, d in zip(live, deltas_live)}
        items = [(e, by_id.get(id(e.a), torch.zeros_like(e.a)), by_id.get(id(e.b), torch.zeros_like(e.b)))
                 for e in self.entries]
        self._aggregate_factors([it for it in items if it[0].path == "factors"])
        self._aggregate_dense([it for it in items if it[0].path == "dense"])

    # -- aggregation ----------------------------------------------------------------------------
    def _buckets(self, items, size_of):
        bucket, size = [], 0
        for item in items:
            n = size_of(item)
            if bucket and size + n > self.bucket_size:
                yield bucket
                bucket, size = [], 0
            bucket.append(item)
            size += n
        if bucket:
            yield bucket

    def _launch_deltas(self, bucket):
        flat = torch.cat([t.reshape(-1) for _, da, db in bucket for t in (da, db)])
        if self.groups.dp_size == 1:
            return flat.view(1, -1), None
        self.last_step_bytes["deltas"] += flat.numel() * flat.element_size()
        return _flat_all_gather(flat, self.groups, async_op=True)

    def _aggregate_factors(self, items):
        buckets = list(self._buckets(items, lambda it: it[1].numel() + it[2].numel()))
        pending = self._launch_deltas(buckets[0]) if buckets else None
        for i, bucket in enumerate(buckets):
            gathered, handle = pending
            if i + 1 < len(buckets):  # the next bucket's all-gather runs under these GEMMs
                pending = self._launch_deltas(buckets[i + 1])
            if handle is not None:
                handle.wait()
            off = 0
            for entry, da, db in bucket:
                na, nb = da.numel(), db.numel()
                d_a_all = gathered[:, off:off + na].reshape(-1, *da.shape[1:])
                d_b_all = gathered[:, off + na:off + na + nb].reshape(-1, *db.shape[1:])
                off += na + nb
                a_all, b_all = entry.adapter.all_factors(entry.part.name)
                self._apply_factors(entry, a_all, b_all, d_a_all, d_b_all)
                if self.update_factors:
                    a_all.sub_(d_a_all)
                    b_all.sub_(d_b_all)
                    entry.a.sub_(da)
                    entry.b.sub_(db)

    def _aggregate_dense(self, items):
        """Each rank's own update sum_l [(B_l - dB_l)(A_l - dA_l) - B_l A_l] (its local slices),
        summed over DP by one all-reduce per bucket."""
        for bucket in self._buckets(items, lambda it: it[0].rows.numel() * it[1].shape[-1]):
            updates = []
            for entry, da, db in bucket:
                ad = entry.adapter
                lo, hi = ad.first_slice, ad.first_slice + ad.local_slices
                a_all, b_all = ad.all_factors(entry.part.name)
                left, right = _left_right(a_all[lo:hi], b_all[lo:hi], da, db)
                updates.append(left @ right)
            flat = torch.cat([u.reshape(-1) for u in updates])
            if self.groups.dp_size > 1:
                self.last_step_bytes["dense"] += flat.numel() * flat.element_size()
                dist.all_reduce(flat, group=self.groups.dp_group)
            off = 0
            for (entry, da, db), u in zip(bucket, updates):
                total = flat[off:off + u.numel()].view_as(u)
                off += u.numel()
                self._apply_update(entry, total, rows_subset=entry.block_sel)
            if self.update_factors:
                self._all_gather_moved_factors(bucket)

    def _all_gather_moved_factors(self, bucket):
        flat = torch.cat([t.reshape(-1) for _, da, db in bucket for t in (da, db)])
        gathered = _flat_all_gather(flat, self.groups, False)[0] if self.groups.dp_size > 1 else flat.view(1, -1)
        off = 0
        for entry, da, db in bucket:
            na, nb = da.numel(), db.numel()
            a_all, b_all = entry.adapter.all_factors(entry.part.name)
            a_all.sub_(gathered[:, off:off + na].reshape(a_all.shape))
            b_all.sub_(gathered[:, off + na:off + na + nb].reshape(b_all.shape))
            off += na + nb
            entry.a.sub_(da)
            entry.b.sub_(db)

    def _apply_factors(self, entry: _Entry, a_all, b_all, d_a_all, d_b_all):
        left, right = _left_right(a_all, b_all, d_a_all, d_b_all)
        if entry.block_sel is not None:  # sharded master: only the rows of my block
            left = left.index_select(0, entry.block_sel)
        rng = entry.part.row_range if entry.part.rows is not None else (0, entry.weight.shape[0])
        if self.master_mode == "fp32-base" and rng is not None:  # in place, no m x n temporary
            entry.weight[rng[0]:rng[1]].addmm_(left, right, alpha=-1.0)
            return
        self._apply_update(entry, left @ right, rows_subset=None)

    def _apply_update(self, entry: _Entry, update: torch.Tensor, rows_subset):
        """Add `-update` (rows of the part, or of the part inside my master block) to where the
        weight's value accumulates in this master-weight mode."""
        w = entry.weight
        if self.master_mode == "sharded-fp32":
            if rows_subset is not None:
                update = update.index_select(0, rows_subset)
            master = self.masters[self._master_index(w)]
            master.data.index_add_(0, entry.block_rows, update, alpha=-1.0)
            return
        rng = entry.part.row_range if entry.part.rows is not None else (0, w.shape[0])
        if self.master_mode == "fp32-base" or (self.master_mode == "none" and w.dtype == torch.float32):
            if rng is not None:
                w[rng[0]:rng[1]].sub_(update)
            else:
                w.index_add_(0, entry.rows, update, alpha=-1.0)
        elif self.master_mode == "none":  # naive low precision: small updates round away
            w.index_copy_(0, entry.rows, (w.index_select(0, entry.rows).float() - update).to(w.dtype))
        else:  # Kahan-compensated bf16
            comp = self.compensation[self._weight_index(w)]
            w_rows = w.index_select(0, entry.rows).float()
            y = -update - comp.index_select(0, entry.rows).float()
            t = (w_rows + y).to(w.dtype)
            comp.index_copy_(0, entry.rows, ((t.float() - w_rows) - y).to(comp.dtype))
            w.index_copy_(0, entry.rows, t)

    def _master_index(self, w) -> int:
        return self._weight_position[id(w)]

    def _weight_index(self, w) -> int:
        return self._weight_position[id(w)]

    # -- sharded masters: parameter all-gather, overlapped with the next forward -----------------
    def _launch_param_gather(self) -> None:
        g = self.groups
        for bucket in self._buckets(self.masters, lambda m: m.block * m.weight.shape[1]):
            parts = []
            for m in bucket:
                blk = torch.zeros(m.block, m.weight.shape[1], dtype=m.weight.dtype, device=m.weight.device)
                blk[: m.hi - m.lo] = m.data.to(m.weight.dtype)
                parts.append(blk.reshape(-1))
            flat = torch.cat(parts)
            if g.dp_size == 1:
                self._pending.append(((flat.view(1, -1), None), bucket))
            else:
                self.last_step_bytes["params"] += flat.numel() * flat.element_size()
                self._pending.append((_flat_all_gather(flat, g, async_op=True), bucket))

    def _wait_for_params(self, module, args):
        if self._pending:
            self.finish_param_gather()

    @torch.no_grad()
    def finish_param_gather(self) -> None:
        """Wait for outstanding parameter all-gathers and write the gathered blocks into W."""
        while self._pending:
            (gathered, handle), bucket = self._pending.pop(0)
            if handle is not None:
                handle.wait()
            off = 0
            for m in bucket:
                rows_total, n = m.weight.shape
                size = m.block * n
                for j in range(gathered.shape[0]):
                    lo, hi = j * m.block, min((j + 1) * m.block, rows_total)
                    if hi > lo:
                        m.weight[lo:hi].copy_(gathered[j, off:off + (hi - lo) * n].view(hi - lo, n))
                off += size

    # -- reliability ----------------------------------------------------------------------------
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
                    _all_gather_flat(full, local.detach().contiguous(), group=g.dp_group)

    @torch.no_grad()
    def check_consistency(self) -> None:
        """Fail loudly, naming the layer, if data-parallel ranks hold different weights."""
        g = self.groups
        if g.dp_size == 1:
            return
        self.finish_param_gather()
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


def _left_right(a, b, d_a, d_b):
    """sum_k [(B_k - dB_k)(A_k - dA_k) - B_k A_k] = -[dB | B - dB] @ [A ; dA]: returns the two
    factors of that product, so W -= left @ right is one GEMM with inner dimension 2kr and no
    cancellation between two large products."""
    k, m, r = b.shape
    left = torch.cat([d_b, b - d_b], 0).permute(1, 0, 2).reshape(m, 2 * k * r)
    right = torch.cat([a, d_a], 0).reshape(2 * k * r, -1)
    return left, right
