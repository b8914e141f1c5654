"""Faults injected at random points of a 2-process torchrun fine-tune (tests/helpers/fault_inject.py):
SIGKILL mid forward / backward, mid aggregation or mid save; SIGTERM (pre-emption); a save onto a
small filesystem that fills up. Each run is resumed and every saved tensor of the final
checkpoint (weights, factors, Adam moments, masters) must equal the uninterrupted run's, bit for
bit (CPU). The short variant (one fault) runs in CI; the slow one injects several per kind."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import tiny_trainer_material
from tests.helpers.trainer import finetune_main

REPO = Path(__file__).resolve().parents[2]
ITERS, INTERVAL = 6, 2
WHERE = ("forward", "aggregate", "save")


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm2_hf_dir, gsm8k_path):
    m = tiny_trainer_material(tmp_path_factory.mktemp("faults"), smollm2_hf_dir, gsm8k_path, seed=5,
                              intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    root = m["root"]
    run_distributed(finetune_main, 2, 1, args=(argv(m, root / "full"),))
    m["full"] = _final(root / "full")
    return m


def argv(m, save, **over) -> list[str]:
    args = {"--pretrained-checkpoint": m["base"], "--data-path": m["train"], "--micro-batch-size": 2,
            "--global-batch-size": 8, "--seq-length": 128, "--lr": 3e-3, "--lr-decay-style": "constant",
            "--hd-pissa-rank": 4, "--no-progress": None, "--seed": 11, "--train-iters": ITERS, "--save": save,
            "--hd-pissa-trainable-modules": "re:.*layernorm.*", **over}
    return [str(x) for k, v in args.items() for x in ((k,) if v is None else (k, v))]


def _final(save) -> dict:
    from megatron_hdpissa.checkpoint.safe_load import read_global_tensors

    return read_global_tensors(Path(save) / f"iter_{ITERS:07d}")


def _faulty_run(m, save, fault: str, **over) -> tuple[int, str]:
    from megatron_hdpissa.distributed.groups import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "tests.helpers.fault_inject", *argv(m, save, **{"--save-interval": INTERVAL, **over})]
    env = dict(os.environ, OMP_NUM_THREADS="1", FAULT=fault)
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stderr + p.stdout


def _resume_and_compare(m, load, save=None, retain: int = 0) -> float:
    """Resume from `load` (its tracked iteration, or the base without one) to the end; the max
    absolute difference of every final tensor from the uninterrupted run's (asserted 0). With
    `retain`, the resumed run passes --save-retain: only the newest `retain` and the one resumed
    from may remain."""
    from megatron_hdpissa.checkpoint.atomic import read_tracker

    save = save or load
    start = read_tracker(load) if Path(load).is_dir() else None
    run_distributed(finetune_main, 2, 1, args=(argv(m, save, **{"--load": load, "--save-interval": INTERVAL,
                                                                 "--save-retain": retain}),))
    if retain:
        newest = [f"iter_{i:07d}" for i in range(ITERS, 0, -INTERVAL)][:retain]
        kept = set(newest) | ({f"iter_{start:07d}"} if start is not None else set())
        assert sorted(p.name for p in Path(save).glob("iter_*")) == sorted(kept), (start, list(Path(save).iterdir()))
    final = _final(save)
    assert set(final) == set(m["full"]) and any(k.startswith("optimizer.") for k in final)
    diff = max(float((final[k].double() - m["full"][k].double()).abs().max()) for k in final)
    for k in final:
        assert torch.equal(final[k], m["full"][k]), k
    return diff


def _kill_and_resume(m, name: str, seed: int, retain: int = 0) -> dict:
    rng = random.Random(seed)
    where = rng.choice(WHERE)
    n = rng.randint(1, ITERS // INTERVAL - 1 if where == "save" else ITERS - 1)
    rank = rng.randint(0, 1)
    save = m["root"] / f"{name}_{seed}"
    t0 = time.time()
    code, err = _faulty_run(m, save, f"kill:{where}:{rank}:{n}")
    assert f"fault: kill at {where} #{n} on rank {rank}" in err, err[-3000:]
    assert code != 0, "the job was killed"
    from megatron_hdpissa.checkpoint.atomic import read_tracker

    tracked = read_tracker(save)
    assert not list(save.glob("*.tmp")) or where == "save"  # a killed save leaves its .tmp; the next save clears it
    diff = _resume_and_compare(m, save, retain=retain)
    return {"signal": "SIGKILL", "where": where, "n": n, "rank": rank, "resumed_from": tracked, "max_diff": diff,
            "seconds": round(time.time() - t0, 1)}


def _term_and_resume(m, seed: int) -> dict:
    rng = random.Random(seed)
    n, rank = rng.randint(1, ITERS - 2), rng.randint(0, 1)
    save = m["root"] / f"term_{seed}"
    code, err = _faulty_run(m, save, f"term:forward:{rank}:{n}")
    from megatron_hdpissa.checkpoint.atomic import read_tracker

    tracked = read_tracker(save)
    stops = [line for line in err.splitlines() if line.startswith("stop requested")]
    assert stops == [f"stop requested: saving at iteration {tracked} and exiting"], (tracked, code, err[-3000:])
    assert tracked >= n  # saved at the next step boundary
    diff = _resume_and_compare(m, save)
    return {"signal": "SIGTERM", "where": "forward", "n": n, "rank": rank, "resumed_from": tracked, "max_diff": diff}


def _full_disk_and_resume(m, tmp_path, saves_that_fit: int) -> dict:
    from megatron_hdpissa.checkpoint.atomic import read_tracker

    size = sum(f.stat().st_size for f in (m["root"] / "full" / f"iter_{ITERS:07d}").rglob("*") if f.is_file())
    mnt = tmp_path / "small"
    mnt.mkdir()
    fs_size = int(size * (saves_that_fit + 0.5)) + (1 << 20)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={fs_size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        code, err = _faulty_run(m, mnt / "run", "none:none:9:0")
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], err[-3000:]
        # no traceback from the trainer's code (torchrun prints its own ChildFailedError summary)
        assert not any('File "' in x and "megatron_hdpissa" in x for x in err.splitlines()), err[-3000:]
        assert not list((mnt / "run").glob("*.tmp")), list((mnt / "run").iterdir())
        tracked = read_tracker(mnt / "run")
        assert tracked == INTERVAL * saves_that_fit, (tracked, lines)
        diff = _resume_and_compare(m, mnt / "run", tmp_path / "resumed")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    return {"signal": "ENOSPC", "where": "save", "n": saves_that_fit + 1, "resumed_from": tracked,
            "max_diff": diff, "line": lines[0]}


def test_one_random_kill_resumes_exactly(run):
    """CI: one SIGKILL at a random point (the seed is the day, so CI visits every point over time)."""
    seed = int(os.environ.get("FAULT_SEED", time.strftime("%j")))
    print(_kill_and_resume(run, "ci", seed, retain=1))


@pytest.mark.slow
def test_many_faults_resume_exactly(run, tmp_path):
    """Several SIGKILLs at random points, SIGTERMs, and a save onto a filesystem that fills up."""
    report = [_kill_and_resume(run, "kill", seed) for seed in range(6)]
    report += [_term_and_resume(run, seed) for seed in range(2)]
    report.append(_full_disk_and_resume(run, tmp_path, saves_that_fit=1))
    for r in report:
        print(r)
    assert {r["where"] for r in report if r["signal"] == "SIGKILL"} == set(WHERE), report
    assert all(r["max_diff"] == 0 for r in report)
