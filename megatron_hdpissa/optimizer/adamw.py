"""The AdamW every method shares: which parameters decay, and the per-parameter step."""
from __future__ import annotations

import math

import torch


def decays(param: torch.Tensor) -> bool:
    """Whether decoupled weight decay applies: to matrices and factors (>= 2-D), not to biases
    and norm weights (1-D), as megatron-core's optimizer does."""
    return param.ndim >= 2


def weight_decay_of(param: torch.Tensor, weight_decay: float) -> float:
    """The weight decay `param` takes under a group's `weight_decay`."""
    return weight_decay if decays(param) else 0.0


def param_groups_by_decay(params, weight_decay: float) -> list[dict]:
    """torch.optim parameter groups applying the rule: each given group (or the plain list of
    parameters) split into its decaying and its non-decaying parameters; empty groups dropped."""
    params = list(params)
    given = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in given:
        wd = group.get("weight_decay", weight_decay)
        members = list(group["params"])
        for subset, decay in (([p for p in members if decays(p)], wd), ([p for p in members if not decays(p)], 0.0)):
            if subset:
                out.append({**group, "params": subset, "weight_decay": decay})
    return out


def init_state(state: dict, param: torch.Tensor) -> dict:
    """AdamW's state of one parameter (step count and both moments), created on first use."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


class PendingAdamW:
    """AdamW's step of some parameters, computed but not yet taken: `deltas` (what AdamW would
    subtract) and the moments the step would leave. Nothing in the optimizer state changes until
    `commit()`, so a step found non-finite is dropped with the moments and step counts untouched."""

    def __init__(self, states, moments, deltas):
        self.states, self.moments, self.deltas = states, moments, deltas

    def commit(self) -> None:
        for st, (exp_avg, exp_avg_sq) in zip(self.states, self.moments):
            st["exp_avg"].copy_(exp_avg)
            st["exp_avg_sq"].copy_(exp_avg_sq)
            st["step"] += 1


def adamw_step(params, grads, states, lr, beta1, beta2, eps, weight_decay) -> PendingAdamW:
    """AdamW's step of each parameter (torch.optim.AdamW's formula; the weight decay per
    `decays`), computed out of place: the moments change only on `commit()`."""
    moments, deltas = [], []
    for p, g, st in zip(params, grads, states):
        step = st["step"] + 1
        exp_avg = st["exp_avg"].lerp(g, 1 - beta1)
        exp_avg_sq = st["exp_avg_sq"].mul(beta2).addcmul_(g, g, value=1 - beta2)
        bias1 = 1 - beta1 ** step
        bias2 = 1 - beta2 ** step
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
        delta = exp_avg / denom
        delta.mul_(lr / bias1)
        wd = weight_decay_of(p, weight_decay)
        if wd:
            delta.add_(p.detach(), alpha=lr * wd)
        moments.append((exp_avg, exp_avg_sq))
        deltas.append(delta)
    return PendingAdamW(list(states), moments, deltas)


def adamw_deltas(params, grads, states, lr, beta1, beta2, eps, weight_decay) -> list[torch.Tensor]:
    """`adamw_step`, committed at once: updates the moments in place and returns one step tensor
    per parameter."""
    pending = adamw_step(params, grads, states, lr, beta1, beta2, eps, weight_decay)
    pending.commit()
    return pending.deltas
