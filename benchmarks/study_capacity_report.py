"""The capacity study's numbers (`analyse`, from the raw record only), its report capacity.md,
capacity_results.json and plots. Nothing here invents a number: every cell comes from `study`."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks import study_capacity_plan as plan
from benchmarks import study_metrics as sm

READING = Path(__file__).resolve().parent / "study" / "capacity_reading.md"  # the human reading
RANK_BOUND = {"hd-pissa": "2Kr", "pissa": "2r", "lora": "r", "full": "min(m, n)"}


def _final(rec: dict, steps: int) -> dict | None:
    """The worker's record at the last step, or None (diverged / unfinished)."""
    last = rec["recall"][-1] if rec.get("recall") else None
    return last if last and last["step"] == steps and not rec["diverged"] else None


def _ev(rec: dict, key: str):
    return ((rec.get("eval") or {}).get(key) or {}).get("mean")


def run_summary(rec: dict, study: dict) -> dict:
    """One reported run: final recall on the reported facts (Wilson 95%), its curve, Botchan,
    and how the live-model recall agrees with the merged export's (transformers) recall."""
    rep, steps = study["report"], study["args"]["steps"]
    last, base = _final(rec, steps), study["base"]["facts"]["flags"]
    out = {"lr": rec["lr"], "seed": rec["seed"], "k": rec.get("k"), "diverged": rec["diverged"],
           "wall_s": rec["wall_s"], "botchan": _ev(rec, "botchan"),
           "curve": plan.curve(rec.get("recall", []), rep, plan.recall(base, rep))}
    out["recall"] = sm.proportion([last["flags"][i] for i in rep]) if last else None
    hf = (rec.get("eval") or {}).get("facts")
    if last and hf:
        out["export_agreement"] = sum(x == y for x, y in zip(last["flags"], hf["flags"])) / len(hf["flags"])
    loss = (rec.get("eval") or {}).get("facts_loss")
    if last and loss:  # the live model's answer-token losses against the merged export's
        out["export_loss_gap"] = max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(last["loss_sums"], loss["sums"]))
    return out


def analyse(study: dict) -> dict:
    a, rep = study["args"], study["report"]
    methods, steps = list(study["sweeps"]), a["steps"]
    er = study.get("effective_rank") or {}
    ranks = er.get("checkpoints", {})
    out = {"methods": methods, "num_selection": len(study["selection"]), "num_report": len(rep),
           "base": {"recall": sm.proportion([study["base"]["facts"]["flags"][i] for i in rep]),
                    "botchan": study["base"]["botchan"]["mean"]}}
    per = {}
    for m in methods:
        sw = study["sweeps"][m]
        rows = []
        for lr in sorted(sw["runs"], key=float):
            rec, score = sw["runs"][lr], sw["scores"].get(lr)
            last = _final(rec, steps)
            rows.append({"lr": float(lr), "score": score, "diverged": rec["diverged"], "wall_s": rec["wall_s"],
                         "selection_recall": plan.recall(last["flags"], study["selection"]) if last else None,
                         "chosen": float(lr) == float(sw["best"])})
        runs = [run_summary(sw["runs"][sw["best"]], study), run_summary(study["seconds"][m], study)]
        rates = [r["recall"]["rate"] for r in runs if r["recall"]]
        per[m] = {"lr": float(sw["best"]), "at_edge": sw["at_edge"], "flags": sw["flags"], "sweep": rows,
                  "runs": runs, "recall_mean": statistics.fmean(rates) if rates else None,
                  "rank": (ranks.get(m) or {}).get("aggregate"),
                  "rank_ratio_to_lora": er.get("ratio_to_reference", {}).get(m, {}).get("ratio_of_means")}
    out["per_method"] = per
    out["comparisons"] = compare(study, methods)
    out["k_sweep"] = {str(k): {**run_summary(rec, study),
                               "rank": (ranks.get("hd-pissa" if int(k) == a["k"] else f"hd-pissa K={k}")
                                        or {}).get("aggregate")}
                      for k, rec in sorted(study.get("k_runs", {}).items(), key=lambda x: int(x[0]))}
    out["flags"] = flags(out, study)
    out["budget"] = {"estimate_s": study["estimate"]["total_s"], "estimate_stages_s": study["estimate"]["stages"],
                     "actual_s": study["total_s"], "actual_stages_s": study["stage_s"]}
    return out


def compare(study: dict, methods: list[str], ref: str = "hd-pissa") -> dict:
    """Exact McNemar tests of HD-PiSSA against each method on the reported facts: per seed (the
    same seed of both), and pooled over the seeds (pairs = fact x seed)."""
    if ref not in methods:
        return {}
    steps, rep = study["args"]["steps"], study["report"]

    def flags(m):
        recs = [study["sweeps"][m]["runs"][study["sweeps"][m]["best"]], study["seconds"][m]]
        return [[last["flags"][i] for i in rep] if (last := _final(r, steps)) else None for r in recs]

    mine, out = flags(ref), {}
    for m in methods:
        if m == ref:
            continue
        theirs = flags(m)
        per_seed = [sm.mcnemar_exact(x, y) if x and y else None for x, y in zip(mine, theirs)]
        both = [(x, y) for x, y in zip(mine, theirs) if x and y]
        pooled = sm.mcnemar_exact(sum((x for x, _ in both), []), sum((y for _, y in both), [])) if both else None
        out[m] = {"per_seed": per_seed, "pooled": pooled}
    return out


