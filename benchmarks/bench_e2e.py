"""End to end, same machine, data and batch: our trainer against HF PEFT + DDP, the published formulation and the floor.

    .venv/bin/python benchmarks/bench_e2e.py --out /tmp/e2e              # full SmolLM2, --seq-length 256
    .venv/bin/python benchmarks/bench_e2e.py --num-layers 2 --steps 1,2 --methods hd-pissa,hf-lora,floor --out /tmp/e2e-smoke
    .venv/bin/python benchmarks/bench_e2e.py --seq-length 2048 --pack --global-batch-size 4 --micro-batch-size 1 \
        --methods hd-pissa,hf-lora,floor --steps 1,2 --out /tmp/e2e-2k

Every method runs as `--nproc` real processes started by torchrun (gloo, `--threads` threads each,
fp32), on real GSM8K rows (the trainer's train split) and real SmolLM2-135M-Instruct (`data/material`):

    hd-pissa, lora, pissa   our trainer, `python -m megatron_hdpissa.finetune --peft <m>`
    hf-lora, hf-pissa       HF PEFT (LoRA; PiSSA init `pissa_niter_4`) on transformers (default SDPA
                            attention) under torch DDP, a plain loop (benchmarks/e2e_loop.py), AdamW
    published               the published formulation (benchmarks/common/published.py: dense `B A`
                            second linear, gradients x 1e16, manual Adam, four all-gathers, dense
                            merge) on our megatron-core model, the same plain loop
    floor                   our model frozen: forward + input-gradient backward, no trainable
                            parameters, no optimizer (the limit for every adapter method)

A method may name its data mode: `hd-pissa:padded` (--pad-to-max-length), `:variable` (each
micro-batch padded to its longest row, the default) or `:packed` (--pack, exact per-example
attention); `--pack` makes packed the default. Every loop builds the trainer's own dataset and
micro-batches (same seed, shards, padding), r = --rank on all seven projections everywhere.

Each method runs twice, `--steps A,B` steps; seconds per step = (wall(B) - wall(A)) / (B - A), so
process start, loading and decomposition cancel. Real tokens are the non-pad positions of the steps
after the first A (the trainer's log since issue 20; the loops count them the same way). Peak RSS:
the largest process of the run (`wait4`'s max RSS of the process tree: the busiest rank).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import e2e_report as report  # noqa: E402

DEFAULT_METHODS = "hd-pissa,hd-pissa:padded,hd-pissa:packed,lora,pissa,hf-lora,hf-pissa,published,floor"
MODE_FLAGS = {"variable": [], "padded": ["--pad-to-max-length"], "packed": ["--pack"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method[:data mode]; methods: "
                   + ", ".join(report.TRAINER_METHODS + report.LOOP_METHODS) + "; modes: " + ", ".join(report.DATA_MODES))
    p.add_argument("--steps", default="1,3", help="the two run lengths A,B (seconds per step from their difference)")
    p.add_argument("--num-layers", type=int, default=None, help="first N layers of SmolLM2 (default: all 30)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--pack", action="store_true", help="packed rows for every method without a data mode")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=8, help="sequences (rows) per optimizer step")
    p.add_argument("--rank", type=int, default=16, help="adapter rank r (HD-PiSSA per slice, LoRA, PiSSA, published)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--nproc", type=int, default=2, help="data-parallel ranks")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--basis", choices=("wall", "cpu", "in_run"), default="wall",
                   help="seconds per step the ratios use (all three printed): the wall difference of the two runs, "
                        "its CPU time per rank, or the median step timed inside the run")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is stopped")
    p.add_argument("--work-dir", default=None, help="converted base and data (default: <cache>/bench_trainer)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    try:
        args.step_counts = report.parse_steps(args.steps)
        args.method_list = [report.parse_method(m, args.pack) for m in args.methods.split(",") if m.strip()]
    except ValueError as e:
        p.error(str(e))
    if args.global_batch_size % (args.micro_batch_size * args.nproc):
        p.error("--global-batch-size must be a multiple of --micro-batch-size x --nproc")
    return args


def trainer_flags(args, base: Path, train: Path, mode: str, steps: int) -> list[str]:
    """The trainer's flags for one run (the loops read the same ones)."""
    return ["--pretrained-checkpoint", str(base), "--data-path", str(train), "--prompt-field", "question",
            "--response-field", "answer", "--prompt-template", "alpaca", "--seq-length", str(args.seq_length),
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
            "--train-iters", str(steps), "--lr", str(args.lr), "--lr-decay-style", "constant",
            "--hd-pissa-rank", str(args.rank), "--hd-pissa-svd", "randomized", "--log-interval", "1",
            "--no-progress", "--seed", "1234", *MODE_FLAGS[mode]]


def launch(cmd: list[str], env: dict, log_path: Path, timeout: float) -> dict:
    """Run `cmd` to the end: its wall seconds, CPU seconds and peak RSS (MiB) of its whole process
    tree (`os.wait4`: every rank torchrun waited for), or raise with the log's tail."""
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, proc.kill)  # only the process started here
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{shlex.join(cmd[:8])} ... failed (exit {code}):\n{tail}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024.0}


