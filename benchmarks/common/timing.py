"""Clocks (wall and process CPU), device synchronisation, per-phase optimizer timing, a profile."""
from __future__ import annotations

import contextlib
import time


def now():
    """(wall, process CPU) clock readings; CPU time counts all threads of this process."""
    return time.perf_counter(), time.process_time()


def since(t0, t1=None):
    """(wall, CPU) seconds from reading t0 to t1 (default: now)."""
    t1 = t1 or now()
    return t1[0] - t0[0], t1[1] - t0[1]


def device_sync(cuda: bool):
    """A function that waits for the device (nothing to wait for on CPU)."""
    import torch

    def sync():
        if cuda:
            torch.cuda.synchronize()
    return sync


class PhaseTimer:
    """(wall, CPU) seconds per optimizer phase, accumulated through the optimizer's `phase_hook`
    (phases "clip", "adam", "aggregate", "param_gather"), the device synchronised around each."""

    def __init__(self, sync):
        self.sync = sync
        self.totals: dict[str, list[float]] = {}
        self.attached = False

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        t0 = now()
        try:
            yield
        finally:
            self.sync()
            wall, cpu = since(t0)
            acc = self.totals.setdefault(name, [0.0, 0.0])
            acc[0] += wall
            acc[1] += cpu

    def attach(self, optimizer) -> bool:
        """Time `optimizer`'s phases from now on; False (and nothing timed) if it offers no hook."""
        if not hasattr(optimizer, "phase_hook"):
            print(f"note: {type(optimizer).__name__} has no phase_hook; its phases are not timed")
            return False
        optimizer.phase_hook = self
        self.attached = True
        return True

    def take(self, *names: str) -> tuple[float, float]:
        """(wall, CPU) seconds spent in `names` since the last take; every phase restarts from 0."""
        wall = sum(self.totals.get(n, (0.0, 0.0))[0] for n in names)
        cpu = sum(self.totals.get(n, (0.0, 0.0))[1] for n in names)
        self.totals = {}
        return wall, cpu


AGGREGATION_PHASES = ("aggregate", "param_gather")  # the merge into W, with its communication


def run_profile(one_step, cuda: bool, rows: int = 25) -> str:
    """torch.profiler's table of one call of one_step, sorted by self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        one_step()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48)
