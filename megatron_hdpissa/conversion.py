"""Hugging Face causal-LM safetensors <-> megatron-core GPTModel checkpoints in the legacy Megatron
layout, sharded for tensor parallelism; streamed one tensor (slice) at a time, written atomically.

Checkpoint layout (plain dicts, loadable with `torch.load(weights_only=True)`):

    DIR/latest_checkpointed_iteration.txt        "0"
    DIR/iter_0000000/mp_rank_00/model_optim_rng.pt   {"model": state_dict, "iteration", ...}
    DIR/model_config.json                        models.ModelConfig (incl. the HF config.json)
    DIR/tokenizer/                               the HF folder's non-weight files, verbatim
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

from megatron_hdpissa.models import MODEL_CONFIG_FILE, TP_FLAG, ModelConfig, validate_tp

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILE = "model_optim_rng.pt"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_FORMAT = "megatron_hdpissa.legacy.v1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_DEFAULT_SHARD_BYTES = 4 * 1024**3
# --dtype spellings the conversion CLIs accept
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# ---- megatron-core parameter names ------------------------------------------------------------
def _layer(i: int, name: str) -> str:
    return f"decoder.layers.{i}.{name}"


def _hf_layer(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


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
    dtype: torch.dtype | None = None, progress_bar=None,
) -> dict[str, torch.Tensor | None]:
    """The GPTModel state dict of TP rank `tp_rank`, sliced straight out of the HF files.
    `progress_bar.update()` is called once per layer (and for embeddings and head)."""
    validate_tp(config, tp_size)
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
    sd: dict[str, torch.Tensor | None] = {
        "embedding.word_embeddings.weight": src.rows(
            "model.embed_tokens.weight", (c.vocab_size, h), t * vocab_part, (t + 1) * vocab_part
        )
    }
    tick()
    for i in range(c.num_layers):
        sd[_layer(i, "input_layernorm.weight")] = src.full(_hf_layer(i, "input_layernorm.weight"), (h,))
        sd[_layer(i, "self_attention.linear_qkv.weight")] = qkv(i, "weight")
        if c.qkv_bias:
            sd[_layer(i, "self_attention.linear_qkv.bias")] = qkv(i, "bias")
        sd[_layer(i, "self_attention.linear_qkv._extra_state")] = None
        sd[_layer(i, "self_attention.linear_proj.weight")] = src.cols(
            _hf_layer(i, "self_attn.o_proj.weight"), (h, nq * hd),
            t * groups_per_rank * q_per_group * hd, (t + 1) * groups_per_rank * q_per_group * hd,
        )
        sd[_layer(i, "self_attention.linear_proj._extra_state")] = None
        sd[_layer(i, "pre_mlp_layernorm.weight")] = src.full(
            _hf_layer(i, "post_attention_layernorm.weight"), (h,)
        )
        gate = src.rows(_hf_layer(i, "mlp.gate_proj.weight"), (c.ffn_hidden_size, h), t * ffn_part, (t + 1) * ffn_part)
        up = src.rows(_hf_layer(i, "mlp.up_proj.weight"), (c.ffn_hidden_size, h), t * ffn_part, (t + 1) * ffn_part)
        sd[_layer(i, "mlp.linear_fc1.weight")] = torch.cat([gate, up], dim=0)
        sd[_layer(i, "mlp.linear_fc1._extra_state")] = None
        sd[_layer(i, "mlp.linear_fc2.weight")] = src.cols(
            _hf_layer(i, "mlp.down_proj.weight"), (h, c.ffn_hidden_size), t * ffn_part, (t + 1) * ffn_part
        )
        sd[_layer(i, "mlp.linear_fc2._extra_state")] = None
        tick()
    sd["decoder.final_layernorm.weight"] = src.full("model.norm.weight", (h,))
    if not c.tie_word_embeddings:
        sd["output_layer.weight"] = src.rows(
            "lm_head.weight", (c.vocab_size, h), t * vocab_part, (t + 1) * vocab_part
        )
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
        for name in ("gate_proj", "up_proj", "down_proj"):
            keys.add(_hf_layer(i, f"mlp.{name}.weight"))
    return keys


# ---- megatron-core -> HF ----------------------------------------------------------------------
def hf_tensors_from_megatron(shards: list[dict], config: ModelConfig, names: list[str] | None = None):
    """Yield `(hf_name, tensor)` merged across the TP shards (rank order), one tensor at a time."""
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
        "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (c.ffn_hidden_size, h),
        "mlp.up_proj.weight": (c.ffn_hidden_size, h), "mlp.down_proj.weight": (h, c.ffn_hidden_size),
    }[rest]


# ---- the legacy checkpoint layout -------------------------------------------------------------
def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_checkpoint_path(ckpt_dir, iteration: int | str, tp_rank: int) -> Path:
    """`DIR/iter_XXXXXXX/mp_rank_RR/model_optim_rng.pt` (pipeline parallel size 1)."""
    return Path(ckpt_dir) / iteration_dir_name(iteration) / f"mp_rank_{tp_rank:02d}" / CHECKPOINT_FILE


@dataclass(frozen=True)
class CheckpointInfo:
    """What a legacy checkpoint folder holds: its tracked iteration and TP shard files."""

    directory: Path
    iteration: int | str
    tp_size: int
    rank_files: tuple[Path, ...]


def read_checkpoint_info(ckpt_dir) -> CheckpointInfo:
    """Read the tracker and list the TP shards; clear errors for whatever is missing."""
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
    rank_dirs = sorted(p.name for p in iter_dir.glob("mp_rank_*") if p.is_dir())
    if any(not re.fullmatch(r"mp_rank_\d{2}", name) for name in rank_dirs):
        raise ValueError(
            f"{iter_dir} holds pipeline-parallel shards ({rank_dirs[0]}, ...); only "
            "--pipeline-model-parallel-size 1 checkpoints are supported"
        )
    if not rank_dirs:
        raise FileNotFoundError(f"{iter_dir} holds no mp_rank_XX shard folders")
    tp_size = len(rank_dirs)
    files = tuple(rank_checkpoint_path(directory, iteration, r) for r in range(tp_size))
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing (found {tp_size} shard folders: {', '.join(rank_dirs)})"
            )
    return CheckpointInfo(directory, iteration, tp_size, files)


def _load_rank_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot read megatron checkpoint shard {path}: {e}") from e


def load_megatron_state_dict(ckpt_dir, tp_rank: int, tp_size: int | None = None) -> dict:
    """The model state dict of `tp_rank` (memory-mapped). With `tp_size`, check the checkpoint
    was written for that tensor-parallel size."""
    info = read_checkpoint_info(ckpt_dir)
    if tp_size is not None and info.tp_size != tp_size:
        raise ValueError(
            f"{info.directory} was saved with {TP_FLAG} {info.tp_size} but this run uses "
            f"{TP_FLAG} {tp_size}; convert it again for {tp_size} "
            f"(tools/convert_megatron_to_hf.py, then tools/convert_hf_to_megatron.py "
            f"{TP_FLAG} {tp_size})"
        )
    if not 0 <= tp_rank < info.tp_size:
        raise ValueError(f"tp_rank {tp_rank} is outside the checkpoint's {info.tp_size} shards")
    path = info.rank_files[tp_rank]
    state = _load_rank_file(path)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} has no 'model' state dict")
    saved_tp = state.get("tensor_model_parallel_size", info.tp_size)
    if saved_tp != info.tp_size:
        raise ValueError(f"{path} says {TP_FLAG} {saved_tp} but the folder holds {info.tp_size} shards")
    return state["model"]


def load_megatron_checkpoint(model, ckpt_dir, tp_rank: int | None = None) -> None:
    """Load this rank's shard into a GPTModel built by `models.build_gpt_model` (strict)."""
    from megatron.core import parallel_state as ps

    initialised = ps.model_parallel_is_initialized()
    tp_size = ps.get_tensor_model_parallel_world_size() if initialised else 1
    if tp_rank is None:
        tp_rank = ps.get_tensor_model_parallel_rank() if initialised else 0
    state_dict = load_megatron_state_dict(ckpt_dir, tp_rank, tp_size)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{rank_checkpoint_path(ckpt_dir, read_checkpoint_info(ckpt_dir).iteration, tp_rank)} "
            f"does not fit the model: {e}"
        ) from e


