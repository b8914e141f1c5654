"""What a checkpoint read or write may not hide: non-finite or unreadable tensors, the OS cause of a failed save.

Loads check every tensor they read (`check_finite`, one pass of `torch.isfinite` over what was
read anyway) and turn a failed read into one line naming the file (`read_failure`). Saves turn
whatever the writers raised (torch's zip writer says `unexpected pos 704 vs 598` on a full disk;
torch.distributed.checkpoint wraps every rank's error in a `CheckpointException`) into the OS
cause (`os_cause`), and every rank agrees on one message (`agree`) so that all raise together.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch


class CheckpointIOError(OSError):
    """A checkpoint could not be written: the message names the folder and the OS cause."""


class CheckpointReadError(ValueError):
    """A checkpoint's file is unreadable or holds non-finite tensors: the message names the file (and key)."""


# ---- reading ------------------------------------------------------------------------------------
def nonfinite_key(tensors: Iterable[tuple[str, object]]) -> Optional[tuple[str, int, int]]:
    """(key, non-finite count, numel) of the first floating-point tensor with a NaN or Inf, else None."""
    for key, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return key, bad, t.numel()
    return None


def flat_tensors(state, prefix: str = "") -> Iterable[tuple[str, object]]:
    """(dotted key, value) of every leaf of nested dicts / lists."""
    if isinstance(state, Mapping):
        for k, v in state.items():
            yield from flat_tensors(v, f"{prefix}{k}.")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from flat_tensors(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], state


def check_finite(state, where, shard_of=None) -> None:
    """Raise `CheckpointReadError` naming `where` (the file, or `shard_of(key)` when given) and the
    key of the first non-finite tensor in `state` (nested dicts / lists of tensors)."""
    found = nonfinite_key(flat_tensors(state))
    if found is not None:
        key, bad, total = found
        raise CheckpointReadError(nonfinite_message(shard_of(key) if shard_of else where, key, bad, total))


def nonfinite_message(where, key: str, bad: int, total: int) -> str:
    return (f"{where}: tensor {key!r} holds {bad} non-finite values (NaN / Inf) of {total}: the checkpoint "
            "is corrupt or was written from diverged weights; refusing to load it")


def failure_chain(exc: BaseException):
    """`exc` and the errors behind it, outermost first: through torch.distributed.checkpoint's
    `CheckpointException` (the lowest failing rank's error) and `__cause__` / `__context__`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict) and failures:
            inner = failures[min(failures)]
            exc = inner[0] if isinstance(inner, tuple) else inner
        else:
            exc = exc.__cause__ or exc.__context__


def root_failure(exc: BaseException) -> BaseException:
    """The innermost error behind `exc` (the end of `failure_chain`)."""
    for exc in failure_chain(exc):
        pass
    return exc


def one_line(exc: BaseException) -> str:
    """The first sentence of the first line of `exc`'s message."""
    text = str(exc).strip().splitlines()
    return text[0].split(". ")[0].rstrip(".") if text else type(exc).__name__


def read_failure(path, exc: BaseException) -> CheckpointReadError:
    """One line for a failed read of `path`: the root error's first line."""
    root = root_failure(exc)
    if isinstance(root, CheckpointReadError):
        return root
    # megatron-core's torch_dist reader lists every key of the checkpoint after a missing one
    missing = re.match(r"""^["']?(\S+) from model not in state dict: \[(.*)\]""", str(root))
    if isinstance(root, KeyError) and missing:
        held = len(re.findall(r"'[^']*'", missing.group(2)))
        return CheckpointReadError(f"cannot read checkpoint {path}: this run asks for tensor {missing.group(1)!r}, "
                                   f"which it does not hold ({held} tensors held: another model, method or targets?)")
    what = "truncated or corrupt" if "zip archive" in str(root) or "unexpected EOF" in str(root) else "unreadable"
    return CheckpointReadError(f"cannot read checkpoint file {path} ({what}): {type(root).__name__}: {one_line(root)}")


# ---- writing ------------------------------------------------------------------------------------
def os_cause(exc: BaseException, folder) -> str:
    """The OS cause of a failed write into `folder`: the OSError behind `exc` if there is one;
    else (torch's zip writer reports a short write as `unexpected pos`) the filesystem's state."""
    for e in failure_chain(exc):
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno) + (f" ({e.filename})" if e.filename else "")
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
        if st.f_bavail * st.f_frsize < 1024 * 1024:
            return f"{os.strerror(errno.ENOSPC)} ({st.f_bavail * st.f_frsize} bytes free under {probe})"
    except OSError:
        pass
    if not os.access(probe, os.W_OK):
        return f"{os.strerror(errno.EACCES)} ({probe})"
    root = root_failure(exc)
    return f"{type(root).__name__}: {one_line(root)}"


def agree(message: Optional[str]) -> Optional[str]:
    """Collective over the default group: the lowest rank's non-None message (None if none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return message
    from megatron_hdpissa.distributed.collectives import all_gather_object

    everyone = all_gather_object(message)
    return next((m for m in everyone if m is not None), None)


# ---- sharding -----------------------------------------------------------------------------------
class CheckpointShardingError(ValueError):
    """The shards the ranks save or load do not fit together: the message names the tensor's key."""


def sharding_message(exc: BaseException) -> str:
    """One line for megatron-core's failed sharding check, naming the tensor's key."""
    text = str(exc)
    found = re.search(r"key='([^']*)'", text)
    what = f"tensor {found.group(1)!r}" if found else "a tensor"
    return (f"the checkpoint shards of {what} do not fit together across ranks (two ranks hold the same "
            f"shard as its main copy, a shard is missing, or the ranks disagree on its shape or dtype): "
            f"{type(exc).__name__}: {text[:400]}")


@contextlib.contextmanager
def agreed_sharding_check():
    """megatron-core checks that a save's or load's shards fit together (`validate_sharding_integrity`)
    on global rank 0 alone and raises there, which would leave every other rank waiting in the next
    collective. Inside this context rank 0's verdict is shared: every rank raises the same
    `CheckpointShardingError`, naming the key (collective, as the check itself)."""
    from megatron.core.dist_checkpointing import state_dict_utils, validation

    original = validation.validate_sharding_integrity

    def agreed(global_metadata, common_state_dict=None):
        message = None
        try:
            original(global_metadata, common_state_dict=common_state_dict)
        except Exception as e:  # noqa: BLE001 - CheckpointingException or AssertionError, on rank 0 only
            message = sharding_message(e)
        message = agree(message)
        if message is not None:
            raise CheckpointShardingError(message)

    validation.validate_sharding_integrity = state_dict_utils.validate_sharding_integrity = agreed
    try:
        yield
    finally:
        validation.validate_sharding_integrity = state_dict_utils.validate_sharding_integrity = original
