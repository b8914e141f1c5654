"""Where each targeted weight's value accumulates: the weight, DP-sharded fp32 masters or compensated bf16."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_hdpissa.distributed.collectives import all_gather_over_dp, buckets
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.peft.common import ConfigError
from megatron_hdpissa.peft.hd_pissa.config import MASTER_WEIGHT_MODES


def unique_weights(entries) -> list[torch.Tensor]:
    """The targeted weights, each once, in entry order (several parts can share a fused weight)."""
    seen, out = set(), []
    for e in entries:
        if id(e.weight) not in seen:
            seen.add(id(e.weight))
            out.append(e.weight)
    return out


def resolve_mode(mode: str, weights: list[torch.Tensor]) -> str:
    """The master-weight mode for these weights: "auto" is fp32-base for fp32 weights, else sharded-fp32."""
    dtypes = {w.dtype for w in weights}
    if mode == "auto":
        return "fp32-base" if dtypes == {torch.float32} else "sharded-fp32"
    if mode == "fp32-base" and dtypes != {torch.float32}:
        raise ConfigError("master_weights", f"{{name}} fp32-base needs fp32 weights, the targeted layers hold "
                                            f"{sorted(map(str, dtypes))}; use fp32 weights, sharded-fp32 or "
                                            "compensated-bf16")
    if mode not in MASTER_WEIGHT_MODES:
        raise ConfigError("master_weights", f"{{name}} must be auto or one of {MASTER_WEIGHT_MODES}, got {mode!r}")
    return mode


@dataclass
class ShardedMaster:
    """DP rank k's fp32 master of rows [lo, hi) of one weight (sharded-fp32 mode)."""

    weight: torch.Tensor
    lo: int
    hi: int
    block: int  # rows per DP rank (the last may be padded)
    data: torch.Tensor


def _row_range(entry):
    """The contiguous rows of the entry's part in its weight, or None where they are scattered."""
    return entry.part.row_range if entry.part.rows is not None else (0, entry.weight.shape[0])