def load_gpt_model(ckpt_dir, dtype: torch.dtype = torch.float32, **build_kwargs):
    """Build the GPTModel described by `DIR/model_config.json` for the current TP rank and load
    its weights. Returns `(model, model_config)`."""
    from megatron_hdpissa.models import build_gpt_model

    model_config = ModelConfig.load(ckpt_dir)
    model = build_gpt_model(model_config, dtype=dtype, **build_kwargs)
    load_megatron_checkpoint(model, ckpt_dir)
    return model, model_config


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
    hf_dir, save_dir, tp_size: int, *, dtype: torch.dtype | None = None, iteration: int = 0,
    force: bool = False, progress: bool = True,
) -> Path:
    """Convert an HF LLaMA / Mistral / Qwen2 folder (safetensors) into a legacy Megatron
    checkpoint with `tp_size` shards. Memory: one TP shard plus one tensor at a time."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {hf_dir} does not exist")
    config = ModelConfig.from_hf(hf_dir)
    validate_tp(config, tp_size)
    src = SafetensorsFolder(hf_dir)
    unexpected = sorted(k for k in src.keys() - _expected_hf_keys(config) if not _IGNORED_HF_KEYS.match(k))
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # a stored copy of the tied embedding
    if unexpected:
        raise ValueError(
            f"{hf_dir}: tensors the {config.model_type} conversion does not know: {unexpected[:5]}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )
    with _atomic_output_dir(Path(save_dir), force, sources=(hf_dir,)) as tmp:
        steps = tp_size * (config.num_layers + 2)
        with _progress(steps, f"HF -> megatron TP={tp_size}", progress, "layer") as bar:
            for tp_rank in range(tp_size):
                shard = megatron_shard_from_hf(src, config, tp_size, tp_rank, dtype, bar)
                path = rank_checkpoint_path(tmp, iteration, tp_rank)
                path.parent.mkdir(parents=True)
                torch.save({
                    "model": shard,
                    "iteration": iteration,
                    "checkpoint_version": 3.0,
                    "tensor_model_parallel_size": tp_size,
                    "tensor_model_parallel_rank": tp_rank,
                    "pipeline_model_parallel_size": 1,
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
) -> Path:
    """Merge a legacy Megatron checkpoint's TP shards into an HF folder (safetensors,
    config.json, tokenizer) that transformers loads. Shards are memory-mapped; output files are
    written `max_shard_bytes` at a time. With `tp_size`, check the checkpoint's TP size."""
    from safetensors.torch import save_file

    info = read_checkpoint_info(megatron_dir)
    if tp_size is not None and tp_size != info.tp_size:
        raise ValueError(
            f"{info.directory} was saved with {TP_FLAG} {info.tp_size}, not {tp_size}"
        )
    config = ModelConfig.load(info.directory)
    validate_tp(config, info.tp_size)
    shards = [load_megatron_state_dict(info.directory, r, info.tp_size) for r in range(info.tp_size)]
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
        hf_config["dtype"] = str(out_dtype).removeprefix("torch.")
        if "torch_dtype" in hf_config:
            hf_config["torch_dtype"] = hf_config["dtype"]
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        tokenizer_dir = info.directory / TOKENIZER_DIR
        if tokenizer_dir.is_dir():
            _copy_non_weight_files(tokenizer_dir, tmp)
    return Path(save_dir)


__all__ = [
    "CHECKPOINT_FILE", "MODEL_CONFIG_FILE", "TOKENIZER_DIR", "TRACKER_FILE", "CheckpointInfo",
    "SafetensorsFolder", "convert_hf_to_megatron", "convert_megatron_to_hf",
    "hf_tensors_from_megatron", "load_gpt_model", "load_megatron_checkpoint",
    "load_megatron_state_dict", "megatron_shard_from_hf", "rank_checkpoint_path",
    "read_checkpoint_info",
]
