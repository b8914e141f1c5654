"""The per-step merge of every DP rank's factor steps into W: deltas all-gathered or updates reduced, per layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_hdpissa.distributed.collectives import (
    all_gather_into, all_gather_over_dp, any_rank, buckets, reduce_scatter_over_dp, sum_over_dp_,
)
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.optimizer.master_weights import MasterWeights
from megatron_hdpissa.peft.common import ConfigError
from megatron_hdpissa.peft.hd_pissa.config import AGGREGATION
from megatron_hdpissa.peft.hd_pissa.layer import HDPiSSAAdapter
from megatron_hdpissa.peft.hd_pissa.model import iter_adapters

# position weights i mod a prime: a moved value changes the fingerprint, and no power-of-two row length aligns with it
FINGERPRINT_MODULUS = 1009


@dataclass
class Entry:
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


def build_entries(model: nn.Module) -> list[Entry]:
    """One entry per part of every HD-PiSSA adapter in `model`, in module order."""
    entries = []
    for name, module, ad in iter_adapters(model):
        for part in ad.parts:
            rows = torch.arange(module.weight.shape[0]) if part.rows is None else part.rows
            entries.append(Entry(name, module, ad, part, module.weight, ad.a[part.name], ad.b[part.name],
                                 rows.to(module.weight.device)))
    return entries


def choose_paths(entries: list[Entry], aggregation: str) -> None:
    """Per entry, how its update travels: the deltas `K r (m + n)` ("factors") or the dense
    `m n` update ("dense"); "auto" takes whichever is smaller."""
    if aggregation not in AGGREGATION:
        raise ConfigError("aggregation", f"{{name}} must be one of {AGGREGATION}, got {aggregation!r}")
    for e in entries:
        k, m_loc, r = e.adapter.all_factors(e.part.name)[1].shape
        n_loc = e.a.shape[-1]
        if aggregation == "auto":
            e.path = "dense" if m_loc * n_loc < k * r * (m_loc + n_loc) else "factors"
        else:
            e.path = aggregation


def left_right(a, b, d_a, d_b):
    """sum_k [(B_k - dB_k)(A_k - dA_k) - B_k A_k] = -[dB | B - dB] @ [A ; dA]: returns the two
    factors of that product, so W -= left @ right is one GEMM with inner dimension 2kr and no
    cancellation between two large products."""
    k, m, r = b.shape
    left = torch.cat([d_b, b - d_b], 0).permute(1, 0, 2).reshape(m, 2 * k * r)
    right = torch.cat([a, d_a], 0).reshape(2 * k * r, -1)
    return left, right


def _dense_size(item) -> int:
    return item[0].rows.numel() * item[1].shape[-1]


def _flat(bucket) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for _, da, db in bucket for t in (da, db)])


def _split(gathered: torch.Tensor, bucket):
    """Per (entry, dA, dB) of a bucket, every DP rank's (dA, dB) out of the gathered flat rows."""
    off = 0
    for entry, da, db in bucket:
        na, nb = da.numel(), db.numel()
        yield (entry, da, db, gathered[:, off:off + na].reshape(-1, *da.shape[1:]),
               gathered[:, off + na:off + na + nb].reshape(-1, *db.shape[1:]))
        off += na + nb


def _move(entry: Entry, da, db, d_a_all, d_b_all) -> None:
    """Let the factors take the step (update_factors): every slice's gathered copy and my own."""
    a_all, b_all = entry.adapter.all_factors(entry.part.name)
    a_all.sub_(d_a_all)
    b_all.sub_(d_b_all)
    entry.a.sub_(da)
    entry.b.sub_(db)


