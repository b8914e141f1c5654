"""End-to-end trainer step time: padded vs variable-length vs packed micro-batches, real SmolLM2 on GSM8K.

    .venv/bin/python benchmarks/bench_trainer.py                      # full 30-layer SmolLM2, ~5-10 min
    .venv/bin/python benchmarks/bench_trainer.py --num-layers 2 --steps 1   # a dry run, ~1 min

Each mode is one `torchrun --nproc-per-node 2` run of the trainer (gloo, fp32, HD-PiSSA, the same
seed and data) that differs only in its data flags:

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

Each rank is started through this file (`--worker`), which sets up the trainer's recipe
(`FinetuneRecipe`) unchanged and wraps its data iterators: a step starts when the trainer asks
for its first micro-batch of the step, so the time between two such requests is one whole step
(forward, backward, optimizer, aggregation, logging). The wrapper also records each
micro-batch's shape and real tokens. The first `--warmup` steps are not timed; one extra step at
the end closes the last timed one.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.trainer_report import FLOOR_EXAMPLES, combine, render, summarise_mode  # noqa: E402

MODES = {
    "padded": ["--pad-to-max-length"],
    "variable": [],
    "packed": ["--pack"],
    "balanced": [],
    "floor": ["--pad-to-max-length", "--seq-length", "16", "--prompt-template", "{prompt}"],
}
TIMINGS_ENV = "BENCH_TRAINER_TIMINGS"  # the worker's output file, per rank
FORCE_PAD_ENV = "BENCH_TRAINER_FORCE_PAD"  # set by --force-padding-hook: see there
BALANCE_ENV = "BENCH_TRAINER_BALANCE"  # the balanced mode's balance_window


# ---- the worker: one rank of the trainer, timed at the data iterator ------------------------
class TimedBatches:
    """A data iterator of the trainer, recording for every micro-batch when it was asked for
    (wall, CPU), the shard, the batch shape, its real positions and supervised tokens."""

    def __init__(self, inner, records: list):
        self.inner, self.records = inner, records

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        wall, cpu = time.perf_counter(), time.process_time()
        batch = next(self.inner)
        mask = batch["loss_mask"] > 0
        ends = (mask * torch.arange(1, mask.shape[1] + 1)).max(dim=1).values  # real positions
        self.records.append([wall, cpu, self.inner.shard_index, list(batch["tokens"].shape), int(ends.sum()),
                             int(mask.sum())])
        return batch

    def __getattr__(self, name):  # state_dict, batches_in_epoch, ...: the wrapped iterator's
        return getattr(self.inner, name)


def run_worker(argv: list[str]) -> None:
    from megatron_hdpissa.distributed.groups import shutdown
    from megatron_hdpissa.training.arguments import parse_args as trainer_args
    from megatron_hdpissa.training.finetune import FinetuneRecipe

    records: list[list] = []
    recipe = FinetuneRecipe(trainer_args(argv))
    recipe.setup()
    for it in recipe.iterators:  # the training iterators, before their first batch
        if os.environ.get(FORCE_PAD_ENV) == "1":
            it.pad_to_max_length = True
        it.balance_window = int(os.environ.get(BALANCE_ENV, "1"))
    recipe.iterators = [TimedBatches(it, records) for it in recipe.iterators]
    try:
        recipe.train()
    finally:
        path = os.environ[TIMINGS_ENV].replace("RANK", os.environ.get("RANK", "0"))
        with open(path, "w") as f:
            json.dump({"records": records, "end": [time.perf_counter(), time.process_time()]}, f)
        shutdown()


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
    """The benchmarks' machine record, for CPU ranks with `--threads` threads each."""
    import torch

    from benchmarks.common.machine import machine_info as record

    info = record(args.threads, "cuda" if torch.cuda.is_available() else "cpu", "fp32")
    info["threads_per_rank"] = info.pop("torch_threads")
    info["load_avg_1m"] = round(info["load_avg_1m"], 2)
    return info


def trainer_has_padding_flags() -> bool:
    from megatron_hdpissa.training.arguments import parse_args as trainer_args

    try:
        args = trainer_args(["--pretrained-checkpoint", "x", "--data-path", "x", "--train-iters", "1",
                             "--pad-to-max-length", "--pad-multiple", "8"])
    except SystemExit:
        return False
    return bool(getattr(args, "pad_to_max_length", False))


def prepare(args) -> tuple[Path, Path]:
    """The converted base (TP=1) and the GSM8K training split, cached."""
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
    from megatron_hdpissa.data.gsm8k import split_gsm8k
    from megatron_hdpissa.data.sft import write_jsonl
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
