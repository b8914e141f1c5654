"""Pipeline stages of a GPTModel state dict: even layer ranges, split / merge with layer renumbering."""
from __future__ import annotations

import re

from megatron_hdpissa.models.config import ModelConfig

PP_FLAG = "--pipeline-model-parallel-size"
_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


# ---- megatron-core parameter names ------------------------------------------------------------
def layer_key(i: int, name: str) -> str:
    """The state-dict key of `name` in decoder layer `i`."""
    return f"decoder.layers.{i}.{name}"


# ---- pipeline stages --------------------------------------------------------------------------
def validate_pp(config: ModelConfig, pp_size: int) -> None:
    """Raise a ValueError naming the flag unless `pp_size` stages split the layers evenly."""
    if pp_size < 1:
        raise ValueError(f"{PP_FLAG} must be >= 1, got {pp_size}")
    if config.num_layers % pp_size:
        valid = [p for p in range(1, config.num_layers + 1) if config.num_layers % p == 0]
        raise ValueError(
            f"{PP_FLAG} {pp_size} does not divide num_layers={config.num_layers} of this "
            f"{config.model_type} model (stages hold equal numbers of layers); valid sizes: {valid}"
        )


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global indices of the layers pipeline stage `pp_rank` of `pp_size` holds (even split, as
    megatron-core's `get_transformer_layer_offset` without uneven-stage options)."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside {PP_FLAG} {pp_size}")
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _stage_of_key(key: str, config: ModelConfig, pp_size: int) -> tuple[int, str]:
    """(stage, local key) of a key of a whole-model (pipeline size 1) state dict."""
    m = _LAYER_KEY.fullmatch(key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if not 0 <= i < config.num_layers:
            raise ValueError(f"state dict key {key!r}: layer {i} outside the model's {config.num_layers} layers")
        per_stage = config.num_layers // pp_size
        return i // per_stage, layer_key(i % per_stage, rest)
    if key.startswith("embedding."):
        return 0, key
    if key.startswith(("decoder.final_layernorm.", "output_layer.")):
        return pp_size - 1, key
    raise ValueError(f"state dict key {key!r} belongs to no known pipeline stage")


def split_pipeline_stages(state_dict: dict, config: ModelConfig, pp_size: int) -> list[dict]:
    """Split one TP rank's whole-model state dict (global layer numbering, as pipeline size 1
    holds it) into the `pp_size` stage state dicts megatron-core's stage GPTModels hold (local
    numbering; with tied embeddings the last stage of P > 1 gets `output_layer.weight`, the same
    tensor as the first stage's word embedding). Tensors are shared, not copied."""
    validate_pp(config, pp_size)
    return [pipeline_stage_state_dict(state_dict, config, pp_size, r) for r in range(pp_size)]


def pipeline_stage_state_dict(state_dict: dict, config: ModelConfig, pp_size: int, pp_rank: int) -> dict:
    """Stage `pp_rank` of `split_pipeline_stages(state_dict, config, pp_size)`."""
    validate_pp(config, pp_size)
    stage: dict = {}
    for key, value in state_dict.items():
        p, local = _stage_of_key(key, config, pp_size)
        if p == pp_rank:
            stage[local] = value
    if pp_size > 1 and pp_rank == pp_size - 1 and config.tie_word_embeddings:
        if "embedding.word_embeddings.weight" not in state_dict:
            raise ValueError("state dict has no 'embedding.word_embeddings.weight' to tie the last "
                             "pipeline stage's output layer to")
        stage["output_layer.weight"] = state_dict["embedding.word_embeddings.weight"]
    return stage


def merge_pipeline_stages(stage_state_dicts, config: ModelConfig) -> dict:
    """Inverse of `split_pipeline_stages`: one TP rank's stage state dicts, in pipeline order,
    into a whole-model state dict with global layer numbering (as pipeline size 1 holds it). With
    tied embeddings the last stage's copy of the word embedding is dropped and the first stage's
    kept (training keeps the two equal: megatron-core all-reduces their gradients). Tensors are
    shared, not copied."""
    stages = list(stage_state_dicts)
    pp_size = len(stages)
    validate_pp(config, pp_size)
    per_stage = config.num_layers // pp_size
    merged: dict = {}
    for pp_rank, stage in enumerate(stages):
        for key, value in stage.items():
            m = _LAYER_KEY.fullmatch(key)
            if m:
                i = int(m.group(1))
                if not 0 <= i < per_stage:
                    raise ValueError(
                        f"pipeline stage {pp_rank} holds {key!r}, but with {PP_FLAG} {pp_size} a "
                        f"stage of this {config.num_layers}-layer model has {per_stage} layers"
                    )
                key = layer_key(pp_rank * per_stage + i, m.group(2))
            elif (pp_size > 1 and pp_rank == pp_size - 1 and config.tie_word_embeddings
                  and key == "output_layer.weight"):
                continue  # the last stage's copy of the tied word embedding
            if key in merged:
                raise ValueError(f"{key!r} is held by more than one pipeline stage")
            merged[key] = value
    return merged


def merge_pipeline_shards(shards, config: ModelConfig) -> list[dict]:
    """Per-(TP rank, PP rank) state dicts -> the per-TP-rank whole-model state dicts (global layer
    numbering) that `hf_tensors_from_megatron` merges. `shards` is a mapping
    `{(tp_rank, pp_rank): state_dict}` covering every rank, or a list over TP ranks of lists over
    stages."""
    if isinstance(shards, dict):
        if not shards or not all(isinstance(k, tuple) and len(k) == 2 for k in shards):
            raise ValueError("shards must be keyed by (tp_rank, pp_rank)")
        tp_size = 1 + max(t for t, _ in shards)
        pp_size = 1 + max(p for _, p in shards)
        missing = [(t, p) for t in range(tp_size) for p in range(pp_size) if (t, p) not in shards]
        if missing:
            raise ValueError(f"state dicts of (tp_rank, pp_rank) {missing} are missing")
        grid = [[shards[(t, p)] for p in range(pp_size)] for t in range(tp_size)]
    else:
        grid = [list(stages) for stages in shards]
        if len({len(stages) for stages in grid}) > 1:
            raise ValueError("every TP rank needs the same number of pipeline stages")
    return [merge_pipeline_stages(stages, config) for stages in grid]


def pipeline_rank_and_size(pp_rank: int | None, pp_size: int | None) -> tuple[int, int]:
    """This rank's pipeline stage and size: what the caller passed, else megatron-core's
    initialised groups, else (0, 1)."""
    from megatron.core import parallel_state as ps

    initialised = ps.model_parallel_is_initialized()
    if pp_size is None:
        pp_size = ps.get_pipeline_model_parallel_world_size() if initialised else 1
    if pp_rank is None:
        pp_rank = ps.get_pipeline_model_parallel_rank() if initialised else 0
    return pp_rank, pp_size


__all__ = ["PP_FLAG", "layer_key", "merge_pipeline_shards", "merge_pipeline_stages", "pipeline_rank_and_size",
           "pipeline_stage_state_dict", "split_pipeline_stages", "stage_layers", "validate_pp"]
