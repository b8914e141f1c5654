"""Top-k singular decomposition of full (TP-gathered) weights, spread over a pipeline stage's ranks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megatron_hdpissa.distributed.collectives import all_gather_list, broadcast_
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.peft.common import COLUMN
from megatron_hdpissa.peft.layout import Part


def top_singular(w: torch.Tensor, k: int, method: str = "exact", oversampling: int | None = None,
                 niter: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets (U: m x k, S: k, V: n x k) of `w`, computed in fp32, descending.
    Randomized: sketch size q = k + oversampling (default 2k); when q is more than half the
    smaller side the exact SVD is as cheap and exact, so it is used instead."""
    w = w.float()
    q = k + (k if oversampling is None else oversampling)
    if method == "randomized" and 2 * q > min(w.shape):
        method = "exact"
    if method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].t().contiguous()
    if method == "randomized":
        q = min(q, min(w.shape))
        devices = [w.device] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
        return u[:, :k].contiguous(), s[:k].contiguous(), v[:, :k].contiguous()
    raise ValueError(f"unknown decomposition method {method!r}")


def slice_factors(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, num_slices: int, rank: int):
    """All slices' factors: A (K, r, n) = diag(sqrt(S_k)) V_k^T, B (K, m, r) = U_k diag(sqrt(S_k))."""
    m, n = u.shape[0], v.shape[0]
    sq = s.clamp_min(0).sqrt().view(num_slices, rank)
    a = v.t().reshape(num_slices, rank, n) * sq.unsqueeze(-1)
    b = u.reshape(m, num_slices, rank).permute(1, 0, 2) * sq.unsqueeze(1)
    return a.contiguous(), b.contiguous()


@dataclass
class Unit:
    """One logical matrix to decompose (a part of a targeted layer, with its full shape), how
    many leading components it needs, and what to do with them (`fill(u, s, v)` on every rank)."""

    kind: str  # COLUMN or ROW
    weight: torch.Tensor  # the layer's local weight shard
    part: Part
    rows: int  # full logical m
    cols: int  # full logical n
    components: int
    fill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]

    def gather_full(self, groups: ParallelGroups) -> torch.Tensor:
        """The full logical matrix on every rank of the TP group (concatenating shards)."""
        w = self.weight.detach()
        local = self.part.select(w) if self.kind == COLUMN else w
        if groups.tp_size == 1:
            return local
        shards = all_gather_list(local, groups.tp_group, groups.tp_size)
        return torch.cat(shards, 0 if self.kind == COLUMN else 1)


def stage_group(groups: ParallelGroups):
    """The process group of every rank on this pipeline stage (its TP x DP ranks): megatron-core's
    tensor-and-data-parallel group. None at PP = 1, where the stage is the world."""
    if groups.pp_size == 1 or not dist.is_initialized():
        return None
    from megatron.core import parallel_state as ps

    return ps.get_tensor_and_data_parallel_group()


def decompose_units(units: list[Unit], groups: ParallelGroups, method: str, oversampling: int,
                    niter: int, seed: int, progress: bool = True) -> None:
    """Decompose every unit and call its `fill` on every rank. Unit i is decomposed by rank
    i % size of this pipeline stage's ranks (all gathers first, then the SVDs in parallel, then
    one broadcast per unit), so a randomized decomposition is computed once and every rank of
    the stage receives identical factors; a layer exists only on its own stage."""
    distributed = dist.is_available() and dist.is_initialized()
    group = stage_group(groups) if distributed else None
    world = dist.get_world_size(group) if distributed else 1
    me = dist.get_rank(group) if distributed else 0
    # seeds by global unit index (stages hold equal numbers of layers), no cross-stage collective
    seed = seed + groups.pp_rank * len(units)
    owned: dict[int, torch.Tensor] = {}
    for i, unit in enumerate(units):
        full = unit.gather_full(groups)
        if i % world == me:
            owned[i] = full
    results = {}
    bar = _progress(len(owned), "decomposing", enabled=progress and me == 0)
    for i, full in owned.items():
        k = units[i].components
        results[i] = top_singular(full, k, method, oversampling, niter, seed=seed + i)
        owned[i] = None
        bar.update(1)
    bar.close()
    for i, unit in enumerate(units):
        k = unit.components
        m, n = unit.rows, unit.cols
        device = unit.weight.device
        if world > 1:
            buf = torch.empty(k * (m + n + 1), dtype=torch.float32, device=device)
            if i % world == me:
                u, s, v = results.pop(i)
                torch.cat([u.reshape(-1), s, v.reshape(-1)], out=buf)
            src = i % world if group is None else dist.get_global_rank(group, i % world)
            broadcast_(buf, src, group)
            u = buf[: m * k].view(m, k)
            s = buf[m * k: m * k + k]
            v = buf[m * k + k:].view(n, k)
        else:
            u, s, v = results.pop(i)
        unit.fill(u, s, v)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="matrix", leave=False)


def subspace_error(u_ref: torch.Tensor, u: torch.Tensor) -> float:
    """Largest principal-angle sine between span(u_ref) and span(u) (0 = identical subspaces)."""
    q1, _ = torch.linalg.qr(u_ref.double())
    q2, _ = torch.linalg.qr(u.double())
    cos = torch.linalg.svdvals(q1.t() @ q2).clamp(max=1.0)
    return float(math.sqrt(max(0.0, 1.0 - float(cos.min()) ** 2)))
