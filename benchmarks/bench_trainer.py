"""End-to-end trainer step time: padded vs variable-length vs packed micro-batches, real SmolLM2 on GSM8K.

    .venv/bin/python benchmarks/bench_trainer.py                      # full 30-layer SmolLM2, ~5-10 min
    .venv/bin/python benchmarks/bench_trainer.py --num-layers 2 --steps 1   # a dry run, ~1 min

Each mode is one `torchrun --nproc-per-node 2 -m megatron_hdpissa.finetune` run (gloo, fp32,
HD-PiSSA, the same seed and data) that differs only in its data flags:

    padded     --pad-to-max-length    every micro-batch padded to --seq-length (the old behaviour)
    variable   (the default)          each micro-batch padded to its longest sequence, rounded up
                                      to --pad-multiple
    packed     --pack                 several examples per row, rows trimmed like `variable`
    balanced   (optional) `variable` with the data iterator's `balance_window` = the micro-batches
               per rank of a step (set through the worker: the trainer has no flag for it), so
               both ranks get about the same number of positions in every step
    floor      (optional) the padded run on 16-token rows of a tiny question / answer set: what
               a step costs that does not scale with the tokens (optimizer, aggregation,
               per-micro-batch overheads), the bound on what shorter batches can save

The trainer runs unchanged. Each rank is started through this file (`--worker`), which times
the trainer from the data side: a step starts when the trainer asks the data iterator for its
first micro-batch of the step, so the time between two such requests is one whole step
(forward, backward, optimizer, aggregation, logging). The worker also records each
micro-batch's shape and real tokens. The first `--warmup` steps are not timed; one extra step
at the end closes the last timed one.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES = {
    "padded": ["--pad-to-max-length"],
    "variable": [],
    "packed": ["--pack"],
    "balanced": [],
    "floor": ["--pad-to-max-length", "--seq-length", "16", "--prompt-template", "{prompt}"],
}
FLOOR_EXAMPLES = 256
TIMINGS_ENV = "BENCH_TRAINER_TIMINGS"  # the worker's output file, per rank
FORCE_PAD_ENV = "BENCH_TRAINER_FORCE_PAD"  # set by --force-padding-hook: see there
BALANCE_ENV = "BENCH_TRAINER_BALANCE"  # the balanced mode's balance_window


# ---- the worker: one rank of the trainer, timed at the data iterator ------------------------
def run_worker(argv: list[str]) -> None:
    import atexit

    from megatron_hdpissa.data import sft as data

    records: list[list] = []
    original_next = data.SFTBatchIterator.__next__
    original_init = data.SFTBatchIterator.__init__

    def timed_next(self):
        wall, cpu = time.perf_counter(), time.process_time()
        batch = original_next(self)
        mask = batch["loss_mask"] > 0
        ends = (mask * data.torch.arange(1, mask.shape[1] + 1)).max(dim=1).values  # real positions
        records.append([wall, cpu, self.shard_index, list(batch["tokens"].shape), int(ends.sum()),
                        int(mask.sum())])
        return batch

    force_pad, balance = os.environ.get(FORCE_PAD_ENV) == "1", int(os.environ.get(BALANCE_ENV, "1"))

    def patched_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if force_pad:
            self.pad_to_max_length = True
        if self.shuffle:  # the training iterators, not an evaluation pass
            self.balance_window = balance

    data.SFTBatchIterator.__next__ = timed_next
    data.SFTBatchIterator.__init__ = patched_init

    def dump():
        path = os.environ[TIMINGS_ENV].replace("RANK", os.environ.get("RANK", "0"))
        with open(path, "w") as f:
            json.dump({"records": records, "end": [time.perf_counter(), time.process_time()]}, f)

    atexit.register(dump)
    from megatron_hdpissa.training import finetune

    if hasattr(finetune, "cli"):
        finetune.cli(argv)
    else:
        finetune.main(argv)


# ---- the parent ------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="padded,variable,packed,floor", help="comma-separated, from " + ",".join(MODES))
    p.add_argument("--num-layers", type=int, default=None, help="first N layers of SmolLM2 (default: all 30)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--nproc", type=int, default=2, help="data-parallel ranks (torchrun processes)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=8, help="sequences (rows) per optimizer step")
    p.add_argument("--pad-multiple", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    p.add_argument("--rounds", type=int, default=1, help="run all modes this many times, interleaved")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--hd-pissa-rank", type=int, default=16)
    p.add_argument("--target", type=float, default=1.25, help="padded / variable step-time target")
    p.add_argument("--basis", choices=["cpu", "wall"], default="cpu",
                   help="clock for the ratios: process CPU time (the slowest rank of each step; other jobs "
                        "on a shared machine disturb it far less) or wall time; both are printed")
    p.add_argument("--force-padding-hook", action="store_true",
                   help="for a trainer without --pad-to-max-length: force the padded mode through the "
                        "data iterator instead (a dry run of this script, not a measurement of the flag)")
    p.add_argument("--work-dir", default=None, help="default: <cache>/bench_trainer")
    p.add_argument("--json-out", default=None)
    p.add_argument("--markdown-out", default=None)
    return p.parse_args(argv)


def machine_info(args) -> dict:
    """bench_step's machine record, for CPU ranks with `--threads` threads each."""
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    import torch
    import bench_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = bench_step.machine_info(argparse.Namespace(threads=args.threads, device=device, dtype="fp32"))
    info["threads_per_rank"] = info.pop("torch_threads")
    info["load_avg_1m"] = round(info["load_avg_1m"], 2)
    return info


