"""Atomic training checkpoints in the legacy Megatron layout (`--ckpt-format torch`), plus each
(DP, TP, PP) rank's adapter state: resuming reproduces the uninterrupted run exactly on CPU, at
the same layout. (`--ckpt-format torch_dist`, the default, resumes at any TP / PP: its state is
in `training_state_dist.py`; `save_dist_training_checkpoint` below adds the meta and base files.)

    SAVE/latest_checkpointed_iteration.txt         written last: marks the newest complete one
    SAVE/model_config.json, SAVE/tokenizer/        copied from the base checkpoint
    SAVE/iter_0000100/mp_rank_TT/model_optim_rng.pt   base weights of TP rank TT (HD-PiSSA: the
                                                      updated W; LoRA/PiSSA: W_res), adapters excluded;
                                                      mp_rank_TT_PPP/ per pipeline stage at PP > 1
    SAVE/iter_0000100/hd_pissa/meta.json           method, parallel sizes, config, arguments
    SAVE/iter_0000100/hd_pissa/dp_DDD_tp_TT.pt     factors, optimizer moments, scheduler, data
                                                   position, RNG states of that rank (_pp_PPP at PP > 1)

Because the per-TP model files are an ordinary converted checkpoint, `tools/convert_megatron_to_hf.py`
exports an HD-PiSSA run's SAVE folder directly (its weights are already merged).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_hdpissa.convert import hf_megatron as conversion
from megatron_hdpissa.convert.hf_megatron import TOKENIZER_DIR, TRACKER_FILE, iteration_dir_name
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.models.config import MODEL_CONFIG_FILE

ADAPTER_KEYS = (".hd_pissa.", ".lora.")
META_FILE = "meta.json"


def is_adapter_key(key: str) -> bool:
    return any(m in key or key.startswith(m[1:]) for m in ADAPTER_KEYS)


def split_state_dict(model: nn.Module) -> tuple[dict, dict]:
    """(base weights, adapter parameters) of this rank's model."""
    base, adapter = {}, {}
    for k, v in model.state_dict().items():
        (adapter if is_adapter_key(k) else base)[k] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return base, adapter


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _world_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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


def rank_file(iter_dir: Path, groups: ParallelGroups) -> Path:
    """`hd_pissa/dp_DDD_tp_TT.pt`, with `_pp_PPP` at PP > 1 (PP = 1 names as before PP existed)."""
    stage = f"_pp_{groups.pp_rank:03d}" if groups.pp_size > 1 else ""
    return iter_dir / "hd_pissa" / f"dp_{groups.dp_rank:03d}_tp_{groups.tp_rank:02d}{stage}.pt"


def model_file(ckpt_dir, iteration, tp_rank: int, pp_rank: int = 0, pp_size: int = 1) -> Path:
    """Megatron's legacy shard path: `iter_X/mp_rank_TT/...`, or `mp_rank_TT_PPP/...` at PP > 1."""
    return conversion.rank_checkpoint_path(ckpt_dir, iteration, tp_rank, pp_rank=pp_rank, pp_size=pp_size)


def save_checkpoint(save_dir, iteration: int, model: nn.Module, rank_state: dict, meta: dict,
                    groups: ParallelGroups, base_dir: Optional[str] = None) -> Path:
    """Collective: every rank calls it. Writes into a hidden temp folder, renames it into place,
    then rewrites the tracker, so a crash at any point leaves the previous checkpoint loadable."""
    save_dir = Path(save_dir)
    final = save_dir / iteration_dir_name(iteration)
    tmp = save_dir / f".{final.name}.tmp"
    if _world_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "hd_pissa").mkdir(parents=True)
    _barrier()
    base, adapter = split_state_dict(model)
    if groups.dp_rank == 0:
        path = tmp / conversion.rank_dir_name(groups.tp_rank, groups.pp_rank, groups.pp_size) / conversion.CHECKPOINT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": base, "iteration": iteration, "checkpoint_version": 3.0,
                    "tensor_model_parallel_size": groups.tp_size,
                    "tensor_model_parallel_rank": groups.tp_rank,
                    "pipeline_model_parallel_size": groups.pp_size,
                    "pipeline_model_parallel_rank": groups.pp_rank,
                    "format": "megatron_hdpissa.train.v1"}, path)
    torch.save({"adapter": adapter, **rank_state}, rank_file(tmp, groups))
    _barrier()
    if _world_rank() == 0:
        write_meta(tmp, meta)
        copy_base_files(save_dir, base_dir)
        if final.exists():  # re-saving the same iteration: keep the old one until the swap
            old = save_dir / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        tracker_tmp = save_dir / f".{TRACKER_FILE}.tmp"
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, save_dir / TRACKER_FILE)
    _barrier()
    return final


