"""The study's numbers in one dict (`analyse`), its plots (`plot_all`) and its report (`markdown`);
pure functions of the study record that benchmarks/study.py writes as study.json."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import study_metrics as sm

PUBLISHED = ("study.md", "results.json", "curves.png", "spectra.png", "forgetting.png", "lr_sweep.png")
RANK_BOUND = {"hd-pissa": "2Kr", "pissa": "2r", "lora": "r", "full": "min(m, n)"}


def _mean_last(curve: list, n: int = 3) -> float | None:
    vals = [v for _, v in curve[-n:]]
    return statistics.fmean(vals) if vals else None


def _ev(rec: dict, key: str, field: str = "mean"):
    ev = rec.get("eval") or {}
    return ev[key][field] if key in ev else None


def _subset_mean(rec: dict, n: int | None) -> float | None:
    """The study's validation loss of `rec` on its first `n` problems (what the trainer evaluates)."""
    v = (rec.get("eval") or {}).get("val")
    if not n or not v or "sums" not in v:
        return None
    return sm.token_mean(v["sums"][:n], v["counts"][:n])


def _prop(p: dict | None) -> dict | None:
    return None if p is None else {k: p[k] for k in ("k", "n", "rate", "ci95")}


def analyse(study: dict) -> dict:
    """Everything the report prints, computed from the raw record; no I/O."""
    methods = list(study["sweeps"])
    base = study["base"]
    out: dict = {"methods": methods, "base": {
        "val": base["val"]["mean"], "test": base["test"]["mean"], "botchan": base["botchan"]["mean"],
        "facts": _prop(base["facts"]), "em_strict": _prop(base["em"]["strict"]),
        "em_flexible": _prop(base["em"]["flexible"]), "em_formatted": _prop(base["em"]["formatted"])}}
    per, first_losses = {}, []
    for m in methods:
        sw, best, second, facts = study["sweeps"][m], study["best"][m], study["seconds"][m], study["facts"][m]
        rows = []
        for lr in sorted(sw["runs"], key=float):
            rec = sw["runs"][lr]
            rows.append({"lr": float(lr), "val": _ev(rec, "val"), "botchan": _ev(rec, "botchan"),
                         "train_last3": _mean_last(rec["train"]), "wall_s": rec["wall_s"],
                         "diverged": rec["diverged"], "best": float(lr) == float(sw["best"])})
            if rec["train"]:
                first_losses.append(rec["train"][0][1])
        tests = [t for t in (_ev(best, "test"), _ev(second, "test")) if t is not None]
        em = best["eval"]["em"]
        rank = study["effective_rank"]["checkpoints"].get(m, {})
        ratio = study["effective_rank"].get("ratio_to_reference", {}).get(m, {}).get("ratio_of_means")
        per[m] = {
            "best_lr": float(sw["best"]), "at_edge": sw["at_edge"], "flags": sw["flags"], "sweep": rows,
            "trainable_M": best["trainable_M"],
            "test": tests, "test_mean": statistics.fmean(tests) if tests else None,
            "test_half_range": (max(tests) - min(tests)) / 2 if len(tests) > 1 else None,
            "val": [_ev(best, "val"), _ev(second, "val")],
            "val_trainer_seed2": second["valid"][-1][1] if second.get("valid") else None,
            "val_study_seed2_subset": _subset_mean(second, study["args"].get("curve_problems")),
            "em_strict": _prop(em["strict"]), "em_flexible": _prop(em["flexible"]),
            "em_formatted": _prop(em["formatted"]), "em_hit_cap": em.get("hit_cap"),
            "botchan": [_ev(best, "botchan"), _ev(second, "botchan")],
            "botchan_delta": _ev(best, "botchan") - base["botchan"]["mean"],
            "facts": _prop(facts["eval"]["facts"]) if not facts["diverged"] else None,
            "facts_botchan": _ev(facts, "botchan"), "facts_diverged": facts["diverged"],
            "rank": rank.get("aggregate"),
            "rank_by_projection": {p: v["mean"] for p, v in rank.get("by_projection", {}).items()},
            "rank_ratio_to_lora": ratio, "relative_change": (rank.get("relative_change") or {}).get("mean"),
            "wall_s": best["wall_s"],
        }
    out["per_method"] = per
    out["first_step_loss_spread"] = (max(first_losses) - min(first_losses)) if first_losses else None
    out["comparisons"] = compare(study, methods)
    out["flags"] = reading_flags(out)
    out["budget"] = {"estimate_s": study["estimate"]["total_s"], "estimate_stages_s": study["estimate"]["stages"],
                     "actual_s": study["total_s"], "actual_stages_s": study["stage_s"]}
    return out