def trainer_has_padding_flags() -> bool:
    from megatron_hdpissa.training.finetune import parse_args as trainer_parse_args

    try:
        args = trainer_parse_args(["--pretrained-checkpoint", "x", "--data-path", "x", "--train-iters", "1",
                                   "--pad-to-max-length", "--pad-multiple", "8"])
    except SystemExit:
        return False
    return bool(getattr(args, "pad_to_max_length", False))


def prepare(args) -> tuple[Path, Path]:
    """The converted base (TP=1) and the GSM8K training split, cached."""
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
    from megatron_hdpissa.data.sft import split_gsm8k, write_jsonl
    from megatron_hdpissa.data.material import cache_dir, gsm8k_test_path, smollm2_hf_dir

    work = Path(args.work_dir) if args.work_dir else cache_dir() / "bench_trainer"
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = smollm2_hf_dir(num_layers=args.num_layers)
    base = work / f"base-{hf_dir.name}"
    if not (base / "latest_checkpointed_iteration.txt").exists():
        convert_hf_to_megatron(hf_dir, base, tp_size=1, force=True, progress=False)
    train_path = work / "gsm8k_train.jsonl"
    if not train_path.exists():
        train, _ = split_gsm8k(str(gsm8k_test_path()), num_heldout=319, seed=0)
        write_jsonl(train, str(train_path))
    floor_path = work / "floor.jsonl"
    if not floor_path.exists():
        write_jsonl([{"question": f"{i} + 1 =", "answer": f"{i + 1}"} for i in range(FLOOR_EXAMPLES)],
                    str(floor_path))
    return base, train_path


def trainer_flags(args, base: Path, train_path: Path, mode: str) -> list[str]:
    flags = [
        "--pretrained-checkpoint", str(base), "--data-path", str(train_path),
        "--prompt-field", "question", "--response-field", "answer", "--prompt-template", "alpaca",
        "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.global_batch_size),
        "--train-iters", str(args.warmup + args.steps + 1),
        "--lr", "1e-4", "--lr-decay-style", "constant",
        "--peft", "hd-pissa", "--hd-pissa-rank", str(args.hd_pissa_rank), "--hd-pissa-svd", "randomized",
        "--log-interval", "1", "--no-progress", "--seed", "1234",
    ]
    padded = "--pad-to-max-length" in MODES[mode]
    if not (padded and args.force_padding_hook):
        flags += MODES[mode]
    elif mode == "floor":
        flags += MODES[mode][1:]
    if not padded and not args.force_padding_hook:
        flags += ["--pad-multiple", str(args.pad_multiple)]
    if mode == "floor":
        flags += ["--data-path", str(train_path.with_name("floor.jsonl"))]
    return flags


