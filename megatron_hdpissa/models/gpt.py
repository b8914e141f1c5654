"""megatron-core GPTModel building: a ModelConfig's `TransformerConfig` and `build_gpt_model` (local layer spec)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron_hdpissa.models.config import TP_FLAG, ModelConfig, as_model_config, validate_tp
from megatron_hdpissa.models.moe import moe_transformer_fields, validate_expert_parallel
from megatron_hdpissa.models.recompute import RECOMPUTE_GRANULARITIES, RECOMPUTE_METHODS

DEFAULT_SEED = 1234  # Megatron-LM's --seed default
# --attention-backend (Megatron-LM's flag name): core attention on torch's scaled_dot_product_attention
# (models/attention.py, the default), or megatron-core's DotProductAttention (s x s scores in memory)
SDPA, LOCAL = "sdpa", "local"
ATTENTION_BACKENDS = (SDPA, LOCAL)


def check_attention_backend(attention_backend: str, config: ModelConfig, document_masks: bool) -> None:
    """Refuse what would silently be inexact: megatron-core's DotProductAttention lets a sliding
    window replace a given mask, so packed rows (per-document masks) would attend across examples."""
    if document_masks and attention_backend == LOCAL and config.sliding_window:
        raise ValueError(f"--pack with --attention-backend {LOCAL} on a sliding-window model (window "
                         f"{config.sliding_window}): megatron-core's DotProductAttention drops the per-document "
                         f"mask under a window; use --attention-backend {SDPA}")


def parallelism_overrides(
    tp_size: int,
    seq_length: int,
    num_layers: int,
    *,
    pp_size: int = 1,
    sequence_parallel: bool = False,
    recompute_granularity: str | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    recompute_modules: list[str] | None = None,
) -> dict:
    """`TransformerConfig` overrides for sequence parallelism and activation recompute, checked
    up front so bad input fails naming Megatron-LM's flag rather than deep inside megatron-core."""
    if sequence_parallel and tp_size == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1 (it shards the "
                         "sequence over the tensor-parallel group)")
    if sequence_parallel and seq_length % tp_size:
        raise ValueError(f"--sequence-parallel: --seq-length {seq_length} is not divisible by "
                         f"--tensor-model-parallel-size {tp_size}")
    out: dict = {"sequence_parallel": bool(sequence_parallel)}
    if recompute_granularity is None:
        if recompute_method is not None or recompute_num_layers is not None:
            raise ValueError("--recompute-method / --recompute-num-layers need --recompute-granularity")
        return out
    if recompute_granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"--recompute-granularity {recompute_granularity!r}: choose from "
                         f"{', '.join(RECOMPUTE_GRANULARITIES)}")
    out["recompute_granularity"] = recompute_granularity
    if recompute_granularity == "selective":
        if recompute_method is not None or recompute_num_layers is not None:
            raise ValueError("--recompute-granularity selective takes no --recompute-method or "
                             "--recompute-num-layers (megatron-core recomputes the chosen submodules "
                             "of every layer; pick them with --recompute-modules)")
        if recompute_modules:
            out["recompute_modules"] = list(recompute_modules)
        return out
    if recompute_method not in RECOMPUTE_METHODS:
        raise ValueError(f"--recompute-granularity full needs --recompute-method "
                         f"{' or '.join(RECOMPUTE_METHODS)}, got {recompute_method!r}")
    layers_per_stage = num_layers // max(pp_size, 1)
    n = 1 if recompute_num_layers is None else recompute_num_layers
    if not 1 <= n <= layers_per_stage:
        raise ValueError(f"--recompute-num-layers {n} must be between 1 and the {layers_per_stage} "
                         f"layers of a pipeline stage")
    out.update(recompute_method=recompute_method, recompute_num_layers=n)
    return out


