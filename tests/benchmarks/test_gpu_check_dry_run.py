"""benchmarks/gpu_check.sh cannot rot between lent GPUs: its dry run (DEVICE_DRY_RUN=1: CPU, gloo,
tiny shapes) runs the trainer stage exactly as the GPU run does (torchrun, one rank, the model
built and converted on the spot, bf16 with sharded-fp32 masters, HD-PiSSA with 4 virtual ranks and
LoRA, a torch_dist save, a resume), and the script's results carry its figures."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _gpu_check(out: Path, **env) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEVICE_DRY_RUN="1", OUT=str(out), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="",
               GPU_CHECK_BUDGET="200", **env)
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=400)


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


def test_dry_run_falls_back_from_unfit_wheels_and_the_megatron_lm_stage_says_why(tmp_path):
    """`make gpu-wheels` leaves the cp312 megatron-core wheel in .whl/; the dry run on an interpreter
    it does not fit uses the installed megatron-core instead of stopping. Where megatron.training
    imports but there is no CUDA, the megatron-lm stage is skipped with the places in megatron-core
    0.19.2 that need a GPU (no flag avoids them) rather than failing inside pretrain()."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "unfit-0.0.1-cp399-cp399-manylinux_2_28_x86_64.whl").write_bytes(b"not installable here")
    stub = tmp_path / "stub" / "megatron" / "training"  # an importable megatron.training (namespace `megatron`)
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    out = tmp_path / "out"
    proc = _gpu_check(out, STAGES="megatron-lm", GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_SITE=str(tmp_path / "site"),
                      PYTHONPATH=str(tmp_path / "stub"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wheels do not install for" in (out / "env.txt").read_text()
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["megatron-lm"]
    status = stages[0]["status"]
    assert status.startswith("skipped (no CUDA") and "initialize.py:66" in status, status


def _stub_wheel(folder: Path) -> Path:
    """A pure-Python wheel laid out like megatron-core's datasets folder: the prebuilt extension, no Makefile."""
    path = folder / "megatron_core_stub-0.0.1-py3-none-any.whl"
    files = {"megatron/core/datasets/helpers_cpp.cpython-312-x86_64-linux-gnu.so": "stands in for the extension",
             "megatron_core_stub-0.0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: megatron-core-stub\n"
                                                            "Version: 0.0.1\n",
             "megatron_core_stub-0.0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                         "Tag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + "megatron_core_stub-0.0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("megatron_core_stub-0.0.1.dist-info/RECORD", record)
    return path


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed (the script then uses a stand-in)")
def test_installed_wheel_gets_the_helpers_makefile_megatron_training_runs(tmp_path):
    """megatron.training's initialize_megatron runs `make -C <site>/megatron/core/datasets` and exits
    when it fails; the megatron-core 0.19.2 wheel ships the extension prebuilt but no Makefile there.
    After installing the wheels the script writes one whose target succeeds exactly when the prebuilt
    extension is present."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _stub_wheel(wheels)
    site, out = tmp_path / "site", tmp_path / "out"
    proc = _gpu_check(out, STAGES="megatron-lm", GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_SITE=str(site))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    datasets = site / "megatron" / "core" / "datasets"
    assert (datasets / "Makefile").is_file() and "wrote" in (out / "env.txt").read_text()
    make = ["make", "-C", str(datasets)]  # what megatron/core/datasets/utils.py compile_helpers runs
    assert subprocess.run(make, capture_output=True).returncode == 0
    (datasets / "helpers_cpp.cpython-312-x86_64-linux-gnu.so").unlink()
    assert subprocess.run(make, capture_output=True).returncode != 0