def run_mode(args, base, train_path, mode: str, tmp: Path, log) -> dict:
    from megatron_hdpissa.distributed.groups import free_port

    timings, log_json = tmp / f"{mode}-RANK.json", tmp / f"{mode}-log.jsonl"
    log_json.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--master-port", str(free_port()), str(Path(__file__).resolve()), "--worker", "--",
           *trainer_flags(args, base, train_path, mode), "--log-json", str(log_json)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **{TIMINGS_ENV: str(timings)})
    env[FORCE_PAD_ENV] = "1" if ("--pad-to-max-length" in MODES[mode] and args.force_padding_hook) else "0"
    env[BALANCE_ENV] = str(args.global_batch_size // (args.micro_batch_size * args.nproc)) if mode == "balanced" else "1"
    log(f"\n[{mode}] " + shlex.join(cmd))
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"mode {mode} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    losses = []
    if log_json.exists():
        losses = [json.loads(line)["loss"] for line in log_json.read_text().splitlines()
                  if '"loss"' in line]
    ranks = [json.loads(Path(str(timings).replace("RANK", str(r))).read_text()) for r in range(args.nproc)]
    return summarise_mode(args, mode, ranks, losses, wall)


def summarise_mode(args, mode: str, ranks: list[dict], losses: list[float], wall: float) -> dict:
    per_step_batches = args.global_batch_size // (args.micro_batch_size * args.nproc)
    total_steps = args.warmup + args.steps + 1
    step_wall, step_cpu, positions, real, supervised, slowest = [], [], [], [], [], []
    for s in range(args.warmup, args.warmup + args.steps):
        walls, cpus = [], []
        for rank in ranks:
            recs = rank["records"]
            if len(recs) != total_steps * per_step_batches:
                raise RuntimeError(f"mode {mode}: a rank drew {len(recs)} micro-batches, expected "
                                   f"{total_steps} steps x {per_step_batches}")
            first, nxt = recs[s * per_step_batches], recs[(s + 1) * per_step_batches]
            walls.append(nxt[0] - first[0])
            cpus.append(nxt[1] - first[1])
        step_wall.append(max(walls))  # the ranks meet in the aggregation: the slowest sets the step
        step_cpu.append(max(cpus))
        step = [r for rank in ranks for r in rank["records"][s * per_step_batches:(s + 1) * per_step_batches]]
        positions.append(sum(shape[0] * shape[1] for _, _, _, shape, _, _ in step))
        slowest.append(max(sum(r[3][0] * r[3][1] for r in rank["records"][s * per_step_batches:(s + 1) * per_step_batches])
                           for rank in ranks))
        real.append(sum(rec[4] for rec in step))
        supervised.append(sum(rec[5] for rec in step))
    lengths = sorted({rec[3][1] for rank in ranks for rec in rank["records"]})
    wall_med, cpu_med = statistics.median(step_wall), statistics.median(step_cpu)
    return {
        "mode": mode, "step_wall_s": step_wall, "step_cpu_s": step_cpu,
        "median_wall_s": wall_med, "median_cpu_s": cpu_med,
        "positions_per_step": statistics.mean(positions), "slowest_rank_positions_per_step": statistics.mean(slowest),
        "real_tokens_per_step": statistics.mean(real),
        "supervised_per_step": statistics.mean(supervised),
        "micro_batch_lengths": [lengths[0], lengths[-1]], "losses": losses, "run_wall_s": wall,
    }


def combine(rounds: list[dict]) -> dict:
    """Per mode: every round's timed steps together."""
    out = {}
    for res in rounds:
        cur = out.setdefault(res["mode"], {**res, "step_wall_s": [], "step_cpu_s": [], "losses_by_round": []})
        cur["step_wall_s"] += res["step_wall_s"]
        cur["step_cpu_s"] += res["step_cpu_s"]
        cur["losses_by_round"].append(res["losses"])
    for cur in out.values():
        cur["median_wall_s"] = statistics.median(cur["step_wall_s"])
        cur["median_cpu_s"] = statistics.median(cur["step_cpu_s"])
    return out


def render(results: dict, info: dict, args, command: str) -> str:
    lines = ["```", command, "```", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if v is not None), "",
             f"Model: SmolLM2-135M-Instruct, {args.num_layers or 30} layers, fp32; GSM8K train split (1000), "
             f"alpaca template, --seq-length {args.seq_length}; {args.nproc} ranks (torchrun, gloo), HD-PiSSA "
             f"r={args.hd_pissa_rank}; {args.global_batch_size} sequences per step = micro-batch "
             f"{args.micro_batch_size} x {args.global_batch_size // (args.micro_batch_size * args.nproc)} x "
             f"{args.nproc} ranks; {args.warmup} warm-up + {args.steps} timed steps per mode x {args.rounds} "
             f"round(s); --pad-multiple {args.pad_multiple}."
             + (f" floor: {FLOOR_EXAMPLES} one-line problems ('i + 1 =' / 'i+1'), --seq-length 16, padded."
                if "floor" in results else ""), "",
             f"Ratio basis: **{'process CPU time' if args.basis == 'cpu' else 'wall time'}** (medians of the "
             "timed steps; per step the slowest rank's CPU time).", "",
             "| mode | step CPU s (median) | step wall s (median) | steps CPU s | steps wall s | positions / step | "
             f"real tokens / step | real tokens/s ({args.basis}) | micro-batch lengths | losses |",
             "|---|---:|---:|---|---|---:|---:|---:|---|---|"]
    for mode, r in results.items():
        lines.append(
            f"| {mode} | {r['median_cpu_s']:.2f} | {r['median_wall_s']:.2f} | "
            f"{', '.join(f'{t:.2f}' for t in r['step_cpu_s'])} | "
            f"{', '.join(f'{t:.2f}' for t in r['step_wall_s'])} | {r['positions_per_step']:.0f} | "
            f"{r['real_tokens_per_step']:.0f} | {r['real_tokens_per_step'] / r['median_' + args.basis + '_s']:.0f} | "
            f"{r['micro_batch_lengths'][0]}-{r['micro_batch_lengths'][1]} | "
            f"{' '.join(f'{x:.4f}' for x in r['losses_by_round'][0])} |")
    lines.append("")
    lines += ratio_lines(results, args)
    return "\n".join(lines) + "\n"


