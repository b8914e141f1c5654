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
from .ddp import build_others_optimizer, factor_gradient_prescale, is_megatron_ddp
from .distributed import ParallelGroups, average_over_dp_, squared_norms


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
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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
    once at init) or, where `m n < K r (m + n)`, as a dense all-reduce of each rank's update
    (a reduce-scatter of row blocks with sharded masters).
    With bf16 weights the update accumulates in a DP-sharded fp32 master (each DP rank owns a
    row block; the low-precision blocks are all-gathered, the gather overlapped with the next
    forward as megatron-core's `overlap_param_gather` does) or in Kahan-compensated bf16.

    Other trainable parameters (e.g. unfrozen norms) are ordinary data parallel: gradients are
    averaged over the DP group, then AdamW (no weight decay on 1-D parameters, as megatron-core).
    Parameter group 0 holds the factors, group 1 (if any) the other parameters, so LR schedulers
    work as usual.

    `model` may be wrapped in megatron-core's `DistributedDataParallel` (`ddp.wrap_ddp`): then the
    gradients come from DDP's buffers (`main_grad`; call `ddp.finish_grad_sync()` before `step`),
    the other parameters' averaging is DDP's, and with `others_optimizer` "auto" (on CUDA, or
    with fp32 parameters) or "megatron" they are stepped by megatron-core's optimizer.

    `clip_grad` > 0 clips the L2 norm of the gradient of the whole HD-PiSSA model (every DP
    rank's factors plus the averaged other parameters; one coefficient on every rank).
    `grad_scaler` (fp16; megatron-core's `DynamicGradScaler` or `ConstantGradScaler`): backward
    on `scale_loss(loss)`; `step` unscales, and an overflow on any rank skips the step on every
    rank (`last_step_skipped`) and backs the scale off.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, groups: Optional[ParallelGroups] = None,
                 master_weights: Optional[str] = None, aggregation: Optional[str] = None,
                 bucket_size: Optional[int] = None, clip_grad: float = 0.0, grad_scaler=None,
                 others_optimizer: str = "auto"):
        if lr < 0:
            raise ValueError(f"--lr must be >= 0, got {lr}")
        if clip_grad is None or clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0 (0 disables clipping), got {clip_grad}")
        self.ddp = None
        if is_megatron_ddp(model):  # megatron-core DDP: gradients arrive in param.main_grad
            self.ddp, model = model, model.module
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
        self.clip_grad = float(clip_grad)
        self.grad_scaler = grad_scaler
        self.last_grad_norm: Optional[float] = None
        self.track_grad_norm = False  # compute last_grad_norm even without clipping / loss scaling
        self.last_step_skipped = False
        self.skipped_steps = 0
        # DDP pre-scales the factors' gradients by 1/dp (it assumes a DP-averaged loss): undo it
        self._factor_grad_unscale = 1.0 / factor_gradient_prescale(self.ddp) if self.ddp is not None else 1.0
        if others_optimizer == "megatron" and self.ddp is None:
            raise ValueError("others_optimizer='megatron' needs a model wrapped with megatron_hdpissa.ddp.wrap_ddp")
        self.others_optimizer = None  # megatron-core's optimizer for the non-factor parameters
        if self.ddp is not None:
            self.others_optimizer = build_others_optimizer(self.ddp, lr, weight_decay, betas, eps, others_optimizer)
        elif others_optimizer not in ("auto", "builtin"):
            raise ValueError(f"others_optimizer must be auto, megatron or builtin, got {others_optimizer!r}")
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
        sd["hd_pissa_skipped_steps"] = self.skipped_steps
        if self.grad_scaler is not None:
            sd["hd_pissa_grad_scaler"] = _scaler_state(self.grad_scaler)
        if self.others_optimizer is not None:
            sd["hd_pissa_others_optimizer"] = self.others_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.num_steps = int(state_dict.pop("hd_pissa_num_steps", 0))
        mode = state_dict.pop("hd_pissa_master_mode", self.master_mode)
        masters = state_dict.pop("hd_pissa_masters", [])
        comp = state_dict.pop("hd_pissa_compensation", [])
        self.skipped_steps = int(state_dict.pop("hd_pissa_skipped_steps", 0))
        scaler_state = state_dict.pop("hd_pissa_grad_scaler", None)
        others_state = state_dict.pop("hd_pissa_others_optimizer", None)
        if scaler_state is not None and self.grad_scaler is not None:
            _load_scaler_state(self.grad_scaler, scaler_state)
        if others_state is not None and self.others_optimizer is not None:
            self.others_optimizer.load_state_dict(others_state)
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

    # -- gradients --------------------------------------------------------------------------------
    def _grad(self, p: torch.Tensor, factor: bool) -> Optional[torch.Tensor]:
        """The gradient the update uses: `param.grad`, or under megatron-core DDP `param.main_grad`
        (the factors' with DDP's 1/dp pre-scaling undone). Modified in place by unscaling and
        clipping, so megatron-core's optimizer sees the same gradients."""
        if self.ddp is not None and getattr(p, "main_grad", None) is not None:
            g = p.main_grad
            if factor and self._factor_grad_unscale != 1.0:
                g.mul_(self._factor_grad_unscale)
            return g
        return p.grad

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: multiplied by the loss scale when a grad scaler is set
        (fp16), as megatron-core's `optimizer.scale_loss`."""
        return loss * self.grad_scaler.scale if self.grad_scaler is not None else loss

    def _grad_norm(self, factor_grads, other_params, other_grads) -> float:
        """L2 norm of the gradient of the whole HD-PiSSA model: every DP rank's factors (each
        rank's own) and the ordinary parameters (DP-averaged, counted once), TP shards summed
        over TP. The same value on every rank; non-finite if any rank's gradient is."""
        g = self.groups
        others = [(bool(getattr(p, "tensor_model_parallel", False)), x) for p, x in zip(other_params, other_grads)]
        sq = squared_norms([factor_grads, others], g)
        factors = sq[:1].clone()
        if g.dp_size > 1:
            dist.all_reduce(factors, group=g.dp_group)
        return float((factors[0] + sq[1]).sqrt())

    def _factor_grads(self):
        """(is sharded over TP, gradient) for each factor that received a gradient; the column-
        parallel B and row-parallel A are TP shards, the other factor is replicated."""
        out = []
        for e in self.entries:
            column = e.adapter.kind == "column"
            for p, sharded in ((e.a, not column), (e.b, column)):
                x = self._grad(p, factor=True)
                if x is not None:
                    out.append((p, sharded and e.adapter.tp_size > 1, x))
        return out

    # -- step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step: (fp16) unscale and skip on overflow anywhere, clip the global norm,
        AdamW on the factors and the other parameters, merge the summed update into W."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.finish_param_gather()
        self.last_step_bytes = {"deltas": 0, "dense": 0, "params": 0}
        factor_grads = self._factor_grads()
        others = [p for gr in self.param_groups if not gr["hd_pissa"] for p in gr["params"]]
        other_pairs = [(p, self._grad(p, factor=False)) for p in others]
        other_pairs = [(p, x) for p, x in other_pairs if x is not None]
        if self.ddp is None:  # megatron-core DDP has averaged them already
            average_over_dp_([x for _, x in other_pairs], self.groups)
        all_grads = [x for _, _, x in factor_grads] + [x for _, x in other_pairs]
        self.last_step_skipped = False
        if self.grad_scaler is not None:
            inv = float(self.grad_scaler.inv_scale)
            for x in all_grads:
                x.mul_(inv)
        if self.clip_grad > 0 or self.grad_scaler is not None or self.track_grad_norm:
            norm = self._grad_norm([(sh, x) for _, sh, x in factor_grads], [p for p, _ in other_pairs],
                                   [x for _, x in other_pairs])
            self.last_grad_norm = norm
            finite = math.isfinite(norm)  # global: an overflow on any rank shows on every rank
            if self.grad_scaler is not None:
                self.grad_scaler.update(not finite)
            if not finite:  # every rank skips: the merged update needs every rank's deltas
                self.last_step_skipped = True
                self.skipped_steps += 1
                return loss
            coef = self.clip_grad / (norm + 1e-6)
            if self.clip_grad > 0 and coef < 1.0:
                for x in all_grads:
                    x.mul_(coef)
        for group in self.param_groups:
            if group["hd_pissa"]:
                self._step_factors(group, {id(p): x for p, _, x in factor_grads})
            else:
                self._step_others(group, dict((id(p), x) for p, x in other_pairs))
        if self.master_mode == "sharded-fp32":
            self._launch_param_gather()
        self.num_steps += 1
        if self.check_interval and self.num_steps % self.check_interval == 0:
            self.check_consistency()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none=set_to_none)
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()

    def _step_others(self, group, grads_by_id):
        params = [p for p in group["params"] if id(p) in grads_by_id]
        if not params:
            return
        if self.others_optimizer is not None:  # megatron-core's optimizer, at this group's lr
            for g in self.others_optimizer.param_groups:
                g["lr"] = group["lr"]
            self.others_optimizer.step()
            return
        beta1, beta2 = group["betas"]
        # as megatron-core: no weight decay on biases and norms (1-D parameters)
        for subset, wd in (([p for p in params if p.ndim > 1], group["weight_decay"]),
                           ([p for p in params if p.ndim <= 1], 0.0)):
            deltas = _adam_deltas(subset, [grads_by_id[id(p)].float() for p in subset],
                                  [self._state_for(p) for p in subset], group["lr"], beta1, beta2,
                                  group["eps"], wd)
            for p, d in zip(subset, deltas):
                p.sub_(d.to(p.dtype))

    def _step_factors(self, group, grads_by_id):
        beta1, beta2 = group["betas"]
        params = [p for e in self.entries for p in (e.a, e.b)]
        live = [p for p in params if id(p) in grads_by_id]
        deltas_live = _adam_deltas(live, [grads_by_id[id(p)].float() for p in live],
                                   [self._state_for(p) for p in live],
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
        summed over DP by one all-reduce per bucket; with sharded masters by one reduce-scatter,
        each rank receiving the sum for its own row block only."""
        if self.master_mode == "sharded-fp32" and self.groups.dp_size > 1:
            self._aggregate_dense_sharded(items)
            return
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

    def _aggregate_dense_sharded(self, items):
        """Dense path with sharded masters: the updates of a bucket's parts are placed in their
        weights' rows (padded to DP x block rows), reduce-scattered over DP, and each rank adds
        the summed rows of its block to its fp32 master."""
        g = self.groups
        for bucket in self._buckets(items, lambda it: it[0].rows.numel() * it[1].shape[-1]):
            buffers: dict[int, tuple[_Master, torch.Tensor]] = {}
            for entry, da, db in bucket:
                ad = entry.adapter
                lo, hi = ad.first_slice, ad.first_slice + ad.local_slices
                a_all, b_all = ad.all_factors(entry.part.name)
                left, right = _left_right(a_all[lo:hi], b_all[lo:hi], da, db)
                m = self.masters[self._master_index(entry.weight)]
                if id(entry.weight) not in buffers:
                    buf = torch.zeros(g.dp_size * m.block, entry.weight.shape[1], device=left.device,
                                      dtype=torch.float32)
                    buffers[id(entry.weight)] = (m, buf)
                buffers[id(entry.weight)][1].index_add_(0, entry.rows, left @ right)
            flat = torch.cat([buf.view(g.dp_size, -1) for _, buf in buffers.values()], 1)
            mine = torch.empty(flat.shape[1], dtype=flat.dtype, device=flat.device)
            self.last_step_bytes["dense"] += flat.numel() * flat.element_size()
            _reduce_scatter_flat(mine, flat.reshape(-1), group=g.dp_group)
            off = 0
            for m, buf in buffers.values():
                n = buf.shape[1]
                m.data.sub_(mine[off:off + (m.hi - m.lo) * n].view(m.hi - m.lo, n))
                off += m.block * n
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
        """Forward pre-hook of each targeted layer: wait only for the bucket holding its weight
        (and the buckets launched before it), so later buckets keep gathering under this layer's
        forward."""
        if self._pending:
            self.finish_param_gather(upto=module.weight)

    @torch.no_grad()
    def finish_param_gather(self, upto: Optional[torch.Tensor] = None) -> None:
        """Wait for outstanding parameter all-gathers and write the gathered blocks into W: all of
        them, or with `upto` (a weight) those launched up to the bucket that holds it."""
        if upto is not None and not any(m.weight is upto for _, bucket in self._pending for m in bucket):
            return
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
            if upto is not None and any(m.weight is upto for m in bucket):
                return

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


def _scaler_state(scaler) -> dict:
    """A megatron-core grad scaler's state, device-independent."""
    sd = dict(scaler.state_dict()) if hasattr(scaler, "state_dict") else {}
    sd["scale"] = scaler.scale.detach().float().cpu().clone()
    return sd


def _load_scaler_state(scaler, sd: dict) -> None:
    """megatron-core's `DynamicGradScaler.load_state_dict` moves the scale with `.cuda()`; do the
    same on whatever device the scaler lives."""
    device = scaler.scale.device
    scaler._scale = sd["scale"].to(device)
    for key in ("growth_tracker", "hysteresis_tracker"):
        if key in sd and hasattr(scaler, "_" + key):
            setattr(scaler, "_" + key, sd[key])
