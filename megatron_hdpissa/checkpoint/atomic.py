"""A checkpoint folder's tracker and its atomic writes: folders built aside and renamed into place, the tracker last.

Megatron-LM's folder layout, shared by both formats (legacy `torch` and `torch_dist`):

    DIR/latest_checkpointed_iteration.txt   the tracked iteration ("release" or a number); written last
    DIR/iter_XXXXXXX/  or  DIR/release/     one iteration's files
    DIR/model_config.json, DIR/tokenizer/   the model's description and tokenizer (this project's)

A save writes the iteration into `DIR/iter_XXXXXXX.tmp/`, renames it into place once every rank
finished, then rewrites the tracker (temp file, fsync, `os.replace`): a crash at any point leaves
the previously tracked iteration complete and tracked. A converter's output folder is built the
same way next to its target (`atomic_output_dir`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch.distributed as dist

from megatron_hdpissa.distributed import collectives

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"  # Megatron-LM's tracker value for a released checkpoint: its folder is DIR/release
TOKENIZER_DIR = "tokenizer"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


# ---- the tracker ------------------------------------------------------------------------------
def iteration_dir_name(iteration: int | str) -> str:
    """`iter_0000100` for iteration 100, `release` for the release checkpoint."""
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def parse_tracker(text: str, where: object = TRACKER_FILE) -> int | str:
    """The tracker's value by Megatron-LM's rule: "release" (the release folder) or an iteration
    number >= 0; anything else is an error naming `where`."""
    text = text.strip()
    if text == RELEASE:
        return RELEASE
    try:
        iteration = int(text)
    except ValueError:
        iteration = -1
    if iteration < 0:
        raise ValueError(f"{where}: expected an iteration number or {RELEASE!r}, found {text!r}")
    return iteration


def read_tracker(ckpt_dir) -> Optional[int | str]:
    """The tracked iteration of a checkpoint folder ("release" or a number), None without a tracker."""
    tracker = Path(ckpt_dir) / TRACKER_FILE
    if not tracker.is_file():
        return None
    return parse_tracker(tracker.read_text(), tracker)


def write_tracker(ckpt_dir, iteration: int | str) -> None:
    """Point the tracker at `iteration` atomically (temp file, fsync, `os.replace`)."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir / f".{TRACKER_FILE}{TMP_SUFFIX}"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / TRACKER_FILE)
    fsync_dir(ckpt_dir)


def prune_iterations(ckpt_dir, retain: int, keep=None) -> list[str]:
    """Remove all but the newest `retain` finished `iter_XXXXXXX` folders of `ckpt_dir` (one
    process; call it after a save). Never removes the tracked iteration, nor `keep` (the folder
    a run resumed from). Returns the names removed, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if retain < 1:
        raise ValueError(f"retain must be >= 1, got {retain}")
    tracked = read_tracker(ckpt_dir)
    protected = {iteration_dir_name(tracked)} if tracked is not None else set()
    if keep is not None and Path(keep).absolute().parent == ckpt_dir.absolute():
        protected.add(Path(keep).name)
    names = sorted(p.name for p in ckpt_dir.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    removed = [n for n in names[:-retain] if n not in protected]
    for name in removed:
        shutil.rmtree(ckpt_dir / name)
    return removed


# ---- processes --------------------------------------------------------------------------------
def world_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    """A barrier over the default process group (nothing without one)."""
    collectives.barrier()


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames) to disk, where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_files(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def _swap_into_place(tmp: Path, final: Path, old: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved to `old` first and removed after."""
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


# ---- atomic writes ----------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_iteration_dir(save_dir, iteration: int | str) -> Iterator[Path]:
    """Collective: every rank of the default group enters it. Yields `save_dir/iter_X.tmp/` (made
    empty by rank 0: a crashed save's remains are cleared) for every rank to write its files into;
    on leaving, rank 0 fsyncs them, renames the folder to `iter_X/` (an existing one is replaced)
    and then writes the tracker. Code inside that runs on rank 0 only after all ranks wrote needs
    its own barrier. An error inside on any rank (collectives inside must fail on every rank
    together, as torch.distributed.checkpoint's do) or while renaming: every rank raises
    `CheckpointIOError` naming the folder and the OS cause, the `.tmp` folder is removed and
    the tracker still names the previous checkpoint."""
    save_dir = Path(save_dir).absolute()
    final = save_dir / iteration_dir_name(iteration)
    tmp = save_dir / (final.name + TMP_SUFFIX)
    failure = None
    if world_rank() == 0:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            failure = e
    _raise_agreed(failure, tmp, final)
    try:
        yield tmp
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - torch.distributed.checkpoint raises BaseException
        failure = e
    _raise_agreed(failure, tmp, final)
    if world_rank() == 0:
        try:
            _fsync_files(tmp)
            _swap_into_place(tmp, final, save_dir / (final.name + OLD_SUFFIX))
            fsync_dir(save_dir)
            write_tracker(save_dir, iteration)  # last: marks the checkpoint complete
        except OSError as e:
            failure = e
    _raise_agreed(failure, tmp, final)


def _raise_agreed(failure: Optional[BaseException], tmp: Path, final: Path) -> None:
    """Collective: when any rank failed, every rank raises one `CheckpointIOError` (the lowest
    failing rank's cause) after rank 0 removed `tmp`; else a barrier."""
    from megatron_hdpissa.checkpoint.verify import CheckpointIOError, agree, os_cause

    message = agree(None if failure is None else
                    f"cannot save checkpoint {final}: {os_cause(failure, tmp.parent)}; the partial {tmp.name} was "
                    f"removed and {TRACKER_FILE} still names the previous checkpoint")
    if message is None:
        return
    if world_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    raise CheckpointIOError(message) from failure


@contextlib.contextmanager
def atomic_output_dir(target, force: bool, sources: Sequence[Path] = ()) -> Iterator[Path]:
    """One process: yields a hidden temp folder next to `target`; on success it replaces
    `target` by rename (an existing `target` only with `force`). Refuses a `target` that is one
    of `sources` or holds one."""
    target = Path(target).absolute()
    for source in sources:
        source = Path(source).resolve()
        if source == target.resolve() or target.resolve() in source.parents:
            raise ValueError(f"output {target} would overwrite the input {source}")
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass --force to overwrite it")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_SUFFIX}-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the output from other users
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_SUFFIX}-", dir=target.parent)) / target.name
        _swap_into_place(tmp, target, old)
        shutil.rmtree(old.parent, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