class MasterWeights:
    """The full-precision value of every targeted weight in one mode. fp32-base: the fp32 weight
    itself. sharded-fp32: DP rank k holds an fp32 copy of its 1/K row block of each weight (ZeRO-1);
    after a step the low-precision blocks are all-gathered into the weights, bucketed and
    asynchronously, each layer waiting for its own bucket just before its forward (megatron-core's
    `overlap_param_gather`). compensated-bf16: Kahan summation into the bf16 weight. none: the
    update rounded into the weight (small updates are lost in bf16)."""

    def __init__(self, entries, mode: str, groups: ParallelGroups, bucket_size: int):
        self.mode = mode
        self.groups = groups
        self.bucket_size = bucket_size
        self.weights = unique_weights(entries)
        self._position = {id(w): i for i, w in enumerate(self.weights)}
        self.masters: list[ShardedMaster] = []
        self.compensation: list[torch.Tensor] = []
        self.pending: list = []  # ((gathered, handle), bucket of masters) per launched all-gather
        self.hooks = []
        if mode == "sharded-fp32":
            self._shard(entries)
        elif mode == "compensated-bf16":
            self.compensation = [torch.zeros_like(w) for w in self.weights]

    def _shard(self, entries) -> None:
        g = self.groups
        for w in self.weights:
            block = -(-w.shape[0] // g.dp_size)
            lo, hi = min(g.dp_rank * block, w.shape[0]), min((g.dp_rank + 1) * block, w.shape[0])
            self.masters.append(ShardedMaster(w, lo, hi, block, w.detach()[lo:hi].float().clone()))
        for e in entries:  # where each part's rows sit inside my block
            m = self.master_of(e.weight)
            inside = (e.rows >= m.lo) & (e.rows < m.hi)
            e.block_sel = inside.nonzero().flatten()
            e.block_rows = e.rows[inside] - m.lo

    def master_of(self, weight: torch.Tensor) -> ShardedMaster:
        return self.masters[self._position[id(weight)]]

    def in_place_rows(self, entry) -> Optional[torch.Tensor]:
        """The weight rows an update of the entry's part can be written into directly (fp32-base,
        contiguous part), so the merge GEMM needs no m x n temporary; None otherwise."""
        rng = _row_range(entry)
        return entry.weight[rng[0]:rng[1]] if self.mode == "fp32-base" and rng is not None else None

    def subtract(self, entry, update: torch.Tensor, rows_subset: Optional[torch.Tensor] = None) -> None:
        """Subtract `update` (rows of the entry's part; with sharded masters the rows of the part
        inside my block, or `rows_subset` of the part's rows to select them) where the weight's
        value accumulates."""
        w = entry.weight
        if self.mode == "sharded-fp32":
            if rows_subset is not None:
                update = update.index_select(0, rows_subset)
            self.master_of(w).data.index_add_(0, entry.block_rows, update, alpha=-1.0)
            return
        rng = _row_range(entry)
        if self.mode == "fp32-base" or (self.mode == "none" and w.dtype == torch.float32):
            if rng is not None:
                w[rng[0]:rng[1]].sub_(update)
            else:
                w.index_add_(0, entry.rows, update, alpha=-1.0)
        elif self.mode == "none":  # naive low precision: small updates round away
            w.index_copy_(0, entry.rows, (w.index_select(0, entry.rows).float() - update).to(w.dtype))
        else:  # Kahan-compensated bf16
            comp = self.compensation[self._position[id(w)]]
            w_rows = w.index_select(0, entry.rows).float()
            y = -update - comp.index_select(0, entry.rows).float()
            t = (w_rows + y).to(w.dtype)
            comp.index_copy_(0, entry.rows, ((t.float() - w_rows) - y).to(comp.dtype))
            w.index_copy_(0, entry.rows, t)

    # -- sharded masters: parameter all-gather, overlapped with the next forward -----------------
    def wait_before_forward(self, modules, finish: Callable) -> None:
        """A forward pre-hook on each targeted layer that calls `finish(upto=its weight)` while
        gathers are pending: the layer waits only for the bucket holding its weight (and those
        launched before it), so later buckets keep gathering under its forward."""
        def hook(module, args):
            if self.pending:
                finish(upto=module.weight)

        self.hooks += [module.register_forward_pre_hook(hook) for module in modules]

    def launch_param_gather(self) -> int:
        """Start the bucketed asynchronous all-gather of every master's block, in the weights'
        dtype. Returns the bytes handed to the collectives."""
        sent = 0
        for bucket in buckets(self.masters, lambda m: m.block * m.weight.shape[1], self.bucket_size):
            parts = []
            for m in bucket:
                blk = torch.zeros(m.block, m.weight.shape[1], dtype=m.weight.dtype, device=m.weight.device)
                blk[: m.hi - m.lo] = m.data.to(m.weight.dtype)
                parts.append(blk.reshape(-1))
            flat = torch.cat(parts)
            if self.groups.dp_size > 1:
                sent += flat.numel() * flat.element_size()
            self.pending.append((all_gather_over_dp(flat, self.groups, async_op=True), bucket))
        return sent

    @torch.no_grad()
    def finish_param_gather(self, upto: Optional[torch.Tensor] = None) -> None:
        """Wait for outstanding parameter all-gathers and write the gathered blocks into W: all of
        them, or with `upto` (a weight) those launched up to the bucket that holds it."""
        if upto is not None and not any(m.weight is upto for _, bucket in self.pending for m in bucket):
            return
        while self.pending:
            (gathered, handle), bucket = self.pending.pop(0)
            if handle is not None:
                handle.wait()
            off = 0
            for m in bucket:
                rows_total, n = m.weight.shape
                for j in range(gathered.shape[0]):
                    lo, hi = j * m.block, min((j + 1) * m.block, rows_total)
                    if hi > lo:
                        m.weight[lo:hi].copy_(gathered[j, off:off + (hi - lo) * n].view(hi - lo, n))
                off += m.block * n
            if upto is not None and any(m.weight is upto for m in bucket):
                return

    @torch.no_grad()
    def load(self, masters: list[torch.Tensor], compensation: list[torch.Tensor]) -> None:
        """Restore the saved master blocks and compensation terms."""
        for m, saved in zip(self.masters, masters):
            m.data.copy_(saved)
        for c, saved in zip(self.compensation, compensation):
            c.copy_(saved)
