"""Hugging Face causal-LM safetensors <-> megatron-core GPTModel checkpoints in the legacy Megatron
layout, sharded for tensor and pipeline parallelism; streamed one tensor (slice) at a time, written
atomically.

Checkpoint layout (plain dicts, loadable with `torch.load(weights_only=True)`):

    DIR/latest_checkpointed_iteration.txt        "0"
    DIR/iter_0000000/mp_rank_TT/model_optim_rng.pt       pipeline size 1: {"model": state_dict, ...}
    DIR/iter_0000000/mp_rank_TT_PPP/model_optim_rng.pt   pipeline size > 1: stage PPP of TP rank TT
    DIR/model_config.json                        models.ModelConfig (incl. the HF config.json)
    DIR/tokenizer/                               the HF folder's non-weight files, verbatim

A pipeline stage's file holds what megatron-core's GPTModel on that stage holds, with its layers
numbered locally (`decoder.layers.0 .. L/P-1`): the word embedding on the first stage, the final
norm and output layer on the last; with tied embeddings the last stage (of P > 1) holds its own
copy of the word embedding as `output_layer.weight`. Stages split the layers evenly.

`--ckpt-format torch_dist` (megatron-core's dist_checkpointing, see `dist_checkpoint.py`) writes
`DIR/iter_0000000/{metadata.json,common.pt,.metadata,*.distcp}` instead of the mp_rank folders,
with the same tracker, model_config.json and tokenizer/: one checkpoint for any TP / PP layout.
Every reader here (`read_checkpoint_info`, `load_megatron_state_dict`, `load_megatron_checkpoint`,
`load_gpt_model`, `convert_megatron_to_hf`) detects the format from the iteration folder.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_hdpissa import dist_checkpoint
from megatron_hdpissa.models import (MODEL_CONFIG_FILE, TP_FLAG, ModelConfig, hf_config_for_readers,
                                     validate_tp)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILE = "model_optim_rng.pt"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_FORMAT = "megatron_hdpissa.legacy.v1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_DEFAULT_SHARD_BYTES = 4 * 1024**3
PP_FLAG = "--pipeline-model-parallel-size"
_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
# --dtype spellings the conversion CLIs accept
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# Qwen3's per-head q / k RMSNorm: HF `self_attn.{q,k}_norm` <-> megatron `self_attention.{q,k}_layernorm`
_QK_NORMS = (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm"))


# ---- megatron-core parameter names ------------------------------------------------------------
def _layer(i: int, name: str) -> str:
    return f"decoder.layers.{i}.{name}"


def _hf_layer(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


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
        return i // per_stage, _layer(i % per_stage, rest)
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
                key = _layer(pp_rank * per_stage + i, m.group(2))
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


# ---- reading a Hugging Face folder lazily -----------------------------------------------------
class SafetensorsFolder:
    """Tensor access by name over an HF folder's safetensors files, reading only what is asked."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors weights in {hf_dir} (PyTorch .bin checkpoints are not read: "
                "re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        self._handles = {}
        self.file_of = {}
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {index.name} but missing")
            self._handles[name] = safe_open(str(path), framework="pt")
            keys = self._handles[name].keys()
            self.file_of.update({k: name for k in keys if weight_map is None or weight_map.get(k) == name})

    def keys(self) -> set[str]:
        return set(self.file_of)

    def _slice(self, key: str, shape: tuple[int, ...]):
        if key not in self.file_of:
            raise ValueError(f"{self.hf_dir}: tensor {key!r} is missing from the safetensors files")
        sl = self._handles[self.file_of[key]].get_slice(key)
        if tuple(sl.get_shape()) != tuple(shape):
            raise ValueError(
                f"{self.hf_dir / self.file_of[key]}: tensor {key!r} has shape {tuple(sl.get_shape())}, "
                f"the config implies {tuple(shape)}"
            )
        return sl

    def full(self, key: str, shape) -> torch.Tensor:
        return self._slice(key, shape)[:]

    def rows(self, key: str, shape, start: int, stop: int) -> torch.Tensor:
        return self._slice(key, shape)[start:stop]

    def cols(self, key: str, shape, start: int, stop: int) -> torch.Tensor:
        return self._slice(key, shape)[:, start:stop].contiguous()


