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

The parts live by job in `hf_mapping.py` (with `hf_sources.py`), `pipeline_stages.py`,
`legacy_checkpoint.py`, `dist_conversion.py` and `output_folder.py`; this module holds the two
converters and the loaders, and re-exports the parts' names.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megatron_hdpissa.checkpoint import dist as dist_checkpoint
from megatron_hdpissa.convert.dist import (  # noqa: F401 - private names re-exported for callers
    _dist_rank_state_dict, _local_layer_names, _single_process_group, dist_whole_state_dict, save_whole_as_dist)
from megatron_hdpissa.convert.hf_mapping import (  # noqa: F401
    _IGNORED_HF_KEYS, _QK_NORMS, _expected_hf_keys, _hf_layer, _hf_names, _hf_shape, hf_tensors_from_megatron,
    megatron_shard_from_hf)
from megatron_hdpissa.convert.hf_sources import SafetensorsFolder, _TensorSource  # noqa: F401
from megatron_hdpissa.checkpoint.legacy import (  # noqa: F401
    CHECKPOINT_FILE, CHECKPOINT_FORMAT, TRACKER_FILE, CheckpointInfo, _load_rank_file, _save_rank_file,
    _saved_layout, _stage_state_dict, iteration_dir_name, rank_checkpoint_path, rank_dir_name,
    read_checkpoint_info)
from megatron_hdpissa.models.config import (MODEL_CONFIG_FILE, TP_FLAG, ModelConfig, hf_config_for_readers,
                                     validate_tp)
from megatron_hdpissa.checkpoint.atomic import (  # noqa: F401
    _NOT_COPIED, _WEIGHT_SUFFIXES, _atomic_output_dir, _copy_non_weight_files)
from megatron_hdpissa.models.pipeline_stages import (  # noqa: F401
    _LAYER_KEY, PP_FLAG, _layer, _pipeline_rank_and_size, _stage_of_key, merge_pipeline_shards,
    merge_pipeline_stages, pipeline_stage_state_dict, split_pipeline_stages, stage_layers, validate_pp)

TOKENIZER_DIR = "tokenizer"
_DEFAULT_SHARD_BYTES = 4 * 1024**3
# --dtype spellings the conversion CLIs accept
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
CKPT_FORMATS = dist_checkpoint.CKPT_FORMATS


# ---- loading ----------------------------------------------------------------------------------
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
    from megatron_hdpissa.models.config import build_gpt_model

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


def checkpoint_format(ckpt_dir) -> str:
    """"torch_dist" or "torch" (legacy mp_rank files) for a checkpoint folder."""
    return read_checkpoint_info(ckpt_dir).ckpt_format


def _progress(total: int, desc: str, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


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
                    _save_rank_file(rank_checkpoint_path(tmp, iteration, tp_rank, pp_rank, pp_size), shard,
                                    iteration=iteration, tp_size=tp_size, tp_rank=tp_rank,
                                    pp_size=pp_size, pp_rank=pp_rank)
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
    _merge_training_adapters(shards, config, info)
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


def _merge_training_adapters(shards: list, config, info) -> int:
    """A LoRA / PiSSA training checkpoint keeps the base (W_res for PiSSA) and the factors apart:
    add `s B A` into the shards (both formats), so the export is the fine-tuned model. HD-PiSSA
    checkpoints hold the merged W already."""
    from megatron_hdpissa.analysis import effective_rank as analysis
    from megatron_hdpissa.checkpoint import training_state as checkpointing

    if not checkpointing.is_training_checkpoint(info.directory):
        return 0
    meta = checkpointing.read_meta(info.directory)
    if meta.get("peft") not in ("lora", "pissa"):
        return 0
    return analysis.merge_lowrank_factors(shards, config, info.directory, info.iteration, meta, pp_size=info.pp_size)


__all__ = [
    "CHECKPOINT_FILE", "CKPT_FORMATS", "MODEL_CONFIG_FILE", "PP_FLAG", "TOKENIZER_DIR", "TRACKER_FILE",
    "CheckpointInfo", "SafetensorsFolder", "checkpoint_format", "convert_hf_to_megatron",
    "dist_whole_state_dict", "save_whole_as_dist", "convert_megatron_to_hf",
    "hf_tensors_from_megatron", "load_gpt_model", "load_megatron_checkpoint",
    "load_megatron_state_dict", "megatron_shard_from_hf", "merge_pipeline_shards",
    "merge_pipeline_stages", "pipeline_stage_state_dict", "rank_checkpoint_path", "rank_dir_name",
    "read_checkpoint_info", "split_pipeline_stages", "stage_layers", "validate_pp",
]
