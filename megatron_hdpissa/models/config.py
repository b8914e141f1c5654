"""Model description: a serialisable `ModelConfig` read from a Hugging Face LLaMA / Mistral / Qwen2 / Qwen3 config, or a Qwen3-MoE / Mixtral one (models/moe.py)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from megatron_hdpissa.models.moe import (MOE_ARCHITECTURES, MOE_FIELDS, moe_fields_from_hf, moe_hf_config_for_readers,
                                         moe_hf_fields)

MODEL_CONFIG_FILE = "model_config.json"
INIT_METHOD_STD = 0.02  # HF's initializer_range default
TP_FLAG = "--tensor-model-parallel-size"

# HF model_type -> transformers config / causal-LM class names.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    **MOE_ARCHITECTURES,
}
# megatron-core hard-codes these llama3 RoPE-scaling constants.
_MCORE_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}


@dataclasses.dataclass
class ModelConfig:
    """What megatron-core needs to rebuild a decoder-only model, and HF needs to get it back.
    Saved as `model_config.json` next to checkpoints."""

    model_type: str                 # "llama" | "mistral" | "qwen2" | "qwen3" | "qwen3_moe" | "mixtral"
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int            # MoE models: each expert's FFN size
    num_attention_heads: int
    num_query_groups: int           # KV heads (GQA)
    kv_channels: int                # head dim
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    norm_epsilon: float
    tie_word_embeddings: bool
    qkv_bias: bool = False          # Qwen2: biases on q, k, v only
    rope_scaling_factor: float | None = None   # llama3-style RoPE scaling (megatron-core's constants)
    sliding_window: int | None = None          # Mistral: attend to the last `sliding_window` tokens
    qk_layernorm: bool = False      # Qwen3: RMSNorm over each q and k head (megatron-core qk_layernorm)
    init_method_std: float = INIT_METHOD_STD
    # mixture of experts (models/moe.py); num_experts None: a dense model
    num_experts: int | None = None
    moe_router_topk: int | None = None
    moe_router_pre_softmax: bool = False    # softmax over all experts, top-k not renormalised
    moe_aux_loss_coeff: float = 0.0         # the family's router_aux_loss_coef
    moe_input_jitter_eps: float | None = None   # Mixtral router_jitter_noise
    moe_shared_expert_size: int | None = None   # Qwen2-MoE shared_expert_intermediate_size (gated)
    hf_config: dict | None = None   # the source config.json, written back verbatim on export

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """From a transformers `PretrainedConfig`, a config dict, or an HF folder."""
        if isinstance(hf_config, (str, os.PathLike)):
            path = Path(hf_config)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise FileNotFoundError(f"no Hugging Face config.json at {path}")
            hf_config = json.loads(path.read_text())
        d = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
        model_type = d.get("model_type")
        moe = {}
        if model_type in MOE_ARCHITECTURES or str(model_type).endswith("_moe") or any(
                d.get(k) for k in MOE_FIELDS):
            moe = moe_fields_from_hf(d)
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture model_type={model_type!r} "
                f"(architectures={d.get('architectures')}); supported: {sorted(ARCHITECTURES)}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported (SwiGLU/silu only)")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        if model_type in ("llama", "qwen3", "qwen3_moe") and d.get("attention_bias"):
            raise ValueError(f"attention_bias=True on a {model_type} config is not supported (it also "
                             "puts a bias on o_proj, which megatron-core's add_qkv_bias does not cover)")
        if d.get("pretraining_tp", 1) != 1:
            raise ValueError(f"pretraining_tp={d['pretraining_tp']} is not supported")
        if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and d.get("use_sliding_window"):
            raise ValueError(f"{model_type} use_sliding_window=True (per-layer windows above "
                             "max_window_layers) is not supported")
        layer_types = d.get("layer_types") or []
        other = sorted({t for t in layer_types if t != "full_attention"})
        if model_type not in ("mistral", "mixtral") and other:
            raise ValueError(f"layer_types with {other} entries (per-layer attention kinds) is not "
                             "supported; every layer must be full_attention")
        norm = d.get("norm_type") or d.get("normalization")
        if norm not in (None, "rmsnorm", "RMSNorm", "rms_norm"):
            raise ValueError(f"norm_type={norm!r} is not supported (RMSNorm only)")

        heads = d["num_attention_heads"]
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_factor = None
        if rope_type == "llama3":
            for key, value in _MCORE_LLAMA3_ROPE.items():
                if float(rope.get(key, value)) != value:
                    raise ValueError(
                        f"llama3 RoPE scaling with {key}={rope.get(key)} is not supported "
                        f"(megatron-core fixes {key}={value})"
                    )
            rope_factor = float(rope["factor"])
        elif rope_type != "default":
            raise ValueError(f"RoPE scaling type {rope_type!r} is not supported")

        return cls(
            model_type=model_type,
            num_layers=d["num_hidden_layers"],
            hidden_size=d["hidden_size"],
            ffn_hidden_size=moe.pop("ffn_hidden_size", None) or d["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=d.get("num_key_value_heads") or heads,
            kv_channels=d.get("head_dim") or d["hidden_size"] // heads,
            vocab_size=d["vocab_size"],
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta),
            norm_epsilon=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or (model_type == "qwen2_moe" and bool(d.get("qkv_bias", True))),
            qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
            rope_scaling_factor=rope_factor,
            sliding_window=d.get("sliding_window") if model_type in ("mistral", "mixtral") else None,
            init_method_std=float(d.get("initializer_range", INIT_METHOD_STD)),
            **moe,
            hf_config=_jsonable(d),
        )

    def to_hf_config(self):
        """The transformers config: the stored source config if any, else one built from fields."""
        import transformers

        config_cls = getattr(transformers, ARCHITECTURES[self.model_type][0])
        if self.hf_config is not None:
            return config_cls.from_dict(dict(self.hf_config))
        kwargs = dict(
            num_hidden_layers=self.num_layers, hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups, head_dim=self.kv_channels,
            vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_epsilon, tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu", initializer_range=self.init_method_std,
            architectures=[ARCHITECTURES[self.model_type][1]],
        )
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta,
                    "factor": self.rope_scaling_factor, **_MCORE_LLAMA3_ROPE}
        if self.model_type == "mistral":
            kwargs["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen3", "qwen3_moe"):
            kwargs["attention_bias"] = False
        if self.model_type == "mixtral":
            kwargs["sliding_window"] = self.sliding_window
        kwargs.update(moe_hf_fields(self))
        # transformers >= 5 reads rope_parameters; 4.x reads only rope_theta / rope_scaling and
        # silently falls back to theta 10000 when given rope_parameters.
        if _transformers_major() >= 5:
            return config_cls(rope_parameters=rope, **kwargs)
        if self.rope_scaling_factor is not None:
            kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        return config_cls(rope_theta=self.rope_theta, **kwargs)

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model-config keys {sorted(unknown)}")
        return cls(**d)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MODEL_CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ModelConfig":
        """From `DIR/model_config.json` (a converted checkpoint) or a file path."""
        path = Path(directory)
        path = path / MODEL_CONFIG_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no {MODEL_CONFIG_FILE} at {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a valid model config: {e}") from e


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def hf_config_for_readers(hf_config: dict, rope_theta: float) -> dict:
    """A config.json dict both transformers 4.x and 5.x read the same: transformers 5 nests RoPE
    under `rope_parameters` (and still reads a top-level `rope_theta`); 4.x reads only the
    top-level `rope_theta` / `rope_scaling` and silently uses theta 10000 otherwise."""
    d = moe_hf_config_for_readers(dict(hf_config))
    rope = d.get("rope_parameters")
    if isinstance(rope, dict):
        d.setdefault("rope_theta", rope.get("rope_theta", rope_theta))
        if rope.get("rope_type", "default") != "default" and not d.get("rope_scaling"):
            d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return d


def _jsonable(d: dict) -> dict:
    """Drop what json cannot hold (torch dtypes become their names)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    return out