# ---- HF -> megatron-core, one TP rank ---------------------------------------------------------
def megatron_shard_from_hf(
    src: SafetensorsFolder, config: ModelConfig, tp_size: int, tp_rank: int,
    dtype: torch.dtype | None = None, progress_bar=None, *, pp_size: int = 1, pp_rank: int = 0,
) -> dict[str, torch.Tensor | None]:
    """The GPTModel state dict of TP rank `tp_rank` on pipeline stage `pp_rank` of `pp_size`
    (layers numbered locally), sliced straight out of the HF files. `progress_bar.update()` is
    called once per layer (and for embeddings and head)."""
    validate_tp(config, tp_size)
    validate_pp(config, pp_size)
    layers = stage_layers(config.num_layers, pp_size, pp_rank)
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    c = config
    h, hd, ng, nq = c.hidden_size, c.kv_channels, c.num_query_groups, c.num_attention_heads
    t = tp_rank
    vocab_part = c.vocab_size // tp_size
    ffn_part = c.ffn_hidden_size // tp_size
    # TP takes whole query groups: rank t holds groups [t*gpr, (t+1)*gpr), i.e. a contiguous
    # block of q heads and of k/v heads.
    groups_per_rank, q_per_group = ng // tp_size, nq // ng
    q_part, kv_part = groups_per_rank * q_per_group * hd, groups_per_rank * hd

    def qkv(i: int, kind: str) -> torch.Tensor:
        tail = (h,) if kind == "weight" else ()
        q = src.rows(_hf_layer(i, f"self_attn.q_proj.{kind}"), (nq * hd, *tail), t * q_part, (t + 1) * q_part)
        k = src.rows(_hf_layer(i, f"self_attn.k_proj.{kind}"), (ng * hd, *tail), t * kv_part, (t + 1) * kv_part)
        v = src.rows(_hf_layer(i, f"self_attn.v_proj.{kind}"), (ng * hd, *tail), t * kv_part, (t + 1) * kv_part)
        # megatron-core's fused layout: per query group [q heads of the group, k, v].
        return torch.cat(
            [q.view(groups_per_rank, q_per_group * hd, *tail),
             k.view(groups_per_rank, hd, *tail),
             v.view(groups_per_rank, hd, *tail)], dim=1,
        ).reshape(-1, *tail)

    tick = progress_bar.update if progress_bar is not None else (lambda: None)

    def embedding_rows() -> torch.Tensor:
        return src.rows("model.embed_tokens.weight", (c.vocab_size, h), t * vocab_part, (t + 1) * vocab_part)

    def local(i: int, name: str) -> str:  # HF reads use the global index i, keys the stage's
        return _layer(i - layers.start, name)

    sd: dict[str, torch.Tensor | None] = {}
    if first:
        sd["embedding.word_embeddings.weight"] = embedding_rows()
        tick()
    for i in layers:
        sd[local(i, "input_layernorm.weight")] = src.full(_hf_layer(i, "input_layernorm.weight"), (h,))
        sd[local(i, "self_attention.linear_qkv.weight")] = qkv(i, "weight")
        if c.qkv_bias:
            sd[local(i, "self_attention.linear_qkv.bias")] = qkv(i, "bias")
        sd[local(i, "self_attention.linear_qkv._extra_state")] = None
        if c.qk_layernorm:  # Qwen3: per-head RMSNorm weights, replicated over TP
            for hf_name, mc_name in _QK_NORMS:
                sd[local(i, f"self_attention.{mc_name}.weight")] = src.full(
                    _hf_layer(i, f"self_attn.{hf_name}.weight"), (hd,))
        sd[local(i, "self_attention.linear_proj.weight")] = src.cols(
            _hf_layer(i, "self_attn.o_proj.weight"), (h, nq * hd),
            t * groups_per_rank * q_per_group * hd, (t + 1) * groups_per_rank * q_per_group * hd,
        )
        sd[local(i, "self_attention.linear_proj._extra_state")] = None
        sd[local(i, "pre_mlp_layernorm.weight")] = src.full(
            _hf_layer(i, "post_attention_layernorm.weight"), (h,)
        )
        gate = src.rows(_hf_layer(i, "mlp.gate_proj.weight"), (c.ffn_hidden_size, h), t * ffn_part, (t + 1) * ffn_part)
        up = src.rows(_hf_layer(i, "mlp.up_proj.weight"), (c.ffn_hidden_size, h), t * ffn_part, (t + 1) * ffn_part)
        sd[local(i, "mlp.linear_fc1.weight")] = torch.cat([gate, up], dim=0)
        sd[local(i, "mlp.linear_fc1._extra_state")] = None
        sd[local(i, "mlp.linear_fc2.weight")] = src.cols(
            _hf_layer(i, "mlp.down_proj.weight"), (h, c.ffn_hidden_size), t * ffn_part, (t + 1) * ffn_part
        )
        sd[local(i, "mlp.linear_fc2._extra_state")] = None
        tick()
    if last:
        sd["decoder.final_layernorm.weight"] = src.full("model.norm.weight", (h,))
        if not c.tie_word_embeddings:
            sd["output_layer.weight"] = src.rows(
                "lm_head.weight", (c.vocab_size, h), t * vocab_part, (t + 1) * vocab_part
            )
        elif not first:  # megatron-core's last stage holds its own copy of the tied embedding
            sd["output_layer.weight"] = embedding_rows()
        sd["output_layer._extra_state"] = None
        tick()
    if dtype is not None:
        sd = {k: v.to(dtype) if v is not None else None for k, v in sd.items()}
    return sd


