"""Megatron checkpoints (legacy or torch_dist) read at any TP / PP layout: state dicts, or loaded into a GPTModel.

`--ckpt-format torch_dist` checkpoints (megatron-core's dist_checkpointing, `checkpoint/dist.py`)
load at any TP / PP; legacy `mp_rank_TT[_PPP]` ones at their own TP and any pipeline size that
divides the layers (stages renumbered). Every reader detects the format from the iteration folder.
"""
from __future__ import annotations

import torch

from megatron_hdpissa.checkpoint.dist import TORCH, TORCH_DIST, load_model_checkpoint
from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info, stage_state_dict
from megatron_hdpissa.convert.dist import dist_rank_state_dict
from megatron_hdpissa.convert.moe_load import legacy_moe_state_dict
from megatron_hdpissa.models.config import TP_FLAG, ModelConfig
from megatron_hdpissa.models.pipeline_stages import (PP_FLAG, merge_pipeline_stages, pipeline_rank_and_size,
                                                     pipeline_stage_state_dict, validate_pp)


def load_megatron_state_dict(ckpt_dir, tp_rank: int, tp_size: int | None = None, *,
                             pp_rank: int = 0, pp_size: int | None = None) -> dict:
    """The model state dict of TP rank `tp_rank`, pipeline stage `pp_rank` of `pp_size`, as
    megatron-core's GPTModel on that stage holds it (local layer numbering; memory-mapped).

    A torch_dist checkpoint is resharded to any `tp_size` / `pp_size` (None: 1): the whole model
    is read in this process (no process group) and sliced as the HF converter slices it.

    Legacy: with `tp_size`, check the checkpoint was written for that tensor-parallel size (TP is
    not resharded). `pp_size` None: the checkpoint's own stages. Another `pp_size` reshards: the
    stage's layers are gathered from whichever stage files hold them and renumbered, so a
    checkpoint saved at any pipeline size loads at any other that divides the layers (pp_size=1
    gives the whole model)."""
    info = read_checkpoint_info(ckpt_dir)
    if info.ckpt_format == TORCH_DIST:
        return dist_rank_state_dict(info, tp_rank, tp_size or 1, pp_rank, pp_size or 1)
    if tp_size is not None and info.tp_size != tp_size:
        raise ValueError(
            f"{info.directory} was saved with {TP_FLAG} {info.tp_size} but this run uses "
            f"{TP_FLAG} {tp_size}; convert it again for {tp_size} "
            f"(tools/convert_megatron_to_hf.py, then tools/convert_hf_to_megatron.py "
            f"{TP_FLAG} {tp_size})"
        )
    if not 0 <= tp_rank < info.tp_size:
        raise ValueError(f"tp_rank {tp_rank} is outside the checkpoint's {info.tp_size} shards")
    if pp_size is None:
        pp_size = info.pp_size
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} is outside {PP_FLAG} {pp_size}")
    if pp_size == info.pp_size:
        return stage_state_dict(info, tp_rank, pp_rank)
    config = ModelConfig.load(info.directory)
    try:
        validate_pp(config, pp_size)
    except ValueError as e:
        raise ValueError(f"cannot load {info.directory} (saved with {PP_FLAG} {info.pp_size}) at "
                         f"{PP_FLAG} {pp_size}: {e}") from None
    # Legacy stage files are keyed by local layer index: resharding is renumbering. The files
    # are memory-mapped, so only the tensors of the wanted stage are ever read.
    whole = merge_pipeline_stages(
        [stage_state_dict(info, tp_rank, p) for p in range(info.pp_size)], config)
    return pipeline_stage_state_dict(whole, config, pp_size, pp_rank)


def load_megatron_checkpoint(model, ckpt_dir, tp_rank: int | None = None, *,
                             pp_rank: int | None = None, pp_size: int | None = None) -> None:
    """Load this rank's (TP, pipeline stage) shard into a GPTModel built by
    `models.build_gpt_model` (strict). Ranks and sizes not given come from megatron-core's
    `parallel_state`; a checkpoint saved at another pipeline size is resharded on load. A
    torch_dist checkpoint loads at any TP / PP: inside an initialised megatron-core job, for this
    rank's own (TP, PP) position, through `dist_checkpointing.load` on every rank (collective),
    else (other ranks asked for, or no process group) by slicing in this process."""
    from megatron.core import parallel_state as ps

    initialised = ps.model_parallel_is_initialized()
    tp_size = ps.get_tensor_model_parallel_world_size() if initialised else 1
    own_ranks = initialised and (tp_rank is None or tp_rank == ps.get_tensor_model_parallel_rank())
    if tp_rank is None:
        tp_rank = ps.get_tensor_model_parallel_rank() if initialised else 0
    own_ranks = own_ranks and (pp_rank, pp_size) in ((None, None), pipeline_rank_and_size(None, None))
    pp_rank, pp_size = pipeline_rank_and_size(pp_rank, pp_size)
    if own_ranks and read_checkpoint_info(ckpt_dir).ckpt_format == TORCH_DIST:
        # this rank's own shard of the job's layout: megatron-core reshards (collective: every
        # rank of the job loads at the same time)
        load_model_checkpoint(model, read_checkpoint_info(ckpt_dir).iter_dir)
        return
    state_dict = legacy_moe_state_dict(ckpt_dir, tp_rank, tp_size, pp_rank, pp_size) or load_megatron_state_dict(
        ckpt_dir, tp_rank, tp_size, pp_rank=pp_rank, pp_size=pp_size)  # MoE: this job's expert layout
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        info = read_checkpoint_info(ckpt_dir)
        where = (info.iter_dir if info.ckpt_format != TORCH else
                 info.rank_file(tp_rank, pp_rank) if pp_size == info.pp_size else
                 f"{info.directory} (saved with {PP_FLAG} {info.pp_size}) resharded to stage "
                 f"{pp_rank} of {PP_FLAG} {pp_size}")
        raise ValueError(f"{where} does not fit the model: {e}") from e


def load_gpt_model(ckpt_dir, dtype: torch.dtype = torch.float32, **build_kwargs):
    """Build the GPTModel described by `DIR/model_config.json` for the current TP rank and
    pipeline stage (megatron-core's `parallel_state`) and load its weights. Returns
    `(model, model_config)`."""
    from megatron_hdpissa.models.gpt import build_gpt_model

    model_config = ModelConfig.load(ckpt_dir)
    pp_rank, pp_size = pipeline_rank_and_size(None, None)
    validate_pp(model_config, pp_size)
    build_kwargs.setdefault("pre_process", pp_rank == 0)
    build_kwargs.setdefault("post_process", pp_rank == pp_size - 1)
    if pp_size > 1:  # TransformerConfig fields: the stage builds num_layers / pp_size layers
        build_kwargs.setdefault("pipeline_model_parallel_size", pp_size)
        build_kwargs.setdefault("pipeline_dtype", dtype)
    model = build_gpt_model(model_config, dtype=dtype, **build_kwargs)
    load_megatron_checkpoint(model, ckpt_dir, pp_rank=pp_rank, pp_size=pp_size)
    return model, model_config
