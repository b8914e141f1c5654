"""Mixture-of-experts weights in the effective-rank tool: on an MoE model the MLP projections
(`gate_proj`, `up_proj`, `down_proj`) stand for every expert's matrix (and Qwen2-MoE's shared
expert's), each analysed on its own, under its HF name (`convert.hf_moe`: Mixtral's `w1` / `w3` /
`w2` included). HD-PiSSA's update of an expert is rank 2Kr wherever every data shard routed at
least r tokens to it (DESIGN §1a)."""
from __future__ import annotations

from typing import Optional

from megatron_hdpissa.models.moe import MOE_FIELDS

_EXPERT_PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def hf_moe_config(hf_config: dict):
    """The `ModelConfig` of an HF config.json dict of an MoE model (None for a dense one, which
    the tool reads without a ModelConfig)."""
    if not any(hf_config.get(k) for k in MOE_FIELDS):
        return None
    from megatron_hdpissa.models.config import ModelConfig

    return ModelConfig.from_hf(hf_config)


def expert_matrix_names(model_config, layer: int, projection: str) -> Optional[list[str]]:
    """HF names of the matrices `projection` stands for in `layer` of an MoE model: each expert's
    (in expert order), then the shared expert's; None for a dense model or an attention projection."""
    if model_config is None or not model_config.num_experts or projection not in _EXPERT_PARTS:
        return None
    from megatron_hdpissa.convert.hf_moe import expert_key

    part = _EXPERT_PARTS[projection]
    names = [expert_key(model_config, layer, e, part) for e in range(model_config.num_experts)]
    if model_config.moe_shared_expert_size:
        names.append(f"model.layers.{layer}.mlp.shared_expert.{projection}.weight")
    return names
