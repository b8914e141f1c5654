"""The machine record every benchmark prints and stores: CPU, cores, load, versions, device."""
from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def megatron_core_version() -> str:
    try:
        import megatron.core as mcore

        return getattr(mcore, "__version__", "?")
    except Exception:  # noqa: BLE001
        return "not importable"


def machine_info(threads: int, device: str, dtype: str) -> dict:
    """CPU, cores (all and available to this process), 1-minute load, torch threads, versions,
    device (with the GPU's name on CUDA) and dtype."""
    import torch

    info = {
        "cpu": cpu_name(),
        "logical_cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": threads,
        "torch": torch.__version__,
        "megatron_core": megatron_core_version(),
        "python": platform.python_version(),
        "device": device,
        "dtype": dtype,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def worker_env(threads: int) -> dict:
    """The environment of a worker process: this one's, with the thread count set for OpenMP/MKL/BLAS."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env