def run_method(args, name: str, mode: str, steps: int, base: Path, train: Path, hf_dir: Path, tmp: Path) -> dict:
    """One run of `steps` steps: {"steps", "wall_s", "cpu_s", "peak_rss_mib", "real_tokens", "losses"}."""
    from megatron_hdpissa.distributed.groups import free_port

    tag = f"{name}-{mode}-{steps}"
    flags = trainer_flags(args, base, train, mode, steps)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                "--master-port", str(free_port())]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp / f"{tag}.json"
    if name in report.TRAINER_METHODS:
        cmd = [*torchrun, "-m", "megatron_hdpissa.finetune", *flags, "--peft", name, "--log-json", str(out)]
    else:
        cmd = [*torchrun, str(REPO / "benchmarks" / "e2e_loop.py"), "--method", name, "--steps", str(steps),
               "--hf-dir", str(hf_dir), "--out", str(out), "--", *flags]
    res = {"steps": steps, "command": shlex.join(cmd), **launch(cmd, env, tmp / f"{tag}.log", args.timeout)}
    if name in report.TRAINER_METHODS:
        res["real_tokens"], res["losses"], res["step_s"] = report.trainer_log(out)
    else:
        loop = json.loads(out.read_text())
        res.update(real_tokens=loop["real_tokens"], losses=loop["losses"], step_s=loop["step_s"],
                   rank_peak_rss_mib=loop["peak_rss_mib"])
    if len(res["real_tokens"]) != steps:
        raise RuntimeError(f"{tag}: {len(res['real_tokens'])} logged steps, expected {steps}")
    return res


def machine(args) -> dict:
    from benchmarks.common.machine import machine_info

    info = machine_info(args.threads, "cpu", "fp32")
    info["threads_per_rank"] = info.pop("torch_threads")
    return info


def setup_line(args, runs: list[str]) -> str:
    return (f"Model: SmolLM2-135M-Instruct, {args.num_layers or 30} layers, fp32; GSM8K train split (1000), alpaca "
            f"template, --seq-length {args.seq_length}{' --pack' if args.pack else ''}; {args.nproc} ranks (torchrun, "
            f"gloo, {args.threads} thread each); {args.global_batch_size} sequences per optimizer step = micro-batch "
            f"{args.micro_batch_size} x {args.global_batch_size // (args.micro_batch_size * args.nproc)} x {args.nproc} "
            f"ranks; r = {args.rank} on q, k, v, o, gate, up, down; lr {args.lr:g} constant. Runs of "
            f"{args.step_counts[0]} and {args.step_counts[1]} steps per method ({', '.join(runs)}).")


def main(argv=None) -> list[dict]:
    from benchmarks.bench_trainer import prepare
    from benchmarks.common.runner import command_line
    from megatron_hdpissa.data.material import smollm2_hf_dir

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command, info = command_line(__file__, argv), machine(args)
    print(f"command: {command}\nmachine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    rows_tokens = args.global_batch_size * (args.seq_length * 0.95 if args.pack else min(args.seq_length, 205))
    est = report.estimate_s(args.method_list, args.step_counts, rows_tokens, args.num_layers)
    print(f"estimate: about {est / 60:.0f} min on 2 idle cores ({len(args.method_list)} methods x 2 runs; "
          "more on a loaded machine)", flush=True)
    t0 = time.time()
    base, train = prepare(argparse.Namespace(work_dir=args.work_dir, num_layers=args.num_layers))
    hf_dir = smollm2_hf_dir(num_layers=args.num_layers)
    print(f"base {base}, data {train}, HF {hf_dir} (prepared in {time.time() - t0:.0f} s)", flush=True)
    rows, total = [], 2 * len(args.method_list)
    with tempfile.TemporaryDirectory(prefix="bench_e2e-") as tmp:
        for i, (name, mode) in enumerate(args.method_list):
            runs = []
            for j, steps in enumerate(args.step_counts):
                res = run_method(args, name, mode, steps, base, train, hf_dir, Path(tmp))
                runs.append(res)
                print(f"[{2 * i + j + 1}/{total}] {name} ({mode}), {steps} steps: {res['wall_s']:.1f} s wall, "
                      f"{res['cpu_s']:.1f} s CPU, peak RSS {res['peak_rss_mib']:.0f} MiB, last loss "
                      f"{res['losses'][-1]:.4f} ({(time.time() - t0) / 60:.1f} min so far)", flush=True)
            label = name if mode == ("packed" if args.pack else "variable") else f"{name}:{mode}"
            rows.append(report.summarise(label, name, mode, runs[0], runs[1], args.nproc))
    report.add_ratios(rows, args.basis)
    info["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    info["total_wall_s"] = round(time.time() - t0)
    text = report.render(rows, info, setup_line(args, [r["method"] for r in rows]), command, args.basis)
    print("\n" + text, flush=True)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"command": command, "machine": info, "rows": rows}, indent=1))
        Path(args.out + ".md").write_text(text)
        print(f"wrote {args.out}.json and {args.out}.md")
    return rows


if __name__ == "__main__":
    main()
