"""Checkpoints Megatron-LM / Megatron-Bridge wrote (legacy `mp_rank_TT[_PPP]` files or torch_dist): the model config from their `args`, the weights at any TP / PP.

What Megatron-LM's `save_checkpoint` lays out (`--ckpt-format torch`, the legacy layout):

    DIR/latest_checkpointed_iteration.txt           the iteration, or "release"
    DIR/iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt
        {"args": argparse.Namespace, "checkpoint_version": 3.0, "iteration", "model": the stage's
         GPTModel.state_dict_for_save_checkpoint() (local layer numbers), "optimizer", "rng_state", ...}

and with `--ckpt-format torch_dist` (megatron-core dist_checkpointing): `iter_XXXXXXX/common.pt`
holds the same plain part (`args` included) and the `*.distcp` shards the GPTModel's sharded state
dict under megatron-core's global keys (layers stacked on a leading axis), next to the optimizer's.

Megatron-Bridge writes the torch_dist layout with its ConfigContainer in `iter_XXXXXXX/run_config.yaml`;
when its common state has no `args`, that file's `model:` section stands in for them.

Neither carries our `model_config.json`: the model is described by `args` (read with the allow-list
of `checkpoint/safe_load.py`, nothing that runs code) and mapped to a `ModelConfig`; what that
config cannot express is one error naming the arg. The weights are read in this process, joined to
the whole model (legacy: across TP shards and pipeline stages) and sliced for the requested TP / PP
with the HF converter's slicing (`hf_mapping.py`), as a torch_dist checkpoint of ours is resharded.
TransformerEngine's fused-norm names (`linear_qkv.layer_norm_weight`) become the local spec's.
"""
from __future__ import annotations

import re
from pathlib import Path

from megatron_hdpissa.checkpoint.atomic import TRACKER_FILE
from megatron_hdpissa.checkpoint.dist import TORCH_DIST
from megatron_hdpissa.checkpoint.legacy import CheckpointInfo, read_checkpoint_info
from megatron_hdpissa.checkpoint.safe_load import load_common_state, load_megatron_lm_file
from megatron_hdpissa.convert.dist import _local_layer_names, dist_whole_state_dict
from megatron_hdpissa.convert.hf_mapping import hf_tensors_from_megatron, megatron_shard_from_hf
from megatron_hdpissa.convert.hf_sources import TensorSource
from megatron_hdpissa.models.config import MODEL_CONFIG_FILE, ModelConfig, validate_tp
from megatron_hdpissa.models.pipeline_stages import merge_pipeline_shards, validate_pp


def is_megatron_lm_checkpoint(directory) -> bool:
    """A tracked Megatron checkpoint folder without our `model_config.json` (what Megatron-LM and
    Megatron-Bridge write)."""
    d = Path(directory)
    return (d / TRACKER_FILE).is_file() and not (d / MODEL_CONFIG_FILE).is_file()


# ---- args -> ModelConfig ------------------------------------------------------------------------
def read_args(info: CheckpointInfo):
    """The `args` Namespace Megatron-LM saved with the checkpoint (torch_dist: `common.pt`;
    legacy: the first rank file), and the file it came from."""
    path = info.iter_dir / "common.pt" if info.ckpt_format == TORCH_DIST else info.rank_file(0, 0)
    state = load_common_state(info.iter_dir) if info.ckpt_format == TORCH_DIST else load_megatron_lm_file(path)
    args = state.get("args")
    if args is None and (info.iter_dir / BRIDGE_RUN_CONFIG).is_file() and info.ckpt_format == TORCH_DIST:
        return bridge_args(info.iter_dir), info.iter_dir / BRIDGE_RUN_CONFIG
    if args is None or not hasattr(args, "num_layers"):
        raise ValueError(f"{path} holds no Megatron-LM `args` (and {info.directory} has no {MODEL_CONFIG_FILE}): "
                         "cannot tell which model it is")
    version = state.get("checkpoint_version", 3.0)
    if float(version) < 3.0:
        raise ValueError(f"{path}: checkpoint_version {version} (the fused q/k/v order of Megatron-LM before "
                         "version 3) is not supported; load and re-save it with a current Megatron-LM")
    return args, path


BRIDGE_RUN_CONFIG = "run_config.yaml"  # Megatron-Bridge: the ConfigContainer, next to the shards
# Megatron-Bridge's model provider (TransformerConfig) field -> Megatron-LM's arg
_BRIDGE_NAMES = {"layernorm_epsilon": "norm_epsilon", "num_moe_experts": "num_experts",
                 "seq_length": "max_position_embeddings", "rope_scaling": "use_rope_scaling"}


