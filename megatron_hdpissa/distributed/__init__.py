"""Process groups, the collectives on them, and megatron-core DDP wiring."""
from megatron_hdpissa.distributed.groups import ParallelGroups, initialize, shutdown

__all__ = ["ParallelGroups", "initialize", "shutdown"]
