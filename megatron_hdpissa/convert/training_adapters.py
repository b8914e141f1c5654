"""The offline merge of a LoRA / PiSSA training checkpoint's factors into its base weights (`W_res + s B A`)."""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_hdpissa.checkpoint.atomic import iteration_dir_name
from megatron_hdpissa.checkpoint.dist import is_dist_checkpoint_dir
from megatron_hdpissa.checkpoint.legacy import CheckpointInfo
from megatron_hdpissa.checkpoint.safe_load import read_dcp_metadata, read_global_tensors
from megatron_hdpissa.checkpoint.trainer_state import is_training_checkpoint, read_meta
from megatron_hdpissa.checkpoint.trainer_legacy import rank_file
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.models.config import ModelConfig
from megatron_hdpissa.models.pipeline_stages import merge_pipeline_stages
from megatron_hdpissa.peft import layout
from megatron_hdpissa.peft.common import LORA, PISSA, add_part_delta_, lowrank_scale, part_named

DIST_PREFIX = "lora."  # the torch_dist key prefix of LoRA / PiSSA factors (checkpoint/trainer_dist.py)


def adapter_state(path: Path, iteration, config: ModelConfig, tp_rank: int, tp_size: int,
                  pp_size: int) -> tuple[dict, str]:
    """DP rank 0's adapter parameters of TP rank `tp_rank`, all pipeline stages merged (layers
    renumbered globally), and the file(s) they came from. A torch_dist checkpoint holds whole
    factors (TP = 1)."""
    iter_dir = Path(path) / iteration_dir_name(iteration)
    if is_dist_checkpoint_dir(iter_dir):
        return dist_adapter_state(iter_dir), str(iter_dir)
    stages, files = [], []
    for p in range(pp_size):
        groups = ParallelGroups(None, None, tp_rank=tp_rank, tp_size=tp_size, dp_rank=0, dp_size=1,
                                pp_rank=p, pp_size=pp_size)
        file = rank_file(iter_dir, groups)
        legacy = iter_dir / "hd_pissa" / f"dp_000_tp_{tp_rank:02d}.pt"  # saved before pipeline support
        if not file.is_file() and pp_size == 1 and legacy.is_file():
            file = legacy
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: cannot merge the adapter factors of TP rank "
                                    f"{tp_rank}" + (f", pipeline stage {p}" if pp_size > 1 else ""))
        if file in files:
            raise ValueError(f"{file}: trainer_legacy.rank_file names one adapter file for all "
                             f"{pp_size} pipeline stages")
        stages.append(torch.load(file, map_location="cpu", weights_only=True)["adapter"])
        files.append(file)
    return merge_pipeline_stages(stages, config), ", ".join(str(f) for f in files)


def dist_adapter_state(iter_dir: Path) -> dict:
    """The LoRA / PiSSA factors of a torch_dist training checkpoint (`lora.<layer>.<a|b>.<part>`,
    one slice, whole shapes) keyed as the legacy adapter files key them
    (`<layer>.lora.<a|b>.<part>`)."""
    keys = [k for k in read_dcp_metadata(iter_dir).state_dict_metadata if k.startswith(DIST_PREFIX)]
    out = {}
    for key, value in read_global_tensors(iter_dir, keys).items():
        layer, which, part = key[len(DIST_PREFIX):].rsplit(".", 2)
        out[f"{layer}.lora.{which}.{part}"] = value[0]
    return out


def _part(config: ModelConfig, layer: str, part: str, tp_size: int, local_rows: int, file: str) -> layout.Part:
    """The part of a TP shard's weight that a factor pair of `layer` adapts."""
    if part == "w":
        return layout.whole()[0]
    if part in ("q", "k", "v"):
        parts = layout.qkv_parts(config.num_attention_heads, config.num_query_groups, config.kv_channels,
                                 tp_size, layer)
    elif part in ("gate", "up"):
        parts = layout.gate_up_parts(local_rows, layer)
    else:
        raise ValueError(f"{file}: unknown adapter part {part!r} of {layer.rsplit('.', 1)[-1]}")
    return part_named(parts, part, layer)


def merge_lowrank_factors(shards: list, config: ModelConfig, path: Path, iteration, meta: dict,
                          pp_size: int = 1) -> int:
    """Add `s B A` of every LoRA / PiSSA adapter (DP rank 0's factors; the baselines keep them
    identical on all DP ranks) into the TP shards' base weights (whole-model state dicts, global
    layer numbering), in place; `s = alpha / rank` from the run's meta. `pp_size`: pipeline
    stages the adapter files were saved in. Returns the number of factor pairs merged."""
    scale = lowrank_scale(meta["config"]["rank"], meta["config"].get("alpha"))
    tp = len(shards)
    merged = 0
    for t in range(tp):
        adapter, file = adapter_state(path, iteration, config, t, tp, pp_size)
        for key_a in sorted(k for k in adapter if ".lora.a." in k):
            layer, part = key_a.split(".lora.a.")
            a, b = adapter[key_a].double(), adapter[f"{layer}.lora.b.{part}"].double()
            wkey = f"{layer}.weight"
            if wkey not in shards[t]:
                raise ValueError(f"{file}: adapter {key_a} has no base weight {wkey} in mp_rank_{t:02d}")
            w = shards[t][wkey].clone()
            add_part_delta_(w, _part(config, layer, part, tp, w.shape[0], file), (scale * (b @ a)).to(w.dtype))
            shards[t][wkey] = w
            merged += 1
    if not merged:
        raise ValueError(f"{path}: a --peft {meta.get('peft')} checkpoint without adapter factors")
    return merged


def merge_training_adapters(shards: list, config: ModelConfig, info: CheckpointInfo) -> int:
    """A LoRA / PiSSA training checkpoint keeps the base (W_res for PiSSA) and the factors apart:
    add `s B A` into the shards (both formats), so an export is the fine-tuned model. HD-PiSSA
    checkpoints hold the merged W already (0 merged)."""
    if not is_training_checkpoint(info.directory):
        return 0
    meta = read_meta(info.directory)
    if meta.get("peft") not in (LORA, PISSA):
        return 0
    return merge_lowrank_factors(shards, config, info.directory, info.iteration, meta, pp_size=info.pp_size)
