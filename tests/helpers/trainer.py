"""Run the trainer's `main` in-process (inside a spawned rank) and collect its error messages."""
from __future__ import annotations

import torch


def finetune_main(argv):
    """`megatron_hdpissa.training.finetune.main(argv)` on one intra-op thread (ranks share the cores)."""
    from megatron_hdpissa.training import finetune

    torch.set_num_threads(1)
    return finetune.main(argv)


def expect_error(argv) -> str:
    """The trainer's failure on `argv` as "ExceptionType: message", or "no error"."""
    try:
        finetune_main(argv)
    except Exception as e:  # noqa: BLE001 - the message is what is tested
        return f"{type(e).__name__}: {e}"
    return "no error"


def expect_errors(cases) -> list[str]:
    """`expect_error` of each argv in `cases`, in one process."""
    return [expect_error(argv) for argv in cases]


def flags(args: dict) -> list[str]:
    """The trainer's argv from {flag: value}: None is a bare switch, False leaves the flag out."""
    out = []
    for k, v in args.items():
        if v is not False:
            out += [k] + ([] if v is None else [str(v)])
    return out


def saved_tensors(folder) -> dict:
    """Every global tensor of the latest training checkpoint in `folder` (either format's tracker)."""
    from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info
    from megatron_hdpissa.checkpoint.safe_load import read_global_tensors

    return read_global_tensors(read_checkpoint_info(folder).iter_dir)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32 (0 / 0 counts as 0)."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
