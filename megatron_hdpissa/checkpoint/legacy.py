"""The legacy `iter_X/mp_rank_TT[_PPP]/model_optim_rng.pt` layout: names, `CheckpointInfo`, rank files."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_hdpissa.checkpoint.dist import COMMON_LAYOUT_KEY, DIST_METADATA_FILE, TORCH, TORCH_DIST, is_dist_checkpoint_dir
from megatron_hdpissa.checkpoint.atomic import TRACKER_FILE, iteration_dir_name, read_tracker
from megatron_hdpissa.checkpoint.safe_load import load_common_state
from megatron_hdpissa.models.config import TP_FLAG
from megatron_hdpissa.models.pipeline_stages import PP_FLAG

CHECKPOINT_FILE = "model_optim_rng.pt"
CHECKPOINT_FORMAT = "megatron_hdpissa.legacy.v1"


# ---- the legacy checkpoint layout -------------------------------------------------------------
def rank_dir_name(tp_rank: int, pp_rank: int = 0, pp_size: int = 1) -> str:
    """Megatron-LM's shard folder name: `mp_rank_TT`, or `mp_rank_TT_PPP` when pp_size > 1."""
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rank_checkpoint_path(ckpt_dir, iteration: int | str, tp_rank: int, pp_rank: int = 0,
                         pp_size: int = 1) -> Path:
    """`DIR/iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt` of TP rank `tp_rank`, pipeline
    stage `pp_rank` of `pp_size`."""
    return (Path(ckpt_dir) / iteration_dir_name(iteration) / rank_dir_name(tp_rank, pp_rank, pp_size)
            / CHECKPOINT_FILE)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint folder holds: its tracked iteration and, for the legacy format, its
    shard files, one per (TP rank, pipeline stage); `rank_files` lists them TP-rank-major (just
    the TP shards when pp_size is 1). For torch_dist, `tp_size` / `pp_size` are the layout it was
    saved at (1 when unrecorded) and `rank_files` is empty: it loads at any layout."""

    directory: Path
    iteration: int | str
    tp_size: int
    rank_files: tuple[Path, ...]
    pp_size: int = 1
    ckpt_format: str = TORCH   # "torch" (legacy mp_rank files) or "torch_dist" (any layout)

    @property
    def iter_dir(self) -> Path:
        return self.directory / iteration_dir_name(self.iteration)

    def rank_file(self, tp_rank: int, pp_rank: int = 0) -> Path:
        if self.ckpt_format != TORCH:
            raise ValueError(f"{self.directory} is a {self.ckpt_format} checkpoint: it has no per-rank files")
        if not (0 <= tp_rank < self.tp_size and 0 <= pp_rank < self.pp_size):
            raise ValueError(
                f"(tp_rank {tp_rank}, pp_rank {pp_rank}) is outside {self.directory}'s "
                f"{self.tp_size} TP x {self.pp_size} pipeline shards"
            )
        return self.rank_files[tp_rank * self.pp_size + pp_rank]


def read_checkpoint_info(ckpt_dir) -> CheckpointInfo:
    """Read the tracker, detect the format (torch_dist: the iteration folder holds megatron-core's
    metadata.json; torch: mp_rank_* folders) and list the legacy (TP, PP) shards; clear errors for
    whatever is missing."""
    directory = Path(ckpt_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"megatron checkpoint directory {directory} does not exist")
    iteration = read_tracker(directory)
    if iteration is None:
        raise FileNotFoundError(
            f"{directory / TRACKER_FILE} is missing: {directory} is not a Megatron checkpoint (or was not "
            "finished; the tracker file is written last)"
        )
    iter_dir = directory / iteration_dir_name(iteration)
    if not iter_dir.is_dir():
        raise FileNotFoundError(f"{directory / TRACKER_FILE} names iteration {iteration} but {iter_dir} does not exist")
    if is_dist_checkpoint_dir(iter_dir):
        layout = _saved_layout(iter_dir)
        return CheckpointInfo(directory, iteration, layout.get("tp", 1), (), layout.get("pp", 1),
                              ckpt_format=TORCH_DIST)
    rank_dirs = sorted(p.name for p in iter_dir.glob("mp_rank_*") if p.is_dir())
    if not rank_dirs:
        raise FileNotFoundError(f"{iter_dir} holds no mp_rank_XX shard folders (and no torch_dist "
                                f"{DIST_METADATA_FILE})")
    parsed = [re.fullmatch(r"mp_rank_(\d{2})(?:_(\d{3}))?", name) for name in rank_dirs]
    bad = [name for name, m in zip(rank_dirs, parsed) if m is None]
    if bad:
        raise ValueError(f"{iter_dir}: unexpected shard folder names {bad[:3]} (expected "
                         "mp_rank_TT, or mp_rank_TT_PPP with pipeline parallelism)")
    pipelined = {m.group(2) is not None for m in parsed}
    if len(pipelined) > 1:
        raise ValueError(f"{iter_dir} mixes mp_rank_TT and mp_rank_TT_PPP shard folders: {rank_dirs}")
    ranks = {(int(m.group(1)), int(m.group(2) or 0)) for m in parsed}
    tp_size = 1 + max(t for t, _ in ranks)
    pp_size = 1 + max(p for _, p in ranks)

    def name(t: int, p: int) -> str:  # as found: a lone stage may still be named mp_rank_TT_000
        return f"mp_rank_{t:02d}_{p:03d}" if pipelined == {True} else f"mp_rank_{t:02d}"

    missing = [name(t, p) for t in range(tp_size) for p in range(pp_size) if (t, p) not in ranks]
    if missing:
        raise FileNotFoundError(f"{iter_dir} lacks the shard folders {missing[:4]} (found {rank_dirs})")
    files = tuple(iter_dir / name(t, p) / CHECKPOINT_FILE for t in range(tp_size) for p in range(pp_size))
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing (found {len(rank_dirs)} shard folders: {', '.join(rank_dirs)})"
            )
    return CheckpointInfo(directory, iteration, tp_size, files, pp_size)


def _saved_layout(iter_dir: Path) -> dict:
    """The layout a torch_dist folder was saved at, as `checkpoint/dist.py` records it ({} when the
    common state does not say, e.g. another tool's checkpoint)."""
    try:
        common = load_common_state(iter_dir)
    except (FileNotFoundError, ValueError):
        return {}
    layout = common.get(COMMON_LAYOUT_KEY)
    return dict(layout) if isinstance(layout, dict) else {}


def load_checked(path: Path) -> dict:
    """A legacy file, every tensor read and checked finite (one line naming the file and key)."""
    from megatron_hdpissa.checkpoint.verify import check_finite, read_failure

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        check_finite(state, path)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise read_failure(path, e) from None
    return state


def stage_state_dict(info: CheckpointInfo, tp_rank: int, pp_rank: int) -> dict:
    """The model state dict of one legacy (TP rank, pipeline stage) file, checked against the folder."""
    path = info.rank_file(tp_rank, pp_rank)
    state = load_checked(path)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} has no 'model' state dict")
    saved_tp = state.get("tensor_model_parallel_size", info.tp_size)
    if saved_tp != info.tp_size:
        raise ValueError(f"{path} says {TP_FLAG} {saved_tp} but the folder holds {info.tp_size} TP shards")
    saved_pp = state.get("pipeline_model_parallel_size", info.pp_size)
    if saved_pp != info.pp_size:
        raise ValueError(f"{path} says {PP_FLAG} {saved_pp} but the folder holds {info.pp_size} "
                         "pipeline stages")
    return state["model"]


def save_rank_file(path: Path, shard: dict, *, iteration: int | str, tp_size: int, tp_rank: int,
                   pp_size: int, pp_rank: int, fmt: str = CHECKPOINT_FORMAT) -> None:
    """Write one (TP rank, pipeline stage) shard as a legacy rank file; its folder must be new."""
    path.parent.mkdir(parents=True)
    torch.save({
        "model": shard,
        "iteration": iteration,
        "checkpoint_version": 3.0,
        "tensor_model_parallel_size": tp_size,
        "tensor_model_parallel_rank": tp_rank,
        "pipeline_model_parallel_size": pp_size,
        "pipeline_model_parallel_rank": pp_rank,
        "format": fmt,
    }, path)

