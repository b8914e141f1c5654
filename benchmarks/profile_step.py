"""A torch.profiler trace of one trainer step on CPU, its top operators, and where a step's time goes.

    .venv/bin/python benchmarks/profile_step.py --out /tmp/prof            # full SmolLM2, 2 ranks, --seq-length 256
    .venv/bin/python benchmarks/profile_step.py --tiny-rows --out /tmp/prof16   # 16-token rows: the fixed cost
    .venv/bin/python benchmarks/profile_step.py --num-layers 2 --steps 1 --out /tmp/prof-smoke

Each rank (torchrun, gloo, 1 thread) sets up the trainer's recipe (`FinetuneRecipe`) unchanged and
calls its `train_step()` itself: `--warmup` untimed steps, `--steps` timed ones, then one step under
`torch.profiler`. The timed steps are split into: the data (time inside the data iterators'
`next`, through a wrapper), each optimizer phase (the optimizer's `phase_hook`: clip, adam,
aggregate, param_gather), the rest of `optimizer.step` (timed around this optimizer object's
`step`), and what is left (megatron-core's schedule: forward and backward, the loss all-reduces,
zero_grad). The profiled step's operators are grouped (GEMMs, attention, loss,
collectives, the rest) and what the operators' self time does not cover is Python, autograd and
dispatch overhead. `--tiny-rows` runs 16-token rows of one-line problems (bench_trainer's floor
data), where what is left is what a step costs whatever its tokens. Writes OUT/ops_rank0.txt (the
top operators by self CPU time), OUT/trace_rank<r>.json (chrome://tracing) and OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GROUPS = (  # operator name fragments -> group, first match wins
    ("collectives", ("gloo", "all_reduce", "allreduce", "all_gather", "allgather", "broadcast", "reduce_scatter",
                     "barrier", "c10d")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax_backward", "_softmax")),
    ("loss", ("cross_entropy", "CrossEntropy", "log_softmax", "nll_loss")),
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
)


def op_group(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other ops"


class TimedIterator:
    """A trainer data iterator that adds the seconds spent in `next` to `totals["data"]`."""

    def __init__(self, inner, totals: dict):
        self.inner, self.totals = inner, totals

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.inner)
        finally:
            self.totals["data"] = self.totals.get("data", 0.0) + time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self.inner, name)


def run_worker(out: Path, warmup: int, steps: int, argv: list[str]) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.common.timing import PhaseTimer
    from megatron_hdpissa.distributed.groups import shutdown
    from megatron_hdpissa.training.arguments import parse_args as trainer_args
    from megatron_hdpissa.training.finetune import FinetuneRecipe

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    recipe = FinetuneRecipe(trainer_args(argv))
    recipe.setup()
    rank = torch.distributed.get_rank()
    data: dict = {}
    recipe.iterators = [TimedIterator(it, data) for it in recipe.iterators]
    phases = PhaseTimer(lambda: None)
    phases.attach(recipe.optimizer)
    opt_step, opt_s = recipe.optimizer.step, [0.0]

    def timed_step(*a, **k):  # this optimizer object's step, timed whole (phases are parts of it)
        t = time.perf_counter()
        try:
            return opt_step(*a, **k)
        finally:
            opt_s[0] += time.perf_counter() - t

    recipe.optimizer.step = timed_step
    recipe.model.train()
    for _ in range(warmup):
        recipe.train_step()
    rows = []
    for _ in range(steps):
        data.clear()
        phases.totals, opt_s[0] = {}, 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        recipe.train_step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        parts = {"data": data.get("data", 0.0), **{f"optimizer: {k}": v[0] for k, v in phases.totals.items()}}
        parts["optimizer: outside its phases"] = opt_s[0] - sum(v[0] for v in phases.totals.values())
        parts["schedule: forward + backward, loss all-reduces, zero_grad"] = wall - data.get("data", 0.0) - opt_s[0]
        rows.append({"step_s": wall, "step_cpu_s": cpu, **parts})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        recipe.train_step()
        profiled = time.perf_counter() - t0
    events = prof.key_averages()
    groups: dict = {}
    for e in events:
        if e.key.startswith("hd_pissa.optimizer.") or e.key.startswith("ProfilerStep"):
            continue  # ranges, not operators: their time is their operators'
        g = op_group(e.key)
        groups[g] = groups.get(g, 0.0) + e.self_cpu_time_total / 1e6
    groups["Python / autograd / dispatch (not in any operator)"] = profiled - sum(groups.values())
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / f"trace_rank{rank}.json"))
    if rank == 0:
        table = events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
        (out / "ops_rank0.txt").write_text(table)
    with open(out / f"rank{rank}.json", "w") as f:
        json.dump({"steps": rows, "profiled_step_s": profiled, "groups_s": groups}, f)
    shutdown()


def summarise(ranks: list[dict]) -> dict:
    """Per part: the median over timed steps of the slowest rank's (the rank with the longest step:
    the others wait for it) split; the profiled step's operator groups (rank 0)."""
    slowest = [max((r["steps"][i] for r in ranks), key=lambda s: s["step_s"]) for i in range(len(ranks[0]["steps"]))]
    parts = sorted({k for s in slowest for k in s})
    med = {k: statistics.median(s.get(k, 0.0) for s in slowest) for k in parts}
    return {"median_s": med, "profiled_step_s": ranks[0]["profiled_step_s"], "groups_s": ranks[0]["groups_s"]}


