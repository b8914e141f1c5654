"""The benchmark scripts' shared code (benchmarks/common/ and the report modules): every script's
--help from any directory, the step report's pooling, ratios and table, the machine line, the
phase timer, the byte estimates and the trainer benchmark's data-side records. Fast: no
benchmark is run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from benchmarks.common.machine import machine_info
from benchmarks.common.markdown import describe_machine, fmt
from benchmarks.common.timing import AGGREGATION_PHASES, PhaseTimer
from benchmarks.dist_bytes import payload_bytes, ring_bytes_sent

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("bench_step", "bench_dist", "bench_trainer", "bench_decompose", "bench_memory", "bench_checkpoint",
           "study", "bench_e2e", "profile_step")
# flags benchmarks/gpu_check.sh passes after finding them in a script's --help
GPU_CHECK_FLAGS = {"bench_step": ("--svd", "--timeout", "--methods", "--device", "--llama7b", "--json-out"),
                   "bench_dist": ("--svd", "--timeout", "--methods", "--nproc", "--dtype", "--markdown-out"),
                   "bench_decompose": ("--smollm2-layer", "--device", "--llama7b", "--json-out")}

_HELP_DRIVER = r"""
import contextlib, io, json, runpy, sys
base = list(sys.path)
out = {}
for script in sys.argv[1:]:
    sys.path[:] = base  # each script must find the repository on its own
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[name]
    sys.argv = [script, "--help"]
    buf, code = io.StringIO(), "no exit"
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code
    out[script] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def test_every_script_help_runs_from_any_directory(tmp_path):
    """`python benchmarks/<script>.py --help` from outside the repository: one interpreter for all
    (imports shared), the benchmarks package forgotten before each script."""
    paths = [str(ROOT / "benchmarks" / f"{s}.py") for s in SCRIPTS]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _HELP_DRIVER, *paths], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for script, path in zip(SCRIPTS, paths):
        code, text = out[path]
        assert code in (0, None) and text.startswith("usage: "), (script, code, text[:300])
        for flag in GPU_CHECK_FLAGS.get(script, ()):
            assert f"{flag} " in text or f"{flag}\n" in text, (script, flag)


# ---- the machine record and its markdown line ----------------------------------------------------
def test_machine_info_and_its_line():
    import torch

    info = machine_info(3, "cpu", "bf16")
    assert (info["logical_cores"], info["torch_threads"], info["torch"]) == (os.cpu_count(), 3, torch.__version__)
    assert (info["device"], info["dtype"]) == ("cpu", "bf16") and "gpu" not in info
    line = describe_machine({**info, "cpu": "CPU X", "logical_cores": 8, "cores_available": 4, "load_avg_1m": 1.25,
                             "torch": "T", "megatron_core": "M", "python": "P", "gpu": "G"}, " per process")
    assert line == ("CPU X, 8 logical cores (4 available, 1-min load 1.2 at start), torch threads 3 per process, "
                    "torch T, megatron-core M, Python P, device cpu (G)")
    assert (fmt(None), fmt(2.25, ".1f"), fmt(1234.6)) == ("-", "2.2", "1235")


# ---- bench_step's report -------------------------------------------------------------------------
def _raw(method, steps, fwd, agg=None, slices=1):
    """A worker result with the given (wall, cpu) seconds per timed step."""
    opt = [(s[0] - f[0], s[1] - f[1]) for s, f in zip(steps, fwd)]
    return {"method": method, "slices": slices, "trainable_params": 10, "setup_s": 0.5, "final_loss": 1.0,
            "series": {"step": steps, "fwd_bwd": fwd, "opt": opt, "agg": agg or [], "merge": []},
            "mem_delta_mb": 5.0, "mem_peak_mb": 9.0, "mem_setup_peak_mb": 7.0, "wall_s": 2.0, "profile": None}


def _step_args(**kw):
    base = dict(micro_batch=2, seq=8, grad_accum=4, basis="cpu", device="cpu", method_list=["hd-pissa", "lora"],
                layers=1, hidden=8, heads=2, groups=1, head_dim=4, ffn=16, mixer="gate", rank=2, alpha=2.0,
                virtual_ranks=4, loss="mse", warmup=1, iters=3, rounds=2)
    return types.SimpleNamespace(**{**base, **kw})


