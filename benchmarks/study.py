"""study: HD-PiSSA against data-parallel PiSSA and LoRA (optionally full fine-tuning) on real
SmolLM2-135M-Instruct and GSM8K, at the same per-rank rank r, K ranks, data order, steps and
optimizer settings. Measures held-out loss (the trainer's), exact-match accuracy on held-out
problems (greedy decoding in transformers on each run's merged export), and the effective rank
of W_T - W_0 per projection (megatron_hdpissa.analysis); writes a markdown table and plots.

    .venv/bin/python benchmarks/study.py                        # CPU: first 4 layers, K=8 virtual ranks
    .venv/bin/python benchmarks/study.py --full-model --nproc 8 --seq-length 512 \
        --train-iters 200 --num-heldout-accuracy 319              # GPU box: 8 real ranks, all 30 layers

K ranks: HD-PiSSA runs `--nproc` processes x `K / nproc` virtual ranks (`--hd-pissa-virtual-ranks`,
mathematically identical to K processes); a baseline runs `--nproc` data-parallel processes with
the same global batch, which is the same computation as K data-parallel ranks (gradients are
averaged over the global batch either way). With micro-batch 1 and global batch K every method
sees the same K training rows per step, in the same order.

Why a few steps suffice for the rank: with factors reset every step, HD-PiSSA's accumulated update
is sum_k [-(sum_t dB_k^t) A_k - B_k (sum_t dA_k^t)] + sum_{k,t} dB_k^t dA_k^t. The first-order part
has rank <= 2Kr from the first step on (columns in span(B_k) + span(sum dB_k), rows in
rowspan(A_k) + rowspan(sum dA_k), orthogonal across k); the second-order terms are O(lr^2) and
far below a 1e-3 relative threshold. LoRA's update s B_T A_T has rank <= r, PiSSA's
s (B_T A_T - B_0 A_0) rank <= 2r. So at K=8 the expected ratio to LoRA is 2Kr / r = 16 once every
direction has moved, which with Adam (per-coordinate steps) is after the first step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("hd-pissa", "pissa", "lora", "full")
RANK_BOUND = {"hd-pissa": "2Kr", "pissa": "2r", "lora": "r", "full": "min(m, n)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: <cache>/study)")
    p.add_argument("--publish", default=None,
                   help="also copy study.md and the PNGs here (e.g. benchmarks/study)")
    m = p.add_argument_group("model and methods")
    m.add_argument("--layers", type=int, default=4, help="keep the first N decoder layers (CPU)")
    m.add_argument("--full-model", action="store_true", help="all 30 layers (GPU)")
    m.add_argument("--methods", default="hd-pissa,pissa,lora", help=f"comma list from {METHODS}")
    m.add_argument("--rank", type=int, default=8, help="per-rank adapter rank r (every method)")
    m.add_argument("--alpha", type=float, default=None, help="s = alpha / r (default alpha = r)")
    m.add_argument("--k", type=int, default=8, help="K: HD-PiSSA slices = data-parallel ranks emulated")
    m.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1); divides K")
    m.add_argument("--threads", type=int, default=None, help="OMP threads per process (default cores/nproc)")
    t = p.add_argument_group("training (identical for every method)")
    t.add_argument("--train-iters", type=int, default=20)
    t.add_argument("--micro-batch-size", type=int, default=1)
    t.add_argument("--global-batch-size", type=int, default=None, help="default: K x micro-batch")
    t.add_argument("--seq-length", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--lr-warmup-iters", type=int, default=2)
    t.add_argument("--lr-decay-style", default="cosine")
    t.add_argument("--seed", type=int, default=1234)
    e = p.add_argument_group("evaluation")
    e.add_argument("--num-heldout-loss", type=int, default=32, help="held-out problems for the loss")
    e.add_argument("--eval-interval", type=int, default=10)
    e.add_argument("--num-heldout-accuracy", type=int, default=20, help="held-out problems decoded")
    e.add_argument("--max-new-tokens", type=int, default=192)
    e.add_argument("--generation-batch-size", type=int, default=8)
    e.add_argument("--threshold", type=float, default=1e-3, help="effective-rank threshold (relative)")
    e.add_argument("--no-base-accuracy", action="store_true", help="skip decoding with the base model")
    p.add_argument("--reuse", action="store_true", help="keep runs that already finished in --out")
    args = p.parse_args(argv)
    args.methods = [x for x in args.methods.split(",") if x]
    bad = [x for x in args.methods if x not in METHODS]
    if bad or not args.methods:
        p.error(f"--methods {bad or args.methods}: choose from {METHODS}")
    if args.k % args.nproc:
        p.error(f"--nproc {args.nproc} must divide --k {args.k}")
    args.global_batch_size = args.global_batch_size or args.k * args.micro_batch_size
    if args.global_batch_size % (args.k * args.micro_batch_size):
        p.error("--global-batch-size must be a multiple of K x --micro-batch-size")
    return args


# ---- material ------------------------------------------------------------------------------------
def prepare(args, out: Path) -> dict:
    """The (truncated) HF model, its Megatron conversion, the fixed GSM8K split."""
    from megatron_hdpissa.conversion import TRACKER_FILE, convert_hf_to_megatron
    from megatron_hdpissa.data import split_gsm8k, write_jsonl
    from megatron_hdpissa.material import gsm8k_test_path, smollm2_hf_dir

    hf_dir = smollm2_hf_dir(num_layers=None if args.full_model else args.layers)
    base = out / f"base-{hf_dir.name}"
    if not (base / TRACKER_FILE).is_file():
        convert_hf_to_megatron(hf_dir, base, tp_size=1, force=True, progress=False)
    train, heldout = split_gsm8k(str(gsm8k_test_path()), num_heldout=319, seed=0)
    if max(args.num_heldout_loss, args.num_heldout_accuracy) > len(heldout):
        raise ValueError(f"only {len(heldout)} held-out problems")
    write_jsonl(train, str(out / "train.jsonl"))
    write_jsonl(heldout[:args.num_heldout_loss], str(out / "heldout.jsonl"))
    return {"hf": hf_dir, "base": base, "train": out / "train.jsonl", "heldout": out / "heldout.jsonl",
            "num_train": len(train), "accuracy_problems": heldout[:args.num_heldout_accuracy]}


# ---- one fine-tune -------------------------------------------------------------------------------
def finetune_command(args, method: str, mat: dict, run: Path) -> list[str]:
    from megatron_hdpissa.distributed import free_port

    launch = [sys.executable, "-m", "megatron_hdpissa.finetune"]
    if args.nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                  "--master-port", str(free_port()), "-m", "megatron_hdpissa.finetune"]
    cmd = launch + [
        "--pretrained-checkpoint", str(mat["base"]), "--data-path", str(mat["train"]),
        "--valid-data-path", str(mat["heldout"]), "--prompt-template", "alpaca",
        "--peft", method, "--hd-pissa-rank", str(args.rank),
        "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
        "--seq-length", str(args.seq_length), "--train-iters", str(args.train_iters),
        "--lr", str(args.lr), "--lr-warmup-iters", str(args.lr_warmup_iters),
        "--lr-decay-style", args.lr_decay_style, "--seed", str(args.seed),
        "--eval-interval", str(args.eval_interval), "--log-json", str(run / "log.jsonl"),
        "--save", str(run / "ckpt"), "--export-hf", str(run / "hf"), "--no-progress",
    ]
    if args.alpha is not None:
        cmd += ["--hd-pissa-alpha", str(args.alpha)]
    if method == "hd-pissa":
        cmd += ["--hd-pissa-virtual-ranks", str(args.k // args.nproc)]
    return cmd


_HELDOUT = re.compile(r"held-out loss at iteration (\d+): ([0-9.]+|nan|inf)")
_TRAINABLE = re.compile(r"([0-9.]+)M trainable parameters per rank")


def run_method(args, method: str, mat: dict, out: Path, log) -> dict:
    run = out / "runs" / method
    done = run / "done.json"
    if args.reuse and done.is_file():
        log(f"[{method}] reusing the finished run in {run}")
        return json.loads(done.read_text())
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cmd = finetune_command(args, method, mat, run)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log(f"[{method}] {shlex.join(cmd)}")
    t0 = time.time()
    with open(run / "stdout.log", "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    text = (run / "stdout.log").read_text()
    if proc.returncode:
        raise RuntimeError(f"[{method}] the fine-tune failed (exit {proc.returncode}); see {run / 'stdout.log'}:\n"
                           + "\n".join(text.splitlines()[-20:]))
    from megatron_hdpissa.analysis import read_log_json

    curves = read_log_json(run / "log.jsonl")
    # The trainer prints (but does not --log-json) the held-out loss before and after training.
    heldout = {int(i): float(v) for i, v in _HELDOUT.findall(text)}
    curves["valid"] = sorted({**dict(curves["valid"]), **heldout}.items())
    trainable = _TRAINABLE.search(text)
    last = [loss for _, loss in curves["train"][-5:]]
    result = {
        "method": method, "command": shlex.join(cmd), "wall_s": wall,
        "s_per_step": _median_step_seconds(curves, args), "trainable_M": float(trainable.group(1)) if trainable else None,
        "heldout_before": heldout.get(0), "heldout_after": heldout.get(args.train_iters),
        "train_loss_last5": sum(last) / len(last) if last else None, "curves": curves,
        "hf": str(run / "hf"), "checkpoint": str(run / "ckpt"),
    }
    done.write_text(json.dumps(result, indent=2) + "\n")
    log(f"[{method}] {wall:.0f}s; held-out loss {result['heldout_before']} -> {result['heldout_after']}")
    return result


def _median_step_seconds(curves: dict, args) -> float | None:
    tps = sorted(v for _, v in curves["tokens_per_s"][1:]) or sorted(v for _, v in curves["tokens_per_s"])
    if not tps:
        return None
    return args.global_batch_size * args.seq_length / tps[len(tps) // 2]


# ---- exact match on held-out problems --------------------------------------------------------------
def gsm8k_accuracy(hf_dir, problems: list[dict], max_new_tokens: int, log, label: str,
                   batch_size: int = 8) -> dict:
    """Greedy decoding in transformers with the training prompt (Alpaca template, the trainer's
    tokenisation of the prompt), `batch_size` prompts at a time (left-padded); a prediction
    counts when the number after its first `####` equals the reference's."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from megatron_hdpissa.data import SFTExample, extract_gsm8k_answer, render
    from megatron_hdpissa.tokenizer import HuggingFaceTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = HuggingFaceTokenizer(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    prompts = []
    for item in problems:
        prompt, _ = render(SFTExample(item["question"], item["answer"]), "alpaca", tok)
        ids = tok.encode(prompt)
        prompts.append(([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + ids)
    texts = []
    t0 = time.time()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        x = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            y = model.generate(x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        for row in y[:, width:].tolist():
            if tok.eos_id in row:
                row = row[:row.index(tok.eos_id)]
            texts.append(tok.decode(row))
    correct, with_answer, samples = 0, 0, []
    for i, (item, text) in enumerate(zip(problems, texts)):
        pred, gold = extract_gsm8k_answer(text), extract_gsm8k_answer(item["answer"])
        correct += int(pred is not None and pred == gold)
        with_answer += int(pred is not None)
        if i < 2:
            samples.append({"question": item["question"], "generated": text, "predicted": pred, "reference": gold})
    log(f"[{label}] exact match {correct}/{len(problems)}, {with_answer} with a `####` answer "
        f"({time.time() - t0:.0f}s decoding)")
    return {"correct": correct, "total": len(problems), "accuracy": correct / max(1, len(problems)),
            "with_answer": with_answer, "samples": samples}


# ---- report --------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def _fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def write_markdown(study: dict, path: Path) -> None:
    a = study["args"]
    rank = study["effective_rank"]
    lines = [
        "# HD-PiSSA vs PiSSA vs LoRA: held-out loss, GSM8K exact match, effective rank",
        "",
        f"Model: SmolLM2-135M-Instruct (packaged Q4_1 GGUF dequantised to fp32), "
        f"{'all 30 layers' if a['full_model'] else 'first ' + str(a['layers']) + ' of 30 decoder layers'}. "
        f"Data: fixed split of the packaged GSM8K test file ({study['num_train']} train / 319 held-out, "
        f"seed 0); held-out loss on the first {a['num_heldout_loss']} held-out problems, exact match on the "
        f"first {a['num_heldout_accuracy']} (greedy, at most {a['max_new_tokens']} new tokens, answer after `####`).",
        "",
        f"Every method: r = {a['rank']} per rank, K = {a['k']} ranks ({a['nproc']} process(es); HD-PiSSA "
        f"{a['k'] // a['nproc']} virtual ranks per process), micro-batch {a['micro_batch_size']}, global batch "
        f"{a['global_batch_size']}, sequence length {a['seq_length']}, {a['train_iters']} steps, AdamW lr "
        f"{a['lr']:g} ({a['lr_warmup_iters']} warm-up steps, {a['lr_decay_style']} decay), seed {a['seed']}, fp32.",
        "",
        f"Effective rank = number of {rank['definition']}, per projection matrix (q, k, v, o, gate, up, "
        f"down of every layer), measured on the merged `--export-hf` output by `tools/effective_rank.py`.",
        "",
        "| method | trainable/rank (M) | held-out loss before -> after | train loss (last 5) | exact match "
        "| effective rank mean (min-max) | bound | x LoRA | mean ‖ΔW‖/‖W0‖ | run wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_acc = study.get("base_accuracy")
    first = next(iter(study["runs"].values()))
    lines.append(f"| base (no fine-tuning) | - | {_fmt(first['heldout_before'])} | - | "
                 + (f"{base_acc['correct']}/{base_acc['total']}" if base_acc else "-") + " | - | - | - | - | - |")
    bound_val = {"hd-pissa": 2 * a["k"] * a["rank"], "pissa": 2 * a["rank"], "lora": a["rank"]}
    for method, r in study["runs"].items():
        c = rank["checkpoints"][method]["aggregate"]
        change = rank["checkpoints"][method].get("relative_change", {}).get("mean")
        ratio = rank.get("ratio_to_reference", {}).get(method, {}).get("ratio_of_means")
        acc = r["accuracy"]
        bound = RANK_BOUND[method] + (f" = {bound_val[method]}" if method in bound_val else "")
        lines.append(
            f"| {method} | {_fmt(r['trainable_M'], '.3f')} | {_fmt(r['heldout_before'])} -> "
            f"{_fmt(r['heldout_after'])} | {_fmt(r['train_loss_last5'])} | {acc['correct']}/{acc['total']} | "
            f"{c['mean']:.1f} ({c['min']}-{c['max']}) | {bound} | {_fmt(ratio, '.2f')} | {_fmt(change, '.2e')} | "
            f"{r['wall_s']:.0f} |")
    lines += ["", "Effective rank per projection type (mean over layers):", "",
              study["rank_table"], "",
              "Distance of the counts from the threshold (sigma_i / sigma_max over all matrices): the counts "
              "are the same for any threshold between the two numbers.", "",
              "| method | smallest value counted | largest value not counted |", "|---|---|---|"]
    for method in study["runs"]:
        mg = rank["checkpoints"][method].get("threshold_margin", {})
        lines.append(f"| {method} | {_fmt(mg.get('min_smallest_counted'), '.2e')} | "
                     f"{_fmt(mg.get('max_largest_not_counted'), '.2e')} |")
    lines.append("")
    if "check" in study:
        lines += [study["check"], ""]
    lines += ["![learning curves](curves.png)", "", "![spectra](spectra.png)", "",
              f"Machine: {', '.join(f'{k} {v}' for k, v in study['machine'].items())}. Run wall times (set-up, "
              f"training, held-out evaluations, save, export) are not a speed benchmark: the cores were shared "
              f"with other jobs (load average {study['load_before']} before, {study['load_after']} after); "
              f"see benchmarks/bench_step.py for step times.", "",
              "Command:", "", "```", study["command"], "```", ""]
    if a["reuse"]:
        lines += ["With `--reuse` the finished runs in the output folder were kept (their fine-tune commands "
                  "are in `study.json`, `runs.<method>.command`) and this report was recomputed from them.", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> dict:
    args = parse_args(argv)
    from megatron_hdpissa import analysis
    from megatron_hdpissa.material import cache_dir

    out = Path(args.out) if args.out else cache_dir() / "study"
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    mat = prepare(args, out)
    log(f"model {mat['hf']}, base {mat['base']}, {mat['num_train']} training problems")

    runs = {}
    for method in args.methods:
        runs[method] = run_method(args, method, mat, out, log)
        acc_file = out / "runs" / method / "accuracy.json"
        if args.reuse and acc_file.is_file():
            runs[method]["accuracy"] = json.loads(acc_file.read_text())
        else:
            runs[method]["accuracy"] = gsm8k_accuracy(runs[method]["hf"], mat["accuracy_problems"],
                                                      args.max_new_tokens, log, method,
                                                      args.generation_batch_size)
            acc_file.write_text(json.dumps(runs[method]["accuracy"], indent=2) + "\n")
    base_acc = None
    if not args.no_base_accuracy:
        acc_file = out / "base_accuracy.json"
        if args.reuse and acc_file.is_file():
            base_acc = json.loads(acc_file.read_text())
        else:
            base_acc = gsm8k_accuracy(mat["hf"], mat["accuracy_problems"], args.max_new_tokens, log, "base",
                                      args.generation_batch_size)
            acc_file.write_text(json.dumps(base_acc, indent=2) + "\n")

    # Effective rank on the merged exports, then the same from the Megatron training checkpoints
    # (LoRA/PiSSA factors merged by the analysis) as a cross-check of the two input paths.
    reference = "lora" if "lora" in runs else None
    t0 = time.time()
    summary, results = analysis.analyse(mat["hf"], {m: r["hf"] for m, r in runs.items()}, args.threshold,
                                        reference=reference, log=log)
    log(f"effective rank of the exports in {time.time() - t0:.0f}s")
    analysis.write_json(summary, out / "effective_rank.json")
    model_desc = "SmolLM2-135M" + ("" if args.full_model else f", first {args.layers} layers")
    analysis.plot_spectra(results, args.threshold, out / "spectra.png",
                          f"{model_desc}: K={args.k}, r={args.rank}, {args.train_iters} steps")
    analysis.plot_learning_curves({m: r["curves"] for m, r in runs.items()}, out / "curves.png",
                                  f"{model_desc} on GSM8K: K={args.k}, r={args.rank}, lr {args.lr:g}")
    ckpt_summary, _ = analysis.analyse(mat["base"], {m: r["checkpoint"] for m, r in runs.items()},
                                       args.threshold, log=log)
    agree = all(
        [x["effective_rank"] for x in summary["checkpoints"][m]["matrices"]]
        == [x["effective_rank"] for x in ckpt_summary["checkpoints"][m]["matrices"]] for m in runs)
    check = (f"Cross-check: the effective ranks read from the Megatron `--save` checkpoints (base: the "
             f"converted Megatron base; LoRA/PiSSA factors merged by the analysis) "
             f"{'equal' if agree else 'DIFFER FROM'} those of the merged HF exports for every matrix.")
    log(check)

    study = {
        "args": vars(args), "command": shlex.join([".venv/bin/python", "benchmarks/study.py",
                                              *(sys.argv[1:] if argv is None else argv)]), "machine": machine(), "num_train": mat["num_train"],
        "load_before": load_before, "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "runs": runs, "base_accuracy": base_acc, "effective_rank": summary,
        "rank_table": analysis.format_table(summary), "check": check, "exports_match_checkpoints": agree,
        "total_s": time.time() - t_start,
    }
    if "hd-pissa" in runs and reference:
        ratio = summary["ratio_to_reference"]["hd-pissa"]["ratio_of_means"]
        study["hd_pissa_over_lora"] = ratio
        log(f"effective rank HD-PiSSA / LoRA = {ratio:.2f} (K={args.k}, r={args.rank}; the paper: 16x)")
    (out / "study.json").write_text(json.dumps(study, indent=2, default=str) + "\n")
    write_markdown(study, out / "study.md")
    log(f"wrote {out / 'study.md'}, study.json, curves.png, spectra.png, effective_rank.json "
        f"({time.time() - t_start:.0f}s in all)")
    if args.publish:
        dest = Path(args.publish)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("study.md", "curves.png", "spectra.png", "effective_rank.json"):
            shutil.copy2(out / name, dest / name)
        log(f"copied the report to {dest}")
    return study


if __name__ == "__main__":
    main()
