"""Launcher: SLURM hostlists, rank derivation from SLURM / torchrun, disagreements, real 2-process runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hdpissa.launch import launcher as launch
from megatron_hdpissa.distributed.groups import free_port
from megatron_hdpissa.launch.launcher import (
    LaunchError,
    expand_hostlist,
    expand_tasks_per_node,
    job_port,
    resolve_node,
    resolve_rank,
    runtime_defaults,
)

REPO = Path(__file__).resolve().parents[2]


# --- hostlists (expected lists written out by hand; checked against `scontrol show hostnames`) --

@pytest.mark.parametrize("spec, hosts", [
    ("node01", ["node01"]),
    ("host.example.com", ["host.example.com"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a-[1-2],b3", ["a-1", "a-2", "b3"]),
    ("gpu[1-2]-ib,cpu[003-005]", ["gpu1-ib", "gpu2-ib", "cpu003", "cpu004", "cpu005"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-100]", ["n098", "n099", "n100"]),
    ("n[08-9]", ["n08", "n09"]),
    ("n[1-010]", ["n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9", "n10"]),
    ("n[0]", ["n0"]),
    ("n[00-02]", ["n00", "n01", "n02"]),
    ("x[3,1,2]", ["x3", "x1", "x2"]),
    ("a,a", ["a", "a"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("n[1-2],m[5-6]z[1-2]", ["n1", "n2", "m5z1", "m5z2", "m6z1", "m6z2"]),
    ("dgx[1,3-4],login,gpu[9-10]-ib", ["dgx1", "dgx3", "dgx4", "login", "gpu9-ib", "gpu10-ib"]),
    (" node[1-2] ", ["node1", "node2"]),
])
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["", "n[1-2", "n1-2]", "n[]", "n[a-b]", "n[3-1]", "a,,b", "n[[1]]", "n[1-]"])
def test_expand_hostlist_rejects(spec):
    with pytest.raises(ValueError):
        expand_hostlist(spec)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(3)")


def test_job_port_is_deterministic_and_below_ephemeral_range():
    assert job_port(123456) == job_port(123456)
    assert job_port(1) != job_port(2)
    assert all(1024 < job_port(j) < 32768 for j in (0, 1, 11999, 12000, 10**9))


# --- deriving ranks ------------------------------------------------------------------------------

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


# --- runtime settings and the command line ----------------------------------------------------

def test_runtime_defaults_only_fill_gaps():
    defaults = runtime_defaults({}, cpus_per_task=16, procs_per_task=4, procs_on_node=4)
    assert defaults == {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_IB_TIMEOUT": "22",
                        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "OMP_NUM_THREADS": "4"}
    user = {"CUDA_DEVICE_MAX_CONNECTIONS": "8", "OMP_NUM_THREADS": "2", "NCCL_ASYNC_ERROR_HANDLING": "0"}
    assert runtime_defaults(user, None, 1, 1) == {"NCCL_IB_TIMEOUT": "22"}
    assert runtime_defaults({}, cpus_per_task=2, procs_per_task=8, procs_on_node=8)["OMP_NUM_THREADS"] == "1"


@pytest.fixture
def clean_environ(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TORCHELASTIC_")) or name in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "OMP_NUM_THREADS", "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_IB_TIMEOUT",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_main_dry_run_reports_the_exports(clean_environ, capsys):
    for key, value in slurm_step(procid=1, ntasks=2, nodelist="n[1-2]", tasks_per_node="1(x2)", nodeid=1,
                                 localid=0).items():
        clean_environ.setenv(key, value)
    assert launch.main(["--dry-run", "--", "-m", "megatron_hdpissa.finetune", "--x"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["export"]["RANK"] == "1" and out["export"]["MASTER_ADDR"] == "n1"
    assert out["command"] == [sys.executable, "-m", "megatron_hdpissa.finetune", "--x"]
    assert os.environ.get("RANK") is None  # a dry run exports nothing


def test_main_reports_disagreement_and_exits_2(clean_environ, capsys):
    for key, value in slurm_step(procid=3, ntasks=4, nodelist="n1", tasks_per_node="4", RANK=0,
                                 WORLD_SIZE=4).items():
        clean_environ.setenv(key, value)
    assert launch.main(["--", "train.py"]) == 2
    assert "unset RANK, WORLD_SIZE" in capsys.readouterr().err


def test_main_rejects_options_meant_for_the_script():
    with pytest.raises(SystemExit):
        launch.main(["--micro-batch-size", "2", "train.py"])


# --- real processes (gloo on CPU) --------------------------------------------------------------

def _child_environ(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", **{k: str(v) for k, v in extra.items()})
    return env


def _check_selftest(result: dict, world_size: int, tp: int) -> None:
    # independent expectation: sum over ranks of (rank + 1); megatron puts consecutive ranks in a TP group
    ranks = result["ranks"]
    assert result["ok"] and [r["rank"] for r in ranks] == list(range(world_size))
    assert all(r["world_sum"] == world_size * (world_size + 1) // 2 for r in ranks)
    for r in ranks:
        first = r["rank"] // tp * tp
        assert r["tp_sum"] == sum(range(first + 1, first + tp + 1))


def test_selftest_two_processes_through_the_launcher(tmp_path):
    """One SLURM task per node (`srun --ntasks-per-node=1`) on one node: the launcher reads SLURM,
    starts torchrun with 2 processes, each checks torchrun against SLURM and runs the selftest.
    (One task per GPU, i.e. the exec of a script, runs for real in tools/slurm_local_test.sh.)"""
    out = tmp_path / "result.json"
    port = free_port()
    env = _child_environ(**slurm_step(procid=0, ntasks=1, nodelist="localhost", tasks_per_node="1"),
                         MASTER_PORT=port)
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_hdpissa.launch", "--nproc-per-node", "2", "--selftest",
         "--tensor-model-parallel-size", "2", "--out", str(out), "--micro-batch-size", "4"],  # ignored
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_selftest(json.loads(out.read_text()), world_size=2, tp=2)
    assert "selftest rank 1/2 on" in proc.stdout and f"localhost:{port}" in proc.stdout
    assert "] warning:" not in proc.stderr  # the launcher found SLURM and torchrun in agreement