class DeltaAggregator:
    """Merges `sum_k [(B_k - dB_k)(A_k - dA_k) - B_k A_k]` into each targeted weight, identically on
    every DP rank. Items are (entry, dA, dB) with this rank's step of its own slices; each
    method returns the bytes it handed to collectives."""

    def __init__(self, masters: MasterWeights, groups: ParallelGroups, bucket_size: int, update_factors: bool):
        self.masters = masters
        self.groups = groups
        self.bucket_size = bucket_size
        self.update_factors = update_factors

    def factors(self, items) -> int:
        """Factor path: the deltas of a bucket are all-gathered over DP (the factors themselves
        were gathered once at init); the next bucket's all-gather runs under this bucket's GEMMs."""
        sent = 0

        def launch(bucket):
            nonlocal sent
            flat = _flat(bucket)
            if self.groups.dp_size > 1:
                sent += flat.numel() * flat.element_size()
            return all_gather_over_dp(flat, self.groups, async_op=True)

        todo = list(buckets(items, lambda it: it[1].numel() + it[2].numel(), self.bucket_size))
        pending = launch(todo[0]) if todo else None
        for i, bucket in enumerate(todo):
            gathered, handle = pending
            if i + 1 < len(todo):
                pending = launch(todo[i + 1])
            if handle is not None:
                handle.wait()
            for entry, da, db, d_a_all, d_b_all in _split(gathered, bucket):
                a_all, b_all = entry.adapter.all_factors(entry.part.name)
                self._merge(entry, *left_right(a_all, b_all, d_a_all, d_b_all))
                if self.update_factors:
                    _move(entry, da, db, d_a_all, d_b_all)
        return sent

    def _merge(self, entry: Entry, left, right) -> None:
        """W -= left @ right (only the rows of my block with sharded masters)."""
        if entry.block_sel is not None:
            left = left.index_select(0, entry.block_sel)
        rows = self.masters.in_place_rows(entry)
        if rows is not None:  # in place, no m x n temporary
            rows.addmm_(left, right, alpha=-1.0)
        else:
            self.masters.subtract(entry, left @ right)

    @staticmethod
    def _own_update(entry: Entry, da, db) -> torch.Tensor:
        """This rank's own update sum_l [(B_l - dB_l)(A_l - dA_l) - B_l A_l] over its local slices."""
        ad = entry.adapter
        lo, hi = ad.first_slice, ad.first_slice + ad.local_slices
        a_all, b_all = ad.all_factors(entry.part.name)
        left, right = left_right(a_all[lo:hi], b_all[lo:hi], da, db)
        return left @ right

    def dense(self, items) -> int:
        """Dense path: each rank's own update, summed over DP by one all-reduce per bucket; with
        sharded masters by one reduce-scatter, each rank receiving its own row block only."""
        if self.masters.mode == "sharded-fp32" and self.groups.dp_size > 1:
            return self._dense_sharded(items)
        sent = 0
        for bucket in buckets(items, _dense_size, self.bucket_size):
            updates = [self._own_update(*item) for item in bucket]
            flat = torch.cat([u.reshape(-1) for u in updates])
            if self.groups.dp_size > 1:
                sent += flat.numel() * flat.element_size()
            sum_over_dp_(flat, self.groups)
            off = 0
            for (entry, _, _), u in zip(bucket, updates):
                self.masters.subtract(entry, flat[off:off + u.numel()].view_as(u), rows_subset=entry.block_sel)
                off += u.numel()
            self._gather_moved_factors(bucket)
        return sent

    def _dense_sharded(self, items) -> int:
        """The updates of a bucket's parts are placed in their weights' rows (padded to DP x block
        rows), reduce-scattered over DP, and each rank subtracts the rows of its block from its master."""
        g, sent = self.groups, 0
        for bucket in buckets(items, _dense_size, self.bucket_size):
            padded = {}  # id(weight) -> (master, dp * block rows)
            for entry, da, db in bucket:
                m = self.masters.master_of(entry.weight)
                if id(entry.weight) not in padded:
                    rows = torch.zeros(g.dp_size * m.block, entry.weight.shape[1], device=entry.weight.device,
                                       dtype=torch.float32)
                    padded[id(entry.weight)] = (m, rows)
                padded[id(entry.weight)][1].index_add_(0, entry.rows, self._own_update(entry, da, db))
            flat = torch.cat([rows.view(g.dp_size, -1) for _, rows in padded.values()], 1)
            sent += flat.numel() * flat.element_size()
            mine = reduce_scatter_over_dp(flat, g)
            off = 0
            for m, rows in padded.values():
                n = rows.shape[1]
                m.data.sub_(mine[off:off + (m.hi - m.lo) * n].view(m.hi - m.lo, n))
                off += m.block * n
            self._gather_moved_factors(bucket)
        return sent

    def _gather_moved_factors(self, bucket) -> None:
        """Dense path with update_factors: every slice's copy of the factors takes its step too."""
        if not self.update_factors:
            return
        gathered, _ = all_gather_over_dp(_flat(bucket), self.groups)
        for entry, da, db, d_a_all, d_b_all in _split(gathered, bucket):
            _move(entry, da, db, d_a_all, d_b_all)


@torch.no_grad()
def gather_factors(entries: list[Entry], groups: ParallelGroups) -> None:
    """Re-gather all slices' factors from every rank's local parameters (after loading moved factors)."""
    for e in entries:
        a_all, b_all = e.adapter.all_factors(e.part.name)
        all_gather_into(a_all, e.a, groups)
        all_gather_into(b_all, e.b, groups)


@torch.no_grad()
def check_consistency(entries: list[Entry], groups: ParallelGroups, step: int) -> None:
    """Fail loudly on every rank, naming the layer, if the DP ranks of any stage (and TP shard)
    hold different weights: a fingerprint of each weight is compared across the DP group, and the
    verdict is shared over TP and PP so no rank goes on alone."""
    if groups.dp_size == 1:
        return
    names, prints, seen = [], [], set()
    for e in entries:
        if id(e.weight) in seen:
            continue
        seen.add(id(e.weight))
        w = e.weight.detach().double().reshape(-1)
        idx = torch.arange(w.numel(), device=w.device, dtype=torch.float64).remainder_(FINGERPRINT_MODULUS)
        prints.append(torch.stack([w.sum(), (w * w).sum(), (w * idx).sum()]))
        names.append(e.name)
    local = torch.stack(prints)
    gathered = all_gather_over_dp(local.reshape(-1), groups)[0].view(groups.dp_size, *local.shape)
    found = None  # (layer index, DP rank) of the first difference
    for rank, other in enumerate(gathered):
        diff = (other != local).any(dim=1)
        if found is None and bool(diff.any()):
            found = int(diff.nonzero()[0]), rank
    me = dist.get_rank() if dist.is_initialized() else 0
    where = any_rank(found is not None, groups, value=me + 1)
    if found is not None:
        raise RuntimeError(f"data-parallel divergence after optimizer step {step}: layer {names[found[0]]} "
                           f"differs between DP rank {groups.dp_rank} and DP rank {found[1]}")
    if where:
        raise RuntimeError(f"data-parallel divergence after optimizer step {step}, found on global rank "
                           f"{where - 1} (pipeline stage or tensor-parallel shard other than this rank's)")