def bridge_args(iter_dir: Path):
    """Megatron-LM-style args from a Megatron-Bridge iteration's `run_config.yaml` (its `model:`
    section; yaml.safe_load, nothing constructed): SwiGLU is `gated_linear_unit` with a silu
    `activation_func`, the padded vocabulary the saved embedding's rows."""
    import argparse

    import yaml

    from megatron_hdpissa.checkpoint.safe_load import read_dcp_metadata

    path = iter_dir / BRIDGE_RUN_CONFIG
    try:
        run_config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not readable YAML: {str(e).splitlines()[0]}") from None
    model = run_config.get("model") or {}
    args = argparse.Namespace(**{_BRIDGE_NAMES.get(k, k): v for k, v in model.items() if isinstance(k, str)})
    tokenizer = run_config.get("tokenizer") or {}
    args.tokenizer_type, args.tokenizer_model = tokenizer.get("tokenizer_type"), tokenizer.get("tokenizer_model")
    activation = model.get("activation_func")
    target = activation.get("_target_", "") if isinstance(activation, dict) else str(activation or "")
    args.swiglu = bool(model.get("gated_linear_unit")) and target.rsplit(".", 1)[-1] == "silu"
    args.untie_embeddings_and_output_weights = not model.get("share_embeddings_and_output_weights", True)
    args.group_query_attention = bool(model.get("num_query_groups"))
    embedding = read_dcp_metadata(iter_dir).state_dict_metadata.get("embedding.word_embeddings.weight")
    args.padded_vocab_size = embedding.size[0] if embedding is not None else None
    return args


def _arg(args, name: str, default=None):
    return getattr(args, name, default)


# (arg, value our model needs, what to say): a checkpoint with another value is refused
_REQUIRED = (
    ("normalization", "RMSNorm", "only RMSNorm models are supported"),
    ("swiglu", True, "only SwiGLU MLPs are supported (--swiglu)"),
    ("position_embedding_type", "rope", "only rotary position embeddings are supported"),
    ("add_bias_linear", False, "biases on every linear layer are not supported (LLaMA-style models "
                                "pass --disable-bias-linear)"),
    ("apply_layernorm_1p", False, "zero-centred (1 + weight) norms are not supported"),
    ("rotary_interleaved", False, "interleaved rotary embeddings are not supported"),
    ("apply_residual_connection_post_layernorm", False, "post-norm residuals are not supported"),
    ("multi_latent_attention", False, "multi-latent attention is not supported"),
    ("num_experts", None, "mixture-of-experts models are not supported"),
    ("mtp_num_layers", None, "multi-token-prediction layers are not supported"),
    ("window_size", None, "sliding-window attention from Megatron-LM args is not supported"),
    ("heterogeneous_layers_config_path", None, "heterogeneous layers are not supported"),
    ("rotary_percent", 1.0, "partial rotary embeddings are not supported"),
)


def model_config_from_args(args, where) -> ModelConfig:
    """Our `ModelConfig` for the GPT model Megatron-LM's `args` describe; a ValueError naming the
    arg (and `where`, the file) for anything that config cannot express."""
    for name, want, why in _REQUIRED:
        value = _arg(args, name, want)
        if value != want and not (want is None and not value):
            raise ValueError(f"{where}: args.{name}={value!r}: {why}")
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
        if not _arg(args, name):
            raise ValueError(f"{where}: args.{name} is missing")
    vocab = _arg(args, "padded_vocab_size")
    if not vocab:
        raise ValueError(f"{where}: args.padded_vocab_size is missing (Megatron-LM sets it from the tokenizer "
                         "when it builds the model)")
    heads = args.num_attention_heads
    groups = args.num_query_groups if _arg(args, "group_query_attention") and _arg(args, "num_query_groups") else heads
    qkv_bias, qk_norm = bool(_arg(args, "add_qkv_bias", False)), bool(_arg(args, "qk_layernorm", False))
    if qkv_bias and qk_norm:
        raise ValueError(f"{where}: args.add_qkv_bias and args.qk_layernorm together are not supported")
    rope_factor = None
    if _arg(args, "use_rope_scaling", False):
        rope_factor = float(_arg(args, "rope_scaling_factor", 8.0))
    return ModelConfig(
        model_type="qwen3" if qk_norm else "qwen2" if qkv_bias else "llama",
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=heads, num_query_groups=groups,
        kv_channels=_arg(args, "kv_channels") or args.hidden_size // heads, vocab_size=vocab,
        max_position_embeddings=_arg(args, "max_position_embeddings") or _arg(args, "seq_length") or 4096,
        rope_theta=float(_arg(args, "rotary_base", 10000)), norm_epsilon=float(_arg(args, "norm_epsilon", 1e-5)),
        tie_word_embeddings=not _arg(args, "untie_embeddings_and_output_weights", False),
        qkv_bias=qkv_bias, qk_layernorm=qk_norm, rope_scaling_factor=rope_factor,
        init_method_std=float(_arg(args, "init_method_std", 0.02)),
    )


