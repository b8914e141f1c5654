"""The trainer's entry point with one fault injected (`python -m tests.helpers.fault_inject ARGS`, under torchrun).

FAULT="<signal>:<where>:<rank>:<n>" makes global rank <rank> deliver <signal> on the <n>-th time it
reaches <where>:
    forward    inside a step, after the forward / backward of every micro-batch, before the optimizer step
    aggregate  inside the optimizer's "aggregate" phase (the deltas' collectives)
    save       inside a checkpoint save, after this rank wrote its torch_dist shard, before the rename
<signal>: "kill" (SIGKILL to this worker) or "term" (SIGTERM to torchrun, which forwards it to
every worker: pre-emption). The run's own code is unchanged; only these three calls are wrapped.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys


def _arm(fault: str) -> None:
    how, where, rank, n = fault.split(":")
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    seen = [0]

    def hit(name: str) -> None:
        if name != where:
            return
        seen[0] += 1
        if seen[0] == int(n):
            print(f"fault: {how} at {where} #{n} on rank {rank}", file=sys.stderr, flush=True)
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                os.kill(os.getppid(), signal.SIGTERM)

    from megatron_hdpissa.optimizer import hd_pissa
    from megatron_hdpissa.training import finetune
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    forward_backward, phase, write_data = finetune.forward_backward, hd_pissa.phase, FileSystemWriter.write_data

    def fb(*args, **kwargs):
        out = forward_backward(*args, **kwargs)
        hit("forward")
        return out

    @contextlib.contextmanager
    def ph(name, hook):
        with phase(name, hook):
            hit(name)
            yield

    def wd(self, *args, **kwargs):
        out = write_data(self, *args, **kwargs)
        out.wait()
        hit("save")
        return out

    finetune.forward_backward, hd_pissa.phase, FileSystemWriter.write_data = fb, ph, wd


if __name__ == "__main__":
    if os.environ.get("FAULT"):
        _arm(os.environ["FAULT"])
    from megatron_hdpissa.training.finetune import cli

    cli(sys.argv[1:])
