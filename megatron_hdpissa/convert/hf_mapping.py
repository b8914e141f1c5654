"""HF causal-LM tensors <-> megatron-core GPTModel shard tensors: names, shapes, TP slicing, qkv / fc1 fusing."""
from __future__ import annotations

import functools
import re

import torch

from megatron_hdpissa.convert.hf_moe import hf_moe_tensor, is_fused, megatron_moe_layer, moe_hf_keys, moe_hf_shape
from megatron_hdpissa.convert.hf_sources import SafetensorsFolder
from megatron_hdpissa.models.config import ModelConfig, validate_tp
from megatron_hdpissa.models.moe import validate_expert_parallel
from megatron_hdpissa.models.pipeline_stages import layer_key, merge_pipeline_shards, stage_layers, validate_pp

IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
# Qwen3's per-head q / k RMSNorm: HF `self_attn.{q,k}_norm` <-> megatron `self_attention.{q,k}_layernorm`
_QK_NORMS = (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm"))


# ---- HF parameter names ------------------------------------------------------------------------
def _hf_layer(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


# ---- HF -> megatron-core, one TP rank ---------------------------------------------------------
def megatron_shard_from_hf(
    src: SafetensorsFolder, config: ModelConfig, tp_size: int, tp_rank: int,
    dtype: torch.dtype | None = None, progress_bar=None, *, pp_size: int = 1, pp_rank: int = 0,
    ep_size: int = 1, ep_rank: int = 0, etp_size: int | None = None, etp_rank: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """The GPTModel state dict of TP rank `tp_rank` on pipeline stage `pp_rank` of `pp_size`
    (layers numbered locally), sliced straight out of the HF files. `progress_bar.update()` is
    called once per layer (and for embeddings and head). MoE models: the local experts of
    expert-parallel rank `ep_rank` of `ep_size`, split for expert-TP rank `etp_rank` of `etp_size`
    (None: TP rank and size)."""
    validate_tp(config, tp_size)
    etp_size = validate_expert_parallel(config, tp_size, ep_size, etp_size)
    etp_rank = tp_rank if etp_rank is None else etp_rank
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
        return layer_key(i - layers.start, name)

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
        if c.num_experts:
            moe = megatron_moe_layer(src, c, i, tp_size=tp_size, tp_rank=tp_rank, ep_size=ep_size, ep_rank=ep_rank,
                                     etp_size=etp_size, etp_rank=etp_rank)
            sd.update({local(i, name): tensor for name, tensor in moe.items()})
            tick()
            continue
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


def expected_hf_keys(config: ModelConfig, stored=()) -> set[str]:
    """The HF tensor names a model of `config` has (a tied head may still be stored); MoE
    experts per expert, or fused when the `stored` names are (transformers 5's layout)."""
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
        if config.num_experts:
            keys.update(moe_hf_keys(config, i, is_fused(stored, config)))
            continue
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
            w = get(r, layer_key(i, f"self_attention.linear_qkv.{kind}"))
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
            gate, up = torch.chunk(get(r, layer_key(i, "mlp.linear_fc1.weight")), 2, dim=0)
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
            return get(0, layer_key(i, "input_layernorm.weight"))
        if rest == "post_attention_layernorm.weight":
            return get(0, layer_key(i, "pre_mlp_layernorm.weight"))
        if rest == "self_attn.o_proj.weight":
            return cat(layer_key(i, "self_attention.linear_proj.weight"), 1)
        if c.num_experts:
            moe = hf_moe_tensor(get, tp, c, i, rest, layer_key)
            if moe is not None:
                return moe
        if rest == "mlp.down_proj.weight":
            return cat(layer_key(i, "mlp.linear_fc2.weight"), 1)
        for hf_norm, mc_norm in _QK_NORMS:
            if rest == f"self_attn.{hf_norm}.weight":
                return get(0, layer_key(i, f"self_attention.{mc_norm}.weight"))
        if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            return fc1(i)[0 if "gate" in rest else 1]
        proj, kind = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest).groups()
        return qkv(i, kind)["qkv".index(proj)]

    for name in names if names is not None else hf_names(config):
        yield name, build(name).contiguous()


def hf_names(config: ModelConfig) -> list[str]:
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
        names += [_hf_layer(i, n) for n in ("self_attn.o_proj.weight", "post_attention_layernorm.weight")]
        names += moe_hf_keys(config, i) if config.num_experts else [_hf_layer(i, f"mlp.{n}.weight") for n in (
            "gate_proj", "up_proj", "down_proj")]
    names.append("model.norm.weight")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def hf_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    """The whole shape of HF tensor `name` of a model of `config`."""
    c = config
    h, q, kv = c.hidden_size, c.num_attention_heads * c.kv_channels, c.num_query_groups * c.kv_channels
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (c.vocab_size, h)
    rest = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    moe = moe_hf_shape(c, rest) if c.num_experts else None
    if moe is not None:
        return moe
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

