"""What an HF PEFT adapter export reads: a training checkpoint's whole weights and LoRA / PiSSA
factors in HF module names (fused q/k/v and gate/up split, TP shards joined), the original base's
weights W_0 (a Megatron checkpoint or an HF folder), and which HF modules a run adapted."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from megatron_hdpissa.checkpoint.legacy import CheckpointInfo, read_checkpoint_info
from megatron_hdpissa.convert.hf_mapping import hf_names, hf_shape, hf_tensors_from_megatron
from megatron_hdpissa.convert.hf_sources import SafetensorsFolder
from megatron_hdpissa.convert.load import load_megatron_state_dict
from megatron_hdpissa.convert.training_adapters import _part, adapter_state
from megatron_hdpissa.models.config import ModelConfig
from megatron_hdpissa.peft.common import ConfigError, add_part_delta_, matches

# megatron-core layer (under decoder.layers.<i>.) -> the HF modules (under model.layers.<i>.) it holds
HF_MODULES = {"self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "self_attention.linear_proj": ("self_attn.o_proj",),
              "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
              "mlp.linear_fc2": ("mlp.down_proj",)}
COLUMN_LAYERS = ("self_attention.linear_qkv", "mlp.linear_fc1")  # B row-sharded; row-parallel: A column-sharded
PART_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj"}


def whole_shards(directory) -> tuple[CheckpointInfo, ModelConfig, list[dict]]:
    """A Megatron checkpoint's TP shards (legacy; one whole shard for torch_dist), pipeline
    stages joined and layers numbered globally, unmerged (LoRA / PiSSA: W_0 / W_res)."""
    info = read_checkpoint_info(directory)
    config = ModelConfig.load(info.directory)
    tp = 1 if info.ckpt_format == "torch_dist" else info.tp_size
    return info, config, [dict(load_megatron_state_dict(info.directory, t, tp, pp_size=1)) for t in range(tp)]


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "latest_checkpointed_iteration.txt").is_file()


def base_tensors(base, config: ModelConfig, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, W_0)` of the original base, in the order of `names` (HF names), one at a time,
    from a Megatron checkpoint (either format, any TP / PP) or an HF folder; a base of another
    architecture than the checkpoint (`config`) is refused naming it."""
    base = Path(base)
    if not base.is_dir():
        raise ConfigError("base", f"{{name}} {base} does not exist")
    if not is_hf_folder(base) and not (base / "latest_checkpointed_iteration.txt").is_file():
        raise ConfigError("base", f"{{name}} {base} is neither a Megatron checkpoint (no "
                                  "latest_checkpointed_iteration.txt) nor a Hugging Face folder (no config.json)")
    theirs = ModelConfig.from_hf(base) if is_hf_folder(base) else ModelConfig.load(base)
    for name in names:
        if name not in hf_names(theirs) or hf_shape(theirs, name) != hf_shape(config, name):
            raise ConfigError("base", f"{{name}} {base} is not the base of this checkpoint: {name} "
                                      f"{hf_shape(config, name)} has no counterpart of that shape there")
    if is_hf_folder(base):
        src = SafetensorsFolder(base)
        for name in names:
            yield name, src.full(name, hf_shape(config, name))
        return
    yield from hf_tensors_from_megatron(whole_shards(base)[2], theirs, list(names))


def targeted_modules(config: ModelConfig, target_modules: Sequence[str]) -> dict[str, str]:
    """HF module name -> the megatron-core layer it lives in, for every layer `target_modules`
    matches (the patterns of the run's config, `peft.common.matches` on the global layer name)."""
    out = {}
    for i in range(config.num_layers):
        for suffix, modules in HF_MODULES.items():
            if matches(f"decoder.layers.{i}.{suffix}", target_modules):
                out.update({f"model.layers.{i}.{m}": f"decoder.layers.{i}.{suffix}" for m in modules})
    for other in ("output_layer", "embedding.word_embeddings"):
        if matches(other, target_modules):
            raise ConfigError("target_modules", f"{{name}} matches {other}: an adapter export covers only "
                                                 "the attention and MLP projections")
    return out


def lowrank_factors(info: CheckpointInfo, config: ModelConfig, shards: list[dict]) -> dict:
    """{HF module: (B, A)} of a LoRA / PiSSA training checkpoint (DP rank 0's factors, float64):
    column-parallel B rows joined over TP and split into q / k / v or gate / up the way the
    weight is (`hf_tensors_from_megatron` on the factor placed at its part's rows), row-parallel
    A columns joined over TP; the replicated factor from TP rank 0. A fused-decomposition part
    (`w`) gives every HF module of its layer the same A."""
    tp = len(shards)
    adapters, files = zip(*(adapter_state(info.directory, info.iteration, config, t, tp, info.pp_size)
                            for t in range(tp)))
    out = {}
    for key_a in sorted(k for k in adapters[0] if ".lora.a." in k):
        layer, part = key_a.split(".lora.a.")
        key_b, wkey = f"{layer}.lora.b.{part}", f"{layer}.weight"
        i, suffix = int(layer.split(".")[2]), layer.split(".", 3)[3]
        modules = HF_MODULES[suffix] if part == "w" else (PART_MODULE[part],)
        names = [f"model.layers.{i}.{m}.weight" for m in modules]
        if suffix in COLUMN_LAYERS:
            placed = []
            for t in range(tp):
                b = adapters[t][key_b].double()
                rows = torch.zeros(shards[t][wkey].shape[0], b.shape[1], dtype=torch.float64)
                placed.append({wkey: add_part_delta_(rows, _part(config, layer, part, tp, rows.shape[0], files[t]), b)})
            a = adapters[0][key_a].double()
            out.update({n[:-len(".weight")]: (bt, a) for n, bt in hf_tensors_from_megatron(placed, config, names)})
        else:
            b = adapters[0][key_b].double()
            (n, a), = hf_tensors_from_megatron([{wkey: adapters[t][key_a].double()} for t in range(tp)], config, names)
            out[n[:-len(".weight")]] = (b, a)
    return out
