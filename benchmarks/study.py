"""study: HD-PiSSA against data-parallel PiSSA, LoRA and full fine-tuning on the full 30-layer
SmolLM2-135M-Instruct, every method at its own best learning rate. Measures GSM8K held-out loss
and greedy exact match (generalisation), exact recall of invented facts (capacity), loss on
English prose no method trains on (forgetting), the effective rank of W_T - W_0 and learning curves.

    make study                                              # about 75 minutes on 2 idle cores
    .venv/bin/python benchmarks/study.py --reuse            # resume; finished runs are kept
    .venv/bin/python benchmarks/study.py --estimate-only    # the compute plan, nothing run
    .venv/bin/python benchmarks/study.py --layers 2 --steps 2 --lrs 1 --num-test 4 ...  # a dry run

Protocol. Every method has r per rank and K = 8 ranks: HD-PiSSA runs --nproc processes x K/nproc
virtual ranks (mathematically K ranks), a baseline runs --nproc data-parallel processes on the
same global batch (K rows per step, the same rows in the same order for every method: their
first-step losses agree). GSM8K: the repository's fixed split of the packaged test file (1000
train / 319 held-out); the learning rate is chosen on a validation part of the held-out problems
and everything is reported on a disjoint test part. Per method: a sweep on the half-decade grid
(1, 3, 10, 30 x 10^e) around its own centre, widened by one value whenever the best is at an
edge (up to --max-lrs values), then the best LR repeated with a second seed (held-out curve from
the trainer). Capacity: each method memorises invented "name -> number" facts at its best GSM8K
LR for a fixed number of steps. Forgetting: loss on Botchan (Project Gutenberg), before and after.

Budget (benchmarks/study_budget.py; `--estimate-only` prints it): with the defaults about 74 minutes
on 2 idle cores -- 20 GSM8K fine-tunes of 10 steps (a GSM8K step is about 8 s for the adapters and
14 s for full fine-tuning on the 30-layer model), 4 fact runs, 200-problem test loss for 8 runs and
200-problem greedy decoding (160 new tokens) for the base and the 4 best runs. Each extra GSM8K
step costs about 3 minutes in all. Outputs: study.md, results.json (small), study.json (everything,
per-problem values and generations), PNGs, in --out; `--publish` copies the small ones.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import study_budget  # noqa: E402
from benchmarks.study_run import (  # noqa: E402
    Study, add_model_args, check_sweep_args, drop_export, evaluate, fine_tune, prepare, sweep_lrs,
)

METHODS = ("hd-pissa", "pissa", "lora", "full")
# Sweep centres on the half-decade grid. HD-PiSSA sums K Adam steps per step, so its best LR is
# expected below PiSSA's; LoRA starts from B = 0 and usually wants the largest.
LR_CENTRES = {"hd-pissa": 1e-4, "pissa": 3e-4, "lora": 1e-3, "full": 1e-4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="work folder (default: <cache>/study)")
    p.add_argument("--publish", default=None,
                   help="also copy study.md, results.json and the PNGs here (not study.json)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs and evaluations found in --out")
    p.add_argument("--keep-exports", action="store_true", help="keep every run's merged HF export (538 MB each)")
    p.add_argument("--estimate-only", action="store_true", help="print the compute estimate and exit")
    add_model_args(p, METHODS)
    t = p.add_argument_group("GSM8K training")
    t.add_argument("--steps", type=int, default=10, help="optimizer steps per GSM8K run")
    t.add_argument("--seq-length", type=int, default=256)
    t.add_argument("--template", default="alpaca", help="the trainer's --prompt-template for GSM8K")
    t.add_argument("--warmup", type=int, default=2, help="warm-up steps (cosine decay after)")
    t.add_argument("--seeds", default="1,2", help="the sweep's seed, then the repeat's")
    s = p.add_argument_group("learning-rate sweep")
    s.add_argument("--lr-centres", default=",".join(f"{k}={v:g}" for k, v in LR_CENTRES.items()),
                   help="method=lr, the middle of each sweep (snapped to the half-decade grid)")
    s.add_argument("--lrs", type=int, default=3, help="learning rates per method before widening")
    s.add_argument("--max-lrs", type=int, default=5, help="widen at most to this many per method")
    e = p.add_argument_group("evaluation")
    e.add_argument("--num-val", type=int, default=48, help="held-out problems choosing the LR")
    e.add_argument("--curve-problems", type=int, default=16,
                   help="validation problems the trainer evaluates for the held-out curves (seed-2 runs)")
    e.add_argument("--num-test", type=int, default=200, help="held-out problems for the reported loss")
    e.add_argument("--num-em", type=int, default=200, help="test problems decoded for exact match")
    e.add_argument("--max-new-tokens", type=int, default=160)
    e.add_argument("--gen-batch", type=int, default=40)
    e.add_argument("--eval-batch", type=int, default=8)
    e.add_argument("--botchan-windows", type=int, default=16, help="windows of Botchan for the prose loss")
    e.add_argument("--botchan-length", type=int, default=256, help="tokens per window")
    e.add_argument("--threshold", type=float, default=1e-3, help="effective-rank threshold (relative)")
    f = p.add_argument_group("capacity: invented facts")
    f.add_argument("--num-facts", type=int, default=400)
    f.add_argument("--facts-seed", type=int, default=0)
    f.add_argument("--facts-steps", type=int, default=10, help="optimizer steps (the fixed budget)")
    f.add_argument("--facts-micro-batch", type=int, default=16, help="facts per micro-batch")
    a = p.parse_args(argv)
    a.methods = [x for x in a.methods.split(",") if x]
    bad = [x for x in a.methods if x not in METHODS]
    if bad or not a.methods:
        p.error(f"--methods {bad or a.methods}: choose from {METHODS}")
    check_sweep_args(p, a, METHODS, LR_CENTRES)
    if a.num_em > a.num_test:
        p.error("--num-em must not exceed --num-test (exact match is decoded on test problems)")
    a.global_batch = a.k  # micro-batch 1 per slice: K rows per step
    a.facts_global_batch = a.k * a.facts_micro_batch
    a.rank_layer_count = a.layers or 30
    return a


def sweep(st: Study, method: str) -> dict:
    """GSM8K runs at the grid around the method's centre, widened while the best is at an edge."""
    a = st.args
    return sweep_lrs(st, method, lambda lr: fine_tune(st, "gsm8k", method, lr, a.seeds[0], ("val", "botchan")),
                     lambda rec: None if rec["diverged"] else rec["eval"]["val"]["mean"], "validation loss")


