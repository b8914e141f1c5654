"""The fp16 loss scale around megatron-core's grad scalers: scale the loss, unscale, save and restore."""
from __future__ import annotations

import torch


def scale_loss(loss: torch.Tensor, grad_scaler=None) -> torch.Tensor:
    """The loss to call backward on: times the loss scale when a grad scaler is set (fp16)."""
    return loss * grad_scaler.scale if grad_scaler is not None else loss


def unscale_(grads: list[torch.Tensor], grad_scaler=None) -> None:
    """Divide every gradient by the loss scale in place (nothing without a grad scaler)."""
    if grad_scaler is None:
        return
    inv = float(grad_scaler.inv_scale)
    for x in grads:
        x.mul_(inv)


def record_overflow(grad_scaler, found_inf: bool) -> None:
    """Tell the scaler whether this step overflowed: it backs the scale off or grows it."""
    if grad_scaler is not None:
        grad_scaler.update(found_inf)


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
