"""On a GPU only (skipped elsewhere; run by benchmarks/gpu_check.sh's `tests` stage): under NCCL the
collectives layer takes CPU tensors (moved to the current CUDA device and copied back) and CUDA
tensors as they are, and a raw NCCL all-reduce of a CPU tensor fails, which is why the layer exists
(docs/DESIGN.md §10)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _nccl_collectives():
    import torch.distributed as dist

    from megatron_hdpissa.distributed import collectives as c
    from megatron_hdpissa.distributed.groups import ParallelGroups

    g = ParallelGroups.from_megatron()
    out = {"backend": str(dist.get_backend()), "device": str(c.collective_device()),
           "served": sorted(c.served_devices() or [])}
    cpu = torch.tensor([1.5, -2.0], dtype=torch.float64)
    out["cpu_all_reduce"] = c.all_reduce_(cpu, op=c.MAX).tolist() + [str(cpu.device)]
    gpu = torch.arange(4.0, device="cuda")
    out["gpu_broadcast"] = c.broadcast_(gpu, 0).cpu().tolist() + [str(gpu.device)]
    gathered = torch.zeros(6)  # CPU: the gather runs synchronously on CUDA and is copied back
    handle = c.all_gather_flat_(gathered, torch.arange(6.0))
    out["gather"] = (gathered.tolist(), handle is None)
    mine = torch.zeros(3)
    c.reduce_scatter_flat_(mine, torch.arange(3.0))
    out["reduce_scatter"] = mine.tolist()
    out["any_rank"] = c.any_rank(True, g, 7)
    out["objects"] = c.all_gather_object({"r": dist.get_rank()})
    try:
        dist.all_reduce(torch.ones(1))  # a CPU tensor straight to NCCL
        out["raw_cpu"] = "accepted"
    except Exception as e:  # noqa: BLE001 - the kind of error is what is recorded
        out["raw_cpu"] = type(e).__name__
    return out


def test_nccl_collectives_place_cpu_tensors():
    (r,) = run_distributed(_nccl_collectives, world_size=1, backend="nccl")
    assert r["backend"] == "nccl" and r["device"] == "cuda:0" and r["served"] == ["cuda"], r
    assert r["cpu_all_reduce"] == [1.5, -2.0, "cpu"]
    assert r["gpu_broadcast"] == [0.0, 1.0, 2.0, 3.0, "cuda:0"]
    assert r["gather"] == ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], True) and r["reduce_scatter"] == [0.0, 1.0, 2.0]
    assert r["any_rank"] == 7 and r["objects"] == [{"r": 0}]
    # informative: torch's NCCL backend refuses CPU tensors (the reason for the layer); not asserted,
    # so a torch that accepts them does not fail the check
    print("raw NCCL all_reduce of a CPU tensor:", r["raw_cpu"])
