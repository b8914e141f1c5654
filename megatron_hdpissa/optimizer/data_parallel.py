"""AdamW for the LoRA, PiSSA and full fine-tuning baselines: DP-averaged gradients, then one AdamW."""
from __future__ import annotations

from typing import Optional

import torch

from megatron_hdpissa.distributed.collectives import average_over_dp_
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.optimizer.adamw import param_groups_by_decay
from megatron_hdpissa.optimizer.clip_grads import grads_for_norm, record_step, unscale_and_clip_
from megatron_hdpissa.optimizer.expert_grads import average_expert_grads_, expert_norm_pairs, is_expert_param
from megatron_hdpissa.optimizer.finite_guard import nonfinite_marker, torch_adamw_bound, update_is_finite
from megatron_hdpissa.optimizer.phases import PhaseHook, phase

TORCH_ADAMW_WEIGHT_DECAY = 1e-2  # torch.optim.AdamW's default, kept for callers that pass none


class DataParallelAdamW(torch.optim.AdamW):
    """torch AdamW after averaging gradients over the data-parallel group (one flat all-reduce)
    and, with `clip_grad` > 0, clipping their global L2 norm (TP shards summed over TP, tensors
    replicated over TP counted once): the optimizer for LoRA, PiSSA and full fine-tuning
    baselines in the same trainer. MoE expert parameters (`expert_grads.is_expert_param`: expert
    weights, their adapters) are summed over the expert-DP group and divided by DP instead, and
    counted once per expert shard in the norm (`expert_grads`).

    The rules are HDPiSSAOptimizer's: weight decay on >= 2-D parameters only (`adamw.decays`; the
    parameters are split into a decaying and a non-decaying group), and a non-finite global norm
    skips the step on every rank (`clip_grads.unscale_and_clip_`; `last_step_skipped`,
    `skipped_steps`). The norm is taken when clipping or with `track_grad_norm`. Before torch's
    AdamW runs, the finite guard bounds every new parameter (`finite_guard`); a step that could
    leave a non-finite value is skipped on every rank with parameters and moments untouched
    (`last_skip_reason` "update").

    `phase_hook(name)`, when set, wraps the phases "aggregate" (the gradient average), "clip"
    and "adam", each also a profiler range `hd_pissa.optimizer.<name>` (`phases`)."""

    def __init__(self, params, groups: Optional[ParallelGroups] = None, clip_grad: float = 0.0, **kwargs):
        if clip_grad is None or clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0 (0 disables clipping), got {clip_grad}")
        weight_decay = kwargs.pop("weight_decay", TORCH_ADAMW_WEIGHT_DECAY)
        super().__init__(param_groups_by_decay(params, weight_decay), weight_decay=weight_decay, **kwargs)
        self.groups = groups or ParallelGroups.from_megatron()
        self.clip_grad = float(clip_grad)
        self.last_step_bytes = 0
        self.last_grad_norm: Optional[float] = None
        self.track_grad_norm = False  # compute last_grad_norm even without clipping
        self.last_step_skipped = False
        self.skipped_steps = 0
        self.last_skip_reason: Optional[str] = None
        self.phase_hook: Optional[PhaseHook] = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        experts, dense = [], []  # MoE experts: over expert-DP (expert_grads)
        for p in params:
            (experts if is_expert_param(p) else dense).append(p)
        with phase("aggregate", self.phase_hook):
            self.last_step_bytes = (average_over_dp_([p.grad for p in dense], self.groups)
                                    + average_expert_grads_([p.grad for p in experts], self.groups))
        with phase("clip", self.phase_hook):  # on every rank: the norm's all-reduce spans the pipeline stages
            norm, skip = unscale_and_clip_(grads, expert_norm_pairs(experts, [p.grad for p in experts], self.groups),
                                           grads_for_norm(dense, [p.grad for p in dense]), self.groups,
                                           self.clip_grad, track_norm=self.track_grad_norm)
        if record_step(self, norm, skip):
            return loss
        with phase("adam", self.phase_hook):
            if not self._update_is_finite(norm, grads):  # skipped before torch's AdamW touches anything
                record_step(self, norm, True, reason="update")
                return loss
            super().step()
        return loss

    def _update_is_finite(self, norm: Optional[float], grads) -> bool:
        """The finite guard (`finite_guard.torch_adamw_bound`): with finite gradients (checked by
        their norm, or here when no norm was taken) every new parameter is bounded from its old
        largest value, lr, weight decay and Adam's ratio bound; one float64 all-reduced."""
        bound, limit = torch_adamw_bound(self.param_groups, self.state)
        if norm is None:
            bound = torch.maximum(bound, nonfinite_marker(grads))
        return update_is_finite(bound, limit, self.groups)
