"""The study's numbers (`analyse`: per method, paired comparisons, flags) and its results.json."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks import study_metrics as sm

PUBLISHED = ("study.md", "results.json", "curves.png", "spectra.png", "forgetting.png", "lr_sweep.png")


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


def compact(study: dict) -> dict:
    """results.json: the analysis without per-problem arrays (small enough to commit)."""
    return {"args": study["args"], "machine": study["machine"], "analysis": study["analysis"]}


def write_results(study: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(compact(study), indent=1, default=str) + "\n")
