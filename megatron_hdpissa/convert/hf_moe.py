"""HF <-> megatron-core tensors of an MoE layer (Qwen2-MoE, Qwen3-MoE, Mixtral): the router, each expert's gate / up / down (per-expert or fused 3-D HF layouts, split over expert-parallel and expert-TP ranks) and Qwen2-MoE's gated shared expert.

HF layouts read (both families):
- per expert, what `save_pretrained` writes: Qwen2/3-MoE `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`
  with router `mlp.gate.weight`; Mixtral `model.layers.{i}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`
  (gate, up, down) with router `block_sparse_moe.gate.weight`;
- fused, transformers 5's module layout: `model.layers.{i}.mlp.experts.gate_up_proj` (E, 2I, H: the gate
  rows first), `mlp.experts.down_proj` (E, H, I), router `mlp.gate.weight`.
Written back: the per-expert layout (transformers 4.x and 5.x both read it). Qwen2-MoE's shared expert
`mlp.shared_expert.{gate,up,down}_proj.weight` and `mlp.shared_expert_gate.weight` (1, H) <-> megatron-core's
`mlp.shared_experts.linear_fc1/linear_fc2.weight` (split over TP as a dense MLP) and `mlp.shared_experts.gate_weight`.

megatron-core (SequentialMLP, local spec): `mlp.router.weight` (E, H) on every rank; local expert j of
expert-parallel rank r is global expert r * E / EP + j, with `mlp.experts.local_experts.{j}.linear_fc1.weight`
= [gate rows; up rows] of its expert-TP rank (as a dense fc1) and `linear_fc2.weight` its columns of down.
"""
from __future__ import annotations

import torch

from megatron_hdpissa.models.config import ModelConfig

FUSED_GATE_UP, FUSED_DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"
# per-expert HF names: family -> (router, expert prefix, (gate, up, down) names)
_PER_EXPERT = {
    "qwen2_moe": ("mlp.gate.weight", "mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts", ("w1", "w3", "w2")),
}
_FUSED_ROUTER = "mlp.gate.weight"
_SHARED = "mlp.shared_expert"  # Qwen2-MoE: + ".{gate,up,down}_proj.weight"; gate: "mlp.shared_expert_gate.weight"
_SHARED_GATE = "mlp.shared_expert_gate.weight"


