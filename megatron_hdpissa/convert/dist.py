"""torch_dist checkpoints as whole-model state dicts: read in one process and resliced, or written via a GPTModel."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from megatron_hdpissa.checkpoint.dist import FORMAT_TAG, save_model_checkpoint
from megatron_hdpissa.checkpoint.safe_load import read_dcp_metadata, read_global_tensors
from megatron_hdpissa.convert.hf_mapping import hf_tensors_from_megatron, megatron_shard_from_hf
from megatron_hdpissa.convert.hf_moe import unstack_experts
from megatron_hdpissa.convert.hf_sources import TensorSource
from megatron_hdpissa.checkpoint.legacy import CheckpointInfo
from megatron_hdpissa.models.config import ModelConfig, validate_tp
from megatron_hdpissa.models.pipeline_stages import layer_key, validate_pp


_MODEL_PREFIXES = ("embedding.", "output_layer.", "decoder.")  # GPTModel's sharded keys


def _local_layer_names() -> list[tuple[str, str]]:
    """(sharded-key prefix, module-name prefix) pairs of the layer spec's
    `sharded_state_dict_keys_map` (the local spec saves `input_layernorm.weight` as
    `self_attention.linear_qkv.layer_norm_weight`, as TransformerEngine's fused layers name it)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    return [(sharded, local) for local, sharded in keys_map.items()]


def dist_whole_state_dict(iter_dir, config: ModelConfig) -> dict:
    """A torch_dist folder as the whole-model state dict a TP=1, PP=1 GPTModel holds (global
    layer numbering, no `_extra_state`), read in this process without a process group."""
    iter_dir = Path(iter_dir)
    renames = _local_layer_names()
    whole: dict = {}
    layer_pattern = re.compile(r"decoder\.layers\.(?:(\d+)\.)?(.+)")
    for key, tensor in read_global_tensors(iter_dir, _model_tensor_keys(iter_dir)).items():
        m = layer_pattern.fullmatch(key)
        if m is None:
            if key.startswith(_MODEL_PREFIXES[:2]) or key.startswith("decoder.final_layernorm."):
                whole[key] = tensor
                continue
            continue  # not model state (the caller's extra sharded state)
        if m.group(1) is not None:  # one key per layer
            items = [(int(m.group(1)), tensor)]
        else:  # layers stacked on a leading axis (megatron-core's default)
            if tensor.shape[0] != config.num_layers:
                raise ValueError(f"{iter_dir}: {key!r} stacks {tensor.shape[0]} layers, the model has "
                                 f"{config.num_layers}")
            items = list(enumerate(tensor.unbind(0)))
        name = m.group(2)
        for sharded, local in renames:
            if name.startswith(sharded):
                name = local + name[len(sharded):]
        for i, t in items:
            whole.update(unstack_experts(layer_key(i, name), t, config, iter_dir))
    for key in [k for k in whole if k.endswith("linear_fc1.weight_w")]:  # swiglu saved as two tensors
        whole[key[:-2]] = torch.cat([whole.pop(key), whole.pop(key[:-1] + "v")], dim=0)
    if not whole:
        raise ValueError(f"{iter_dir}: the torch_dist checkpoint holds no GPTModel tensors")
    return whole


def _model_tensor_keys(iter_dir) -> list[str]:
    """The GPTModel's tensor keys of a torch_dist folder (not the optimizer's or the trainer's)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return [key for key, md in read_dcp_metadata(iter_dir).state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata) and key.startswith(_MODEL_PREFIXES)]


def dist_rank_state_dict(info: CheckpointInfo, tp_rank: int, tp_size: int, pp_rank: int,
                         pp_size: int) -> dict:
    """A torch_dist checkpoint's state dict for (TP rank, stage) of any layout, resliced in this process."""
    config = ModelConfig.load(info.directory)
    validate_tp(config, tp_size)
    validate_pp(config, pp_size)
    whole = dist_whole_state_dict(info.iter_dir, config)
    hf = dict(hf_tensors_from_megatron([whole], config))
    return megatron_shard_from_hf(TensorSource(hf, info.iter_dir), config, tp_size, tp_rank,
                                  pp_size=pp_size, pp_rank=pp_rank)


@contextlib.contextmanager
def _single_process_group():
    """A one-rank gloo process group and megatron-core model-parallel state (TP = PP = 1) for
    the duration of a conversion, unless the caller already has them."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    own_pg = not dist.is_initialized()
    if own_pg:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise ValueError("converting to torch_dist is a single-process job: run it outside a "
                           f"distributed job (this process is one of {dist.get_world_size()} ranks)")
    own_mp = not ps.model_parallel_is_initialized()
    if own_mp:
        ps.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        if own_mp:
            ps.destroy_model_parallel()
        if own_pg:
            dist.destroy_process_group()


def save_whole_as_dist(whole: dict, config: ModelConfig, save_dir, iteration: int | str = 0) -> Path:
    """Write a whole-model (TP=1, PP=1) state dict as a torch_dist checkpoint iteration under
    `save_dir` through a real megatron-core GPTModel's `sharded_state_dict()` (one process)."""
    from megatron_hdpissa.models.gpt import build_gpt_model

    dtype = whole["embedding.word_embeddings.weight"].dtype
    with _single_process_group():
        model = build_gpt_model(config, tp_size=1, dtype=dtype, seed=None, perform_initialization=False)
        missing, unexpected = model.load_state_dict(whole, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"state dict does not fit the {config.model_type} GPTModel: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        return save_model_checkpoint(
            model, save_dir, iteration, layout={"tp": 1, "pp": 1, "dp": 1, "world": 1},
            common_state={"iteration": iteration, "checkpoint_version": 3.0,
                          "format": FORMAT_TAG})