def megatron_lm_model_config(directory) -> ModelConfig:
    """The `ModelConfig` of a Megatron-LM / Megatron-Bridge checkpoint folder, from its args."""
    info = read_checkpoint_info(directory)
    args, where = read_args(info)
    return model_config_from_args(args, where)


def megatron_lm_tokenizer(directory) -> Path | None:
    """The tokenizer folder the checkpoint's args name (`--tokenizer-model` of a
    HuggingFaceTokenizer), when it exists on this machine."""
    args, _ = read_args(read_checkpoint_info(directory))
    model = _arg(args, "tokenizer_model")
    if _arg(args, "tokenizer_type") == "HuggingFaceTokenizer" and model and Path(model).is_dir():
        return Path(model)
    return None


# ---- weights ------------------------------------------------------------------------------------
def _legacy_stage(path: Path, args) -> dict:
    """A legacy rank file's model state dict with the local spec's names, `_extra_state` dropped."""
    state = load_megatron_lm_file(path)
    if "model" not in state:
        models = sorted(k for k in state if re.fullmatch(r"model\d+", k))
        if models:
            raise ValueError(f"{path} holds {models} (virtual pipeline stages, args.virtual_pipeline_model_"
                             f"parallel_size={_arg(args, 'virtual_pipeline_model_parallel_size')}): not supported "
                             "in the legacy format; save it with --ckpt-format torch_dist")
        raise ValueError(f"{path} has no 'model' state dict")
    renames = _local_layer_names()
    out = {}
    for key, tensor in state["model"].items():
        if key.endswith("_extra_state"):
            continue
        m = re.fullmatch(r"(decoder\.layers\.\d+\.)(.+)", key)
        if m is not None:
            name = m.group(2)
            for sharded, local in renames:
                if name.startswith(sharded):
                    name = local + name[len(sharded):]
            key = m.group(1) + name
        out[key] = tensor
    return out


def megatron_lm_tp_shards(directory, config: ModelConfig) -> tuple[list[dict], Path]:
    """The whole-model state dicts of the checkpoint's TP ranks (torch_dist: one), global layer
    numbering, local-spec names; and the folder they came from."""
    info = read_checkpoint_info(directory)
    if info.ckpt_format == TORCH_DIST:
        return [dist_whole_state_dict(info.iter_dir, config)], info.iter_dir
    args, where = read_args(info)
    for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                 "num_layers_per_virtual_pipeline_stage"):
        if _arg(args, name):
            raise ValueError(f"{where}: args.{name}={_arg(args, name)} (uneven or virtual pipeline stages) is "
                             "not supported in the legacy format; save it with --ckpt-format torch_dist")
    validate_tp(config, info.tp_size)
    validate_pp(config, info.pp_size)
    stages = {(t, p): _legacy_stage(info.rank_file(t, p), args)
              for t in range(info.tp_size) for p in range(info.pp_size)}
    return merge_pipeline_shards(stages, config), info.iter_dir


def _check_known(shards: list[dict], config: ModelConfig, where) -> dict:
    """The HF tensors of the model; a checkpoint tensor with no place in it (a bias, an extra
    layer) is one error naming it."""
    hf = dict(hf_tensors_from_megatron(shards, config))
    expected = set(megatron_shard_from_hf(TensorSource(hf, where), config, 1, 0))
    unknown = sorted(k for k in shards[0] if k not in expected)
    if unknown:
        raise ValueError(f"{where}: tensor {unknown[0]!r} has no place in the {config.model_type} model its args "
                         f"describe ({len(unknown)} such tensors)")
    return hf


def megatron_lm_state_dict(directory, tp_rank: int, tp_size: int, pp_rank: int = 0, pp_size: int = 1,
                           config: ModelConfig | None = None) -> dict:
    """The GPTModel state dict of (TP rank, pipeline stage) of any layout, from a Megatron-LM /
    Megatron-Bridge checkpoint (local layer numbering, as `convert/load.py` returns)."""
    config = config or megatron_lm_model_config(directory)
    validate_tp(config, tp_size)
    validate_pp(config, pp_size)
    shards, where = megatron_lm_tp_shards(directory, config)
    hf = _check_known(shards, config, where)
    return megatron_shard_from_hf(TensorSource(hf, where), config, tp_size, tp_rank, pp_size=pp_size,
                                  pp_rank=pp_rank)


def megatron_lm_whole(directory, config: ModelConfig) -> list[dict]:
    """The checkpoint as TP=1 whole-model state dicts (one), checked, for the HF exporter."""
    shards, where = megatron_lm_tp_shards(directory, config)
    hf = _check_known(shards, config, where)
    return [megatron_shard_from_hf(TensorSource(hf, where), config, 1, 0)]