def _layer(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def expert_key(config: ModelConfig, i: int, e: int, part: str) -> str:
    """HF name of expert `e`'s `part` ("gate" | "up" | "down") in layer `i` (per-expert layout)."""
    _, prefix, names = _PER_EXPERT[config.model_type]
    return _layer(i, f"{prefix}.{e}.{names[('gate', 'up', 'down').index(part)]}.weight")


def router_key(config: ModelConfig, i: int, fused: bool = False) -> str:
    return _layer(i, _FUSED_ROUTER if fused else _PER_EXPERT[config.model_type][0])


def is_fused(keys, config: ModelConfig) -> bool:
    """Whether an HF tensor set stores the experts fused (transformers 5's 3-D module layout)."""
    return bool(config.num_experts) and _layer(0, FUSED_GATE_UP) in keys


def moe_hf_keys(config: ModelConfig, i: int, fused: bool = False) -> list[str]:
    """HF tensor names of layer `i`'s router, experts and shared expert, in model order."""
    shared = [_layer(i, f"{_SHARED}.{p}_proj.weight") for p in ("gate", "up", "down")] + [
        _layer(i, _SHARED_GATE)] if config.moe_shared_expert_size else []
    if fused:
        return [router_key(config, i, True), _layer(i, FUSED_GATE_UP), _layer(i, FUSED_DOWN)] + shared
    return [router_key(config, i)] + [expert_key(config, i, e, part) for e in range(config.num_experts)
                                      for part in ("gate", "up", "down")] + shared


def moe_hf_shape(config: ModelConfig, rest: str) -> tuple[int, ...] | None:
    """Shape of a per-expert-layout HF tensor `rest` (name after `model.layers.{i}.`), None if not an MoE name."""
    h, ffn, experts = config.hidden_size, config.ffn_hidden_size, config.num_experts
    router, prefix, (gate, up, down) = _PER_EXPERT.get(config.model_type, (None, None, (None,) * 3))
    if router is None:
        return None
    if rest == router:
        return (experts, h)
    shared = config.moe_shared_expert_size
    if shared and rest == _SHARED_GATE:
        return (1, h)
    if shared and rest.startswith(_SHARED + "."):
        return {"gate_proj.weight": (shared, h), "up_proj.weight": (shared, h),
                "down_proj.weight": (h, shared)}.get(rest[len(_SHARED) + 1:])
    if rest.startswith(prefix + "."):
        part = rest[len(prefix) + 1:].split(".", 1)[1]
        return {f"{gate}.weight": (ffn, h), f"{up}.weight": (ffn, h), f"{down}.weight": (h, ffn)}.get(part)
    return None


# ---- HF -> megatron-core, one (EP, expert-TP) rank ---------------------------------------------
def megatron_moe_layer(src, config: ModelConfig, i: int, *, tp_size: int = 1, tp_rank: int = 0, ep_size: int = 1,
                       ep_rank: int = 0, etp_size: int = 1, etp_rank: int = 0) -> dict[str, torch.Tensor | None]:
    """Layer `i`'s router and the local experts of EP rank `ep_rank`, each sliced for expert-TP
    rank `etp_rank`, and a shared expert sliced for TP rank `tp_rank`: megatron-core names
    relative to the layer (`mlp.router.weight`, ...)."""
    h, ffn, experts = config.hidden_size, config.ffn_hidden_size, config.num_experts
    local, part = experts // ep_size, ffn // etp_size
    a, b = etp_rank * part, (etp_rank + 1) * part
    fused = is_fused(src.keys(), config)
    out: dict[str, torch.Tensor | None] = {"mlp.router.weight": src.full(router_key(config, i, fused), (experts, h))}
    for j in range(local):
        e = ep_rank * local + j
        if fused:
            gate_up = (experts, 2 * ffn, h)
            gate = src.part(_layer(i, FUSED_GATE_UP), gate_up, (e, slice(a, b)))
            up = src.part(_layer(i, FUSED_GATE_UP), gate_up, (e, slice(ffn + a, ffn + b)))
            down = src.part(_layer(i, FUSED_DOWN), (experts, h, ffn), (e, slice(None), slice(a, b)))
        else:
            gate = src.rows(expert_key(config, i, e, "gate"), (ffn, h), a, b)
            up = src.rows(expert_key(config, i, e, "up"), (ffn, h), a, b)
            down = src.cols(expert_key(config, i, e, "down"), (h, ffn), a, b)
        name = f"mlp.experts.local_experts.{j}"
        out[f"{name}.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        out[f"{name}.linear_fc1._extra_state"] = None
        out[f"{name}.linear_fc2.weight"] = down.contiguous()
        out[f"{name}.linear_fc2._extra_state"] = None
    shared = config.moe_shared_expert_size
    if shared:
        s_part = shared // tp_size
        sa, sb = tp_rank * s_part, (tp_rank + 1) * s_part
        gate = src.rows(_layer(i, f"{_SHARED}.gate_proj.weight"), (shared, h), sa, sb)
        up = src.rows(_layer(i, f"{_SHARED}.up_proj.weight"), (shared, h), sa, sb)
        out["mlp.shared_experts.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        out["mlp.shared_experts.linear_fc2.weight"] = src.cols(_layer(i, f"{_SHARED}.down_proj.weight"),
                                                               (h, shared), sa, sb)
        out["mlp.shared_experts.linear_fc1._extra_state"] = out["mlp.shared_experts.linear_fc2._extra_state"] = None
        out["mlp.shared_experts.gate_weight"] = src.full(_layer(i, _SHARED_GATE), (1, h))
    return out


# ---- torch_dist ----------------------------------------------------------------------------------
_STACKED_EXPERTS = ".mlp.experts.experts."  # megatron-core's SequentialMLP sharded keys: global expert axis


def unstack_experts(key: str, tensor: torch.Tensor, config: ModelConfig, where) -> dict[str, torch.Tensor]:
    """A torch_dist layer tensor as GPTModel state-dict entries: the experts' tensors (stacked
    over the global expert axis) become `mlp.experts.local_experts.{e}.*` of an EP=1 model."""
    if _STACKED_EXPERTS not in key:
        return {key: tensor}
    if tensor.shape[0] != config.num_experts:
        raise ValueError(f"{where}: {key!r} stacks {tensor.shape[0]} experts, the model has {config.num_experts}")
    head, tail = key.split(_STACKED_EXPERTS)
    return {f"{head}.mlp.experts.local_experts.{e}.{tail}": t for e, t in enumerate(tensor.unbind(0))}


# ---- megatron-core -> HF ------------------------------------------------------------------------
def hf_moe_tensor(get, tp: int, config: ModelConfig, i: int, rest: str, layer_key) -> torch.Tensor | None:
    """The whole HF tensor `rest` of layer `i` (per-expert layout) from TP shards that each hold
    every expert split over expert-TP = TP (`get(rank, key)`); None if `rest` is no MoE name."""
    router, prefix, (gate, up, down) = _PER_EXPERT[config.model_type]
    if rest == router:
        return get(0, layer_key(i, "mlp.router.weight"))
    if config.moe_shared_expert_size and rest == _SHARED_GATE:
        return get(0, layer_key(i, "mlp.shared_experts.gate_weight"))
    if config.moe_shared_expert_size and rest.startswith(_SHARED + "."):
        mc, name = "mlp.shared_experts", rest[len(_SHARED) + 1:]
        gate, up, down = "gate_proj", "up_proj", "down_proj"
    elif rest.startswith(prefix + "."):
        e_text, name = rest[len(prefix) + 1:].split(".", 1)
        mc = f"mlp.experts.local_experts.{int(e_text)}"
    else:
        return None
    if name == f"{down}.weight":
        return torch.cat([get(r, layer_key(i, f"{mc}.linear_fc2.weight")) for r in range(tp)], dim=1)
    if name in (f"{gate}.weight", f"{up}.weight"):
        index = 0 if name == f"{gate}.weight" else 1
        return torch.cat([torch.chunk(get(r, layer_key(i, f"{mc}.linear_fc1.weight")), 2, dim=0)[index]
                          for r in range(tp)], dim=0)
    return None