def transformer_config(
    config: ModelConfig, tp_size: int = 1, dtype: torch.dtype = torch.float32, *, ep_size: int = 1,
    etp_size: int | None = None, **overrides
):
    """megatron-core `TransformerConfig` for `config` (local implementation, no fused kernels);
    an MoE model's layers get experts split over `ep_size` ranks and `etp_size` (None: TP) ranks."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    validate_tp(config, tp_size)
    etp_size = validate_expert_parallel(config, tp_size, ep_size, etp_size)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
    kwargs = dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups,
        kv_channels=config.kv_channels,
        tensor_model_parallel_size=tp_size,
        normalization="RMSNorm",
        layernorm_epsilon=config.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=config.qkv_bias,
        qk_layernorm=config.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=config.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Fused kernels need apex / TE / CUDA; plain torch paths are exact and portable.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        window_size=(config.sliding_window - 1, 0) if config.sliding_window else None,
        **moe_transformer_fields(config, ep_size, etp_size),
    )
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    if "transformer_impl" in known:
        kwargs["transformer_impl"] = "local"
    kwargs.update(overrides)
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"TransformerConfig has no fields {sorted(unknown)}")
    return TransformerConfig(**kwargs)


def build_gpt_model(
    config: Any,
    tp_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    parallel_output: bool = True,
    seed: int | None = DEFAULT_SEED,
    pre_process: bool = True,
    post_process: bool = True,
    attention_backend: str = SDPA,
    **overrides,
):
    """A megatron-core `GPTModel` (local layer spec) for this rank's TP shard.

    `config`: ModelConfig, HF config/dict/folder, or a converted checkpoint folder. `tp_size`
    must match megatron-core's initialised TP group (defaults to it). `seed` seeds the
    model-parallel RNG tracker first, as Megatron-LM does (None: the caller already did).
    `parallel_output=False` gathers full-vocabulary logits. `attention_backend`: "sdpa"
    (`models.attention.SDPAttention`) or "local" (megatron-core's `DotProductAttention`); both have
    no parameters, so checkpoints do not depend on it. `overrides` go to TransformerConfig
    (e.g. `sequence_parallel=True`, `recompute_granularity="full"`).

    An MoE config (Qwen3-MoE, Mixtral) gets megatron-core MoE layers: a router, local experts as
    `SequentialMLP` split over megatron-core's initialised expert-parallel and expert-TP groups,
    the all-to-all token dispatcher (`moe_token_dispatcher_type` in `overrides` picks another),
    no capacity factor (no token is dropped).
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_hdpissa.models.compat import ensure_cpu_compat
    from megatron_hdpissa.models.norms import needs_own_norm, sequence_parallel_block_spec

    ensure_cpu_compat()
    model_config = as_model_config(config)
    group_tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    if tp_size is None:
        tp_size = group_tp
    validate_tp(model_config, tp_size)
    if tp_size != group_tp:
        raise ValueError(
            f"{TP_FLAG} {tp_size} differs from megatron-core's initialised tensor-parallel "
            f"group size {group_tp}"
        )
    ep_size, etp_size = 1, None
    if model_config.num_experts:
        from megatron_hdpissa.models.moe_compat import ensure_moe_compat

        ensure_moe_compat()
        if ps.model_parallel_is_initialized():
            ep_size = ps.get_expert_model_parallel_world_size()
            etp_size = ps.get_expert_tensor_parallel_world_size()
    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend {attention_backend!r}: choose from {', '.join(ATTENTION_BACKENDS)}")
    tconfig = transformer_config(model_config, tp_size, dtype, ep_size=ep_size, etp_size=etp_size, **overrides)
    layer_spec = get_gpt_layer_local_spec(num_experts=model_config.num_experts, moe_grouped_gemm=False,
                                          normalization="RMSNorm", qk_layernorm=model_config.qk_layernorm)
    if attention_backend == SDPA:
        from megatron_hdpissa.models.attention import SDPAttention

        layer_spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if tconfig.sequence_parallel and needs_own_norm():
        layer_spec = sequence_parallel_block_spec(layer_spec, tconfig)
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=layer_spec,
        vocab_size=model_config.vocab_size,
        max_sequence_length=model_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=model_config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=model_config.rope_theta,
        rope_scaling=model_config.rope_scaling_factor is not None,
        rope_scaling_factor=model_config.rope_scaling_factor or 8.0,
    )
