"""What the trainer shows and hears: rank-0 log lines, progress bar, JSON lines and TensorBoard;
SIGTERM / SIGINT turned into a checkpoint at the next step boundary."""
from __future__ import annotations

import json
import signal
import sys
import time

import torch
import torch.distributed as dist

from megatron_hdpissa.distributed.collectives import MAX, all_reduce_, collective_device


def real_tokens(batch: dict) -> int:
    """Real (non-pad) positions of a micro-batch: each row up to its last supervised position,
    since every example ends in a supervised label and padding only follows the row's last one."""
    mask = batch["loss_mask"] > 0
    ends = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(dim=1)
    return int(ends.sum())


class Throughput:
    """Real tokens between log lines: `add` each step's tokens; `take` at a log line returns
    (tokens, seconds) since the previous one and starts counting again."""

    def __init__(self):
        self.tokens, self.since = 0.0, time.time()

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def take(self) -> tuple[float, float]:
        now = time.time()
        out = (self.tokens, max(now - self.since, 1e-9))
        self.tokens, self.since = 0.0, now
        return out


class Logger:
    """Rank-0 console lines, a progress bar, optional JSON lines and TensorBoard."""

    def __init__(self, args, total: int, start: int):
        self.rank0 = (dist.get_rank() if dist.is_initialized() else 0) == 0
        self.bar = None
        if self.rank0 and not args.no_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.json = open(args.log_json, "a") if (self.rank0 and args.log_json) else None
        self.tb = None
        if self.rank0 and args.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(args.tensorboard_dir)
            except ImportError:
                self.print("tensorboard is not installed: pip install tensorboard (logging without it)")

    def print(self, msg: str):
        if self.rank0:
            (self.bar.write if self.bar else print)(msg, **({} if self.bar else {"flush": True}))

    def scalars(self, it: int, **values):
        if not self.rank0:
            return
        if self.json:
            self.json.write(json.dumps({"iteration": it, **values}) + "\n")
            self.json.flush()
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, it)

    def log_step(self, it: int, total: int, loss: float, lr: float, tokens_per_s: float, *,
                 grad_norm: float | None = None, comm_bytes: int | None = None, loss_scale: float | None = None,
                 skipped_steps: int | None = None, real_tokens: float | None = None) -> None:
        """One step's line and scalars: loss, lr, throughput (real tokens / s; `real_tokens`: how many
        since the last line, over all DP ranks), and what the optimizer reported (the gradient
        norm; HD-PiSSA's bytes sent this step; the --fp16 loss scale and skipped steps)."""
        extra, text = ({} if real_tokens is None else {"real_tokens": real_tokens}), ""
        if grad_norm is not None:
            extra["grad_norm"] = grad_norm
            text += f" | grad norm {grad_norm:.3f}"
        if comm_bytes is not None:
            extra["comm_bytes"] = comm_bytes
            text += f" | sent {comm_bytes / 2 ** 20:.2f} MiB"
        if loss_scale is not None:
            extra.update(loss_scale=loss_scale, skipped_steps=skipped_steps)
            text += f" | loss scale {loss_scale:.0f} | skipped {skipped_steps}"
        self.scalars(it, loss=loss, lr=lr, tokens_per_s=tokens_per_s, **extra)
        self.print(f"iteration {it:6d}/{total} | loss {loss:.4f} | lr {lr:.3e} | {tokens_per_s:,.0f} tokens/s" + text)

    def step(self, postfix: dict):
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        if self.bar:
            self.bar.close()
        if self.json:
            self.json.close()
        if self.tb:
            self.tb.close()


class StopSignal:
    """SIGTERM/SIGINT (SLURM pre-emption, Ctrl-C) ask for a checkpoint at the next step boundary;
    a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self) -> bool:
        flag = all_reduce_(torch.tensor([1.0 if self.requested else 0.0], device=collective_device()), op=MAX)
        return bool(flag.item() > 0)
