"""The capacity study's calibration (`study_capacity.py --calibrate`): how many facts and steps.

The steps are the most the study's budget allows (benchmarks/study_capacity_plan.estimate, with
assumed step costs). Full fine-tuning at its centre LR is trained on a prefix of the facts whose
size moves over --calibrate-facts (start in the middle, one up while its final recall reaches
--target-recall, one down while it does not); the study takes the largest count that reached it.
LoRA then trains on that count: at or above --saturation it saturates (the task would not tell the
methods apart) and the choice is flagged. A short HD-PiSSA run and the two runs above give measured
step costs, from which the steps are re-fitted to the budget (never more than calibrated), then cut to the most steps at which,
in the calibration runs, full fine-tuning had reached --target-recall and LoRA was still below
--saturation (`plan.choose_steps`), so that the task separates the methods. Writes
calibration.json (read by the study) and capacity_calibration.{json,md}.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks import study_capacity_plan as plan


def _at(records: list, step: int) -> float | None:
    """Recall over every fact at the last record at or before `step`."""
    done = [r for r in records if r["step"] <= step]
    return plan.recall(done[-1]["flags"], range(len(done[-1]["flags"]))) if done else None


def step_seconds(record: dict, steps: int) -> float:
    """Seconds per optimizer step from the worker's last record, leaving out the first step (its
    one-off allocations) when there are others."""
    first = record.get("first_step_s", 0.0)
    return (record["step_s"] - first) / (steps - 1) if steps > 1 and first else record["step_s"] / steps


def calibrate(a, argv, train, publish) -> dict:
    """`train` and `publish` are study_capacity's (one worker run; copying the report)."""
    from benchmarks.study_run import Study, prepare

    cands, budget = a.calibrate_facts, 60 * a.budget_min
    a.num_facts = cands[(len(cands) - 1) // 2]
    steps = a.steps or plan.max_steps(a, budget)
    a.steps, a.num_facts = steps, max(cands)  # prepare writes every candidate's facts (prefixes)
    a.warmup = a.warmup if a.warmup is not None else max(1, steps // 20)
    every = max(1, steps // 10)
    est = plan.calibration_s(a, cands, steps)
    st = Study(a, {"total_s": est, "stages": {"calibration": est}}, folder="study-capacity")
    st.planned_runs = 5
    st.log(f"calibration: full fine-tuning at LR {a.lr_centres['full']:g} on {cands} facts (search), "
           f"{steps} steps x {a.facts_per_step} facts (the most the {a.budget_min:g}-minute budget allows with "
           f"assumed costs), LoRA at LR {a.lr_centres['lora']:g}; about {est / 60:.0f} min")
    if a.estimate_only:
        return {"estimate_s": est, "steps": steps}
    st.out.mkdir(parents=True, exist_ok=True)
    prepare(st)
    lines = st.files["facts"].read_text().splitlines()
    files = {}
    for f in cands:
        files[f] = st.files["facts"].parent / f"facts-{f}.jsonl"
        files[f].write_text("\n".join(lines[:f]) + "\n")
    tried, full = {}, {}
    while (f := plan.next_facts(tried, cands, a.target_recall)) is not None:
        full[f] = train(st, "full", a.lr_centres["full"], a.seeds[0], facts=files[f], steps=steps, every=every,
                        export=False, tag=f"calib-f{f}")
        tried[f] = 0.0 if full[f]["diverged"] else _at(full[f]["recall"], steps) or 0.0
        st.log(f"calibration: full fine-tuning recalls {tried[f]:.1%} of {f} facts after {steps} steps")
    num, why = plan.choose_facts(tried, a.target_recall)
    lora = train(st, "lora", a.lr_centres["lora"], a.seeds[0], facts=files[num], steps=steps, every=every,
                 export=False, tag=f"calib-f{num}")
    hd = train(st, "hd-pissa", a.lr_centres["hd-pissa"], a.seeds[0], facts=files[num], steps=a.cost_steps,
               every=a.cost_steps, export=False, tag=f"calib-cost-f{num}")
    measured = {m: step_seconds(r["recall"][-1], r["steps"]) for m, r in
                (("full", full[num]), ("lora", lora), ("hd-pissa", hd)) if r["recall"]}
    if "lora" in measured:
        measured["pissa"] = measured["lora"]  # the same adapter shapes; assumed, not timed
    a.num_facts = num  # before the fit: the recall evaluations' cost grows with the fact count
    fit = plan.max_steps(a, budget, measured)
    full_curve = plan.curve(full[num]["recall"], range(num)) if not full[num]["diverged"] else []
    lora_curve = plan.curve(lora["recall"], range(num)) if not lora["diverged"] else []
    chosen, why_steps = plan.choose_steps(full_curve, lora_curve, min(steps, fit), every, a.target_recall,
                                          a.saturation)
    lora_final = 0.0 if lora["diverged"] else _at(lora["recall"], chosen) or 0.0
    cal = {"num_facts": num, "steps": chosen, "facts_per_step": a.facts_per_step, "layers": a.layers,
           "why_facts": why,
           "why_steps": why_steps + (f"; the study's cosine schedule then ends at that step, where the calibration's "
                                     f"{steps}-step schedule was still at a higher LR"),
           "calibrated_steps": steps, "budget_fit_steps": fit, "target_recall": a.target_recall,
           "saturation": a.saturation, "full_recall": {str(f): r for f, r in tried.items()},
           "full_recall_at_steps": _at(full[num]["recall"], chosen), "lora_recall_at_steps": lora_final,
           "lora_saturates": lora_final >= a.saturation, "step_s": measured,
           "curves": {f"full {f}": plan.curve(r["recall"], range(f)) for f, r in full.items()}
           | {f"lora {num}": plan.curve(lora["recall"], range(num))},
           "lrs": {m: a.lr_centres[m] for m in ("full", "lora", "hd-pissa")}, "seed": a.seeds[0],
           "estimate_s": est, "wall_s": time.time() - st.t0,
           "runs_s": sum(r.get("wall_s", 0.0) for r in (*full.values(), lora, hd)), "command": " ".join(["benchmarks/study_capacity.py",
                                                                                   *(argv or [])])}
    if cal["lora_saturates"]:
        st.log(f"calibration: LoRA SATURATES ({lora_final:.1%} >= {a.saturation:.0%}) at {num} facts")
    for name in ("calibration.json", "capacity_calibration.json"):
        (st.out / name).write_text(json.dumps(cal, indent=1) + "\n")
    (st.out / "capacity_calibration.md").write_text(markdown(cal))
    st.log(f"calibration: {num} facts, {chosen} steps; wrote {st.out / 'calibration.json'}")
    if a.publish:
        publish(st.out, Path(a.publish))
    return cal


def markdown(cal: dict) -> str:
    L = ["# Capacity study: calibration", "",
         f"Chosen: **{cal['num_facts']} facts, {cal['steps']} steps** of {cal['facts_per_step']} facts "
         f"({cal['steps'] * cal['facts_per_step'] / cal['num_facts']:.1f} epochs).", "",
         f"- Facts: {cal['why_facts']}.", f"- Steps: {cal['why_steps']} (budget fit: {cal['budget_fit_steps']}).",
         f"- Full fine-tuning (LR {cal['lrs']['full']:g}, seed {cal['seed']}), final recall after "
         f"{cal['calibrated_steps']} steps by fact count: "
         + ", ".join(f"{f} facts {r:.1%}" for f, r in sorted(cal["full_recall"].items(), key=lambda x: int(x[0])))
         + ".",
         f"- At the chosen steps: full fine-tuning {cal['full_recall_at_steps']:.1%}, LoRA (LR {cal['lrs']['lora']:g}) "
         f"{cal['lora_recall_at_steps']:.1%}: LoRA "
         + ("SATURATES (the task may not separate the methods)" if cal["lora_saturates"] else "does not saturate")
         + f" (threshold {cal['saturation']:.0%}).",
         "- Measured step costs (s): " + ", ".join(f"{m} {s:.2f}" for m, s in cal["step_s"].items())
         + " (PiSSA taken as LoRA).", "", "| run | recall by step |", "|---|---|"]
    L += [f"| {name} | " + ", ".join(f"{int(s)}: {r:.0%}" for s, r in pts) + " |" for name, pts in cal["curves"].items()]
    L += ["", f"Wall time {cal['wall_s'] / 60:.1f} min (estimated {cal['estimate_s'] / 60:.1f}); the runs trained in "
          f"{cal.get('runs_s', 0.0) / 60:.1f} min (runs found with --reuse keep their own time). Command: "
          f"`{cal['command']}`.", ""]
    return "\n".join(L)