def ratio_lines(results: dict, args) -> list[str]:
    out = []
    pad = results.get("padded")
    for mode in ("variable", "balanced", "packed"):
        r = results.get(mode)
        if pad is None or r is None:
            continue
        wall, cpu = pad["median_wall_s"] / r["median_wall_s"], pad["median_cpu_s"] / r["median_cpu_s"]
        ratio = cpu if args.basis == "cpu" else wall
        positions = pad["positions_per_step"] / r["positions_per_step"]
        slowest = pad["slowest_rank_positions_per_step"] / r["slowest_rank_positions_per_step"]
        tokens = (r["real_tokens_per_step"] / pad["real_tokens_per_step"]) * ratio
        line = (f"- padded / {mode} step time: **{ratio:.2f}x** {args.basis} ({cpu:.2f}x CPU, {wall:.2f}x wall); "
                f"positions computed per step {positions:.2f}x fewer, by the busiest rank {slowest:.2f}x fewer; real tokens/s {tokens:.2f}x")
        if mode in ("variable", "balanced"):
            line += f"; target >= {args.target:.2f}x: {'met' if ratio >= args.target else 'NOT met'}"
        out.append(line)
    floor = results.get("floor")
    if pad and floor and "variable" in results:
        key = f"median_{args.basis}_s"
        var = results["variable"]
        out.append(f"- floor (16-token rows): {floor[key]:.2f} s {args.basis} per step does not scale with the tokens; "
                   f"on the rest, padded / variable = {(pad[key] - floor[key]) / (var[key] - floor[key]):.2f}x; "
                   f"the best padded / variable this floor allows at the positions ratio above is "
                   f"{pad[key] / (floor[key] + (pad[key] - floor[key]) * var['positions_per_step'] / pad['positions_per_step']):.2f}x")
    if pad and "variable" in results:
        a, b = pad["losses_by_round"][0], results["variable"]["losses_by_round"][0]
        if a and len(a) == len(b):
            worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
            out.append(f"- losses padded vs variable (the same batches, masking exact): largest relative "
                       f"difference {worst:.1e} over {len(a)} steps")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/bench_trainer.py",
                          *(sys.argv[1:] if argv is None else argv)])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}; choose from {list(MODES)}")
    if args.global_batch_size % (args.micro_batch_size * args.nproc):
        raise SystemExit("--global-batch-size must be a multiple of --micro-batch-size x --nproc")
    if not trainer_has_padding_flags() and not args.force_padding_hook:
        raise SystemExit("the trainer (megatron_hdpissa.training.finetune) has no --pad-to-max-length / --pad-multiple "
                         "yet; rerun with --force-padding-hook for a dry run of this script")

    def log(msg):
        print(msg, flush=True)

    info = machine_info(args)
    log(command)
    log("machine: " + json.dumps(info))
    t0 = time.time()
    base, train_path = prepare(args)
    log(f"base {base}, data {train_path} (prepared in {time.time() - t0:.0f}s)")
    raw = []
    with tempfile.TemporaryDirectory(prefix="bench_trainer-") as tmp:
        for _ in range(args.rounds):
            for mode in modes:
                res = run_mode(args, base, train_path, mode, Path(tmp), log)
                raw.append(res)
                log(f"[{mode}] median step {res['median_wall_s']:.2f}s wall / {res['median_cpu_s']:.2f}s CPU, "
                    f"{res['positions_per_step']:.0f} positions ({res['real_tokens_per_step']:.0f} real tokens) "
                    f"per step, run {res['run_wall_s']:.0f}s")
    results = combine(raw)
    info["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    info["total_wall_s"] = round(time.time() - t0)
    text = render(results, info, args, command)
    log("\n" + text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"command": command, "machine": info, "raw": raw,
                                                   "results": results}, indent=1))
    if args.markdown_out:
        Path(args.markdown_out).write_text(text)
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rest = sys.argv[2:]
        run_worker(rest[1:] if rest[:1] == ["--"] else rest)
    else:
        main()
