"""megatron_hdpissa: high-rank distributed PiSSA adapters and optimizer for megatron-core.

The public names are imported lazily so that light entry points (the launcher) start fast.
"""
from importlib import import_module

_EXPORTS = {
    "HDPiSSAAdapter": ".adapter",
    "HDPiSSAConfig": ".config",
    "HDPiSSAOptimizer": ".optimizer",
    "ParallelGroups": ".distributed",
    "active_slice": ".apply",
    "apply_hd_pissa": ".apply",
    "iter_adapters": ".apply",
    "apply_lowrank": ".baselines",
    "merge_lowrank": ".baselines",
    "DataParallelAdamW": ".baselines",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
