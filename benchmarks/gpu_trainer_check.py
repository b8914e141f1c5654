"""The trainer end to end on one device: stage 1 of benchmarks/gpu_check.sh (benchmarks/GPU.md).

    python benchmarks/gpu_trainer_check.py --prepare .gpu        # here, once: tokenizer + JSONL
    torchrun --standalone --nproc-per-node 1 benchmarks/gpu_trainer_check.py --material .gpu \
        --work /tmp/w --json-out r.json --markdown-out r.md [--dry-run]

No weights travel: the material folder holds only SmolLM2's tokenizer files (from the packaged
GGUF's cached HF export) and a few hundred GSM8K rows (from the packaged test split), about 4 MB.
On the box a random-initialised LLaMA-config model of SmolLM2's vocabulary is built with
transformers and converted with our converter (torch_dist). Then, per method (HD-PiSSA with
`--hd-pissa-virtual-ranks 4`, i.e. K = 4 slices on one rank, and `--peft lora`), in this process
(one NCCL rank on CUDA, gloo on CPU), each through `megatron_hdpissa.training.finetune.main`:
  full     --train-iters N with a torch_dist save at N/2 and at N;
  resumed  a copy of that folder whose tracker names N/2, resumed to N;
and checks: every loss finite, the mean of the last two losses below the first, the resumed run's
losses at N/2+1..N equal to the uninterrupted run's (bit-exact on CPU, within --resume-rtol on the
GPU, where bf16 kernels may reorder sums). Prints tokens/s (the trainer's median logged value),
wall seconds and peak device memory per run. --dry-run: tiny shapes on the CPU (still bf16).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TRAIN_ROWS = 256
# (model, data) shapes: the GPU run, and the CPU dry run
GPU_SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, seq=512, micro=4, global_batch=16, iters=8, lr=2e-3)
DRY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, seq=192, micro=2, global_batch=8, iters=4, lr=5e-3)
METHODS = {"hd-pissa": ["--peft", "hd-pissa", "--hd-pissa-rank", "8", "--hd-pissa-virtual-ranks", "4"],
           "lora": ["--peft", "lora", "--lora-rank", "8"]}


def prepare(material: Path) -> None:
    """Tokenizer files and a small JSONL from the packaged material (run here, not on the box)."""
    from megatron_hdpissa.data.gsm8k import split_gsm8k
    from megatron_hdpissa.data.material import gsm8k_test_path, smollm2_hf_dir
    from megatron_hdpissa.data.sft import write_jsonl

    tok = material / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    src = smollm2_hf_dir(num_layers=2)
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    for f in copied:
        shutil.copy2(src / f, tok / f)
    train, _ = split_gsm8k(str(gsm8k_test_path()), num_heldout=319, seed=0)
    write_jsonl(train[:TRAIN_ROWS], str(material / "train.jsonl"))
    size = sum(p.stat().st_size for p in material.rglob("*") if p.is_file())
    print(f"prepared {material}: tokenizer ({', '.join(copied)}), train.jsonl ({TRAIN_ROWS} rows); "
          f"{size / 2 ** 20:.1f} MiB")


def build_base(material: Path, work: Path, shape: dict, seed: int = 0) -> Path:
    """A random LLaMA of SmolLM2's vocabulary with the carried tokenizer, converted to torch_dist."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    config = LlamaConfig(vocab_size=49152, max_position_embeddings=1024, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"], initializer_range=0.02,
                         **{k: shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads")})
    torch.manual_seed(seed)
    hf = work / "hf"
    LlamaForCausalLM(config).save_pretrained(hf)
    for f in (material / "tokenizer").iterdir():
        shutil.copy2(f, hf / f.name)
    return convert_hf_to_megatron(hf, work / "base", progress=False, ckpt_format="torch_dist", force=True)


def losses(log_json: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in log_json.read_text().splitlines() if x.strip()]
    return {r["iteration"]: r for r in rows if "loss" in r}


def run_trainer(argv: list[str], cuda: bool) -> dict:
    import torch

    from megatron_hdpissa.training import finetune

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = finetune.main(argv)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
    return {"result": result, "wall_s": wall, "peak_mem_mb": peak}


def rewind(src: Path, dst: Path, iteration: int) -> Path:
    """A copy of the checkpoint folder `src` whose tracker names `iteration` (later ones dropped)."""
    from megatron_hdpissa.checkpoint.atomic import write_tracker

    shutil.copytree(src, dst)
    for it in dst.glob("iter_*"):
        if int(it.name.split("_")[1]) > iteration:
            shutil.rmtree(it)
    write_tracker(dst, iteration)
    return dst


def check_method(name: str, base: Path, material: Path, work: Path, shape: dict, dry: bool, cuda: bool,
                 rtol: float) -> dict:
    n, half = shape["iters"], shape["iters"] // 2
    common = ["--pretrained-checkpoint", str(base), "--data-path", str(material / "train.jsonl"),
              "--micro-batch-size", str(shape["micro"]), "--global-batch-size", str(shape["global_batch"]),
              "--seq-length", str(shape["seq"]), "--lr", str(shape["lr"]), "--lr-decay-style", "constant",
              "--train-iters", str(n), "--save-interval", str(half), "--ckpt-format", "torch_dist",
              "--no-progress", "--seed", "1", "--log-interval", "1", *METHODS[name]]
    common += ["--bf16"] + (["--hd-pissa-master-weights", "sharded-fp32"] if name == "hd-pissa" else [])
    full_dir, resumed_dir = work / f"{name}-full", work / f"{name}-resumed"
    full = run_trainer(common + ["--save", str(full_dir), "--log-json", str(work / f"{name}-full.jsonl")], cuda)
    rewind(full_dir, resumed_dir, half)
    resumed = run_trainer(common + ["--load", str(resumed_dir), "--save", str(resumed_dir),
                                    "--log-json", str(work / f"{name}-resumed.jsonl")], cuda)
    lf, lr_ = losses(work / f"{name}-full.jsonl"), losses(work / f"{name}-resumed.jsonl")
    curve = [lf[i]["loss"] for i in sorted(lf)]
    after = sorted(i for i in lr_ if i > half)
    diffs = [abs(lr_[i]["loss"] - lf[i]["loss"]) / max(abs(lf[i]["loss"]), 1e-12) for i in after]
    tps = [lf[i]["tokens_per_s"] for i in sorted(lf) if i > 1] or [lf[i]["tokens_per_s"] for i in lf]
    checks = {
        "finite": all(math.isfinite(x) for x in curve + [lr_[i]["loss"] for i in after]),
        "falling": len(curve) >= 3 and statistics.fmean(curve[-2:]) < curve[0],
        "resumed_from_half": resumed["result"].get("start") == half and after == list(range(half + 1, n + 1)),
        "resume_matches": bool(diffs) and (max(diffs) == 0.0 if dry else max(diffs) <= rtol),
    }
    out = {"method": name, "losses": curve, "resumed_losses": [lr_[i]["loss"] for i in after],
           "resume_max_rel_diff": max(diffs) if diffs else None, "tokens_per_s": statistics.median(tps),
           "wall_s": {"full": full["wall_s"], "resumed": resumed["wall_s"]},
           "peak_mem_mb": {"full": full["peak_mem_mb"], "resumed": resumed["peak_mem_mb"]},
           "checks": checks, "ok": all(checks.values())}
    print(f"[{name}] losses {' '.join(f'{x:.4f}' for x in curve)} | resumed "
          f"{' '.join(f'{x:.4f}' for x in out['resumed_losses'])} (max rel diff {out['resume_max_rel_diff']:.2e}) | "
          f"{out['tokens_per_s']:,.0f} tokens/s | peak mem {_mb(full['peak_mem_mb'])} MB | "
          f"wall {full['wall_s']:.1f}+{resumed['wall_s']:.1f} s | checks {checks}", flush=True)
    return out


def _mb(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def markdown(report: dict) -> str:
    lines = [f"{report['device']}, {report['precision']}; model {report['model']}; "
             f"{report['tokens_per_step']} tokens per step", "",
             "| method | losses (uninterrupted) | resumed at N/2 | max rel diff | tokens/s | peak mem MB | "
             "wall s | checks |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in report["methods"]:
        failed = [k for k, v in r["checks"].items() if not v]
        lines.append(f"| {r['method']} | {' '.join(f'{x:.3f}' for x in r['losses'])} | "
                     f"{' '.join(f'{x:.3f}' for x in r['resumed_losses'])} | {r['resume_max_rel_diff']:.1e} | "
                     f"{r['tokens_per_s']:,.0f} | {_mb(r['peak_mem_mb']['full'])} | "
                     f"{r['wall_s']['full']:.1f} + {r['wall_s']['resumed']:.1f} | "
                     f"{'ok' if r['ok'] else 'FAILED: ' + ', '.join(failed)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prepare", type=Path, help="write the material folder here and exit")
    p.add_argument("--material", type=Path, default=REPO / ".gpu")
    p.add_argument("--work", type=Path, required=False)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--methods", default="hd-pissa,lora")
    p.add_argument("--resume-rtol", type=float, default=2e-2,
                   help="GPU: the resumed losses' largest relative difference from the uninterrupted run")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--markdown-out", type=Path)
    args = p.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return 0
    import torch

    if not (args.material / "train.jsonl").is_file() or not (args.material / "tokenizer").is_dir():
        if not args.dry_run:
            print(f"ERROR: no material in {args.material}: run `python benchmarks/gpu_trainer_check.py "
                  f"--prepare .gpu` here and carry .gpu", flush=True)
            return 3
        prepare(args.material)
    cuda = torch.cuda.is_available() and not args.dry_run
    shape = DRY_SHAPE if args.dry_run else GPU_SHAPE
    work = args.work or Path(__import__("tempfile").mkdtemp(prefix="gpu_trainer_"))
    work.mkdir(parents=True, exist_ok=True)
    base = build_base(args.material, work, shape)
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "precision": "bf16, sharded-fp32 masters (hd-pissa)",
              "model": f"LLaMA h{shape['hidden_size']} ffn{shape['intermediate_size']} "
                       f"L{shape['num_hidden_layers']} heads {shape['num_attention_heads']}/"
                       f"{shape['num_key_value_heads']} vocab 49152, random init",
              "tokens_per_step": shape["global_batch"] * shape["seq"], "methods": []}
    for name in args.methods.split(","):
        report["methods"].append(check_method(name, base, args.material, work, shape, args.dry_run, cuda,
                                              args.resume_rtol))
    report["ok"] = all(r["ok"] for r in report["methods"])
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    if args.markdown_out:
        args.markdown_out.write_text(markdown(report))
    print(markdown(report))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
