"""Errors a person can read: a user error (a bad flag, data file or checkpoint: the messages we
write) prints once, from rank 0, as one line without a traceback, and every rank exits non-zero;
anything else keeps its traceback."""
from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Callable

# What our own checks raise for bad input (megatron_hdpissa.data.sft.DataError is a ValueError).
from megatron_hdpissa.checkpoint.verify import CheckpointIOError  # noqa: E402 - a save that failed: one line

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError, CheckpointIOError)
EXIT_USER_ERROR = 1
_KEY = "megatron_hdpissa/user_error/"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: fall back to printing from rank 0 only
        return None


def report_user_error(exc: BaseException, wait_s: float = 10.0) -> None:
    """Rank 0 prints `error: ...`. Another rank prints its message (tagged with its rank) only
    when rank 0 did not report the same one within `wait_s` (an error only that rank hit).
    Rank 0 waits as long for the others, so that every rank exits with the same status rather
    than torchrun terminating the slower ones."""
    import datetime

    msg = f"error: {exc}".replace("\n", " ")
    rank, store = _rank(), _store()
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(_KEY + str(rank), msg)
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)
        if store is not None:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            with contextlib.suppress(Exception):
                store.wait([_KEY + str(r) for r in range(1, world)], datetime.timedelta(seconds=wait_s))
        return
    if store is None:  # before the process group exists: the checks are the same on every rank
        return
    seen = None
    with contextlib.suppress(Exception):
        store.wait([_KEY + "0"], datetime.timedelta(seconds=wait_s))
        seen = store.get(_KEY + "0").decode()
    if seen != msg:
        print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


def run_cli(main: Callable, argv, shutdown: Callable[[], None], parse: Callable | None = None) -> None:
    """Run `main(argv)`; user errors become one line and exit status 1 on every rank."""
    if parse is not None and _rank() != 0:  # argparse's usage errors: printed by rank 0 only
        with contextlib.redirect_stderr(io.StringIO()):
            parse(argv)
    code = 0
    try:
        main(argv)
    except USER_ERRORS as e:
        report_user_error(e)
        code = EXIT_USER_ERROR
    finally:
        with contextlib.suppress(Exception) if code else contextlib.nullcontext():
            shutdown()
    if code:
        sys.exit(code)