def compare(study: dict, methods: list[str], ref: str = "hd-pissa") -> dict:
    """HD-PiSSA against every other method on the same test problems and facts (paired)."""
    if ref not in methods:
        return {}
    out = {}
    a = study["best"][ref]["eval"]
    for m in methods:
        if m == ref:
            continue
        b = study["best"][m]["eval"]
        c = {"test_loss": sm.paired_bootstrap(a["test"]["sums"], b["test"]["sums"], a["test"]["counts"]),
             "em_strict": sm.mcnemar_exact(a["em"]["strict"]["flags"], b["em"]["strict"]["flags"]),
             "em_flexible": sm.mcnemar_exact(a["em"]["flexible"]["flags"], b["em"]["flexible"]["flags"])}
        fa, fb = study["facts"][ref].get("eval"), study["facts"][m].get("eval")
        if fa and fb:
            c["facts"] = sm.mcnemar_exact(fa["facts"]["flags"], fb["facts"]["flags"])
        out[m] = c
    return out


def reading_flags(a: dict) -> list[str]:
    """Automatic observations the honest reading must address (not conclusions)."""
    flags, per = [], a["per_method"]
    for m, p in per.items():
        flags += [f"{m}: {f}" for f in p["flags"]]
        if p["facts_diverged"]:
            flags.append(f"{m}: the facts run diverged at LR {p['best_lr']:g}")
        if p["em_hit_cap"]:
            flags.append(f"{m}: {p['em_hit_cap']} of {p['em_strict']['n']} decodings hit the new-token cap")
    for m, c in a["comparisons"].items():
        d = c["test_loss"]
        lo, hi = d["ci95"]
        spread = max((per[x]["test_half_range"] or 0) for x in ("hd-pissa", m))
        where = "within" if lo <= 0 <= hi else "outside"
        flags.append(f"test loss hd-pissa - {m} = {d['diff']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] (problems "
                     f"resampled): zero is {where} it; the seed half-range is {spread:.4f}"
                     + (" (the difference is smaller than the seed noise)" if abs(d["diff"]) < spread else ""))
        for key, label in (("em_strict", "exact match"), ("facts", "fact recall")):
            if key in c:
                pv = c[key]["p_value"]
                flags.append(f"{label} hd-pissa vs {m}: McNemar p = {pv:.3g} "
                             f"({c[key]['only_a']} only hd-pissa, {c[key]['only_b']} only {m})"
                             + (" - not distinguishable at 5%" if pv >= 0.05 else ""))
    by_rank = sorted((p["rank"]["mean"], m, p["facts"]) for m, p in per.items() if p["rank"] and p["facts"])
    if by_rank:
        flags.append("capacity, fact recall by effective rank of the GSM8K update: " + ", ".join(
            f"{m} (rank {r:.0f}) {100 * f['rate']:.1f}% [{100 * f['ci95'][0]:.1f}, {100 * f['ci95'][1]:.1f}]"
            for r, m, f in by_rank))
    if a["base"]["em_formatted"]["k"] == 0:
        flags.append("the base model never writes `####`, so its strict exact match is 0 by format; compare "
                     "the last-number column")
    ems = [p["em_strict"]["ci95"] for p in per.values()]
    if ems and all(sm.intervals_overlap(x, y) for x in ems for y in ems):
        flags.append("all methods' exact-match 95% intervals overlap")
    if a["first_step_loss_spread"] is not None and a["first_step_loss_spread"] > 1e-3:
        flags.append(f"first-step training losses differ by {a['first_step_loss_spread']:.4f}: the runs did "
                     "not see the same first batch")
    return flags


