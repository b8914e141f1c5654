"""The merged Hugging Face export of a trained model, gathered from every TP shard and pipeline stage."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_hdpissa.checkpoint.atomic import barrier, write_tracker
from megatron_hdpissa.checkpoint.legacy import rank_checkpoint_path
from megatron_hdpissa.checkpoint.trainer_state import copy_base_files, split_state_dict
from megatron_hdpissa.convert.hf_megatron import convert_megatron_to_hf
from megatron_hdpissa.convert.moe_export import experts_in_tp_layout
from megatron_hdpissa.distributed.collectives import broadcast_object
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.peft.common import LORA, PISSA


def export_merged_hf(model, groups: ParallelGroups, base_dir, out_dir: str, peft: str, log) -> None:
    """Merge adapters (LoRA / PiSSA; HD-PiSSA's weights already are) and write an HF folder.
    Collective: DP rank 0 of every (TP, PP) position writes its shard into a temporary Megatron
    checkpoint, which rank 0 converts (the converter joins TP shards and pipeline stages)."""
    from megatron_hdpissa.peft.lowrank.model import merge_lowrank

    if peft in (LORA, PISSA):
        merge_lowrank(model)
    rank0 = (dist.get_rank() if dist.is_initialized() else 0) == 0
    parent = Path(out_dir).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=parent)) if rank0 else None
    if dist.is_initialized():
        tmp = Path(broadcast_object(str(tmp) if tmp else None, src=0))
    base, _ = split_state_dict(model)
    base = experts_in_tp_layout(base, groups, tmp)  # MoE at EP > 1 / expert-TP != TP: every expert per TP shard
    if groups.dp_rank == 0:  # every (TP, PP) position writes its shard of the Megatron layout
        path = rank_checkpoint_path(tmp, 0, groups.tp_rank, groups.pp_rank, groups.pp_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": base, "iteration": 0, "tensor_model_parallel_size": groups.tp_size,
                    "pipeline_model_parallel_size": groups.pp_size}, path)
    barrier()
    if rank0:
        try:
            copy_base_files(tmp, base_dir)  # a folder, or convert.pretrained.PretrainedBase
            write_tracker(tmp, 0)
            convert_megatron_to_hf(tmp, out_dir, force=True, progress=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"exported the merged model to {out_dir}")
    barrier()