def render(summary: dict) -> str:
    step = summary["median_s"]["step_s"]
    lines = ["| part of a step (timed steps, median, slowest rank) | s | share |", "|---|---:|---:|"]
    for k, v in sorted(summary["median_s"].items(), key=lambda kv: -kv[1]):
        if k not in ("step_s", "step_cpu_s"):
            lines.append(f"| {k} | {v:.3f} | {100 * v / step:.0f}% |")
    lines.append(f"| **whole step** (process CPU time: {summary['median_s']['step_cpu_s']:.3f} s) | {step:.3f} | 100% |")
    prof = summary["profiled_step_s"]
    lines += ["", f"| profiled step, rank 0 ({prof:.3f} s with the profiler on): operator self time | s | share |",
              "|---|---:|---:|"]
    for k, v in sorted(summary["groups_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v:.3f} | {100 * v / prof:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from benchmarks.bench_e2e import MODE_FLAGS, trainer_flags
    from benchmarks.bench_trainer import prepare
    from benchmarks.common.runner import command_line
    from megatron_hdpissa.distributed.groups import free_port

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peft", default="hd-pissa", choices=("hd-pissa", "lora", "pissa"))
    p.add_argument("--mode", default="variable", choices=sorted(MODE_FLAGS), help="data mode (bench_e2e's)")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps (before the profiled one)")
    p.add_argument("--tiny-rows", action="store_true", help="16-token rows of one-line problems, padded")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--out", required=True, help="folder for the trace, the operator table and summary.json")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    print(f"command: {command_line(__file__, argv)}", flush=True)
    base, train = prepare(argparse.Namespace(work_dir=args.work_dir, num_layers=args.num_layers))
    mode = "padded" if args.tiny_rows else args.mode
    flags = trainer_flags(args, base, train, mode, args.warmup + args.steps + 1) + ["--peft", args.peft]
    if args.tiny_rows:
        flags += ["--data-path", str(train.with_name("floor.jsonl")), "--seq-length", "16", "--prompt-template",
                  "{prompt}"]
    out = Path(args.out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--master-port",
           str(free_port()), str(Path(__file__).resolve()), "--worker", str(out), str(args.warmup), str(args.steps),
           "--", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"profile run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = summarise([json.loads((out / f"rank{r}.json").read_text()) for r in range(args.nproc)])
    print((out / "ops_rank0.txt").read_text())
    text = render(summary)
    print(text)
    (out / "summary.json").write_text(json.dumps({"command": command_line(__file__, argv), **summary}, indent=1))
    (out / "summary.md").write_text(text)
    return summary


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        out_dir, warm, timed, rest = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
        run_worker(Path(out_dir), warm, timed, rest[1:] if rest[:1] == ["--"] else rest)
    else:
        main()