def _expected_hf_keys(config: ModelConfig) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        keys.add("lm_head.weight")
    for i in range(config.num_layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            keys.add(_hf_layer(i, f"{name}.weight"))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys.add(_hf_layer(i, f"self_attn.{name}.weight"))
        if config.qkv_bias:
            for name in ("q_proj", "k_proj", "v_proj"):
                keys.add(_hf_layer(i, f"self_attn.{name}.bias"))
        if config.qk_layernorm:
            for name, _ in _QK_NORMS:
                keys.add(_hf_layer(i, f"self_attn.{name}.weight"))
        for name in ("gate_proj", "up_proj", "down_proj"):
            keys.add(_hf_layer(i, f"mlp.{name}.weight"))
    return keys


# ---- megatron-core -> HF ----------------------------------------------------------------------
def hf_tensors_from_megatron(shards, config: ModelConfig, names: list[str] | None = None):
    """Yield `(hf_name, tensor)` merged across the TP shards, one tensor at a time.

    `shards`: the whole-model state dicts of the TP ranks (a list in rank order, global layer
    numbering), or the per-stage state dicts of a pipeline-parallel model, as a mapping
    `{(tp_rank, pp_rank): state_dict}` or a list over TP ranks of lists over stages (merged by
    `merge_pipeline_shards`)."""
    if isinstance(shards, dict) or (shards and isinstance(shards[0], (list, tuple))):
        shards = merge_pipeline_shards(shards, config)
    c = config
    tp = len(shards)
    hd, ng, nq = c.kv_channels, c.num_query_groups, c.num_attention_heads
    groups_per_rank, q_per_group = ng // tp, nq // ng

    def get(rank: int, key: str) -> torch.Tensor:
        try:
            return shards[rank][key]
        except KeyError:
            raise ValueError(f"tensor {key!r} is missing from the mp_rank_{rank:02d} checkpoint") from None

    def cat(key: str, dim: int) -> torch.Tensor:
        return torch.cat([get(r, key) for r in range(tp)], dim=dim)

    @functools.lru_cache(maxsize=1)  # q, k and v of one layer come from the same split
    def qkv(i: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = {"q": [], "k": [], "v": []}
        for r in range(tp):
            w = get(r, _layer(i, f"self_attention.linear_qkv.{kind}"))
            tail = tuple(w.shape[1:])
            grouped = w.view(groups_per_rank, (q_per_group + 2) * hd, *tail)
            q, k, v = torch.split(grouped, [q_per_group * hd, hd, hd], dim=1)
            parts["q"].append(q.reshape(-1, *tail))
            parts["k"].append(k.reshape(-1, *tail))
            parts["v"].append(v.reshape(-1, *tail))
        return tuple(torch.cat(parts[n], dim=0) for n in "qkv")

    @functools.lru_cache(maxsize=1)
    def fc1(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gates, ups = [], []
        for r in range(tp):
            gate, up = torch.chunk(get(r, _layer(i, "mlp.linear_fc1.weight")), 2, dim=0)
            gates.append(gate)
            ups.append(up)
        return torch.cat(gates, dim=0), torch.cat(ups, dim=0)

    def build(name: str) -> torch.Tensor:
        if name == "model.embed_tokens.weight":
            return cat("embedding.word_embeddings.weight", 0)
        if name == "model.norm.weight":
            return get(0, "decoder.final_layernorm.weight")
        if name == "lm_head.weight":
            return cat("output_layer.weight", 0)
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        i, rest = int(m.group(1)), m.group(2)
        if rest == "input_layernorm.weight":
            return get(0, _layer(i, "input_layernorm.weight"))
        if rest == "post_attention_layernorm.weight":
            return get(0, _layer(i, "pre_mlp_layernorm.weight"))
        if rest == "self_attn.o_proj.weight":
            return cat(_layer(i, "self_attention.linear_proj.weight"), 1)
        if rest == "mlp.down_proj.weight":
            return cat(_layer(i, "mlp.linear_fc2.weight"), 1)
        for hf_norm, mc_norm in _QK_NORMS:
            if rest == f"self_attn.{hf_norm}.weight":
                return get(0, _layer(i, f"self_attention.{mc_norm}.weight"))
        if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            return fc1(i)[0 if "gate" in rest else 1]
        proj, kind = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest).groups()
        return qkv(i, kind)["qkv".index(proj)]

    for name in names if names is not None else _hf_names(config):
        yield name, build(name).contiguous()


def _hf_names(config: ModelConfig) -> list[str]:
    """HF tensor names in model order (embeddings, layers, norm, head)."""
    names = ["model.embed_tokens.weight"]
    for i in range(config.num_layers):
        names += [_hf_layer(i, n) for n in (
            "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
            "self_attn.v_proj.weight")]
        if config.qkv_bias:
            names += [_hf_layer(i, f"self_attn.{p}_proj.bias") for p in "qkv"]
        if config.qk_layernorm:
            names += [_hf_layer(i, f"self_attn.{n}.weight") for n, _ in _QK_NORMS]
        names += [_hf_layer(i, n) for n in (
            "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
            "mlp.up_proj.weight", "mlp.down_proj.weight")]
    names.append("model.norm.weight")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def _hf_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    c = config
    h, q, kv = c.hidden_size, c.num_attention_heads * c.kv_channels, c.num_query_groups * c.kv_channels
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (c.vocab_size, h)
    rest = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    return {
        "model.norm.weight": (h,), "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (c.kv_channels,), "self_attn.k_norm.weight": (c.kv_channels,),
        "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (c.ffn_hidden_size, h),
        "mlp.up_proj.weight": (c.ffn_hidden_size, h), "mlp.down_proj.weight": (h, c.ffn_hidden_size),
    }[rest]


# ---- the legacy checkpoint layout -------------------------------------------------------------
def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int = 0, pp_size: int = 1) -> str:
    """Megatron-LM's shard folder name: `mp_rank_TT`, or `mp_rank_TT_PPP` when pp_size > 1."""
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rank_checkpoint_path(ckpt_dir, iteration: int | str, tp_rank: int, pp_rank: int = 0,
                         pp_size: int = 1) -> Path:
    """`DIR/iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt` of TP rank `tp_rank`, pipeline
    stage `pp_rank` of `pp_size`."""
    return (Path(ckpt_dir) / iteration_dir_name(iteration) / rank_dir_name(tp_rank, pp_rank, pp_size)
            / CHECKPOINT_FILE)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint folder holds: its tracked iteration and, for the legacy format, its
    shard files, one per (TP rank, pipeline stage); `rank_files` lists them TP-rank-major (just
    the TP shards when pp_size is 1). For torch_dist, `tp_size` / `pp_size` are the layout it was
    saved at (1 when unrecorded) and `rank_files` is empty: it loads at any layout."""

    directory: Path
    iteration: int | str
    tp_size: int
    rank_files: tuple[Path, ...]
    pp_size: int = 1
    ckpt_format: str = "torch"   # "torch" (legacy mp_rank files) or "torch_dist" (any layout)

    @property
    def iter_dir(self) -> Path:
        return self.directory / iteration_dir_name(self.iteration)

    def rank_file(self, tp_rank: int, pp_rank: int = 0) -> Path:
        if self.ckpt_format != "torch":
            raise ValueError(f"{self.directory} is a {self.ckpt_format} checkpoint: it has no per-rank files")
        if not (0 <= tp_rank < self.tp_size and 0 <= pp_rank < self.pp_size):
            raise ValueError(
                f"(tp_rank {tp_rank}, pp_rank {pp_rank}) is outside {self.directory}'s "
                f"{self.tp_size} TP x {self.pp_size} pipeline shards"
            )
        return self.rank_files[tp_rank * self.pp_size + pp_rank]


def read_checkpoint_info(ckpt_dir) -> CheckpointInfo:
    """Read the tracker, detect the format (torch_dist: the iteration folder holds megatron-core's
    metadata.json; torch: mp_rank_* folders) and list the legacy (TP, PP) shards; clear errors for
    whatever is missing."""
    directory = Path(ckpt_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"megatron checkpoint directory {directory} does not exist")
    tracker = directory / TRACKER_FILE
    if not tracker.is_file():
        raise FileNotFoundError(
            f"{tracker} is missing: {directory} is not a legacy Megatron checkpoint (or was not "
            "finished; the tracker file is written last)"
        )
    text = tracker.read_text().strip()
    try:
        iteration: int | str = "release" if text == "release" else int(text)
    except ValueError:
        raise ValueError(f"{tracker}: expected an iteration number or 'release', found {text!r}") from None
    iter_dir = directory / iteration_dir_name(iteration)
    if not iter_dir.is_dir():
        raise FileNotFoundError(f"{tracker} names iteration {text} but {iter_dir} does not exist")
    if dist_checkpoint.is_dist_checkpoint_dir(iter_dir):
        layout = _saved_layout(iter_dir)
        return CheckpointInfo(directory, iteration, layout.get("tp", 1), (), layout.get("pp", 1),
                              ckpt_format=dist_checkpoint.TORCH_DIST)
    rank_dirs = sorted(p.name for p in iter_dir.glob("mp_rank_*") if p.is_dir())
    if not rank_dirs:
        raise FileNotFoundError(f"{iter_dir} holds no mp_rank_XX shard folders (and no torch_dist "
                                f"{dist_checkpoint.DIST_METADATA_FILE})")
    parsed = [re.fullmatch(r"mp_rank_(\d{2})(?:_(\d{3}))?", name) for name in rank_dirs]
    bad = [name for name, m in zip(rank_dirs, parsed) if m is None]
    if bad:
        raise ValueError(f"{iter_dir}: unexpected shard folder names {bad[:3]} (expected "
                         "mp_rank_TT, or mp_rank_TT_PPP with pipeline parallelism)")
    pipelined = {m.group(2) is not None for m in parsed}
    if len(pipelined) > 1:
        raise ValueError(f"{iter_dir} mixes mp_rank_TT and mp_rank_TT_PPP shard folders: {rank_dirs}")
    ranks = {(int(m.group(1)), int(m.group(2) or 0)) for m in parsed}
    tp_size = 1 + max(t for t, _ in ranks)
    pp_size = 1 + max(p for _, p in ranks)

    def name(t: int, p: int) -> str:  # as found: a lone stage may still be named mp_rank_TT_000
        return f"mp_rank_{t:02d}_{p:03d}" if pipelined == {True} else f"mp_rank_{t:02d}"

    missing = [name(t, p) for t in range(tp_size) for p in range(pp_size) if (t, p) not in ranks]
    if missing:
        raise FileNotFoundError(f"{iter_dir} lacks the shard folders {missing[:4]} (found {rank_dirs})")
    files = tuple(iter_dir / name(t, p) / CHECKPOINT_FILE for t in range(tp_size) for p in range(pp_size))
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing (found {len(rank_dirs)} shard folders: {', '.join(rank_dirs)})"
            )
    return CheckpointInfo(directory, iteration, tp_size, files, pp_size)


def _load_rank_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot read megatron checkpoint shard {path}: {e}") from e


def _stage_state_dict(info: CheckpointInfo, tp_rank: int, pp_rank: int) -> dict:
    path = info.rank_file(tp_rank, pp_rank)
    state = _load_rank_file(path)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} has no 'model' state dict")
    saved_tp = state.get("tensor_model_parallel_size", info.tp_size)
    if saved_tp != info.tp_size:
        raise ValueError(f"{path} says {TP_FLAG} {saved_tp} but the folder holds {info.tp_size} TP shards")
    saved_pp = state.get("pipeline_model_parallel_size", info.pp_size)
    if saved_pp != info.pp_size:
        raise ValueError(f"{path} says {PP_FLAG} {saved_pp} but the folder holds {info.pp_size} "
                         "pipeline stages")
    return state["model"]


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
    if info.ckpt_format == dist_checkpoint.TORCH_DIST:
        return _dist_rank_state_dict(info, tp_rank, tp_size or 1, pp_rank, pp_size or 1)
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
        return _stage_state_dict(info, tp_rank, pp_rank)
    config = ModelConfig.load(info.directory)
    try:
        validate_pp(config, pp_size)
    except ValueError as e:
        raise ValueError(f"cannot load {info.directory} (saved with {PP_FLAG} {info.pp_size}) at "
                         f"{PP_FLAG} {pp_size}: {e}") from None
    # Legacy stage files are keyed by local layer index: resharding is renumbering. The files
    # are memory-mapped, so only the tensors of the wanted stage are ever read.
    whole = merge_pipeline_stages(
        [_stage_state_dict(info, tp_rank, p) for p in range(info.pp_size)], config)
    return pipeline_stage_state_dict(whole, config, pp_size, pp_rank)


def _pipeline_rank_and_size(pp_rank: int | None, pp_size: int | None) -> tuple[int, int]:
    """This rank's pipeline stage and size: what the caller passed, else megatron-core's
    initialised groups, else (0, 1)."""
    from megatron.core import parallel_state as ps

    initialised = ps.model_parallel_is_initialized()
    if pp_size is None:
        pp_size = ps.get_pipeline_model_parallel_world_size() if initialised else 1
    if pp_rank is None:
        pp_rank = ps.get_pipeline_model_parallel_rank() if initialised else 0
    return pp_rank, pp_size


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
    own_ranks = own_ranks and (pp_rank, pp_size) in ((None, None), _pipeline_rank_and_size(None, None))
    pp_rank, pp_size = _pipeline_rank_and_size(pp_rank, pp_size)
    if own_ranks and read_checkpoint_info(ckpt_dir).ckpt_format == dist_checkpoint.TORCH_DIST:
        # this rank's own shard of the job's layout: megatron-core reshards (collective: every
        # rank of the job loads at the same time)
        dist_checkpoint.load_model_checkpoint(model, read_checkpoint_info(ckpt_dir).iter_dir)
        return
    state_dict = load_megatron_state_dict(ckpt_dir, tp_rank, tp_size, pp_rank=pp_rank, pp_size=pp_size)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        info = read_checkpoint_info(ckpt_dir)
        where = (info.iter_dir if info.ckpt_format != "torch" else
                 info.rank_file(tp_rank, pp_rank) if pp_size == info.pp_size else
                 f"{info.directory} (saved with {PP_FLAG} {info.pp_size}) resharded to stage "
                 f"{pp_rank} of {PP_FLAG} {pp_size}")
        raise ValueError(f"{where} does not fit the model: {e}") from e


def load_gpt_model(ckpt_dir, dtype: torch.dtype = torch.float32, **build_kwargs):
    """Build the GPTModel described by `DIR/model_config.json` for the current TP rank and
    pipeline stage (megatron-core's `parallel_state`) and load its weights. Returns
    `(model, model_config)`."""
    from megatron_hdpissa.models import build_gpt_model

    model_config = ModelConfig.load(ckpt_dir)
    pp_rank, pp_size = _pipeline_rank_and_size(None, None)
    validate_pp(model_config, pp_size)
    build_kwargs.setdefault("pre_process", pp_rank == 0)
    build_kwargs.setdefault("post_process", pp_rank == pp_size - 1)
    if pp_size > 1:  # TransformerConfig fields: the stage builds num_layers / pp_size layers
        build_kwargs.setdefault("pipeline_model_parallel_size", pp_size)
        build_kwargs.setdefault("pipeline_dtype", dtype)
    model = build_gpt_model(model_config, dtype=dtype, **build_kwargs)
    load_megatron_checkpoint(model, ckpt_dir, pp_rank=pp_rank, pp_size=pp_size)
    return model, model_config


# ---- torch_dist (megatron-core dist_checkpointing) --------------------------------------------
CKPT_FORMATS = dist_checkpoint.CKPT_FORMATS


def checkpoint_format(ckpt_dir) -> str:
    """"torch_dist" or "torch" (legacy mp_rank files) for a checkpoint folder."""
    return read_checkpoint_info(ckpt_dir).ckpt_format


def _saved_layout(iter_dir: Path) -> dict:
    """The layout a torch_dist folder was saved at, as `dist_checkpoint` records it ({} when the
    common state does not say, e.g. another tool's checkpoint)."""
    try:
        common = dist_checkpoint.load_common_state(iter_dir)
    except (FileNotFoundError, ValueError):
        return {}
    layout = common.get(dist_checkpoint.COMMON_LAYOUT_KEY)
    return dict(layout) if isinstance(layout, dict) else {}


class _TensorSource:
    """`SafetensorsFolder`'s slicing interface over in-memory whole HF tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: Path):
        self.tensors, self.where = tensors, where

    def keys(self) -> set[str]:
        return set(self.tensors)

    def full(self, key: str, shape) -> torch.Tensor:
        if key not in self.tensors:
            raise ValueError(f"{self.where}: tensor {key!r} is missing")
        t = self.tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.where}: tensor {key!r} has shape {tuple(t.shape)}, the config "
                             f"implies {tuple(shape)}")
        return t

    def rows(self, key: str, shape, start: int, stop: int) -> torch.Tensor:
        return self.full(key, shape)[start:stop]

    def cols(self, key: str, shape, start: int, stop: int) -> torch.Tensor:
        return self.full(key, shape)[:, start:stop].contiguous()


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
    layer_key = re.compile(r"decoder\.layers\.(?:(\d+)\.)?(.+)")
    for key, tensor in dist_checkpoint.read_global_tensors(iter_dir).items():
        m = layer_key.fullmatch(key)
        if m is None:
            if key.startswith(("embedding.", "output_layer.", "decoder.final_layernorm.")):
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
            whole[_layer(i, name)] = t
    for i in range(config.num_layers):  # swiglu saved as two tensors (singleton local shards)
        w, v = _layer(i, "mlp.linear_fc1.weight_w"), _layer(i, "mlp.linear_fc1.weight_v")
        if w in whole:
            whole[_layer(i, "mlp.linear_fc1.weight")] = torch.cat([whole.pop(w), whole.pop(v)], dim=0)
    if not whole:
        raise ValueError(f"{iter_dir}: the torch_dist checkpoint holds no GPTModel tensors")
    return whole


def _dist_rank_state_dict(info: CheckpointInfo, tp_rank: int, tp_size: int, pp_rank: int,
                          pp_size: int) -> dict:
    config = ModelConfig.load(info.directory)
    validate_tp(config, tp_size)
    validate_pp(config, pp_size)
    whole = dist_whole_state_dict(info.iter_dir, config)
    hf = dict(hf_tensors_from_megatron([whole], config))
    return megatron_shard_from_hf(_TensorSource(hf, info.iter_dir), config, tp_size, tp_rank,
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
    from megatron_hdpissa.models import build_gpt_model

    dtype = whole["embedding.word_embeddings.weight"].dtype
    with _single_process_group():
        model = build_gpt_model(config, tp_size=1, dtype=dtype, seed=None, perform_initialization=False)
        missing, unexpected = model.load_state_dict(whole, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"state dict does not fit the {config.model_type} GPTModel: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        return dist_checkpoint.save_model_checkpoint(
            model, save_dir, iteration, layout={"tp": 1, "pp": 1, "dp": 1, "world": 1},
            common_state={"iteration": iteration, "checkpoint_version": 3.0,
                          "format": dist_checkpoint.FORMAT_TAG})


# ---- atomic output ----------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_output_dir(target: Path, force: bool, sources: tuple[Path, ...] = ()):
    """Yield a temp dir next to `target`; on success it replaces `target` by rename."""
    target = Path(target).absolute()
    for source in sources:
        source = source.resolve()
        if source == target.resolve() or target.resolve() in source.parents:
            raise ValueError(f"output {target} would overwrite the input {source}")
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass --force to overwrite it")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / target.name)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _progress(total: int, desc: str, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


def _copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for path in sorted(src.iterdir()):
        if (path.is_file() and not path.name.startswith(".") and path.name not in _NOT_COPIED
                and not path.name.endswith(_WEIGHT_SUFFIXES)):
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


# ---- the two conversions ----------------------------------------------------------------------
def convert_hf_to_megatron(
    hf_dir, save_dir, tp_size: int = 1, *, pp_size: int = 1, dtype: torch.dtype | None = None,
    iteration: int = 0, force: bool = False, progress: bool = True, ckpt_format: str = "torch",
) -> Path:
    """Convert an HF LLaMA / Mistral / Qwen2 / Qwen3 folder (safetensors) into a Megatron
    checkpoint.

    `ckpt_format="torch"` (legacy): `tp_size` x `pp_size` shards (`mp_rank_TT`, or
    `mp_rank_TT_PPP` when pp_size > 1); memory: one shard plus one tensor at a time.
    `ckpt_format="torch_dist"`: megatron-core's dist_checkpointing format, loadable at any TP /
    PP layout (`tp_size` / `pp_size` are only checked against the model); written by one
    process through a TP=1 GPTModel, so memory holds the whole model."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {hf_dir} does not exist")
    if ckpt_format not in CKPT_FORMATS:
        raise ValueError(f"{dist_checkpoint.CKPT_FORMAT_FLAG} {ckpt_format!r}: choose from {', '.join(CKPT_FORMATS)}")
    config = ModelConfig.from_hf(hf_dir)
    validate_tp(config, tp_size)
    validate_pp(config, pp_size)
    src = SafetensorsFolder(hf_dir)
    unexpected = sorted(k for k in src.keys() - _expected_hf_keys(config) if not _IGNORED_HF_KEYS.match(k))
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # a stored copy of the tied embedding
    if unexpected:
        raise ValueError(
            f"{hf_dir}: tensors the {config.model_type} conversion does not know: {unexpected[:5]}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )
    if ckpt_format == dist_checkpoint.TORCH_DIST:
        with _atomic_output_dir(Path(save_dir), force, sources=(hf_dir,)) as tmp:
            with _progress(config.num_layers + 2, "HF -> megatron torch_dist", progress, "layer") as bar:
                whole = megatron_shard_from_hf(src, config, 1, 0, dtype, bar)
            save_whole_as_dist(whole, config, tmp, iteration)  # tracker written last, inside
            del whole
            config.save(tmp)
            _copy_non_weight_files(hf_dir, tmp / TOKENIZER_DIR)
        return Path(save_dir)
    with _atomic_output_dir(Path(save_dir), force, sources=(hf_dir,)) as tmp:
        steps = tp_size * (config.num_layers + 2)
        with _progress(steps, f"HF -> megatron TP={tp_size} PP={pp_size}", progress, "layer") as bar:
            for tp_rank in range(tp_size):
                for pp_rank in range(pp_size):
                    shard = megatron_shard_from_hf(src, config, tp_size, tp_rank, dtype, bar,
                                                   pp_size=pp_size, pp_rank=pp_rank)
                    path = rank_checkpoint_path(tmp, iteration, tp_rank, pp_rank, pp_size)
                    path.parent.mkdir(parents=True)
                    torch.save({
                        "model": shard,
                        "iteration": iteration,
                        "checkpoint_version": 3.0,
                        "tensor_model_parallel_size": tp_size,
                        "tensor_model_parallel_rank": tp_rank,
                        "pipeline_model_parallel_size": pp_size,
                        "pipeline_model_parallel_rank": pp_rank,
                        "format": CHECKPOINT_FORMAT,
                    }, path)
                    del shard
        config.save(tmp)
        _copy_non_weight_files(hf_dir, tmp / TOKENIZER_DIR)
        (tmp / TRACKER_FILE).write_text(f"{iteration}\n")  # last: marks the checkpoint complete
    return Path(save_dir)


def convert_megatron_to_hf(
    megatron_dir, save_dir, *, dtype: torch.dtype | None = None, force: bool = False,
    progress: bool = True, max_shard_bytes: int = _DEFAULT_SHARD_BYTES, tp_size: int | None = None,
    pp_size: int | None = None,
) -> Path:
    """Merge a Megatron checkpoint (legacy: its TP shards and pipeline stages, memory-mapped;
    torch_dist: the whole tensors, read in this process) into an HF folder (safetensors,
    config.json, tokenizer) that transformers loads; the format is detected from the folder.
    Output files are written `max_shard_bytes` at a time. With `tp_size` / `pp_size`, check the
    legacy checkpoint's TP / pipeline size (a torch_dist checkpoint has no fixed layout)."""
    from safetensors.torch import save_file

    info = read_checkpoint_info(megatron_dir)
    dist = info.ckpt_format == dist_checkpoint.TORCH_DIST
    if dist:
        tp_size = pp_size = None
    if tp_size is not None and tp_size != info.tp_size:
        raise ValueError(
            f"{info.directory} was saved with {TP_FLAG} {info.tp_size}, not {tp_size}"
        )
    if pp_size is not None and pp_size != info.pp_size:
        raise ValueError(
            f"{info.directory} was saved with {PP_FLAG} {info.pp_size}, not {pp_size}"
        )
    config = ModelConfig.load(info.directory)
    if dist:
        shards = [dist_whole_state_dict(info.iter_dir, config)]
    else:
        validate_tp(config, info.tp_size)
        validate_pp(config, info.pp_size)
        shards = merge_pipeline_shards(
            {(t, p): load_megatron_state_dict(info.directory, t, info.tp_size, pp_rank=p)
             for t in range(info.tp_size) for p in range(info.pp_size)}, config)
    out_dtype = dtype or shards[0]["embedding.word_embeddings.weight"].dtype

    names = _hf_names(config)
    element = torch.empty((), dtype=out_dtype).element_size()
    groups, size = [[]], 0
    for name in names:  # plan the output files from shapes alone
        nbytes = math.prod(_hf_shape(config, name)) * element
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes

    with _atomic_output_dir(Path(save_dir), force, sources=(info.directory,)) as tmp:
        weight_map, total = {}, 0
        with _progress(len(names), "megatron -> HF", progress, "tensor") as bar:
            for index, group in enumerate(groups):
                file = ("model.safetensors" if len(groups) == 1
                        else f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors")
                tensors = {}
                for name, tensor in hf_tensors_from_megatron(shards, config, group):
                    tensors[name] = tensor.to(out_dtype)
                    weight_map[name] = file
                    total += tensors[name].numel() * element
                    bar.update()
                save_file(tensors, str(tmp / file), metadata={"format": "pt"})
                del tensors
        if len(groups) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        hf_config = dict(config.hf_config) if config.hf_config else config.to_hf_config().to_dict()
        hf_config = hf_config_for_readers(hf_config, config.rope_theta)
        hf_config["dtype"] = str(out_dtype).removeprefix("torch.")
        if "torch_dtype" in hf_config:
            hf_config["torch_dtype"] = hf_config["dtype"]
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        tokenizer_dir = info.directory / TOKENIZER_DIR
        if tokenizer_dir.is_dir():
            _copy_non_weight_files(tokenizer_dir, tmp)
    return Path(save_dir)


__all__ = [
    "CHECKPOINT_FILE", "CKPT_FORMATS", "MODEL_CONFIG_FILE", "PP_FLAG", "TOKENIZER_DIR", "TRACKER_FILE",
    "CheckpointInfo", "SafetensorsFolder", "checkpoint_format", "convert_hf_to_megatron",
    "dist_whole_state_dict", "save_whole_as_dist", "convert_megatron_to_hf",
    "hf_tensors_from_megatron", "load_gpt_model", "load_megatron_checkpoint",
    "load_megatron_state_dict", "megatron_shard_from_hf", "merge_pipeline_shards",
    "merge_pipeline_stages", "pipeline_stage_state_dict", "rank_checkpoint_path", "rank_dir_name",
    "read_checkpoint_info", "split_pipeline_stages", "stage_layers", "validate_pp",
]
