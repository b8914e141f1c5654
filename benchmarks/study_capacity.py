"""study-capacity: how many invented facts HD-PiSSA, PiSSA, LoRA and full fine-tuning memorise
against steps on the full 30-layer SmolLM2-135M (fp32, r = 8 per rank, K = 8: HD-PiSSA 2 processes
x 4 virtual ranks, the baselines 2 data-parallel processes on the same global batch).

    make study-capacity CAPACITY_ARGS=--calibrate       # 1. choose facts and steps (~20 min)
    make study-capacity CAPACITY_ARGS=--estimate-only   # 2. the plan and its estimate
    make study-capacity                                 # 3. the study (~75 min on 2 idle cores)
    make study-capacity CAPACITY_ARGS=--reuse           #    resume; finished runs are kept
    make study-capacity CAPACITY_ARGS=--report-only     # 4. after writing benchmarks/study/capacity_reading.md

Protocol. Calibration (`--calibrate`) trains full fine-tuning at its centre LR on a growing or
shrinking number of facts for the steps the budget allows, takes the largest count it recalls at
>= --target-recall, checks LoRA does not saturate there, measures the step costs, and writes
calibration.json / capacity_calibration.md. The study then sweeps each method's LR (3 values of the
half-decade grid, widened while the best is at an edge) at seed 1, choosing on the selection slice
(every --selection-every-th fact: recall, then loss) -- never on the reported facts; repeats the
chosen LR with seed 2; sweeps HD-PiSSA's K at its chosen LR with the same per-rank r and global
batch. Recall is teacher-forced exact recall of the answer tokens and EOS, measured on the live
model every steps / --recall-points steps (benchmarks/study_capacity_worker.py); Botchan loss
(forgetting) and the effective rank of W_T - W_0 on the merged exports. Report: capacity.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import study_capacity_plan as plan  # noqa: E402
from benchmarks.study_run import (  # noqa: E402
    Study, add_model_args, check_sweep_args, drop_export, evaluate, fine_tune, prepare, sweep_lrs,
)

METHODS = ("hd-pissa", "pissa", "lora", "full")
LR_CENTRES = {"hd-pissa": 3e-4, "pissa": 1e-3, "lora": 3e-3, "full": 3e-4}  # the GSM8K study's best LRs
WORKER = "benchmarks.study_capacity_worker"
PUBLISHED = ("capacity.md", "capacity_results.json", "capacity_curves.png", "capacity_k.png",
             "capacity_forgetting.png", "capacity_spectra.png", "capacity_calibration.json",
             "capacity_calibration.md")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="work folder (default: <cache>/study-capacity)")
    p.add_argument("--publish", default=None, help="also copy the report, results and PNGs here")
    p.add_argument("--reuse", action="store_true", help="keep finished runs and evaluations found in --out")
    p.add_argument("--keep-exports", action="store_true", help="keep every run's merged HF export")
    p.add_argument("--estimate-only", action="store_true", help="print the plan and its estimate and exit")
    p.add_argument("--calibrate", action="store_true", help="choose --num-facts and --steps, then exit")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite capacity.md and the plots from capacity.json in --out (e.g. after the reading)")
    p.add_argument("--budget-min", type=float, default=75.0, help="the study's budget on 2 idle cores")
    add_model_args(p, METHODS, [("--k-sweep", {"default": "1,2,4,8", "help": "HD-PiSSA's K values at its chosen LR"})])
    t = p.add_argument_group("facts and training")
    t.add_argument("--num-facts", type=int, default=None, help="default: calibration.json's choice")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps; default: calibration.json's")
    t.add_argument("--facts-seed", type=int, default=0)
    t.add_argument("--micro-batch", type=int, default=2, help="facts per micro-batch (K of them per step)")
    t.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps / 20), cosine after")
    t.add_argument("--seeds", default="1,2", help="the sweep's seed, then the repeat's")
    t.add_argument("--recall-points", type=int, default=5, help="recall evaluations per run")
    t.add_argument("--selection-every", type=int, default=4, help="every N-th fact chooses the LR")
    s = p.add_argument_group("learning-rate sweep")
    s.add_argument("--lr-centres", default=",".join(f"{k}={v:g}" for k, v in LR_CENTRES.items()))
    s.add_argument("--lrs", type=int, default=3, help="learning rates per method before widening")
    s.add_argument("--max-lrs", type=int, default=5, help="widen at most to this many per method")
    c = p.add_argument_group("calibration")
    c.add_argument("--calibrate-facts", default="64,128,256,512", help="fact counts calibration may try")
    c.add_argument("--target-recall", type=float, default=0.9, help="full fine-tuning's recall to reach")
    c.add_argument("--saturation", type=float, default=0.9, help="LoRA at or above this recall saturates")
    c.add_argument("--cost-steps", type=int, default=6, help="steps of the HD-PiSSA run timing its step")
    e = p.add_argument_group("evaluation")
    e.add_argument("--botchan-windows", type=int, default=16)
    e.add_argument("--botchan-length", type=int, default=256)
    e.add_argument("--threshold", type=float, default=1e-3, help="effective-rank threshold (relative)")
    a = p.parse_args(argv)
    a.methods = [x for x in a.methods.split(",") if x]
    if not a.methods or any(x not in METHODS for x in a.methods):
        p.error(f"--methods {a.methods}: choose from {METHODS}")
    a.k_sweep = sorted({int(x) for x in a.k_sweep.split(",") if x} | {a.k})
    for k in a.k_sweep:
        if k % min(a.nproc, k) or (a.k * a.micro_batch) % (k * a.micro_batch):
            p.error(f"--k-sweep {k}: K must divide --k {a.k} and min(--nproc, K) must divide K")
    check_sweep_args(p, a, METHODS, LR_CENTRES)
    if a.recall_points < 1 or not 0 < a.target_recall <= 1:
        p.error("need --recall-points >= 1 and 0 < --target-recall <= 1")
    a.calibrate_facts = sorted(int(x) for x in a.calibrate_facts.split(",") if x)
    a.facts_per_step = a.k * a.micro_batch
    a.rank_layer_count = a.layers or 30
    # the GSM8K material study_run.prepare also builds (unused here): kept minimal
    a.num_test, a.num_val, a.num_em, a.template, a.seq_length, a.eval_batch = 1, 1, 1, "alpaca", 256, 8
    return a


def fill_from_calibration(a, required: bool) -> dict | None:
    """--num-facts / --steps from calibration.json in --out unless given; its measured step costs."""
    from megatron_hdpissa.data.material import cache_dir

    path = (Path(a.out) if a.out else cache_dir() / "study-capacity") / "calibration.json"
    cal = json.loads(path.read_text()) if path.is_file() else None
    if cal and (a.num_facts is None or a.steps is None):
        ran = {"layers": cal.get("layers"), "facts_per_step": cal.get("facts_per_step")}
        if ran != {"layers": a.layers, "facts_per_step": a.facts_per_step}:
            raise SystemExit(f"{path} was calibrated with {ran}, this run has --layers {a.layers} and "
                             f"{a.facts_per_step} facts per step: run --calibrate again or give --num-facts and --steps")
        a.num_facts = a.num_facts or cal["num_facts"]
        a.steps = a.steps or cal["steps"]
    if a.num_facts is None or a.steps is None:
        if required:
            raise SystemExit(f"no {path}: run with --calibrate first, or give --num-facts and --steps")
        a.num_facts = a.num_facts or a.calibrate_facts[(len(a.calibrate_facts) - 1) // 2]
        a.steps = a.steps or plan.max_steps(a, 60 * a.budget_min)
    a.warmup = a.warmup if a.warmup is not None else max(1, a.steps // 20)
    return cal


def capacity_command(st: Study, method: str, lr: float, seed: int, run: Path, k: int, facts: Path,
                     steps: int, every: int, export: bool = True) -> list[str]:
    """The worker's command line: the trainer's flags plus --recall-every / --recall-out."""
    a = st.args
    nproc = min(a.nproc, k)
    cmd = ["--recall-every", str(every), "--recall-out", str(run / "recall.jsonl"),
           "--pretrained-checkpoint", str(st.base), "--data-path", str(facts), "--prompt-template", "{prompt}",
           "--seq-length", "32", "--micro-batch-size", str(a.micro_batch), "--global-batch-size",
           str(a.facts_per_step), "--train-iters", str(steps), "--lr-warmup-iters",
           str(min(a.warmup, steps - 1)), "--peft", method, "--hd-pissa-rank", str(a.rank), "--lr", f"{lr:g}",
           "--lr-decay-style", "cosine", "--seed", str(seed), "--log-interval", "1",
           "--log-json", str(run / "log.jsonl"), "--no-progress"]
    if export:
        cmd += ["--export-hf", str(run / "hf")]
    if a.alpha is not None:
        cmd += ["--hd-pissa-alpha", f"{a.alpha:g}"]
    if method == "hd-pissa":
        cmd += ["--hd-pissa-virtual-ranks", str(k // nproc)]
    return cmd


def train(st: Study, method: str, lr: float, seed: int, k: int | None = None, facts: Path | None = None,
          steps: int | None = None, every: int | None = None, export: bool = True, tag: str = "facts") -> dict:
    """One worker fine-tune (trained or reused): its record with the recall records."""
    a = st.args
    k, steps = k or a.k, steps or a.steps
    every = every or max(1, steps // a.recall_points)
    name = f"{tag}-{method}-lr{lr:g}-s{seed}" + (f"-k{k}" if k != a.k else "")
    rec = fine_tune(st, "facts", method, lr, seed, (), name=name, entry=WORKER, nproc=min(a.nproc, k),
                    command=lambda run: capacity_command(st, method, lr, seed, run, k, facts or st.files["facts"],
                                                         steps, every, export))
    path = st.out / "runs" / name / "recall.jsonl"
    rec["recall"] = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    rec["k"], rec["steps"] = k, steps
    return rec


def sweep(st: Study, method: str, sel: list[int]) -> dict:
    """Seed-1 runs on the grid around the centre, widened while the best is at an edge; scored on
    the selection slice at the last step."""
    a = st.args

    def score(rec):
        last = rec["recall"][-1] if rec["recall"] and not rec["diverged"] else None
        return plan.selection_score(last, sel) if last and last["step"] == a.steps else None

    return sweep_lrs(st, method, lambda lr: train(st, method, lr, a.seeds[0]), score, "selection score")


def effective_rank(st: Study, exports: dict) -> dict:
    import torch

    from megatron_hdpissa.analysis.effective_rank import analyse, write_json
    from megatron_hdpissa.analysis.plotting import plot_spectra

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    summary, results = analyse(st.hf, exports, st.args.threshold, reference="lora" if "lora" in exports else None)
    torch.set_num_threads(threads)
    write_json(summary, st.out / "effective_rank.json")
    plot_spectra(results, st.args.threshold, st.out / "capacity_spectra.png",
                 f"facts, {st.hf_layers} layers: r={st.args.rank}, chosen LR per method")
    return summary


def main(argv=None) -> dict:
    from benchmarks import study_capacity_calibrate, study_capacity_report
    from benchmarks.study import machine

    a = parse_args(argv)
    if a.calibrate:
        return study_capacity_calibrate.calibrate(a, argv, train, publish)
    if a.report_only:
        return report_only(a)
    cal = fill_from_calibration(a, required=not a.estimate_only)
    measured = (cal or {}).get("step_s")
    st = Study(a, plan.estimate(a, measured), folder="study-capacity")
    st.planned_runs = st.estimate["runs"]
    st.log(f"plan: {a.num_facts} facts, {a.steps} steps x {a.facts_per_step} facts "
           f"({a.steps * a.facts_per_step / a.num_facts:.1f} epochs), methods {a.methods}, K sweep {a.k_sweep}"
           f"{'' if cal else ' (NOT calibrated: defaults)'}; estimate:\n" + plan.format_estimate(st.estimate))
    if a.estimate_only:
        return {"estimate": st.estimate}
    st.out.mkdir(parents=True, exist_ok=True)
    load_before, t = os.getloadavg(), time.time()
    prepare(st)
    st.hf_layers = a.layers or 30
    sel, rep = plan.slices(a.num_facts, a.selection_every)
    base = evaluate(st, st.hf, st.out / "base_eval.json", ("facts", "botchan"), "base")
    t = st.phase("material and base evaluation", t)
    sweeps = {m: sweep(st, m, sel) for m in a.methods}
    t = st.phase("learning-rate sweeps", t)
    seconds = {m: train(st, m, sweeps[m]["best"], a.seeds[1]) for m in a.methods}
    t = st.phase("second seeds", t)
    k_runs = {}
    if "hd-pissa" in a.methods:
        k_runs = {k: train(st, "hd-pissa", sweeps["hd-pissa"]["best"], a.seeds[0], k=k)
                  for k in a.k_sweep if k != a.k}
        k_runs[a.k] = sweeps["hd-pissa"]["runs"][sweeps["hd-pissa"]["best"]]
    t = st.phase("K sweep", t)
    reported = [sweeps[m]["runs"][sweeps[m]["best"]] for m in a.methods] + list(seconds.values()) + [
        r for k, r in k_runs.items() if k != a.k]
    for rec in reported:
        if not rec["diverged"]:
            rec["eval"] = evaluate(st, Path(rec["hf"]), Path(rec["hf"]).parent / "eval.json", ("facts", "facts_loss", "botchan"),
                                   rec["name"])
    t = st.phase("evaluations of the reported exports", t)
    exports = {m: sweeps[m]["runs"][sweeps[m]["best"]]["hf"] for m in a.methods}
    exports.update({f"hd-pissa K={k}": r["hf"] for k, r in k_runs.items() if k != a.k})
    live, saved = {n: h for n, h in exports.items() if Path(h, "config.json").is_file()}, st.out / "effective_rank.json"
    if len(live) < len(exports) and saved.is_file():  # --reuse after the exports were dropped
        rank = json.loads(saved.read_text())
        st.log(f"effective rank: exports gone, reusing {saved}")
    else:
        rank = effective_rank(st, live) if live else {}
    for rec in reported:
        drop_export(st, rec)
    st.phase("effective rank", t)
    study = {"args": vars(a), "machine": machine(), "estimate": st.estimate, "calibration": cal,
             "stage_s": st.stage_s, "work_s": st.work_s, "runs": st.runs_done, "runs_reused": st.runs_reused,
             "total_s": time.time() - st.t0, "layers": st.hf_layers, "selection": sel, "report": rep,
             "load_before": list(load_before), "load_after": list(os.getloadavg()),
             "command": shlex.join([".venv/bin/python", "benchmarks/study_capacity.py",
                                    *(sys.argv[1:] if argv is None else argv)]),
             "base": base, "sweeps": sweeps, "seconds": seconds, "k_runs": k_runs, "effective_rank": rank}
    study_capacity_report.write_all(study, st.out)
    st.log(f"wrote {st.out / 'capacity.md'} ({(time.time() - st.t0) / 60:.1f} min in all)")
    if a.publish:
        publish(st.out, Path(a.publish))
    return study


def report_only(a) -> dict:
    from benchmarks import study_capacity_report
    from megatron_hdpissa.data.material import cache_dir

    out = Path(a.out) if a.out else cache_dir() / "study-capacity"
    if not (out / "capacity.json").is_file():
        raise SystemExit(f"--report-only: no {out / 'capacity.json'} (run the study first)")
    study = study_capacity_report.from_json(json.loads((out / "capacity.json").read_text()))
    study_capacity_report.write_all(study, out)
    if a.publish:
        publish(out, Path(a.publish))
    return study


def publish(out: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in PUBLISHED:
        if (out / name).is_file():
            shutil.copy2(out / name, dest / name)
    print(f"copied the capacity report to {dest}", flush=True)


if __name__ == "__main__":
    main()
