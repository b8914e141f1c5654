"""The trainer's state as a legacy `--ckpt-format torch` checkpoint: Megatron's per-TP model files plus each rank's state.

Resuming reproduces the uninterrupted run exactly on CPU, at the same layout (`--ckpt-format
torch_dist`, the default, resumes at any TP / PP: `trainer_dist.py`).

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

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from megatron_hdpissa.checkpoint.atomic import atomic_iteration_dir, iteration_dir_name, read_tracker, world_rank
from megatron_hdpissa.checkpoint.legacy import CHECKPOINT_FILE, load_checked, rank_dir_name, save_rank_file
from megatron_hdpissa.checkpoint.trainer_state import (STATE_DIR, Restored, TrainerState, check_trainable,
                                                       copy_base_files, is_adapter_key, rank_flag, rng_state,
                                                       set_rng_state, split_state_dict, write_meta)
from megatron_hdpissa.distributed.groups import ParallelGroups

TRAINING_FORMAT = "megatron_hdpissa.train.v1"


def rank_file(iter_dir: Path, groups: ParallelGroups) -> Path:
    """`hd_pissa/dp_DDD_tp_TT.pt`, with `_pp_PPP` at PP > 1 (PP = 1 names as before PP existed)."""
    stage = f"_pp_{groups.pp_rank:03d}" if groups.pp_size > 1 else ""
    return Path(iter_dir) / STATE_DIR / f"dp_{groups.dp_rank:03d}_tp_{groups.tp_rank:02d}{stage}.pt"


def save_checkpoint(save_dir, iteration: int, model: nn.Module, rank_state: dict, meta: dict,
                    groups: ParallelGroups, base_dir: Optional[Path] = None) -> Path:
    """Collective: every rank calls it. DP rank 0 of every (TP, PP) position writes the model
    file, every rank its `rank_state` and adapters, rank 0 the meta; atomically (see
    `atomic.atomic_iteration_dir`: a crash at any point leaves the previous checkpoint loadable)."""
    base, adapter = split_state_dict(model)
    with atomic_iteration_dir(save_dir, iteration) as tmp:
        if groups.dp_rank == 0:
            model_file = tmp / rank_dir_name(groups.tp_rank, groups.pp_rank, groups.pp_size) / CHECKPOINT_FILE
            save_rank_file(model_file, base, iteration=iteration, tp_size=groups.tp_size, tp_rank=groups.tp_rank,
                           pp_size=groups.pp_size, pp_rank=groups.pp_rank, fmt=TRAINING_FORMAT)
        path = rank_file(tmp, groups)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"adapter": adapter, **rank_state}, path)
        if world_rank() == 0:
            write_meta(tmp, meta)
            copy_base_files(Path(save_dir), base_dir)
    return Path(save_dir).absolute() / iteration_dir_name(iteration)


def save(state: TrainerState, save_dir) -> Path:
    """Collective: `state` as a legacy training checkpoint of iteration `state.iteration`."""
    rank_state = {"optimizer": state.optimizer.state_dict(), "data": [d.state_dict() for d in state.data],
                  "rng": rng_state(), "iteration": state.iteration}
    return save_checkpoint(save_dir, state.iteration, state.model, rank_state, state.meta, state.groups,
                           base_dir=state.base_dir)


def check_compatible(meta: dict, expected: dict, load_dir) -> None:
    """Refuse to resume with another parallel layout or method (each rank's factors and
    moments belong to one (DP, TP) position)."""
    flags = {"peft": "--peft", "dp_size": "data-parallel size (world size / TP)",
             "tp_size": "--tensor-model-parallel-size", "pp_size": "--pipeline-model-parallel-size",
             "virtual_ranks": "--hd-pissa-virtual-ranks", "rank": rank_flag(expected)}
    check_trainable(meta, expected, load_dir)
    defaults = {"pp_size": 1}  # checkpoints written before pipeline parallelism
    for key, flag in flags.items():
        if meta.get(key, defaults.get(key)) != expected.get(key, defaults.get(key)):
            raise ValueError(
                f"cannot resume from {load_dir}: it was saved with {flag} = {meta.get(key)}, this run "
                f"has {expected.get(key)}. Resharding factors and optimizer moments is not supported; "
                "restart from the base checkpoint or use the same layout"
            )


def load_rank_state(load_dir, groups: ParallelGroups) -> dict:
    """This rank's state file of the tracked iteration."""
    path = rank_file(Path(load_dir) / iteration_dir_name(read_tracker(load_dir)), groups)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint does not cover DP rank "
                                f"{groups.dp_rank}, TP rank {groups.tp_rank}, PP rank {groups.pp_rank}")
    return load_checked(path)


def load_adapter_params(model: nn.Module, adapter_state: dict, path_hint: str) -> None:
    own = {k for k in model.state_dict() if is_adapter_key(k)}
    missing, unexpected = own - set(adapter_state), set(adapter_state) - own
    if missing or unexpected:
        raise ValueError(f"{path_hint}: adapter parameters do not fit the model "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.load_state_dict(adapter_state, strict=False)


def load(state: TrainerState, load_dir) -> Restored:
    """Restore adapters, optimizer, data positions and RNG into an already set-up `state` (the
    model's base weights were loaded with the model) at the layout it was saved at."""
    saved = load_rank_state(load_dir, state.groups)
    load_adapter_params(state.model, saved["adapter"], str(load_dir))
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.is_hd_pissa:
        state.optimizer.refresh_gathered_factors()
    for iterator, data_state in zip(state.data, saved["data"]):
        iterator.load_state_dict(data_state)
    set_rng_state(saved["rng"])
    return Restored(int(saved["iteration"]), "RNG states restored")
