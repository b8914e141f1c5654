"""The global gradient norm over DP, TP and PP, the overflow skip it decides, clipping and the loss scale."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_hdpissa.distributed.groups import ParallelGroups, squared_norms


def global_grad_norm(factor_grads: list[tuple[bool, torch.Tensor]], other_grads: list[tuple[bool, torch.Tensor]],
                     groups: ParallelGroups) -> float:
    """L2 norm of the gradient of the whole HD-PiSSA model, as (is a TP shard, gradient) lists:
    every DP rank's own factors (summed over DP) and the DP-averaged other parameters (counted
    once), over every TP shard and pipeline stage. The same value on every rank; non-finite if
    any rank's gradient is."""
    sq = squared_norms([factor_grads, other_grads], groups)
    factors = sq[:1].clone()
    if groups.dp_size > 1:
        dist.all_reduce(factors, group=groups.dp_group)
    return float((factors[0] + sq[1]).sqrt())


def unscale_and_clip_(grads: list[torch.Tensor], factor_grads, other_grads, groups: ParallelGroups,
                      clip_grad: float, grad_scaler=None, track_norm: bool = False) -> tuple[Optional[float], bool]:
    """Unscale `grads` (every gradient the step uses) in place (fp16 `grad_scaler`), take the
    global norm of those in `factor_grads` / `other_grads` (as for `global_grad_norm`; when
    clipping, loss scaling or `track_norm`), update the scaler and, if the norm is finite, scale
    `grads` by one coefficient `clip_grad / (norm + 1e-6)` when below 1. Returns (the norm or
    None, whether to skip the step): a non-finite norm anywhere skips it on every rank, since the
    merged update needs every rank's deltas."""
    if grad_scaler is not None:
        inv = float(grad_scaler.inv_scale)
        for x in grads:
            x.mul_(inv)
    if not (clip_grad > 0 or grad_scaler is not None or track_norm):
        return None, False
    norm = global_grad_norm(factor_grads, other_grads, groups)
    finite = math.isfinite(norm)
    if grad_scaler is not None:
        grad_scaler.update(not finite)
    if not finite:
        return norm, True
    coef = clip_grad / (norm + 1e-6)
    if clip_grad > 0 and coef < 1.0:
        for x in grads:
            x.mul_(coef)
    return norm, False


def scale_loss(loss: torch.Tensor, grad_scaler=None) -> torch.Tensor:
    """The loss to call backward on: times the loss scale when a grad scaler is set (fp16)."""
    return loss * grad_scaler.scale if grad_scaler is not None else loss


def scaler_state(scaler) -> dict:
    """A megatron-core grad scaler's state, device-independent."""
    sd = dict(scaler.state_dict()) if hasattr(scaler, "state_dict") else {}
    sd["scale"] = scaler.scale.detach().float().cpu().clone()
    return sd


def load_scaler_state(scaler, sd: dict) -> None:
    """megatron-core's `DynamicGradScaler.load_state_dict` moves the scale with `.cuda()`; do the
    same on whatever device the scaler lives."""
    device = scaler.scale.device
    scaler._scale = sd["scale"].to(device)
    for key in ("growth_tracker", "hysteresis_tracker"):
        if key in sd and hasattr(scaler, "_" + key):
            setattr(scaler, "_" + key, sd[key])
