"""HDPiSSAOptimizer: per-rank AdamW on the factors, then the summed low-rank update merged into W."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from megatron_hdpissa.distributed.collectives import average_over_dp_
from megatron_hdpissa.distributed.ddp import (
    OTHERS_OPTIMIZERS, build_others_optimizer, factor_gradient_prescale, is_megatron_ddp,
)
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.optimizer.adamw import adamw_step, init_state
from megatron_hdpissa.optimizer.aggregation import (
    DeltaAggregator, build_entries, check_consistency, choose_paths, gather_factors,
)
from megatron_hdpissa.optimizer.clip_grads import grads_for_norm, record_step, unscale_and_clip_
from megatron_hdpissa.optimizer.experts import ExpertDomain, norm_pair, route_items, split_entries
from megatron_hdpissa.optimizer.finite_guard import direct_bound, factor_bound, headroom, update_is_finite
from megatron_hdpissa.optimizer.grad_scaler import load_scaler_state, scale_loss, scaler_state
from megatron_hdpissa.optimizer.master_weights import MasterWeights, resolve_mode, unique_weights
from megatron_hdpissa.optimizer.phases import PhaseHook, phase
from megatron_hdpissa.peft.common import ConfigError
from megatron_hdpissa.peft.hd_pissa.config import BUCKET_SIZE, CONSISTENCY_CHECK_INTERVAL


class HDPiSSAOptimizer(torch.optim.Optimizer):
    """AdamW on each rank's own factors (no data-parallel reduction of their gradients); every
    `step()` then merges `sum_k [(B_k - dB_k)(A_k - dA_k) - B_k A_k]` into each targeted weight,
    identically on all data-parallel ranks.

    Per layer the update travels as the deltas `dA_k, dB_k` or, where `m n < K r (m + n)`, as a
    dense reduction (`aggregation`); with bf16 weights it accumulates in DP-sharded fp32 masters
    or in Kahan-compensated bf16 (`master_weights`).

    Other trainable parameters (e.g. unfrozen norms) are ordinary data parallel: gradients are
    averaged over the DP group, then AdamW. Weight decay follows `adamw.decays` for every
    parameter (factors decay, 1-D parameters do not), as `DataParallelAdamW` for the baselines.
    Parameter group 0 holds the factors, group 1 (if any) the other parameters, so LR schedulers
    work as usual.

    `model` may be wrapped in megatron-core's `DistributedDataParallel` (`ddp.wrap_ddp`): then the
    gradients come from DDP's buffers (`main_grad`; call `ddp.finish_grad_sync()` before `step`),
    the other parameters' averaging is DDP's, and with `others_optimizer` "auto" (on CUDA, or
    with fp32 parameters) or "megatron" they are stepped by megatron-core's optimizer.

    `clip_grad` > 0 clips the L2 norm of the gradient of the whole HD-PiSSA model (every DP
    rank's factors plus the averaged other parameters, every pipeline stage; one coefficient on
    every rank; `clip_grads`).
    `grad_scaler` (fp16; megatron-core's `DynamicGradScaler` or `ConstantGradScaler`): backward
    on `scale_loss(loss)`; `step` unscales, and an overflow on any rank skips the step on every
    rank of every stage (`last_step_skipped`) and backs the scale off.
    Finite or nothing: after AdamW has computed the deltas and before anything is written, the
    finite guard bounds the merged update of every part from the thin factors (`finite_guard`);
    a step that could put a non-finite value into W, a master or a Kahan term is skipped on
    every rank (`last_skip_reason` "update"). The moments are computed out of place
    (`adamw.adamw_step`) and committed only after the guard, so a skipped step leaves them and
    the step counts untouched.

    `phase_hook(name)`, when set, wraps each phase of `step`: "clip", "adam", "aggregate" and
    "param_gather" (the latter also in `finish_param_gather`), each also a profiler range
    `hd_pissa.optimizer.<name>` (`phases`).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, groups: Optional[ParallelGroups] = None,
                 master_weights: Optional[str] = None, aggregation: Optional[str] = None,
                 bucket_size: Optional[int] = None, clip_grad: float = 0.0, grad_scaler=None,
                 others_optimizer: str = "auto"):
        if not (math.isfinite(lr) and lr >= 0):
            raise ConfigError("lr", f"{{name}} must be finite and >= 0, got {lr}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ConfigError("weight_decay", f"{{name}} must be finite and >= 0, got {weight_decay}")
        if clip_grad is None or not math.isfinite(clip_grad) or clip_grad < 0:
            raise ConfigError("clip_grad", f"{{name}} must be >= 0 (0 disables clipping), got {clip_grad}")
        if others_optimizer not in OTHERS_OPTIMIZERS:
            raise ConfigError("others_optimizer",
                              f"{{name}} must be one of {OTHERS_OPTIMIZERS}, got {others_optimizer!r}")
        self.ddp = None
        if is_megatron_ddp(model):  # megatron-core DDP: gradients arrive in param.main_grad
            self.ddp, model = model, model.module
        cfg = getattr(model, "hd_pissa_config", None)
        entries = build_entries(model)
        if not entries:
            raise ValueError("the model has no HD-PiSSA adapters: call apply_hd_pissa(model, config) first")
        factors = [p for e in entries for p in (e.a, e.b)]
        factor_ids = {id(p) for p in factors}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in factor_ids]
        param_groups = [{"params": factors, "hd_pissa": True}]
        if others:
            param_groups.append({"params": others, "hd_pissa": False})
        super().__init__(param_groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.model = model
        self.entries = entries
        self.groups = groups or getattr(model, "hd_pissa_groups", None) or ParallelGroups.from_megatron()
        self.update_factors = bool(getattr(cfg, "update_factors", False))
        self.check_interval = int(getattr(cfg, "consistency_check_interval", CONSISTENCY_CHECK_INTERVAL))
        self.bucket_size = int(bucket_size or getattr(cfg, "bucket_size", BUCKET_SIZE))
        self.aggregation = aggregation or getattr(cfg, "aggregation", "auto")
        mode = resolve_mode(master_weights or getattr(cfg, "master_weights", "auto"), unique_weights(entries))
        self.num_steps = 0
        self.last_step_bytes = {"deltas": 0, "dense": 0, "params": 0}
        self.clip_grad = float(clip_grad)
        self.grad_scaler = grad_scaler
        self.last_grad_norm: Optional[float] = None
        self.track_grad_norm = False  # compute last_grad_norm even without clipping / loss scaling
        self.last_step_skipped = False
        self.skipped_steps = 0
        self.last_skip_reason: Optional[str] = None
        self.phase_hook: Optional[PhaseHook] = None
        # DDP pre-scales the factors' gradients by 1/dp (it assumes a DP-averaged loss): undo it
        self._factor_grad_unscale = 1.0 / factor_gradient_prescale(self.ddp) if self.ddp is not None else 1.0
        if others_optimizer == "megatron" and self.ddp is None:
            raise ConfigError("others_optimizer",
                              "{name}='megatron' needs a model wrapped with megatron_hdpissa.distributed.ddp.wrap_ddp")
        self.others_optimizer = None  # megatron-core's optimizer for the non-factor parameters
        if self.ddp is not None:
            self.others_optimizer = build_others_optimizer(self.ddp, lr, weight_decay, betas, eps, others_optimizer)
        choose_paths(entries, self.aggregation)
        self.dense_entries, expert_entries = split_entries(entries)  # experts: their own groups
        self.weight_store = MasterWeights(self.dense_entries, mode, self.groups, self.bucket_size)
        if mode == "sharded-fp32":  # through self, so the phase hook sees the waits
            self.weight_store.wait_before_forward({id(e.module): e.module for e in self.dense_entries}.values(),
                                                  lambda upto: self.finish_param_gather(upto=upto))
        self.aggregator = DeltaAggregator(self.weight_store, self.groups, self.bucket_size, self.update_factors)
        self.experts = (ExpertDomain(expert_entries, mode, self.bucket_size, self.update_factors)
                        if expert_entries else None)

    # -- where the weights' values live (see master_weights) ------------------------------------
    master_mode = property(lambda self: self.weight_store.mode)
    masters = property(lambda self: self.weight_store.masters)
    compensation = property(lambda self: self.weight_store.compensation)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self):
        self.finish_param_gather()
        sd = super().state_dict()
        sd["hd_pissa_num_steps"] = self.num_steps
        sd["hd_pissa_master_mode"] = self.master_mode
        sd["hd_pissa_masters"] = [m.data for m in self.masters]
        sd["hd_pissa_compensation"] = list(self.compensation)
        sd["hd_pissa_skipped_steps"] = self.skipped_steps
        if self.grad_scaler is not None:
            sd["hd_pissa_grad_scaler"] = scaler_state(self.grad_scaler)
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
        scaler = state_dict.pop("hd_pissa_grad_scaler", None)
        others_state = state_dict.pop("hd_pissa_others_optimizer", None)
        if scaler is not None and self.grad_scaler is not None:
            load_scaler_state(self.grad_scaler, scaler)
        if others_state is not None and self.others_optimizer is not None:
            self.others_optimizer.load_state_dict(others_state)
        if mode != self.master_mode:
            raise ConfigError("master_weights", f"the checkpoint was written with {{name}} {mode}, "
                                                f"this run uses {self.master_mode}")
        super().load_state_dict(state_dict)
        self.weight_store.load(masters, comp)
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
        return scale_loss(loss, self.grad_scaler)

    def _factor_grads(self):
        """(factor, its (is a TP shard, gradient) pair for the norm or None, gradient) for each
        factor that received a gradient; the column-parallel B and row-parallel A are TP shards,
        the other factor is replicated (`experts.norm_pair`)."""
        out = []
        for e in self.entries:
            column = e.adapter.kind == "column"
            for p, sharded in ((e.a, not column), (e.b, column)):
                x = self._grad(p, factor=True)
                if x is not None:
                    out.append((p, norm_pair(e.adapter, sharded, x), x))
        return out

    # -- step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step: (fp16) unscale and skip on overflow anywhere, clip the global norm
        (all DP ranks, TP shards and pipeline stages), AdamW on the factors and the other
        parameters, merge the summed update into W."""
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
        virtual = int(getattr(getattr(self.model, "hd_pissa_config", None), "virtual_ranks", 1))
        for _, x in other_pairs if virtual > 1 else []:  # each local slice added its own mean: the K-slice mean
            x.div_(virtual)
        if self.ddp is None and other_pairs:  # megatron-core DDP has averaged them already
            with phase("aggregate", self.phase_hook):
                average_over_dp_([x for _, x in other_pairs], self.groups)
        with phase("clip", self.phase_hook):
            norm, skip = unscale_and_clip_(
                [x for _, _, x in factor_grads] + [x for _, x in other_pairs],
                [pair for _, pair, _ in factor_grads if pair is not None],
                grads_for_norm([p for p, _ in other_pairs], [x for _, x in other_pairs]),
                self.groups, self.clip_grad, self.grad_scaler, self.track_grad_norm)
        if record_step(self, norm, skip):
            return loss
        with phase("adam", self.phase_hook):
            items, pending, others_step = [], [], None
            for group in self.param_groups:
                if group["hd_pissa"]:
                    items, pending = self._factor_steps(group, {id(p): x for p, _, x in factor_grads})
                else:
                    others_step = self._others_step(group, {id(p): x for p, x in other_pairs})
            if not self._update_is_finite(items, others_step):  # nothing taken: W, masters, moments as they were
                record_step(self, norm, True, reason="update")
                return loss
            for taken in pending:
                taken.commit()
            if others_step is not None:
                others_step()
        with phase("aggregate", self.phase_hook):
            for aggregator, its in route_items(items, self.aggregator, self.experts):
                self.last_step_bytes["deltas"] += aggregator.factors([it for it in its if it[0].path == "factors"])
                self.last_step_bytes["dense"] += aggregator.dense([it for it in its if it[0].path == "dense"])
        if self.master_mode == "sharded-fp32":
            with phase("param_gather", self.phase_hook):
                for store in [self.weight_store] + ([self.experts.weight_store] if self.experts else []):
                    self.last_step_bytes["params"] += store.launch_param_gather()
        self.num_steps += 1
        if self.check_interval and self.num_steps % self.check_interval == 0:
            self.check_consistency()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none=set_to_none)
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()

    def _others_step(self, group, grads_by_id):
        """The other parameters' step, computed but not taken: a function that takes it (None
        without gradients). Its `params` and `deltas` are what the finite guard bounds; megatron-
        core's optimizer (which cannot be asked first) runs only once the guard has passed."""
        params = [p for p in group["params"] if id(p) in grads_by_id]
        if not params:
            return None
        if self.others_optimizer is not None:  # megatron-core's optimizer, at this group's lr
            def take():
                for g in self.others_optimizer.param_groups:
                    g["lr"] = group["lr"]
                self.others_optimizer.step()
            take.params, take.deltas = [], []
            return take
        beta1, beta2 = group["betas"]
        pending = adamw_step(params, [grads_by_id[id(p)].float() for p in params],
                             [init_state(self.state[p], p) for p in params], group["lr"], beta1, beta2,
                             group["eps"], group["weight_decay"])

        def take():
            pending.commit()
            for p, d in zip(params, pending.deltas):
                p.sub_(d.to(p.dtype))
        take.params, take.deltas = params, pending.deltas
        return take

    def _local_factors(self, entry):
        ad = entry.adapter
        a_all, b_all = ad.all_factors(entry.part.name)
        return a_all[ad.first_slice:ad.first_slice + ad.local_slices], b_all[ad.first_slice:ad.first_slice + ad.local_slices]

    def _update_is_finite(self, items, others_step) -> bool:
        """The finite guard (`finite_guard`): every rank's merged deltas and direct steps are
        bounded, one float64 all-reduced; the same answer on every rank."""
        bound = factor_bound(items, self._local_factors)
        if others_step is not None and others_step.params:
            bound = torch.maximum(bound, direct_bound(others_step.params, others_step.deltas))
        limit = min(headroom(w.dtype) for w in [e.weight for e in self.entries] + [m.data for m in self.masters])
        return update_is_finite(bound, limit, self.groups)

    def _factor_steps(self, group, grads_by_id) -> tuple[list, list]:
        """(entry, dA, dB) per entry: this rank's AdamW step of its own factors (zero without a
        gradient), and the pending moment updates (taken once the finite guard has passed)."""
        beta1, beta2 = group["betas"]
        live = [p for e in self.entries for p in (e.a, e.b) if id(p) in grads_by_id]
        pending = adamw_step(live, [grads_by_id[id(p)].float() for p in live],
                             [init_state(self.state[p], p) for p in live],
                             group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        by_id = {id(p): d for p, d in zip(live, pending.deltas)}
        return [(e, by_id.get(id(e.a), torch.zeros_like(e.a)), by_id.get(id(e.b), torch.zeros_like(e.b)))
                for e in self.entries], [pending]

    def finish_param_gather(self, upto: Optional[torch.Tensor] = None) -> None:
        """Wait for outstanding parameter all-gathers (sharded masters) and write them into W: all
        of them, or with `upto` (a weight) those launched up to the bucket that holds it."""
        if self.experts is not None and self.experts.weight_store.pending and upto is None:
            with phase("param_gather", self.phase_hook):
                self.experts.weight_store.finish_param_gather()
        if not self.weight_store.pending:
            return
        with phase("param_gather", self.phase_hook):
            self.weight_store.finish_param_gather(upto)

    # -- reliability ----------------------------------------------------------------------------
    def refresh_gathered_factors(self) -> None:
        """Re-gather all slices' factors from the local parameters (after loading moved factors)."""
        gather_factors(self.dense_entries, self.groups)
        if self.experts is not None:
            self.experts.gather_factors()

    def check_consistency(self) -> None:
        """Fail loudly on every rank, naming the layer, if data-parallel ranks hold different weights
        (each pipeline stage checks its own layers over its DP group)."""
        self.finish_param_gather()
        if self.dense_entries:
            check_consistency(self.dense_entries, self.groups, self.num_steps)
        if self.experts is not None:
            self.experts.check_consistency(self.num_steps)
