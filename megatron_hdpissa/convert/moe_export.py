"""MoE experts of a trained model put back into the legacy layout (every expert in each TP shard, expert-TP = TP) for the merged export, from any expert-parallel / expert-TP layout."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from megatron_hdpissa.distributed.collectives import barrier
from megatron_hdpissa.distributed.groups import ParallelGroups

_EXPERT = re.compile(r"(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..+)")


def experts_in_tp_layout(base: dict, groups: ParallelGroups, folder) -> dict:
    """`base` (this rank's state dict) with its local experts replaced by every expert of the
    model split over TP as the legacy files hold them. Collective (a barrier): one replica of
    each (EP, expert-TP) shard writes its experts, by global id, under `folder`; each rank then
    joins the expert-TP parts of every expert and slices its TP rank's part. A dense model or the
    files' own layout (EP = 1, expert-TP = TP) is returned unchanged."""
    local = {k: v for k, v in base.items() if _EXPERT.fullmatch(k)}
    if not local or (groups.ep_size == 1 and groups.etp_size == groups.tp_size):
        return base
    folder = Path(folder) / f"experts_pp{groups.pp_rank:03d}"
    num_local = 1 + max(int(_EXPERT.fullmatch(k).group(2)) for k in local)
    if groups.expert_dp_rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shard = {}
        for key, value in local.items():
            head, j, tail = _EXPERT.fullmatch(key).groups()
            shard[f"{head}{groups.ep_rank * num_local + int(j)}{tail}"] = value
        torch.save(shard, folder / f"ep{groups.ep_rank:03d}_etp{groups.etp_rank:03d}.pt")
    barrier()
    parts: dict[str, list] = {}
    for etp in range(groups.etp_size):
        for ep in range(groups.ep_size):
            path = folder / f"ep{ep:03d}_etp{etp:03d}.pt"
            for key, value in torch.load(path, weights_only=True).items():
                parts.setdefault(key, [None] * groups.etp_size)[etp] = value
    out = {k: v for k, v in base.items() if k not in local}
    tp, t = groups.tp_size, groups.tp_rank
    for key, shards in parts.items():
        if key.endswith("linear_fc1.weight"):  # each shard [gate rows; up rows]
            gate = torch.cat([s.chunk(2, dim=0)[0] for s in shards], dim=0)
            up = torch.cat([s.chunk(2, dim=0)[1] for s in shards], dim=0)
            out[key] = torch.cat([gate.chunk(tp, dim=0)[t], up.chunk(tp, dim=0)[t]], dim=0)
        elif key.endswith("linear_fc2.weight"):
            out[key] = torch.cat(shards, dim=1).chunk(tp, dim=1)[t].contiguous()
        else:  # _extra_state and the like
            out[key] = shards[0]
    return out
