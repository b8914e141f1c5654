"""What a training checkpoint saves and restores (`TrainerState`, `Restored`), the run's meta and RNG, in either format.

Both formats (`trainer_legacy.py`: legacy per-rank files; `trainer_dist.py`: torch_dist)
offer `save(state, save_dir)`, `check_compatible(saved_meta, expected_meta, load_dir)` and
`load(state, load_dir) -> Restored`. The trainer builds a `TrainerState` from its own objects; the
checkpoint layer never sees the trainer.

    ITER/hd_pissa/meta.json    the run's meta (method, parallel sizes, config, arguments): written
                               into the iteration folder before its rename, read to decide
                               whether a folder is a training checkpoint and how to resume it
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from megatron_hdpissa.checkpoint.atomic import TOKENIZER_DIR, TRACKER_FILE, iteration_dir_name, read_tracker
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.models.config import MODEL_CONFIG_FILE
from megatron_hdpissa.peft.common import HD_PISSA, peft_method

STATE_DIR = "hd_pissa"  # per-iteration folder of this project's files (legacy: also the per-rank state)
META_FILE = "meta.json"
ADAPTER_KEYS = (".hd_pissa.", ".lora.")
# Resuming a torch_dist checkpoint at another layout cannot restore each rank's RNG state (the
# ranks are other processes), so every rank reseeds with `seed + stride * iteration + global rank`.
# The stride is a prime larger than any world size this trainer runs at, so no two (iteration,
# rank) pairs of a run share a seed.
RESEED_ITERATION_STRIDE = 100003


@dataclass
class TrainerState:
    """The trainer's state a checkpoint holds. `model`: the unwrapped GPTModel with its adapters
    (the method comes from `peft_method(model)`); `optimizer`: `HDPiSSAOptimizer` for HD-PiSSA,
    else the data-parallel AdamW; `data`: one batch iterator per local slice (`state_dict()` /
    `load_state_dict()`), slice `dp_rank * len(data) + v`; `meta`: the run's meta (saved as
    meta.json); `seed`: the run's `--seed` (reseeding at another layout); `base_dir`: the base
    checkpoint whose model_config.json and tokenizer/ a save copies next to its iterations."""

    model: nn.Module
    optimizer: Any
    groups: ParallelGroups
    data: Sequence[Any]
    iteration: int
    meta: dict
    seed: int
    base_dir: Optional[Path] = None

    @property
    def is_hd_pissa(self) -> bool:
        return peft_method(self.model) == HD_PISSA


@dataclass(frozen=True)
class Restored:
    """What a resume gives back besides the state restored in place: the iteration to continue
    from and how the RNG was restored (for the log)."""

    iteration: int
    note: str


# ---- the model's base weights and adapters ------------------------------------------------------
def is_adapter_key(key: str) -> bool:
    return any(m in key or key.startswith(m[1:]) for m in ADAPTER_KEYS)


def split_state_dict(model: nn.Module) -> tuple[dict, dict]:
    """(base weights, adapter parameters) of this rank's model, detached copies on the CPU (a GPU
    copy would double the model's device memory while a checkpoint is written)."""
    base, adapter = {}, {}
    for k, v in model.state_dict().items():
        (adapter if is_adapter_key(k) else base)[k] = (v.detach().to("cpu", copy=True)
                                                       if isinstance(v, torch.Tensor) else v)
    return base, adapter


# ---- RNG ----------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def reseed(seed: int, iteration: int, global_rank: int) -> int:
    """Seed torch and Python for a resume that cannot restore the saved RNG states; returns the seed."""
    value = seed + RESEED_ITERATION_STRIDE * iteration + global_rank
    torch.manual_seed(value)
    random.seed(value)
    return value


# ---- the meta and the base's files --------------------------------------------------------------
def rank_flag(meta: dict) -> str:
    """The trainer's flag for the adapter rank of the run `meta` describes (for resume errors)."""
    return "--hd-pissa-rank" if meta.get("peft") == HD_PISSA else "--lora-rank"


def check_trainable(saved: dict, expected: dict, load_dir) -> None:
    """Refuse to resume with another set of ordinary trainable parameters (`--hd-pissa-trainable-modules`,
    `--moe-router-trainable`): the checkpoint's trained values would be frozen, or the new ones start
    without optimizer moments, without a word. Metas without a config (older checkpoints) pass."""
    def patterns(meta):
        config = meta.get("config")
        return None if not isinstance(config, dict) else sorted(set(config.get("trainable_modules") or ()))

    was, now = patterns(saved), patterns(expected)
    if was is not None and now is not None and was != now:
        raise ValueError(f"cannot resume from {load_dir}: it was saved with trainable modules {was or 'none'}, "
                         f"this run has {now or 'none'} (--hd-pissa-trainable-modules, --moe-router-trainable): "
                         "resume with the same ones")


def write_meta(iter_dir: Path, meta: dict) -> None:
    (Path(iter_dir) / STATE_DIR).mkdir(parents=True, exist_ok=True)
    (Path(iter_dir) / STATE_DIR / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def copy_base_files(save_dir: Path, base_dir) -> None:
    """model_config.json and tokenizer/ of the base next to the run's iterations (once). `base_dir`:
    a converted checkpoint folder, or an object that writes them (`write_files(dst)`:
    convert.pretrained.PretrainedBase, e.g. a Megatron-LM checkpoint or an HF folder)."""
    if base_dir is None:
        return
    if hasattr(base_dir, "write_files"):
        base_dir.write_files(Path(save_dir))
        return
    save_dir, base_dir = Path(save_dir), Path(base_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    if not (save_dir / MODEL_CONFIG_FILE).exists():
        shutil.copy2(base_dir / MODEL_CONFIG_FILE, save_dir / MODEL_CONFIG_FILE)
    if (base_dir / TOKENIZER_DIR).is_dir() and not (save_dir / TOKENIZER_DIR).exists():
        shutil.copytree(base_dir / TOKENIZER_DIR, save_dir / TOKENIZER_DIR)


def _meta_path(load_dir) -> Optional[Path]:
    iteration = read_tracker(load_dir)
    if iteration is None:
        return None
    return Path(load_dir) / iteration_dir_name(iteration) / STATE_DIR / META_FILE


def is_training_checkpoint(load_dir) -> bool:
    """True when the tracked iteration of `load_dir` was written by the trainer (has meta.json)."""
    path = _meta_path(load_dir)
    return path is not None and path.is_file()


def read_meta(load_dir) -> dict:
    path = _meta_path(load_dir)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{path or Path(load_dir) / TRACKER_FILE} is missing: "
                                f"{load_dir} is not an HD-PiSSA training checkpoint")
    return json.loads(path.read_text())
