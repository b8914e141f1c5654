"""Mixture-of-experts models: the Qwen3-MoE / Mixtral HF config fields read, megatron-core's MoE settings, and the expert-parallel sizes checked."""
from __future__ import annotations

from megatron_hdpissa.models.moe_router import check_router_flag

EP_FLAG = "--expert-model-parallel-size"
ETP_FLAG = "--expert-tensor-parallel-size"
# HF model_type -> transformers config / causal-LM class names of the MoE families read.
MOE_ARCHITECTURES = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
}
# Config fields that make a model a mixture of experts.
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def _expert_count(d: dict, model_type: str) -> int:
    """Qwen2/3-MoE: `num_experts` (transformers 4.x) or `num_local_experts` (5.x saves this name);
    Mixtral: `num_local_experts`."""
    names = ("num_local_experts",) if model_type == "mixtral" else ("num_experts", "num_local_experts")
    for name in names:
        if d.get(name):
            return int(d[name])
    raise ValueError(f"{model_type} config has no {' / '.join(names)} (the number of experts)")


def moe_fields_from_hf(d: dict) -> dict:
    """The ModelConfig fields of a Qwen3-MoE or Mixtral HF config dict (dense model types raise
    naming the MoE field they carry). Unsupported variants raise naming the HF config field."""
    model_type = d.get("model_type")
    moe = {k: d[k] for k in MOE_FIELDS if d.get(k)}
    if model_type not in MOE_ARCHITECTURES:
        raise ValueError(
            f"mixture-of-experts model_type={model_type!r}"
            + "".join(f", {k}={v}" for k, v in moe.items()) + f" is not supported; supported MoE "
            f"architectures: {sorted(MOE_ARCHITECTURES)} (with their own model_type)")
    experts = _expert_count(d, model_type)
    shown = f"{model_type} config (num_experts={experts})"
    ffn_field = "intermediate_size" if model_type == "mixtral" else "moe_intermediate_size"
    for name in ("num_experts_per_tok", ffn_field):
        if not d.get(name):
            raise ValueError(f"{shown} has no {name}")
    topk = int(d["num_experts_per_tok"])
    if not 1 <= topk <= experts:
        raise ValueError(f"{shown}: num_experts_per_tok={topk} must be between 1 and the number of experts")
    if model_type != "mixtral":
        if int(d.get("decoder_sparse_step", 1)) != 1:
            raise ValueError(f"{shown}: decoder_sparse_step={d['decoder_sparse_step']} (dense layers "
                             "between MoE layers) is not supported; every layer must be an MoE layer")
        if d.get("mlp_only_layers"):
            raise ValueError(f"{shown}: mlp_only_layers={d['mlp_only_layers']} (dense layers among MoE "
                             "layers) is not supported")
        # Qwen2/3-MoE: softmax over all experts, top-k, renormalised iff norm_topk_prob
        renormalise = bool(d.get("norm_topk_prob", False))
    else:
        renormalise = True  # Mixtral: softmax over all experts, top-k, renormalised
    # Qwen2-MoE: one shared expert on every token, scaled by sigmoid(shared_expert_gate x)
    shared = int(d.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
    for field in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
        if d.get(field) and not (model_type == "qwen2_moe" and field == "shared_expert_intermediate_size"):
            raise ValueError(f"{shown}: {field}={d[field]} (shared experts) is not supported")
    for field in ("router_bias", "moe_router_bias", "expert_bias", "mlp_bias"):
        if d.get(field):
            raise ValueError(f"{shown}: {field}=True (bias terms in the router or experts) is not supported")
    if topk == 1 and renormalise:
        # megatron-core refuses top-1 without pre-softmax; top-1 renormalised weighs by 1
        raise ValueError(f"{shown}: num_experts_per_tok=1 with a renormalised top-k "
                         f"({'Mixtral' if model_type == 'mixtral' else 'norm_topk_prob=True'}) is not "
                         "supported (megatron-core's top-1 router weighs by the softmax probability)")
    jitter = float(d.get("router_jitter_noise") or 0.0)
    return dict(
        num_experts=experts,
        moe_router_topk=topk,
        # megatron-core: softmax over the top-k logits == softmax over all, then renormalise;
        # pre-softmax: softmax over all experts, then top-k, not renormalised
        moe_router_pre_softmax=not renormalise,
        moe_aux_loss_coeff=float(d.get("router_aux_loss_coef") or 0.0),
        moe_input_jitter_eps=jitter or None,
        moe_shared_expert_size=shared or None,
        ffn_hidden_size=int(d[ffn_field]),
    )


def moe_hf_fields(config) -> dict:
    """The HF config fields of a ModelConfig's experts (none for a dense model)."""
    if not config.num_experts:
        return {}
    common = dict(num_experts_per_tok=config.moe_router_topk, router_aux_loss_coef=config.moe_aux_loss_coeff)
    if config.model_type in ("qwen2_moe", "qwen3_moe"):
        shared = {"shared_expert_intermediate_size": config.moe_shared_expert_size or 0,
                  "qkv_bias": config.qkv_bias} if config.model_type == "qwen2_moe" else {}
        return dict(common, num_experts=config.num_experts, moe_intermediate_size=config.ffn_hidden_size,
                    norm_topk_prob=not config.moe_router_pre_softmax, decoder_sparse_step=1, mlp_only_layers=[],
                    **shared)
    return dict(common, num_local_experts=config.num_experts,
                router_jitter_noise=config.moe_input_jitter_eps or 0.0)


def moe_hf_config_for_readers(d: dict) -> dict:
    """transformers 4.x reads Qwen2/3-MoE's expert count as `num_experts` (and defaults it),
    5.x saves `num_local_experts`: write both."""
    if d.get("model_type") in ("qwen2_moe", "qwen3_moe"):
        count = d.get("num_experts") or d.get("num_local_experts")
        if count:
            d["num_experts"] = d["num_local_experts"] = count
    return d


def validate_expert_parallel(config, tp_size: int, ep_size: int = 1, etp_size: int | None = None) -> int:
    """Check the expert-parallel sizes against the model; returns the expert-TP size (None: TP,
    megatron-core's default). Errors name the flags."""
    etp = tp_size if etp_size is None else etp_size
    if ep_size < 1:
        raise ValueError(f"{EP_FLAG} must be >= 1, got {ep_size}")
    if etp < 1:
        raise ValueError(f"{ETP_FLAG} must be >= 1, got {etp}")
    if not config.num_experts:
        if ep_size != 1 or (etp_size is not None and etp_size != tp_size):
            raise ValueError(f"{EP_FLAG} / {ETP_FLAG} need a mixture-of-experts model; this "
                             f"{config.model_type} model is dense")
        return etp
    if config.num_experts % ep_size:
        raise ValueError(f"{EP_FLAG} {ep_size} does not divide the {config.num_experts} experts of this "
                         f"{config.model_type} model; valid: "
                         f"{[e for e in range(1, config.num_experts + 1) if config.num_experts % e == 0]}")
    if config.ffn_hidden_size % etp:
        raise ValueError(f"{ETP_FLAG} {etp} does not divide the expert FFN size {config.ffn_hidden_size} of "
                         f"this {config.model_type} model")
    if config.moe_shared_expert_size and config.moe_shared_expert_size % tp_size:
        raise ValueError(f"--tensor-model-parallel-size {tp_size} does not divide the shared expert's FFN size "
                         f"{config.moe_shared_expert_size} (shared_expert_intermediate_size)")
    return etp


def moe_transformer_fields(config, ep_size: int, etp_size: int) -> dict:
    """megatron-core `TransformerConfig` fields of an MoE model (none for a dense one): local
    experts as SequentialMLP, no capacity factor (no token dropping), the all-to-all dispatcher."""
    if not config.num_experts:
        return {}
    coeff = config.moe_aux_loss_coeff
    return dict(
        num_moe_experts=config.num_experts,
        moe_ffn_hidden_size=config.ffn_hidden_size,
        moe_router_topk=config.moe_router_topk,
        moe_router_pre_softmax=config.moe_router_pre_softmax,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if coeff else "none",
        moe_aux_loss_coeff=coeff,
        moe_z_loss_coeff=None,  # neither family uses the router z-loss
        moe_input_jitter_eps=config.moe_input_jitter_eps,
        moe_router_dtype="fp32",  # HF computes the router softmax in float32
        moe_token_dispatcher_type="alltoall",
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=False,
        moe_shared_expert_intermediate_size=config.moe_shared_expert_size,
        moe_shared_expert_gate=bool(config.moe_shared_expert_size),  # Qwen2-MoE's sigmoid gate
        expert_model_parallel_size=ep_size,
        expert_tensor_parallel_size=etp_size,
    )


def moe_overrides(config, *, tp_size: int, ep_size: int = 1, etp_size: int | None = None,
                  sequence_parallel: bool = False, num_experts: int | None = None,
                  router_topk: int | None = None, aux_loss_coeff: float | None = None,
                  training: bool = True) -> dict:
    """The trainer's MoE flags checked against the checkpoint's model (they describe it, they do not
    change it); returns the `TransformerConfig` overrides (`--moe-aux-loss-coeff`)."""
    given = {"--num-experts": num_experts, "--moe-router-topk": router_topk, "--moe-aux-loss-coeff": aux_loss_coeff}
    if not config.num_experts:
        named = [flag for flag, value in given.items() if value is not None]
        if named:
            raise ValueError(f"{', '.join(named)}: this {config.model_type} model is dense (no experts)")
        validate_expert_parallel(config, tp_size, ep_size, etp_size)
        return {}
    for flag, value, own in (("--num-experts", num_experts, config.num_experts),
                             ("--moe-router-topk", router_topk, config.moe_router_topk)):
        if value is not None and value != own:
            raise ValueError(f"{flag} {value} disagrees with the checkpoint's {config.model_type} model "
                             f"({own}, from its model_config.json)")
    validate_expert_parallel(config, tp_size, ep_size, etp_size)
    if training and tp_size > 1 and not sequence_parallel:
        raise ValueError("--tensor-model-parallel-size > 1 on a mixture-of-experts model needs "
                         "--sequence-parallel (megatron-core's MoE layer refuses to train without it)")
    if aux_loss_coeff is None:
        return {}
    if aux_loss_coeff < 0:
        raise ValueError(f"--moe-aux-loss-coeff must be >= 0, got {aux_loss_coeff}")
    return {"moe_aux_loss_coeff": aux_loss_coeff,
            "moe_router_load_balancing_type": "aux_loss" if aux_loss_coeff else "none"}


# ---- the trainer's flags ----------------------------------------------------------------------------
def expert_parallel_sizes(args) -> dict:
    """`distributed.groups.initialize` keywords from `--expert-model-parallel-size` /
    `--expert-tensor-parallel-size`."""
    return dict(expert_model_parallel_size=args.expert_model_parallel_size,
                expert_tensor_parallel_size=args.expert_tensor_parallel_size)


def moe_flag_overrides(config, groups, args) -> dict:
    """`moe_overrides` for the trainer's flags and initialised groups, after the layout checks that
    depend on the checkpoint format and the backend."""
    check_router_flag(config, getattr(args, "moe_router_trainable", False))  # --moe-router-trainable
    if config.num_experts:
        check_expert_job_flags(args, groups.ep_size, groups.etp_size, groups.tp_size)
    return moe_overrides(config, tp_size=groups.tp_size, ep_size=groups.ep_size, etp_size=groups.etp_size,
                         sequence_parallel=args.sequence_parallel, num_experts=args.num_experts,
                         router_topk=args.moe_router_topk, aux_loss_coeff=args.moe_aux_loss_coeff)


def check_expert_job_flags(args, ep_size: int, etp_size: int, tp_size: int, backend: str | None = None) -> None:
    """Layouts a mixture-of-experts job cannot save or run, refused before the first step."""
    if args.save and args.ckpt_format == "torch" and (ep_size > 1 or etp_size != tp_size):
        # A legacy mp_rank_TT shard holds the experts of expert-parallel rank 0 only: the others
        # would be lost on save and loaded into the wrong experts on resume.
        raise ValueError(f"--ckpt-format torch cannot save a mixture-of-experts model at "
                         f"--expert-model-parallel-size {ep_size} / --expert-tensor-parallel-size {etp_size} "
                         f"(its mp_rank files hold one expert layout only): use --ckpt-format torch_dist")
    from megatron_hdpissa.distributed.collectives import served_devices

    cpu_only = served_devices() == {"cpu"} if backend is None else backend == "gloo"
    if cpu_only and etp_size > 1 and not args.pad_to_max_length:
        # megatron-core's expert-TP all-gather sends unequal token counts; gloo's allgather refuses them.
        raise ValueError(f"--expert-tensor-parallel-size {etp_size} over gloo (CPU) needs --pad-to-max-length: "
                         "gloo's all-gather takes equal sizes only, and variable-length or packed rows "
                         "route unequal token counts to the expert-TP ranks")
