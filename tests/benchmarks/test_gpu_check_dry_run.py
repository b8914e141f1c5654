"""benchmarks/gpu_check.sh cannot rot between lent GPUs: its dry run (DEVICE_DRY_RUN=1: CPU, gloo,
tiny shapes) runs the trainer stage exactly as the GPU run does (torchrun, one rank, the model
built and converted on the spot, bf16 with sharded-fp32 masters, HD-PiSSA with 4 virtual ranks and
LoRA, a torch_dist save, a resume), and the script's results carry its figures."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_trainer_stage(tmp_path, smollm2_hf_dir, gsm8k_path):
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE_DRY_RUN="1", STAGES="trainer", OUT=str(out), PYTHON=sys.executable,
               GPU_CHECK_MATERIAL=str(tmp_path / "material"), GPU_CHECK_BUDGET="200", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=400)
    log = (out / "trainer.log").read_text() if (out / "trainer.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["env.txt", "trainer.log", "tests.log", "step.log", "decompose.log", "dist.log", "results.json",
         "RESULTS_gpu.md"])  # at most 8 files come back from the box
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True
    assert [(s["stage"], s["status"]) for s in results["stages"]] == [("trainer", "ok")], log[-4000:]
    trainer = results["trainer"]
    assert trainer["ok"] and [m["method"] for m in trainer["methods"]] == ["hd-pissa", "lora"], trainer
    for m in trainer["methods"]:
        assert len(m["losses"]) == 4 and all(math.isfinite(x) for x in m["losses"])
        assert m["losses"][0] > m["losses"][-1]
        # the resume from the iteration-2 checkpoint repeats iterations 3 and 4 exactly on the CPU
        assert m["resumed_losses"] == m["losses"][2:] and m["resume_max_rel_diff"] == 0.0
        assert m["tokens_per_s"] > 0
    assert "K = 4 slices" in log and "(torch_dist; RNG states restored)" in log
    md = (out / "RESULTS_gpu.md").read_text()
    assert "DRY RUN" in md and "| hd-pissa |" in md and "| lora |" in md