def as_model_config(config: Any) -> ModelConfig:
    """Accept a ModelConfig, an HF config / dict, an HF folder, or a converted checkpoint dir."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, (str, os.PathLike)) and (Path(config) / MODEL_CONFIG_FILE).is_file():
        return ModelConfig.load(config)
    if isinstance(config, dict) and "model_type" in config and "num_layers" in config:
        return ModelConfig.from_dict(config)
    return ModelConfig.from_hf(config)


def valid_tp_sizes(config: ModelConfig, limit: int = 64) -> list[int]:
    """Tensor-parallel sizes up to `limit` that divide heads, query groups, FFN and vocabulary
    (an MoE model's expert FFN is split by the expert-TP size: `models.moe.validate_expert_parallel`)."""
    sizes = (config.num_attention_heads, config.num_query_groups, config.vocab_size,
             *(() if config.num_experts else (config.ffn_hidden_size,)))  # experts: expert-TP
    return [t for t in range(1, limit + 1) if all(size % t == 0 for size in sizes)]


def validate_tp(config: ModelConfig, tp_size: int) -> None:
    """Raise a ValueError naming the flag and the config value TP fails to divide. TP takes whole
    query groups (no KV-head replication) and an unpadded vocabulary slice per rank."""
    if tp_size < 1:
        raise ValueError(f"{TP_FLAG} must be >= 1, got {tp_size}")
    for name, value in (
        ("num_attention_heads", config.num_attention_heads),
        ("num_key_value_heads (query groups)", config.num_query_groups),
        *(() if config.num_experts else (("intermediate_size (FFN)", config.ffn_hidden_size),)),
        ("vocab_size", config.vocab_size),
    ):
        if value % tp_size != 0:
            raise ValueError(
                f"{TP_FLAG} {tp_size} does not divide {name}={value} of this "
                f"{config.model_type} model; valid sizes: {valid_tp_sizes(config)}"
            )
