"""Finite or nothing: before an optimizer step changes a weight, a master or a moment, prove
that the result is finite; otherwise the step is skipped on every rank.

The proof is a bound, not a pass over W. Each rank takes a few norms of what it is about to
apply, reduces the largest of them to one float64 over the whole DP x TP x PP grid
(`collectives.sum_over_grid`: the sum over ranks bounds every rank's share) and every rank
compares the same number with `headroom(dtype)`. A NaN or inf anywhere makes the sum non-finite,
so it fails the comparison too.

- HD-PiSSA (`factor_bound`): the merged update of one part is
  `-sum_k [dB_k A_k + (B_k - dB_k) dA_k]` (`aggregation.left_right`), so every entry of it, and
  every partial sum of the GEMM that forms it, is at most
  `sum_k ||dB_k|| ||A_k|| + (||B_k|| + ||dB_k||) ||dA_k||` (Frobenius norms; Cauchy-Schwarz per
  slice). The factors are small (`K r (m + n)` per part), so this costs a few thin norms.
- Parameters stepped directly (`direct_bound`: the baselines, full fine-tuning, HD-PiSSA's
  other trainable parameters): `|p - d| <= max|p| + max|d|` with the step `d` in hand, or, for
  torch's AdamW before it runs, `max|p| |1 - lr wd| + lr adam_ratio_bound(...)`.

`headroom(dtype)` is 2^-10 of the dtype's largest finite value: a weight stays finite unless it
was already within 0.1% of overflowing (a checkpoint is never written in that state either:
`training.guards.check_finite_weights`).
"""
from __future__ import annotations

import math

import torch

from megatron_hdpissa.distributed.collectives import collective_device, sum_over_grid
from megatron_hdpissa.distributed.groups import ParallelGroups

HEADROOM = 2.0 ** -10


def headroom(dtype: torch.dtype) -> float:
    """The largest update bound accepted for a tensor of `dtype`."""
    return torch.finfo(dtype).max * HEADROOM


def _fro(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1).double(), dim=1)  # one norm per slice


def _absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| in one reduction (no |x| temporary), as float64."""
    return torch.linalg.vector_norm(x.detach(), math.inf).double()


def factor_bound(items, local_factors) -> torch.Tensor:
    """The largest over this rank's parts of `sum_k ||dB_k|| ||A_k|| + (||B_k|| + ||dB_k||) ||dA_k||`
    over its local slices. `items` are (entry, dA, dB); `local_factors(entry)` gives this rank's
    (A, B) slices of that entry."""
    bounds = []
    for entry, da, db in items:
        a, b = local_factors(entry)
        nda, ndb = _fro(da), _fro(db)
        bounds.append((ndb * _fro(a) + (_fro(b) + ndb) * nda).sum())
    return torch.stack(bounds).max() if bounds else torch.zeros((), dtype=torch.float64)


def direct_bound(params, deltas) -> torch.Tensor:
    """The largest `max|p| + max|d|` over the parameters and the steps about to be subtracted."""
    bounds = [_absmax(p) + _absmax(d) for p, d in zip(params, deltas) if p.numel()]
    return torch.stack(bounds).max() if bounds else torch.zeros((), dtype=torch.float64)


def adam_ratio_bound(beta1: float, beta2: float, step: int) -> float:
    """An upper bound of `|m_hat| / (sqrt(v_hat) + eps)` after AdamW's `step`-th step, for any
    finite gradients: Cauchy-Schwarz on the moments' sums gives
    `(1 - b1) / sqrt(1 - b2) * sqrt(sum_{j<t} (b1^2 / b2)^j) * sqrt(1 - b2^t) / (1 - b1^t)`."""
    if not (0.0 <= beta1 < 1.0 and 0.0 < beta2 < 1.0):
        return math.inf
    q = beta1 * beta1 / beta2
    if q < 1.0:
        series = (1.0 - q ** step) / (1.0 - q)
    elif q == 1.0:
        series = float(step)
    else:
        try:
            series = (q ** step - 1.0) / (q - 1.0)
        except OverflowError:
            return math.inf
    return (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt(series) * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)


def torch_adamw_bound(param_groups, state) -> tuple[torch.Tensor, float]:
    """For torch.optim.AdamW's next step (finite gradients assumed: the caller has checked their
    norm): the largest bound of `|p_new|` over the parameters with a gradient, and the smallest
    headroom of their dtypes."""
    bounds, limit = [], math.inf
    for group in param_groups:
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None or not p.numel():
                continue
            step = int(state[p]["step"]) + 1 if "step" in state.get(p, {}) else 1
            ratio = adam_ratio_bound(float(beta1), float(beta2), step)
            pmax = _absmax(p)
            bounds.append(pmax * abs(1.0 - lr * wd) + (lr * ratio if lr else 0.0))
            limit = min(limit, headroom(p.dtype))
    return (torch.stack(bounds).max() if bounds else torch.zeros((), dtype=torch.float64)), limit


def nonfinite_marker(tensors) -> torch.Tensor:
    """0.0 when every tensor is finite, else inf (for a bound, when no norm has checked them)."""
    ok = all(bool(torch.isfinite(t).all()) for t in tensors)
    return torch.tensor(0.0 if ok else math.inf, dtype=torch.float64)


def update_is_finite(local_bound: torch.Tensor, limit: float, groups: ParallelGroups) -> bool:
    """Whether the sum over every rank of `local_bound` is finite and below `limit`: the same
    answer on every rank (one float64 all-reduced over the DP x TP x PP grid)."""
    total = sum_over_grid(local_bound.detach().reshape(1).double().to(collective_device()), groups)
    value = float(total[0])
    return math.isfinite(value) and value < limit