def test_step_report_pools_rounds_and_renders_the_ratios():
    from benchmarks.step_report import dp_projection, reduce_runs, render_markdown, summarise

    hd_rounds = [_raw("hd-pissa", [(0.010, 0.008), (0.030, 0.024)], [(0.006, 0.005), (0.020, 0.016)],
                      agg=[(0.001, 0.001), (0.003, 0.002)], slices=4),
                 _raw("hd-pissa", [(0.014, 0.010)], [(0.008, 0.006)], agg=[(0.002, 0.0015)], slices=4)]
    lora_rounds = [_raw("lora", [(0.040, 0.032), (0.050, 0.040)], [(0.030, 0.025), (0.036, 0.030)])]
    results = {"hd-pissa": reduce_runs(hd_rounds), "lora": reduce_runs(lora_rounds)}
    hd_cpu = results["hd-pissa"]["ms"]["cpu"]
    # medians of the pooled steps (both rounds), in ms: CPU 8, 24, 10; wall 10, 30, 14
    assert hd_cpu["step"] == pytest.approx(10.0) and results["hd-pissa"]["ms"]["wall"]["step"] == pytest.approx(14.0)
    assert hd_cpu["agg"] == pytest.approx(1.5) and results["hd-pissa"]["min_ms"]["wall"] == pytest.approx(10.0)
    assert hd_cpu["adam"] == pytest.approx(hd_cpu["opt"] - 1.5)
    assert results["lora"]["ms"]["cpu"]["agg"] is None and results["lora"]["ms"]["wall"]["step"] == pytest.approx(45)
    args = _step_args()
    rows = summarise(results, args)
    hd = rows[0]
    assert hd["vs_lora"] == pytest.approx(10.0 / 36.0) and hd["vs_lora_other"] == pytest.approx(14.0 / 45.0)
    assert hd["tokens_per_s"] == pytest.approx(64 / 0.010) and hd["agg_share"] == pytest.approx(1.5 / 10.0)
    proj = dp_projection(results, args)  # per rank: fwd+bwd / K + Adam / K + the whole aggregation
    fwd, opt = hd_cpu["fwd_bwd"], hd_cpu["opt"]
    assert proj["K"] == 4 and proj["hd_pissa_ms"] == pytest.approx(fwd / 4 + (opt - 1.5) / 4 + 1.5)
    info = {"cpu": "C", "logical_cores": 2, "cores_available": 2, "load_avg_1m": 0.5, "torch_threads": 1,
            "torch": "T", "megatron_core": "M", "python": "P", "device": "cpu", "dtype": "fp32"}
    md = render_markdown(rows, info, args, "cmd", proj)
    assert md.startswith("Command: `cmd`\n\nMachine: " + describe_machine(info) + ", dtype fp32\n")
    row = next(line for line in md.splitlines() if line.startswith("| hd-pissa |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "14 (10)" and cells[2] == "10"
    assert cells[5] == "1.5" and cells[6] == f"{10.0 / 36.0:.2f}" and cells[-1] == "10"
    assert "Tokens per optimizer step: 2 x 8 x 4 = 64;" in md
    assert "aggregation 1.5 ms = 15.00% of the step" in md


# ---- the phase timer (the optimizers' phase_hook) ------------------------------------------------
def test_phase_timer_accumulates_per_phase_and_restarts(monkeypatch):
    from benchmarks.common import timing

    clock = [0.0]  # wall seconds; the CPU clock runs at half speed
    monkeypatch.setattr(timing, "now", lambda: (clock[0], clock[0] / 2))
    synced = []
    timer = PhaseTimer(lambda: synced.append(clock[0]))
    opt = types.SimpleNamespace(phase_hook=None)
    assert timer.attach(opt) and opt.phase_hook is timer and timer.attached
    assert not PhaseTimer(lambda: None).attach(object())  # no hook offered: nothing timed
    for name, seconds in (("adam", 2.0), ("aggregate", 3.0), ("param_gather", 1.0), ("aggregate", 3.0)):
        clock[0] += 100.0  # time outside any phase is not counted
        with opt.phase_hook(name):
            clock[0] += seconds
    assert synced == [100.0, 102.0, 202.0, 205.0, 305.0, 306.0, 406.0, 409.0]  # before and after every phase
    assert timer.take(*AGGREGATION_PHASES) == (7.0, 3.5)
    assert timer.take("adam") == (0.0, 0.0)  # take restarts every phase
    with pytest.raises(ValueError):
        with timer("clip"):
            clock[0] += 0.5
            raise ValueError("inside the phase")
    assert timer.take("clip") == (0.5, 0.25)  # a phase that raised still counts


# ---- bench_dist's byte estimates -----------------------------------------------------------------
def test_ring_and_payload_bytes():
    counted = {"deltas": 100, "dense": 40, "params": 8, "grads": 12}
    collectives = {"deltas": "all_gather", "dense": "reduce_scatter", "params": "all_gather", "grads": "all_reduce"}
    # ring: (dp-1) x input per all-gather, (dp-1)/dp x buffer per reduce-scatter, 2 (dp-1)/dp x per all-reduce
    assert ring_bytes_sent(counted, collectives, 4) == pytest.approx(3 * 100 + 0.75 * 40 + 3 * 8 + 1.5 * 12)
    assert payload_bytes(counted, collectives, 4) == 4 * 100 + 40 + 4 * 8 + 12
    assert ring_bytes_sent(counted, collectives, 1) == 0


# ---- bench_trainer's data-side records -----------------------------------------------------------
def test_timed_batches_records_shape_real_positions_and_supervised_tokens():
    import torch

    from benchmarks.bench_trainer import TimedBatches

    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]])  # real positions end after 3 and 5
    batch = {"tokens": torch.zeros(2, 5, dtype=torch.long), "loss_mask": mask.float()}
    records = []

    class Inner:
        shard_index = 3

        def __init__(self):
            self.left = 2

        def __next__(self):
            if not self.left:
                raise StopIteration
            self.left -= 1
            return batch

        def state_dict(self):
            return {"consumed": 2 - self.left}

    it = TimedBatches(Inner(), records)
    assert list(it) == [batch, batch] and it.state_dict() == {"consumed": 2}
    assert [r[2:] for r in records] == [[3, [2, 5], 3 + 5, 5]] * 2
    assert records[0][0] <= records[1][0]
