"""The launcher's command line: dry runs, disagreements, misplaced options, and a real 2-process self-test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hdpissa.distributed.groups import free_port
from megatron_hdpissa.launch import launcher as launch
from tests.helpers.launch_env import slurm_step

REPO = Path(__file__).resolve().parents[2]


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