# ---- plots ---------------------------------------------------------------------------------------
def plot_all(study: dict, out: Path) -> None:
    from megatron_hdpissa.analysis.effective_rank import plot_learning_curves

    a = study["analysis"]
    curves = {f"{m} (lr {a['per_method'][m]['best_lr']:g}, seed {study['args']['seeds'][1]})":
              {"train": study["seconds"][m]["train"], "valid": study["seconds"][m]["valid"]} for m in a["methods"]}
    plot_learning_curves(curves, Path(out) / "curves.png",
                         "GSM8K at each method's best LR: training loss (each batch unseen before its step) "
                         "and validation loss (trainer)")
    plot_forgetting(a, Path(out) / "forgetting.png")
    plot_sweep(a, Path(out) / "lr_sweep.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_forgetting(a: dict, path: Path) -> Path:
    """Learning vs forgetting in the style of Biderman et al. (2024): one point per GSM8K run
    (every LR of every method), x = GSM8K validation loss, y = Botchan loss; both axes inverted so
    up and right are better; the base model is the star."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (m, p) in enumerate(a["per_method"].items()):
        pts = [(r["val"], r["botchan"], r["lr"], r["best"]) for r in p["sweep"] if r["val"] is not None]
        if not pts:
            continue
        xs, ys, lrs, best = zip(*pts)
        ax.plot(xs, ys, "-", color=colours[c % 10], lw=0.8, alpha=0.6)
        ax.scatter(xs, ys, color=colours[c % 10], s=[60 if b else 22 for b in best], label=m, zorder=3)
        for x, y, lr in zip(xs, ys, lrs):
            ax.annotate(f"{lr:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.scatter([a["base"]["val"]], [a["base"]["botchan"]], marker="*", s=120, color="k", label="base", zorder=4)
    ax.invert_xaxis()
    ax.invert_yaxis()
    ax.set_xlabel("GSM8K validation loss (learning; right = learnt more)", fontsize=8)
    ax.set_ylabel("Botchan loss (forgetting; up = forgot less)", fontsize=8)
    ax.set_title("learning vs forgetting, every learning rate (large: best)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_sweep(a: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_v, ax_b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for m, p in a["per_method"].items():
        rows = [r for r in p["sweep"] if r["val"] is not None]
        if rows:
            ax_v.semilogx([r["lr"] for r in rows], [r["val"] for r in rows], marker="o", ms=3, label=m)
            ax_b.semilogx([r["lr"] for r in rows], [r["botchan"] for r in rows], marker="o", ms=3, label=m)
    ax_v.axhline(a["base"]["val"], color="k", ls="--", lw=0.7, label="base")
    ax_b.axhline(a["base"]["botchan"], color="k", ls="--", lw=0.7, label="base")
    ax_v.set_title("GSM8K validation loss vs learning rate", fontsize=9)
    ax_b.set_title("Botchan loss vs learning rate", fontsize=9)
    for ax in (ax_v, ax_b):
        ax.set_xlabel("learning rate", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---- the report ----------------------------------------------------------------------------------
def _f(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def _p(p: dict | None) -> str:
    if p is None:
        return "-"
    lo, hi = p["ci95"]
    return f"{p['k']}/{p['n']} = {100 * p['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


READING = Path(__file__).resolve().parent / "study" / "reading.md"  # the human reading, kept across re-runs


def markdown(study: dict) -> str:
    a, args = study["analysis"], study["args"]
    per, base = a["per_method"], a["base"]
    s1, s2 = args["seeds"]
    mach = study["machine"]
    centres = ", ".join(f"{m} {args['lr_centres'][m]:g}" for m in a["methods"])
    L = [
        "# HD-PiSSA vs PiSSA, LoRA and full fine-tuning, each at its best learning rate",
        "",
        "## Honest reading",
        "",
        *(READING.read_text().strip().splitlines() if READING.is_file() else [
            "_To be written in `benchmarks/study/reading.md` by whoever ran the study, from the numbers below: "
            "where HD-PiSSA helps, where it does not, and what a 135M model at this budget cannot tell us._"]),
        "",
        "Automatic flags (observations the reading must address; not conclusions):",
        "",
        *[f"- {f}" for f in a["flags"]],
        "",
        "## Setup",
        "",
        f"- Model: SmolLM2-135M-Instruct (packaged Q4_1 GGUF dequantised to fp32), {study['layers']} decoder "
        "layers, tied embeddings; fp32 training and evaluation.",
        f"- Methods: {', '.join(a['methods'])}; r = {args['rank']} per rank, alpha = "
        f"{args['alpha'] if args['alpha'] is not None else 'r'}, adapters on q, k, v, o, gate, up, down of every "
        "layer (full fine-tuning trains every parameter); "
        f"K = {args['k']}: HD-PiSSA {args['nproc']} processes x {args['k'] // args['nproc']} virtual ranks, the "
        f"baselines {args['nproc']} data-parallel processes on the same global batch of {args['global_batch']} rows.",
        f"- GSM8K: the repository's fixed split of the packaged test file ({study['num_train']} train / 319 "
        f"held-out, `split_gsm8k(seed=0)`); of the held-out problems the first {study['num_test']} are the test "
        f"set (reported loss; exact match on the first {args['num_em']}) and the next {study['num_val']} the "
        f"validation set (learning-rate choice). No test or validation question is in the training split.",
        f"- GSM8K training: {args['steps']} steps x {args['global_batch']} rows = "
        f"{args['steps'] * args['global_batch']} "
        f"problems (one pass, no repeats), sequence length {args['seq_length']} ({study['test_truncated']} of the "
        f"test problems are truncated there, as the trainer does), `{args['template']}` template, "
        "Adam (no weight decay), "
        f"{args['warmup']} warm-up steps then cosine decay to 0, gradient clipping 1.0, seeds {s1} (sweep) and "
        f"{s2} (repeat).",
        f"- Learning rates: per method, {args['lrs']} values of the half-decade grid (1, 3, 10, 30 x 10^e) around "
        f"its centre ({centres}), widened by one grid "
        f"value while the best validation loss is at an edge, up to {args['max_lrs']} values.",
        f"- Exact match: greedy decoding (transformers, batches of {args['gen_batch']}, at most "
        f"{args['max_new_tokens']} new tokens) of the training prompt; strict = the number after `####` equals "
        "the reference's; last number = the last number in the output (for models without the format). 95% "
        "Wilson intervals; paired comparisons by an exact McNemar test on the same problems.",
        f"- Capacity: {args['num_facts']} invented facts (\"The locker number of <random syllables> is\" -> a "
        f"3-digit number, seed {args['facts_seed']}, generated by the study), {args['facts_steps']} steps x "
        f"{args['facts_global_batch']} facts "
        f"({args['facts_steps'] * args['facts_global_batch'] / args['num_facts']:.1f} "
        f"epochs, {study['facts_tokens']} supervised-row tokens per epoch) at each method's best GSM8K LR, seed {s1}. "
        "Exact recall: greedy decoding reproduces the number and stops (checked teacher-forced).",
        f"- Forgetting: mean token loss on {args['botchan_windows']} windows of {args['botchan_length']} tokens of "
        "Botchan (Project Gutenberg, from the sentencepiece 0.2.1 source distribution), which no method trains on.",
        f"- Effective rank: {study['effective_rank']['definition']}, per matrix of every layer, on the best "
        "seed-1 export of each method (`megatron_hdpissa.analysis.effective_rank`, as `tools/effective_rank.py`).",
        "",
        "## Results at each method's best learning rate",
        "",
        f"| method | best LR | test loss seed {s1} / {s2} | validation loss | exact match (strict) | exact match "
        "(last number) | with `####` | Botchan loss (change) | fact recall | effective rank mean (min-max) | bound "
        "| trainable / rank (M) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| base | - | {_f(base['test'])} | {_f(base['val'])} | {_p(base['em_strict'])} | {_p(base['em_flexible'])} "
        f"| {_p(base['em_formatted'])} | {_f(base['botchan'])} | {_p(base['facts'])} | - | - | - |",
    ]
    for m, p in per.items():
        r = p["rank"] or {}
        tests = " / ".join(_f(t) for t in p["test"])
        L.append(
            f"| {m} | {p['best_lr']:g}{' (edge)' if p['at_edge'] else ''} | {tests} | {_f(p['val'][0])} / "
            f"{_f(p['val'][1])} | {_p(p['em_strict'])} | {_p(p['em_flexible'])} | {_p(p['em_formatted'])} | "
            f"{_f(p['botchan'][0])} ({p['botchan_delta']:+.4f}) | {_p(p['facts'])} | "
            f"{_f(r.get('mean'), '.1f')} ({r.get('min', '-')}-{r.get('max', '-')}) | {RANK_BOUND[m]} | "
            f"{_f(p['trainable_M'], '.3f')} |")
    L += ["", "Paired comparisons with HD-PiSSA (seed-1 runs, the same test problems and facts):", "",
          "| vs | test loss difference (hd-pissa - other), 95% CI | exact match: only hd-pissa / only other, "
          "McNemar p | fact recall: only hd-pissa / only other, McNemar p |", "|---|---|---|---|"]
    for m, c in a["comparisons"].items():
        d, e, fc = c["test_loss"], c["em_strict"], c.get("facts")
        L.append(f"| {m} | {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] | {e['only_a']} / "
                 f"{e['only_b']}, p = {e['p_value']:.3g} | "
                 + (f"{fc['only_a']} / {fc['only_b']}, p = {fc['p_value']:.3g}" if fc else "-") + " |")
    L += ["", f"Cross-check, seed-2 runs: loss on the first {args.get('curve_problems')} validation problems "
          "at the last step, by the trainer (megatron-core forward) and by the study (transformers forward on "
          "the merged export):", "", "| method | trainer | study |", "|---|---|---|"]
    for m, p in per.items():
        L.append(f"| {m} | {_f(p['val_trainer_seed2'])} | {_f(p['val_study_seed2_subset'])} |")
    L += ["", "## Every learning rate", "",
          "| method | LR | validation loss | Botchan loss | training loss (last 3 steps) | run wall (s) |",
          "|---|---|---|---|---|---|"]
    for m, p in per.items():
        for r in p["sweep"]:
            mark = "**" if r["best"] else ""
            L.append(f"| {m} | {mark}{r['lr']:g}{mark} | {'diverged' if r['diverged'] else _f(r['val'])} | "
                     f"{_f(r['botchan'])} | {_f(r['train_last3'])} | {r['wall_s']:.0f} |")
    L += ["", "![learning-rate sweeps](lr_sweep.png)", "", "## Learning vs forgetting", "",
          "![learning vs forgetting](forgetting.png)", "",
          "| method | Botchan after GSM8K, seed 1 / 2 | Botchan after the facts |", "|---|---|---|"]
    for m, p in per.items():
        L.append(f"| {m} | {_f(p['botchan'][0])} / {_f(p['botchan'][1])} | {_f(p['facts_botchan'])} |")
    L += ["", f"Base model: {_f(base['botchan'])}.", "", "## Effective rank of W_T - W_0", "",
          "| method | " + " | ".join(next(iter(per.values()))["rank_by_projection"])
          + " | x LoRA | mean ‖ΔW‖/‖W0‖ |",
          "|---|" + "---|" * (len(next(iter(per.values()))["rank_by_projection"]) + 2)]
    for m, p in per.items():
        L.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in p["rank_by_projection"].values())
                 + f" | {_f(p['rank_ratio_to_lora'], '.2f')} | {_f(p['relative_change'], '.2e')} |")
    L += ["", "![spectra](spectra.png)", "", "## Learning curves", "", "![learning curves](curves.png)", "",
          "## Compute", "",
          f"Estimated before the run (2 idle cores, `benchmarks/study_budget.py`): "
          f"{a['budget']['estimate_s'] / 60:.1f} min; actual: {a['budget']['actual_s'] / 60:.1f} min "
          f"(load average {' '.join(f'{x:.1f}' for x in study['load_before'])} before, "
          f"{' '.join(f'{x:.1f}' for x in study['load_after'])} after).", "",
          "| estimated stage | minutes |", "|---|---|"]
    L += [f"| {k} | {v / 60:.1f} |" for k, v in a["budget"]["estimate_stages_s"].items()]
    L += ["", "| measured stage | minutes |", "|---|---|"]
    L += [f"| {k} | {v / 60:.1f} |" for k, v in a["budget"]["actual_stages_s"].items()]
    if study.get("runs_reused"):
        L += ["", f"{study['runs_reused']} of the {study['runs']} fine-tunes were reused (`--reuse`) from an earlier "
              "invocation: the measured stages hold only this invocation's time; each run's own wall time is "
              "in the learning-rate table and in `study.json`."]
    work = study.get("work_s", {})
    if work:
        L += ["", "Of the measured time, " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in work.items())
              + " (fine-tunes incl. launch and export; evaluations of the exports)."]
    L += ["", f"Machine: {', '.join(f'{k} {v}' for k, v in mach.items())}.", "", "## Commands", "", "```",
          study["command"], "```", "", "(`make study` runs `.venv/bin/python benchmarks/study.py --publish "
          "benchmarks/study`.)", "",
          "Every fine-tune's exact command is in `study.json` (`sweeps.<method>.runs.<lr>.command`, "
          "`seconds.<method>.command`, `facts.<method>.command`); for example the best HD-PiSSA run:", "", "```",
          study["best"][a["methods"][0]]["command"], "```", ""]
    return "\n".join(L)


def compact(study: dict) -> dict:
    """results.json: the analysis without per-problem arrays (small enough to commit)."""
    return {"args": study["args"], "machine": study["machine"], "analysis": study["analysis"]}


def write_results(study: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(compact(study), indent=1, default=str) + "\n")
