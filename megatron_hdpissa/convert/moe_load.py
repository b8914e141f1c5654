"""Legacy MoE checkpoints read at another expert layout: every TP shard holds every expert split over expert-TP = TP; a rank of an expert-parallel or other expert-TP layout gets its local experts resliced."""
from __future__ import annotations

from megatron_hdpissa.checkpoint.dist import TORCH
from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info, stage_state_dict
from megatron_hdpissa.convert.hf_mapping import hf_tensors_from_megatron, megatron_shard_from_hf
from megatron_hdpissa.convert.hf_sources import TensorSource
from megatron_hdpissa.models.config import ModelConfig
from megatron_hdpissa.models.pipeline_stages import merge_pipeline_shards


def expert_ranks(tp_rank: int, tp_size: int) -> tuple[int, int, int, int]:
    """(EP size, EP rank, expert-TP size, expert-TP rank) of this process from megatron-core's
    parallel_state when it is initialised and `tp_rank` is this process's own TP rank; else the
    layout legacy files hold (EP = 1, expert-TP = TP)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_rank() == tp_rank \
            and ps.get_tensor_model_parallel_world_size() == tp_size:
        return (ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank(),
                ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank())
    return 1, 0, tp_size, tp_rank


def legacy_moe_state_dict(ckpt_dir, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int) -> dict | None:
    """For loading into this process's model: the legacy checkpoint's state dict of (TP rank,
    stage) at this job's expert layout when it is not the files' own (EP = 1, expert-TP = TP),
    built from every TP shard (the whole model in memory); None when the files' own layout fits,
    the model is dense or the checkpoint is torch_dist (megatron-core reshards it)."""
    info = read_checkpoint_info(ckpt_dir)
    if info.ckpt_format != TORCH:
        return None
    config = ModelConfig.load(info.directory)
    if not config.num_experts or tp_size != info.tp_size:
        return None
    ep_size, ep_rank, etp_size, etp_rank = expert_ranks(tp_rank, tp_size)
    if ep_size == 1 and etp_size == tp_size:
        return None
    shards = merge_pipeline_shards({(t, p): stage_state_dict(info, t, p) for t in range(info.tp_size)
                                    for p in range(info.pp_size)}, config)
    hf = dict(hf_tensors_from_megatron(shards, config))
    return megatron_shard_from_hf(TensorSource(hf, info.directory), config, tp_size, tp_rank,
                                  pp_size=pp_size, pp_rank=pp_rank, ep_size=ep_size, ep_rank=ep_rank,
                                  etp_size=etp_size, etp_rank=etp_rank)
