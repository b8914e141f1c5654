"""megatron_hdpissa: high-rank distributed PiSSA adapters and optimizer for megatron-core."""
from .adapter import HDPiSSAAdapter
from .apply import active_slice, apply_hd_pissa, iter_adapters
from .config import HDPiSSAConfig
from .distributed import ParallelGroups
from .optimizer import HDPiSSAOptimizer

__all__ = [
    "HDPiSSAAdapter",
    "HDPiSSAConfig",
    "HDPiSSAOptimizer",
    "ParallelGroups",
    "active_slice",
    "apply_hd_pissa",
    "iter_adapters",
]
__version__ = "0.1.0"
