"""Peak memory of a benchmark process: the CUDA allocator's view, or max RSS on CPU."""
from __future__ import annotations

import resource


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def mem_mb(cuda: bool, peak: bool = True) -> float:
    """MiB: the device allocator's peak (or current) allocation on CUDA; max RSS on CPU."""
    import torch

    if not cuda:
        return rss_mb()
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20


def memory_baseline(cuda: bool) -> float:
    """mem_mb now (current allocation on CUDA, whose peak statistics restart here)."""
    import torch

    base = mem_mb(cuda, peak=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return base