def write_meta(iter_dir: Path, meta: dict) -> None:
    (Path(iter_dir) / "hd_pissa").mkdir(parents=True, exist_ok=True)
    (Path(iter_dir) / "hd_pissa" / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def copy_base_files(save_dir: Path, base_dir: Optional[str]) -> None:
    """model_config.json and tokenizer/ of the base next to the run's iterations (once)."""
    if base_dir is None:
        return
    base_dir = Path(base_dir)
    if not (save_dir / MODEL_CONFIG_FILE).exists():
        shutil.copy2(base_dir / MODEL_CONFIG_FILE, save_dir / MODEL_CONFIG_FILE)
    if (base_dir / TOKENIZER_DIR).is_dir() and not (save_dir / TOKENIZER_DIR).exists():
        shutil.copytree(base_dir / TOKENIZER_DIR, save_dir / TOKENIZER_DIR)


def save_dist_training_checkpoint(save_dir, meta: dict, save_fn, base_dir: Optional[str] = None) -> Path:
    """The torch_dist layout of a training checkpoint: megatron-core's files in iter_X/, plus
    iter_X/hd_pissa/meta.json and the base's config and tokenizer. `save_fn(write_rank0_files)`
    does the collective save (training_state_dist.save); rank 0 writes the meta into the
    temporary folder before its rename, so the tracker still marks only complete checkpoints."""
    save_dir = Path(save_dir)
    if _world_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        copy_base_files(save_dir, base_dir)
    return save_fn(lambda tmp_iter_dir: write_meta(tmp_iter_dir, meta))


def latest_iteration(load_dir) -> Optional[int]:
    """The tracked iteration of a training checkpoint folder, or None if it holds none."""
    tracker = Path(load_dir) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def is_training_checkpoint(load_dir) -> bool:
    it = latest_iteration(load_dir)
    return it is not None and (Path(load_dir) / iteration_dir_name(it) / "hd_pissa" / META_FILE).is_file()


def read_meta(load_dir) -> dict:
    it = latest_iteration(load_dir)
    path = Path(load_dir) / iteration_dir_name(it) / "hd_pissa" / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {load_dir} is not an HD-PiSSA training checkpoint")
    return json.loads(path.read_text())


def check_resume_compatible(meta: dict, expected: dict, load_dir) -> None:
    """Refuse to resume with another parallel layout or method (each rank's factors and
    moments belong to one (DP, TP) position)."""
    flags = {"peft": "--peft", "dp_size": "data-parallel size (world size / TP)",
             "tp_size": "--tensor-model-parallel-size", "pp_size": "--pipeline-model-parallel-size",
             "virtual_ranks": "--hd-pissa-virtual-ranks", "rank": "--hd-pissa-rank"}
    defaults = {"pp_size": 1}  # checkpoints written before pipeline parallelism
    for key, flag in flags.items():
        if meta.get(key, defaults.get(key)) != expected.get(key, defaults.get(key)):
            raise ValueError(
                f"cannot resume from {load_dir}: it was saved with {flag} = {meta.get(key)}, this run "
                f"has {expected.get(key)}. Resharding factors and optimizer moments is not supported; "
                "restart from the base checkpoint or use the same layout"
            )


def load_rank_state(load_dir, groups: ParallelGroups) -> dict:
    it = latest_iteration(load_dir)
    path = rank_file(Path(load_dir) / iteration_dir_name(it), groups)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint does not cover DP rank "
                                f"{groups.dp_rank}, TP rank {groups.tp_rank}, PP rank {groups.pp_rank}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_adapter_params(model: nn.Module, adapter_state: dict, path_hint: str) -> None:
    own = {k for k in model.state_dict() if is_adapter_key(k)}
    missing, unexpected = own - set(adapter_state), set(adapter_state) - own
    if missing or unexpected:
        raise ValueError(f"{path_hint}: adapter parameters do not fit the model "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.load_state_dict(adapter_state, strict=False)

