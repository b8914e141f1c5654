"""Hugging Face causal-LM safetensors <-> Megatron checkpoints (legacy TP / PP shards or torch_dist), streamed and written atomically.

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

`--ckpt-format torch_dist` (megatron-core's dist_checkpointing, see `checkpoint/dist.py`) writes
`DIR/iter_0000000/{metadata.json,common.pt,.metadata,*.distcp}` instead of the mp_rank folders,
with the same tracker, model_config.json and tokenizer/: one checkpoint for any TP / PP layout.
The readers (`convert/load.py`) and `convert_megatron_to_hf` detect the format from the folder.

The parts live by job: tensor names and slicing in `hf_mapping.py` (with `hf_sources.py`), the
torch_dist whole-model reads and writes in `convert/dist.py`, the legacy files in
`checkpoint/legacy.py`, the output folder in `checkpoint/atomic.py`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megatron_hdpissa.checkpoint.atomic import TOKENIZER_DIR, atomic_output_dir, write_tracker
from megatron_hdpissa.checkpoint.dist import CKPT_FORMAT_FLAG, CKPT_FORMATS, TORCH, TORCH_DIST
from megatron_hdpissa.checkpoint.legacy import rank_checkpoint_path, read_checkpoint_info, save_rank_file
from megatron_hdpissa.convert.dist import dist_whole_state_dict, save_whole_as_dist
from megatron_hdpissa.convert.hf_mapping import (IGNORED_HF_KEYS, expected_hf_keys, hf_names, hf_shape,
                                                 hf_tensors_from_megatron, megatron_shard_from_hf)
from megatron_hdpissa.convert.hf_sources import SafetensorsFolder, copy_non_weight_files
from megatron_hdpissa.convert.load import load_megatron_state_dict
from megatron_hdpissa.convert.megatron_lm_checkpoint import (is_megatron_lm_checkpoint, megatron_lm_model_config,
                                                             megatron_lm_whole)
from megatron_hdpissa.convert.training_adapters import merge_training_adapters
from megatron_hdpissa.models.config import TP_FLAG, ModelConfig, hf_config_for_readers, validate_tp
from megatron_hdpissa.models.pipeline_stages import PP_FLAG, merge_pipeline_shards, validate_pp

_DEFAULT_SHARD_BYTES = 4 * 1024**3
# --dtype spellings the conversion CLIs accept
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _progress(total: int, desc: str, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


# ---- the two conversions ----------------------------------------------------------------------
def convert_hf_to_megatron(
    hf_dir, save_dir, tp_size: int = 1, *, pp_size: int = 1, dtype: torch.dtype | None = None,
    iteration: int = 0, force: bool = False, progress: bool = True, ckpt_format: str = TORCH,
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
        raise ValueError(f"{CKPT_FORMAT_FLAG} {ckpt_format!r}: choose from {', '.join(CKPT_FORMATS)}")
    config = ModelConfig.from_hf(hf_dir)
    validate_tp(config, tp_size)
    validate_pp(config, pp_size)
    src = SafetensorsFolder(hf_dir)
    unexpected = sorted(k for k in src.keys() - expected_hf_keys(config, src.keys()) if not IGNORED_HF_KEYS.match(k))
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # a stored copy of the tied embedding
    if unexpected:
        raise ValueError(
            f"{hf_dir}: tensors the {config.model_type} conversion does not know: {unexpected[:5]}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )
    if ckpt_format == TORCH_DIST:
        with atomic_output_dir(Path(save_dir), force, sources=(hf_dir,)) as tmp:
            with _progress(config.num_layers + 2, "HF -> megatron torch_dist", progress, "layer") as bar:
                whole = megatron_shard_from_hf(src, config, 1, 0, dtype, bar)
            save_whole_as_dist(whole, config, tmp, iteration)  # tracker written last, inside
            del whole
            config.save(tmp)
            copy_non_weight_files(hf_dir, tmp / TOKENIZER_DIR)
        return Path(save_dir)
    with atomic_output_dir(Path(save_dir), force, sources=(hf_dir,)) as tmp:
        steps = tp_size * (config.num_layers + 2)
        with _progress(steps, f"HF -> megatron TP={tp_size} PP={pp_size}", progress, "layer") as bar:
            for tp_rank in range(tp_size):
                for pp_rank in range(pp_size):
                    shard = megatron_shard_from_hf(src, config, tp_size, tp_rank, dtype, bar,
                                                   pp_size=pp_size, pp_rank=pp_rank)
                    save_rank_file(rank_checkpoint_path(tmp, iteration, tp_rank, pp_rank, pp_size), shard,
                                    iteration=iteration, tp_size=tp_size, tp_rank=tp_rank,
                                    pp_size=pp_size, pp_rank=pp_rank)
                    del shard
        config.save(tmp)
        copy_non_weight_files(hf_dir, tmp / TOKENIZER_DIR)
        write_tracker(tmp, iteration)  # last: marks the checkpoint complete
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
    dist = info.ckpt_format == TORCH_DIST
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
    foreign = is_megatron_lm_checkpoint(info.directory)  # Megatron-LM / -Bridge: the model from its args
    config = megatron_lm_model_config(info.directory) if foreign else ModelConfig.load(info.directory)
    if foreign:
        shards = megatron_lm_whole(info.directory, config)
    elif dist:
        shards = [dist_whole_state_dict(info.iter_dir, config)]
    else:
        validate_tp(config, info.tp_size)
        validate_pp(config, info.pp_size)
        shards = merge_pipeline_shards(
            {(t, p): load_megatron_state_dict(info.directory, t, info.tp_size, pp_rank=p)
             for t in range(info.tp_size) for p in range(info.pp_size)}, config)
    merge_training_adapters(shards, config, info)
    out_dtype = dtype or shards[0]["embedding.word_embeddings.weight"].dtype

    names = hf_names(config)
    element = torch.empty((), dtype=out_dtype).element_size()
    groups, size = [[]], 0
    for name in names:  # plan the output files from shapes alone
        nbytes = math.prod(hf_shape(config, name)) * element
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes

    with atomic_output_dir(Path(save_dir), force, sources=(info.directory,)) as tmp:
        weight_map, total = {}, 0
        with _progress(len(names), "megatron -> HF", progress, "tensor") as bar:
            for index, group in enumerate(groups):
                file = ("model.safetensors" if len(groups) == 1
                        else f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors")
                tensors = {}
                for name, tensor in _fitting_hf_tensors(shards, config, group, info.directory):
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
            copy_non_weight_files(tokenizer_dir, tmp)
    return Path(save_dir)


def _fitting_hf_tensors(shards, config: ModelConfig, names, directory):
    """`hf_tensors_from_megatron`, refusing a model_config.json that does not describe the
    checkpoint's tensors (a layer more or less, another width or head layout): each HF tensor
    must have the shape the config implies."""
    where = f"{Path(directory) / 'model_config.json'} ({config.model_type}, {config.num_layers} layers)"
    layers = {int(k.split(".")[2]) for k in shards[0] if k.startswith("decoder.layers.")}
    if layers != set(range(config.num_layers)):
        raise ValueError(f"{where} does not match the checkpoint's tensors: they hold layers "
                         f"{min(layers, default=None)}..{max(layers, default=None)} ({len(layers)} layers)")
    try:
        for name, tensor in hf_tensors_from_megatron(shards, config, names):
            if tuple(tensor.shape) != hf_shape(config, name):
                raise ValueError(f"{where} does not match the checkpoint's tensors: {name} comes out "
                                 f"{tuple(tensor.shape)}, the config implies {hf_shape(config, name)}")
            yield name, tensor
    except (RuntimeError, KeyError, IndexError) as e:
        raise ValueError(f"{where} does not match the checkpoint's tensors: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
