"""Rank layouts from SLURM and torchrun variables: one task per GPU, torchrun per node, their disagreements, runtime defaults."""
from __future__ import annotations

import pytest

from megatron_hdpissa.launch.environ import LaunchError, job_port
from megatron_hdpissa.launch.layout import resolve_node, resolve_rank, runtime_defaults
from tests.helpers.launch_env import slurm_step, torchrun_vars


def test_one_task_per_gpu_from_slurm():
    # 2 nodes x 4 tasks; task 6 is the third task on the second node
    env = slurm_step(procid=6, ntasks=8, nodelist="gpu[07-08]", tasks_per_node="4(x2)", nodeid=1, localid=2)
    rank_env, warnings = resolve_rank(env)
    assert (rank_env.rank, rank_env.local_rank, rank_env.world_size, rank_env.local_world_size) == (6, 2, 8, 4)
    assert (rank_env.master_addr, rank_env.master_port) == ("gpu07", job_port(4242))
    assert rank_env.source == "slurm" and warnings == []
    assert rank_env.as_environ() == {"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                                     "MASTER_ADDR": "gpu07", "MASTER_PORT": str(job_port(4242))}


def test_uneven_tasks_per_node_and_user_master():
    env = slurm_step(procid=4, ntasks=5, nodelist="a[1-2]", tasks_per_node="3,2", nodeid=1, localid=1,
                     MASTER_ADDR="a1", MASTER_PORT=31000)
    rank_env, _ = resolve_rank(env)
    assert (rank_env.local_world_size, rank_env.master_addr, rank_env.master_port) == (2, "a1", 31000)


def test_ntasks_per_node_fallback():
    env = slurm_step(procid=1, ntasks=4, nodelist="n[1-2]", tasks_per_node="", SLURM_NTASKS_PER_NODE=2)
    assert resolve_rank(env)[0].local_world_size == 2


def test_batch_script_is_one_process_and_says_so():
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_TASKS_PER_NODE": "2(x2)"}
    rank_env, warnings = resolve_rank(env)
    assert (rank_env.rank, rank_env.world_size, rank_env.source) == (0, 1, "single")
    assert any("outside srun" in w and "SLURM_NTASKS=4" in w for w in warnings)


def test_no_launcher_at_all_is_a_single_process():
    rank_env, warnings = resolve_rank({})
    assert (rank_env.rank, rank_env.world_size, rank_env.master_port, warnings) == (0, 1, None, [])


def test_inconsistent_slurm_variables():
    with pytest.raises(LaunchError, match="SLURM_PROCID=5 of SLURM_NTASKS=4"):
        resolve_rank(slurm_step(procid=5, ntasks=4, nodelist="n1", tasks_per_node="4"))


def test_one_task_per_node_runs_torchrun_with_slurm_layout():
    env = slurm_step(procid=2, ntasks=4, nodelist="node[10-13]", tasks_per_node="1(x4)", nodeid=2, localid=0,
                     SLURM_GPUS_ON_NODE=8)
    plan, warnings = resolve_node(8, env)
    assert (plan.nnodes, plan.node_rank, plan.nproc_per_node) == (4, 2, 8)
    assert (plan.master_addr, plan.master_port) == ("node10", job_port(4242))
    assert warnings == []
    argv = plan.torchrun_argv(["-m", "x"])
    assert argv[1:3] == ["-m", "torch.distributed.run"] and argv[-2:] == ["-m", "x"]
    assert {"--nnodes=4", "--node-rank=2", "--nproc-per-node=8", "--master-addr=node10"} <= set(argv)


def test_one_task_per_node_warns_about_idle_gpus():
    env = slurm_step(procid=0, ntasks=1, nodelist="n1", tasks_per_node="1", SLURM_GPUS_ON_NODE=8)
    _, warnings = resolve_node(4, env)
    assert any("8 GPU(s)" in w and "--nproc-per-node is 4" in w for w in warnings)


def test_nproc_per_node_needs_one_task_per_node():
    env = slurm_step(procid=1, ntasks=2, nodelist="n1", tasks_per_node="2")
    with pytest.raises(LaunchError, match="--ntasks-per-node=1"):
        resolve_node(4, env)


def test_nproc_per_node_inside_torchrun_is_refused():
    with pytest.raises(LaunchError, match="already set"):
        resolve_node(2, torchrun_vars(0, 2, 0, 2))


def test_nproc_per_node_without_slurm_is_one_local_node():
    plan, _ = resolve_node(2, {"MASTER_PORT": "30123"})
    assert (plan.nnodes, plan.node_rank, plan.master_addr, plan.master_port) == (1, 0, "127.0.0.1", 30123)


# --- SLURM and torchrun together --------------------------------------------------------------

def test_torchrun_per_node_agrees_with_slurm_and_wins():
    # one task per node running torchrun: SLURM says 2 tasks, torchrun says world 8
    env = slurm_step(procid=1, ntasks=2, nodelist="node[01-02]", tasks_per_node="1(x2)", nodeid=1, localid=0)
    env.update(torchrun_vars(rank=6, world_size=8, local_rank=2, local_world_size=4, nnodes=2))
    rank_env, warnings = resolve_rank(env)
    assert (rank_env.rank, rank_env.local_rank, rank_env.world_size, rank_env.local_world_size) == (6, 2, 8, 4)
    assert (rank_env.master_addr, rank_env.master_port, rank_env.source) == ("node01", 29500, "torchrun")
    assert warnings == []


def test_torchrun_world_size_disagreeing_with_slurm_is_an_error():
    env = slurm_step(procid=1, ntasks=2, nodelist="node[01-02]", tasks_per_node="1(x2)", nodeid=1, localid=0)
    env.update(torchrun_vars(rank=6, world_size=16, local_rank=2, local_world_size=4, nnodes=4))
    with pytest.raises(LaunchError) as info:
        resolve_rank(env)
    message = str(info.value)
    assert "2 x 4 = 8" in message and "WORLD_SIZE=16" in message and "--nnodes=2" in message
    rank_env, warnings = resolve_rank(env, allow_mismatch=True)  # torchrun still wins
    assert rank_env.world_size == 16 and any("WORLD_SIZE=16" in w for w in warnings)


def test_master_addr_outside_the_node_list_is_reported():
    env = slurm_step(procid=0, ntasks=2, nodelist="node[01-02]", tasks_per_node="1(x2)", localid=0)
    env.update(torchrun_vars(rank=0, world_size=8, local_rank=0, local_world_size=4, master="elsewhere"))
    _, warnings = resolve_rank(env)
    assert any("MASTER_ADDR=elsewhere is not one of this job's nodes (node01,node02)" in w for w in warnings)
    env["MASTER_ADDR"] = "node01.cluster.local"  # a fully qualified name of a node is fine
    assert resolve_rank(env)[1] == []


def test_loopback_master_on_several_nodes_is_an_error():
    env = slurm_step(procid=0, ntasks=2, nodelist="node[01-02]", tasks_per_node="1(x2)", localid=0,
                     MASTER_ADDR="127.0.0.1")
    with pytest.raises(LaunchError, match="loopback"):
        resolve_rank(env)
    single = slurm_step(procid=0, ntasks=2, nodelist="node01", tasks_per_node="2", MASTER_ADDR="localhost")
    assert resolve_rank(single)[1] == []


def test_rank_exported_in_the_batch_script_is_caught():
    env = slurm_step(procid=3, ntasks=4, nodelist="n1", tasks_per_node="4", RANK=0, WORLD_SIZE=4)
    with pytest.raises(LaunchError, match="exported in the batch script"):
        resolve_rank(env)
    same = slurm_step(procid=3, ntasks=4, nodelist="n1", tasks_per_node="4", RANK=3, WORLD_SIZE=4)
    rank_env, warnings = resolve_rank(same)
    assert (rank_env.rank, rank_env.source, warnings) == (3, "environment", [])


def test_several_torchruns_on_one_node_warn():
    env = slurm_step(procid=1, ntasks=2, nodelist="n1", tasks_per_node="2")
    env.update(torchrun_vars(rank=5, world_size=8, local_rank=1, local_world_size=4, master="n1"))
    _, warnings = resolve_rank(env)
    assert any("same GPUs" in w for w in warnings)


# --- runtime settings --------------------------------------------------------------------------

def test_runtime_defaults_only_fill_gaps():
    defaults = runtime_defaults({}, cpus_per_task=16, procs_per_task=4, procs_on_node=4)
    assert defaults == {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_IB_TIMEOUT": "22",
                        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "OMP_NUM_THREADS": "4"}
    user = {"CUDA_DEVICE_MAX_CONNECTIONS": "8", "OMP_NUM_THREADS": "2", "NCCL_ASYNC_ERROR_HANDLING": "0"}
    assert runtime_defaults(user, None, 1, 1) == {"NCCL_IB_TIMEOUT": "22"}
    assert runtime_defaults({}, cpus_per_task=2, procs_per_task=8, procs_on_node=8)["OMP_NUM_THREADS"] == "1"
