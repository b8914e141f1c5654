"""The launcher's self-test: initialise distributed and megatron-core groups, all-reduce over world / TP / DP, report."""
from __future__ import annotations

import json
import os
import socket

def selftest(out_path: str | None = None, tensor_model_parallel_size: int = 1, backend: str | None = None
             ) -> dict:
    """Initialise distributed + megatron-core groups from the environment, all-reduce (rank + 1) over
    the world, the TP group and the DP group, and gather every rank's view. Rank 0 writes the JSON."""
    import torch
    import torch.distributed as dist

    from megatron_hdpissa.distributed.collectives import all_gather_object, all_reduce_, collective_device
    from megatron_hdpissa.distributed.groups import initialize, shutdown

    groups = initialize(tensor_model_parallel_size=tensor_model_parallel_size, backend=backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    def summed(group) -> int:
        t = torch.tensor([rank + 1], dtype=torch.int64, device=collective_device(group))
        return int(all_reduce_(t, group).item())

    record = {
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "world_size": world_size,
        "tp_rank": groups.tp_rank, "tp_size": groups.tp_size,
        "dp_rank": groups.dp_rank, "dp_size": groups.dp_size,
        "world_sum": summed(None),
        "tp_sum": summed(groups.tp_group),
        "dp_sum": summed(groups.dp_group),
    }
    print(f"selftest rank {rank}/{world_size} on {socket.gethostname()} (master "
          f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): {json.dumps(record)}", flush=True)
    records = all_gather_object(record)
    expected = world_size * (world_size + 1) // 2
    result = {
        "world_size": world_size,
        "tensor_model_parallel_size": tensor_model_parallel_size,
        "expected_world_sum": expected,
        "ranks": records,
        "ok": sorted(r["rank"] for r in records) == list(range(world_size))
        and all(r["world_sum"] == expected for r in records),
    }
    if rank == 0 and out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tmp = f"{out_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
        os.replace(tmp, out_path)
    shutdown()
    return result
