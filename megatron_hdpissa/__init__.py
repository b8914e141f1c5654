"""megatron_hdpissa: high-rank distributed PiSSA adapters and optimizer for megatron-core.

The public names are imported lazily so that light entry points (the launcher) start fast.
"""
from importlib import import_module

_EXPORTS = {
    "HDPiSSAAdapter": ".peft.hd_pissa.layer",
    "HDPiSSAConfig": ".peft.hd_pissa.config",
    "LowRankConfig": ".peft.lowrank.config",
    "HDPiSSAOptimizer": ".optimizer.hd_pissa",
    "ParallelGroups": ".distributed.groups",
    "active_slice": ".peft.hd_pissa.model",
    "apply_hd_pissa": ".peft.hd_pissa.model",
    "iter_adapters": ".peft.hd_pissa.model",
    "apply_lowrank": ".peft.lowrank.model",
    "merge_lowrank": ".peft.lowrank.model",
    "DataParallelAdamW": ".optimizer.data_parallel",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