def effective_rank(st: Study, best_runs: dict) -> dict:
    import torch

    from megatron_hdpissa.analysis.effective_rank import analyse, write_json
    from megatron_hdpissa.analysis.plotting import plot_spectra

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small float64 factorisations: one thread is faster on a busy machine
    ref = "lora" if "lora" in best_runs else None
    summary, results = analyse(st.hf, {m: r["hf"] for m, r in best_runs.items()}, st.args.threshold,
                               reference=ref)
    torch.set_num_threads(threads)
    write_json(summary, st.out / "effective_rank.json")
    plot_spectra(results, st.args.threshold, st.out / "spectra.png",
                 f"SmolLM2-135M, {st.hf_layers} layers: K={st.args.k}, r={st.args.rank}, best LR per method")
    return summary


def machine() -> dict:
    """The study's machine record: cores, versions, CPU, GPU, and the commit that ran."""
    import torch

    from benchmarks.common.machine import cpu_name, megatron_core_version

    info = {"cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "megatron_core": megatron_core_version(), "cpu": cpu_name()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:  # --reuse keys runs on their commands, not on the code: record which code ran
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "megatron_hdpissa"], cwd=ROOT, capture_output=True,
                               text=True)
        info["commit"] = head.stdout.strip() + (" (trainer modified)" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return info


def main(argv=None) -> dict:
    from benchmarks import study_report
    from benchmarks.study_markdown import markdown
    from benchmarks.study_plots import plot_all

    args = parse_args(argv)
    st = Study(args)
    st.log("compute estimate (unit costs of the full model on 2 idle cores):\n"
           + study_budget.format_estimate(st.estimate))
    if args.estimate_only:
        return {"estimate": st.estimate}
    st.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t = time.time()
    prepare(st)
    st.hf_layers = args.layers or 30
    st.log(f"model {st.hf} ({st.hf_layers} layers), base {st.base}; GSM8K {st.num_train} train / "
           f"{len(st.val)} validation / {len(st.test)} test; {len(st.facts)} facts; Botchan "
           f"{len(st.botchan)} x {args.botchan_length} tokens")
    base = evaluate(st, st.hf, st.out / "base_eval.json", ("val", "botchan", "test", "facts", "em"), "base")
    t = st.phase("material and base model evaluations", t)
    st.log(f"base: validation {base['val']['mean']:.4f}, test {base['test']['mean']:.4f}, Botchan "
           f"{base['botchan']['mean']:.4f}, facts {base['facts']['k']}/{base['facts']['n']}, exact match "
           f"{base['em']['strict']['k']}/{base['em']['strict']['n']} (last number {base['em']['flexible']['k']})")

    sweeps = {m: sweep(st, m) for m in args.methods}
    best = {m: sweeps[m]["runs"][sweeps[m]["best"]] for m in args.methods}
    t = st.phase("learning-rate sweeps with widenings", t)
    seconds, facts = {}, {}
    for m in args.methods:
        seconds[m] = fine_tune(st, "gsm8k", m, sweeps[m]["best"], args.seeds[1], ("val", "botchan", "test"),
                               curves=True)
        drop_export(st, seconds[m])
    t = st.phase("second seeds (with held-out curves)", t)
    for m in args.methods:  # the best seed-1 runs: test loss and exact match
        best[m]["eval"] = evaluate(st, Path(best[m]["hf"]), Path(best[m]["hf"]).parent / "eval.json",
                                   ("val", "botchan", "test", "em"), best[m]["name"])
        em = best[m]["eval"]["em"]["strict"]
        repeat = seconds[m].get("eval", {}).get("test", {}).get("mean", float("nan"))
        st.log(f"[{m}] best LR {sweeps[m]['best']:g}: test loss {best[m]['eval']['test']['mean']:.4f} / "
               f"{repeat:.4f} (seeds {args.seeds}), exact match {em['k']}/{em['n']}")
    t = st.phase("test loss and exact match of the best runs", t)
    for m in args.methods:
        facts[m] = fine_tune(st, "facts", m, sweeps[m]["best"], args.seeds[0], ("facts", "botchan"))
        drop_export(st, facts[m])
    t = st.phase("facts (capacity) runs", t)
    rank = effective_rank(st, best)  # the best runs' exports stay, so --reuse can redo this
    st.phase("effective rank", t)

    study = {
        "args": {k: v for k, v in vars(args).items()}, "machine": machine(), "estimate": st.estimate,
        "stage_s": st.stage_s, "work_s": st.work_s, "runs": st.runs_done, "runs_reused": st.runs_reused,
        "total_s": time.time() - st.t0, "num_train": st.num_train,
        "num_val": len(st.val), "num_test": len(st.test), "val_truncated": st.val.num_truncated,
        "test_truncated": st.test.num_truncated, "facts_tokens": st.facts_tokens, "layers": st.hf_layers,
        "load_before": list(load_before), "load_after": list(os.getloadavg()),
        "command": shlex.join([".venv/bin/python", "benchmarks/study.py", *(sys.argv[1:] if argv is None else argv)]),
        "base": base, "sweeps": sweeps, "best": best, "seconds": seconds, "facts": facts,
        "effective_rank": rank,
    }
    study["analysis"] = study_report.analyse(study)
    (st.out / "study.json").write_text(json.dumps(study, default=str) + "\n")
    plot_all(study, st.out)
    study_report.write_results(study, st.out / "results.json")
    (st.out / "study.md").write_text(markdown(study))
    st.log(f"wrote {st.out / 'study.md'} and its PNGs ({(time.time() - st.t0) / 60:.1f} min in all)")
    if args.publish:
        dest = Path(args.publish)
        dest.mkdir(parents=True, exist_ok=True)
        for name in study_report.PUBLISHED:
            if (st.out / name).is_file():
                shutil.copy2(st.out / name, dest / name)
        st.log(f"copied the report to {dest}")
    return study



if __name__ == "__main__":
    main()
