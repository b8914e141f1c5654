"""The global gradient norm over DP, TP and PP, the skip-on-non-finite decision it takes, and clipping."""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_hdpissa.distributed.collectives import squared_norms, sum_over_dp_
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.optimizer.grad_scaler import record_overflow, unscale_

CLIP_EPS = 1e-6  # added to the norm in the clipping coefficient, as megatron-core and torch do


def grads_for_norm(params, grads) -> list[tuple[bool, torch.Tensor]]:
    """(is a TP shard, gradient) of each parameter the global norm counts. A parameter megatron-core
    marks `shared` (the last stage's copy of a tied embedding, whose gradient `finalize_model_grads`
    has already summed with the first stage's) is left out, as in megatron-core's own norm, so the
    tied weight is counted once."""
    return [(bool(getattr(p, "tensor_model_parallel", False)), x) for p, x in zip(params, grads)
            if not getattr(p, "shared", False)]


def global_grad_norm(per_rank_grads: list[tuple[bool, torch.Tensor]], dp_grads: list[tuple[bool, torch.Tensor]],
                     groups: ParallelGroups) -> float:
    """L2 norm of the gradient of the whole model, as (is a TP shard, gradient) lists: parameters
    each DP rank owns alone (HD-PiSSA's factors; summed over DP) and DP-averaged parameters
    (counted once), over every TP shard and pipeline stage. The same value on every rank;
    non-finite if any rank's gradient is."""
    sq = squared_norms([per_rank_grads, dp_grads], groups)
    per_rank = sq[:1].clone()
    sum_over_dp_(per_rank, groups)
    return float((per_rank[0] + sq[1]).sqrt())


def clip_(grads: list[torch.Tensor], norm: float, clip_grad: float) -> None:
    """Scale `grads` in place by `clip_grad / (norm + eps)` when that is below 1."""
    coef = clip_grad / (norm + CLIP_EPS)
    if clip_grad > 0 and coef < 1.0:
        for x in grads:
            x.mul_(coef)


def unscale_and_clip_(grads: list[torch.Tensor], per_rank_grads, dp_grads, groups: ParallelGroups,
                      clip_grad: float, grad_scaler=None, track_norm: bool = False) -> tuple[Optional[float], bool]:
    """The rule every optimizer of the package follows before its AdamW. Unscale `grads` (every
    gradient the step uses) in place (fp16 `grad_scaler`); take the global norm of those in
    `per_rank_grads` / `dp_grads` (as for `global_grad_norm`) when clipping, loss scaling or
    `track_norm`; update the scaler; if the norm is finite, clip `grads` with one coefficient.
    Returns (the norm or None, whether to skip the step): a non-finite norm anywhere skips it on
    every rank (HD-PiSSA's merged update needs every rank's deltas; a baseline would write NaN
    into its weights)."""
    unscale_(grads, grad_scaler)
    if not (clip_grad > 0 or grad_scaler is not None or track_norm):
        return None, False
    norm = global_grad_norm(per_rank_grads, dp_grads, groups)
    finite = math.isfinite(norm)
    record_overflow(grad_scaler, not finite)
    if not finite:
        return norm, True
    clip_(grads, norm, clip_grad)
    return norm, False


def record_step(optimizer, norm: Optional[float], skip: bool, reason: Optional[str] = None) -> bool:
    """Keep an optimizer's public record of its last step the same way for every method:
    `last_grad_norm` (this step's norm, None when it was not taken), `last_step_skipped`,
    `skipped_steps`, and `last_skip_reason`: "gradient" (a non-finite gradient norm, e.g. an
    fp16 overflow), "update" (the finite guard refused the update: `finite_guard`) or None.
    Returns `skip`."""
    optimizer.last_grad_norm = norm
    optimizer.last_step_skipped = skip
    optimizer.last_skip_reason = (reason or "gradient") if skip else None
    if skip:
        optimizer.skipped_steps += 1
    return skip
