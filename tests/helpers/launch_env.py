"""SLURM-step and torchrun environments as the launcher tests feed them to the launcher."""
from __future__ import annotations


def slurm_step(procid, ntasks, nodelist, tasks_per_node, nodeid=0, localid=None, job_id=4242, **extra):
    env = {
        "SLURM_JOB_ID": str(job_id), "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid if localid is None else localid), "SLURM_NODEID": str(nodeid),
        "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist,
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun_vars(rank, world_size, local_rank, local_world_size, master="node01", port=29500, nnodes=None):
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
           "LOCAL_WORLD_SIZE": str(local_world_size), "MASTER_ADDR": master, "MASTER_PORT": str(port),
           "TORCHELASTIC_RUN_ID": "none"}
    if nnodes is not None:
        env["GROUP_WORLD_SIZE"] = str(nnodes)
    return env