def flags(a: dict, study: dict) -> list[str]:
    """Observations the reading must address (not conclusions)."""
    out, per, cal = [], a["per_method"], study.get("calibration") or {}
    for m, p in per.items():
        out += [f"{m}: {f}" for f in p["flags"]]
        for r in p["runs"]:
            if r["recall"] is None:
                out.append(f"{m}: the seed-{r['seed']} run at LR {r['lr']:g} diverged or did not finish")
            if r.get("export_agreement") is not None and r["export_agreement"] < 1:
                out.append(f"{m} seed {r['seed']}: live-model and export recall agree on only "
                           f"{r['export_agreement']:.1%} of the facts")
            if r.get("export_loss_gap") is not None and r["export_loss_gap"] > 1e-3:
                out.append(f"{m} seed {r['seed']}: live-model and export fact losses differ by up to "
                           f"{r['export_loss_gap']:.2%} (relative)")
    full = per.get("full", {}).get("recall_mean")
    target = study["args"]["target_recall"]
    if full is not None and full < target:
        out.append(f"full fine-tuning's mean recall {full:.1%} is below the calibration target {target:.0%}")
    if cal.get("lora_saturates"):
        out.append("calibration found LoRA saturating at this fact count")
    for m, c in a["comparisons"].items():
        p = c["pooled"]
        if p:
            out.append(f"recall hd-pissa vs {m} (both seeds pooled): {p['only_a']} facts only hd-pissa, "
                       f"{p['only_b']} only {m}, McNemar p = {p['p_value']:.3g}"
                       + (" - not distinguishable at 5%" if p["p_value"] >= 0.05 else ""))
    ks = [(int(k), v["recall"]["rate"]) for k, v in a["k_sweep"].items() if v["recall"]]
    if len(ks) > 1:
        rising = all(y2 >= y1 for (_, y1), (_, y2) in zip(ks, ks[1:]))
        out.append("HD-PiSSA recall by K: " + ", ".join(f"K={k} {100 * r:.1f}%" for k, r in ks)
                   + (" (non-decreasing in K)" if rising else " (NOT monotonic in K)"))
    return out


