"""Training-checkpoint save / resume time and size: --ckpt-format torch_dist vs torch (legacy), on
full SmolLM2-135M-Instruct (30 layers, fp32) with the trainer's real state.

    .venv/bin/python benchmarks/bench_checkpoint.py                    # full model, ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_checkpoint.py --num-layers 2     # a dry run, ~1 min

Each rank of a real `torch.multiprocessing` gloo job (default 2 ranks: DP=2, or --tp 2) sets up
the trainer (`FinetuneRecipe.setup`: the converted torch_dist base, HD-PiSSA adapters,
optimizer, data), takes one optimizer step so that the Adam moments exist, then for each format
times `recipe.save()` (`--repeats` times, the median; a barrier before and after, so the time
is the slowest rank's) and measures the iteration folder on disk. Resume: a fresh recipe with
`--load` on the saved folder, timed over its whole `setup()` (build the model, load the
weights, attach adapters, load factors / moments / data positions / RNG), next to the same
set-up from the base without training state (which also decomposes: the SVDs a resume skips).

The state saved: the model (fp32, merged W), every slice's factors and both Adam moments.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FORMATS = ("torch_dist", "torch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-layers", type=int, default=None, help="truncate SmolLM2 (default: all 30)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--rank", type=int, default=16, help="--hd-pissa-rank")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", default=None, help="default: <cache>/bench_checkpoint")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _trainer_argv(base: Path, data: Path, save: Path, args, load: Path | None = None) -> list[str]:
    argv = ["--pretrained-checkpoint", str(base), "--data-path", str(data), "--micro-batch-size", "1",
            "--global-batch-size", str(args.nproc // args.tp), "--seq-length", "128", "--train-iters", "1",
            "--lr", "1e-4", "--hd-pissa-rank", str(args.rank), "--no-progress", "--save", str(save),
            "--tensor-model-parallel-size", str(args.tp)]
    return argv + (["--load", str(load)] if load is not None else [])


def worker(base: str, data: str, work: str, args) -> dict:
    """One rank: set up, one step, save in each format, resume from each."""
    import torch
    import torch.distributed as dist

    from megatron_hdpissa.training.arguments import parse_args as trainer_args
    from megatron_hdpissa.training.finetune import FinetuneRecipe

    torch.set_num_threads(1)
    work = Path(work)

    def timed(fn):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    out: dict = {}
    recipe = FinetuneRecipe(trainer_args(_trainer_argv(Path(base), Path(data), work / "unused", args)))
    out["setup_from_base_s"] = timed(recipe.setup)
    recipe.train_step()
    for fmt in FORMATS:
        recipe.args.ckpt_format, recipe.args.save = fmt, str(work / fmt)
        recipe.rank0 = False  # quiet
        out[f"save_{fmt}_s"] = [timed(recipe.save) for _ in range(args.repeats)]
    for fmt in FORMATS:
        again = FinetuneRecipe(trainer_args(_trainer_argv(Path(base), Path(data), work / f"resumed_{fmt}", args,
                                                          load=work / fmt)))
        out[f"resume_{fmt}_s"] = timed(again.setup)
        assert again.iteration == 1
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
    from megatron_hdpissa.data.gsm8k import split_gsm8k
    from megatron_hdpissa.data.sft import write_jsonl
    from megatron_hdpissa.data.material import cache_dir, gsm8k_test_path, smollm2_hf_dir
    from tests.helpers.distributed import run_distributed

    work = Path(args.work_dir or cache_dir() / "bench_checkpoint")
    hf = smollm2_hf_dir(num_layers=args.num_layers)
    base = work / f"base-{hf.name}"
    if not (base / "latest_checkpointed_iteration.txt").exists():
        convert_hf_to_megatron(hf, base, progress=False, ckpt_format="torch_dist")
    data = work / "train.jsonl"
    train, _ = split_gsm8k(str(gsm8k_test_path()), num_heldout=319, seed=0)
    write_jsonl(train[:64], str(data))
    runs = work / "runs"
    if runs.exists():
        import shutil

        shutil.rmtree(runs)
    t0 = time.time()
    results = run_distributed(worker, args.nproc, args.tp, args=(str(base), str(data), str(runs), args))
    r = results[0]
    import torch

    rows = []
    for fmt in FORMATS:
        it = runs / fmt / "iter_0000001"
        rows.append({"format": fmt, "save_s": statistics.median(r[f"save_{fmt}_s"]), "save_all_s": r[f"save_{fmt}_s"],
                     "resume_s": r[f"resume_{fmt}_s"], "bytes": folder_bytes(it),
                     "files": sum(1 for f in it.rglob("*") if f.is_file())})
    report = {"command": "python benchmarks/bench_checkpoint.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": f"{hf.name}", "layout": f"TP={args.tp} x DP={args.nproc // args.tp}, --hd-pissa-rank {args.rank}",
              "setup_from_base_s": r["setup_from_base_s"], "rows": rows, "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "wall_s": time.time() - t0}
    print(format_table(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict) -> str:
    lines = [f"# {report['command']}", f"# {report['model']}, {report['layout']}, fp32, gloo, torch "
             f"{report['torch']}, {report['cpu_count']} cores (1-min load {report['load_avg_1m']:.1f} at end)",
             "| format | save (median) | saves | resume (set-up with --load) | size on disk | files |",
             "|---|---:|---|---:|---:|---:|"]
    for row in report["rows"]:
        lines.append(f"| {row['format']} | {row['save_s']:.2f} s | {', '.join(f'{x:.2f}' for x in row['save_all_s'])} "
                     f"| {row['resume_s']:.2f} s | {row['bytes'] / 2**20:.1f} MiB | {row['files']} |")
    lines.append(f"set-up from the base (no training state; decomposes): {report['setup_from_base_s']:.2f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