def _p(p: dict | None) -> str:
    if p is None:
        return "-"
    lo, hi = p["ci95"]
    return f"{p['k']}/{p['n']} = {100 * p['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _f(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(study: dict) -> str:
    a, args, cal = study["analysis"], study["args"], study.get("calibration")
    per, s1, s2 = a["per_method"], *args["seeds"]
    L = ["# Capacity: invented facts memorised against steps, HD-PiSSA vs PiSSA, LoRA and full fine-tuning", "",
         "## Honest reading", "",
         *(READING.read_text().strip().splitlines() if READING.is_file() else [
             "_To be written in `benchmarks/study/capacity_reading.md` by whoever ran the study, from the numbers "
             "below._"]),
         "", "Automatic flags (observations, not conclusions):", "", *[f"- {f}" for f in a["flags"]], "",
         "## Setup", "",
         f"- SmolLM2-135M-Instruct, {study['layers']} layers, fp32; r = {args['rank']} per rank; K = {args['k']}: "
         f"HD-PiSSA {args['nproc']} processes x {args['k'] // args['nproc']} virtual ranks, the baselines "
         f"{args['nproc']} data-parallel processes; every method {args['facts_per_step']} facts per step.",
         f"- {args['num_facts']} invented facts (\"The locker number of <name> is\" -> 3 digits, seed "
         f"{args['facts_seed']}), {args['steps']} steps ({args['steps'] * args['facts_per_step'] / args['num_facts']:.1f} "
         f"epochs), {args['warmup']} warm-up steps then cosine decay. "
         + (f"Chosen by calibration: {cal['why_facts']}; steps: {cal['why_steps']}." if cal else
            "Facts and steps given on the command line (no calibration)."),
         f"- Recall: teacher-forced exact recall (every answer token and the EOS is the argmax) on the live "
         f"model every {max(1, args['steps'] // args['recall_points'])} steps. The LR is chosen on "
         f"{a['num_selection']} selection facts (every {args['selection_every']}-th: recall, ties by loss); "
         f"every reported number is on the other {a['num_report']} facts. Wilson 95% intervals; exact McNemar "
         f"tests on the same facts. Seeds {s1} (sweep) and {s2}.",
         f"- Forgetting: loss on {args['botchan_windows']} x {args['botchan_length']} tokens of Botchan.", "",
         "## Final recall at each method's chosen LR", "",
         f"| method | LR | recall seed {s1} | recall seed {s2} | mean | Botchan {s1} / {s2} | effective rank | bound |",
         "|---|---|---|---|---|---|---|---|",
         f"| base | - | {_p(a['base']['recall'])} | | | {_f(a['base']['botchan'])} | - | - |"]
    for m, p in per.items():
        r1, r2 = p["runs"]
        L.append(f"| {m} | {p['lr']:g}{' (edge)' if p['at_edge'] else ''} | {_p(r1['recall'])} | {_p(r2['recall'])} "
                 f"| {_pct(p['recall_mean'])} | {_f(r1['botchan'])} / "
                 f"{_f(r2['botchan'])} | {_f((p['rank'] or {}).get('mean'), '.1f')} | {RANK_BOUND[m]} |")
    L += ["", "Paired with HD-PiSSA (only hd-pissa / only other, exact McNemar p):", "",
          f"| vs | seed {s1} | seed {s2} | pooled |", "|---|---|---|---|"]
    for m, c in a["comparisons"].items():
        cells = [f"{x['only_a']} / {x['only_b']}, p = {x['p_value']:.3g}" if x else "-"
                 for x in (*c["per_seed"], c["pooled"])]
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L += ["", "![recall against steps](capacity_curves.png)", "", "## K sweep (HD-PiSSA, its chosen LR, seed "
          f"{s1})", "", "| K | recall | Botchan | effective rank (bound 2Kr) |", "|---|---|---|---|"]
    for k, v in a["k_sweep"].items():
        L.append(f"| {k} | {_p(v['recall'])} | {_f(v['botchan'])} | {_f((v['rank'] or {}).get('mean'), '.1f')} "
                 f"({2 * int(k) * args['rank']}) |")
    L += ["", "![recall against K](capacity_k.png)", "", "## Learning vs forgetting", "",
          "![recall vs forgetting](capacity_forgetting.png)", "", "## Every learning rate (seed "
          f"{s1}; chosen in bold)", "", "| method | LR | selection score | selection recall | run wall (s) |",
          "|---|---|---|---|---|"]
    for m, p in per.items():
        for r in p["sweep"]:
            b = "**" if r["chosen"] else ""
            L.append(f"| {m} | {b}{r['lr']:g}{b} | {'diverged' if r['diverged'] else _f(r['score'])} | "
                     f"{_pct(r['selection_recall'])} | {r['wall_s']:.0f} |")
    bud, ref = a["budget"], "hd-pissa" if "hd-pissa" in study["sweeps"] else a["methods"][0]
    L += ["", "## Compute", "", f"Estimated {bud['estimate_s'] / 60:.1f} min ({study['estimate']['costs']}); "
          f"actual {bud['actual_s'] / 60:.1f} min; load average {' '.join(f'{x:.1f}' for x in study['load_before'])} "
          f"before, {' '.join(f'{x:.1f}' for x in study['load_after'])} after; {study['runs']} fine-tunes "
          f"({study['runs_reused']} reused from an earlier invocation).", "", "| stage | estimated min | measured min |",
          "|---|---|---|"]
    for k, v in bud["estimate_stages_s"].items():
        L.append(f"| {k} | {v / 60:.1f} | |")
    L += [f"| {k} | | {v / 60:.1f} |" for k, v in bud["actual_stages_s"].items()]
    L += ["", f"Machine: {', '.join(f'{k} {v}' for k, v in study['machine'].items())}.", "", "## Commands", "",
          "```", study["command"], "```", "", "Each fine-tune's command is in `capacity.json` "
          f"(`sweeps.<method>.runs.<lr>.command`); the chosen {ref} run:", "", "```",
          study["sweeps"][ref]["runs"][study["sweeps"][ref]["best"]]["command"], "```", ""]
    return "\n".join(L)


def compact(study: dict) -> dict:
    return {"args": study["args"], "machine": study["machine"], "calibration": study.get("calibration"),
            "analysis": study["analysis"]}


def from_json(study: dict) -> dict:
    """A study read back from capacity.json: the learning-rate and K keys JSON made strings are
    numbers again (for `--report-only`, which rewrites the report, e.g. after the reading)."""
    for sw in study["sweeps"].values():
        sw["runs"] = {float(lr): rec for lr, rec in sw["runs"].items()}
        sw["scores"] = {float(lr): v for lr, v in sw["scores"].items()}
    study["k_runs"] = {int(k): rec for k, rec in study.get("k_runs", {}).items()}
    return study


def write_all(study: dict, out: Path) -> None:
    from benchmarks.study_capacity_plots import plot_all

    out = Path(out)
    study["analysis"] = analyse(study)
    (out / "capacity.json").write_text(json.dumps(study, default=str) + "\n")
    (out / "capacity_results.json").write_text(json.dumps(compact(study), indent=1, default=str) + "\n")
    plot_all(study["analysis"], out)
    (out / "capacity.md").write_text(markdown(study))
