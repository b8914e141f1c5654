"""The capacity study's plan and its pure rules: the runs, their compute estimate, the held-out
selection slice of the facts and its score, the calibration choice, recall curves.

Cost model (seconds on 2 idle cores, full 30-layer SmolLM2-135M, fp32). Per optimizer step:
STEP_OVERHEAD_S + tokens x the GSM8K step's cost per token (benchmarks/study_budget.py: 8.2 s for
HD-PiSSA, 8.0 s for PiSSA / LoRA, 14 s for full fine-tuning per 1,750 tokens), a fact padded to
16 positions. These are ASSUMPTIONS until `--calibrate` has run: it measures the step of each
method it trains (full, LoRA, a short HD-PiSSA run; PiSSA is taken as LoRA) and the estimate uses
those. A recall evaluation is a forward of every fact, RECALL_SLOWDOWN x the transformers forward
cost of study_budget (megatron-core's forward, 2 processes, short rows). Launch, export and the
evaluations of the exports come from study_budget too.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from benchmarks import study_budget as sb

STEP_OVERHEAD_S = 0.5  # optimizer step, schedule and logging per step (assumption)
RECALL_SLOWDOWN = 1.5  # megatron-core forward on short rows vs the transformers forward (assumption)
EXPORT_S = 6.0  # merged HF export of the 30-layer model (538 MB)


# ---- facts: the selection slice and its score ------------------------------------------------------
def slices(num_facts: int, every: int) -> tuple[list[int], list[int]]:
    """(selection, report): every `every`-th fact (0, every, 2 every, ...) chooses the learning
    rate; the others are the reported numbers. Both are trained on (memorisation has no held-out
    facts): the choice never looks at a reported fact."""
    if every < 2:
        raise ValueError(f"--selection-every must be >= 2 (1 would leave no reported facts), got {every}")
    sel = list(range(0, num_facts, every))
    return sel, [i for i in range(num_facts) if i % every]


def recall(flags: Sequence[bool], idx: Sequence[int]) -> float:
    return sum(bool(flags[i]) for i in idx) / len(idx)


def selection_score(record: Mapping, idx: Sequence[int]) -> float:
    """Lower is better: 1 - recall on `idx`, then the answer-token loss on `idx` to break ties
    (scaled below one fact's 1/n so it never outranks a recall difference); inf when non-finite."""
    loss = sum(record["loss_sums"][i] for i in idx) / max(sum(record["counts"][i] for i in idx), 1e-30)
    if not math.isfinite(loss):
        return math.inf
    return 1 - recall(record["flags"], idx) + min(loss, 20.0) / (40 * len(idx))


def curve(records: Sequence[Mapping], idx: Sequence[int], base: float | None = None) -> list[list[float]]:
    """[[step, recall on idx], ...] from the worker's records (the base model's recall at step 0)."""
    pts = [[0, base]] if base is not None else []
    return pts + [[r["step"], recall(r["flags"], idx)] for r in records]


# ---- calibration -------------------------------------------------------------------------------------
def next_facts(tried: Mapping[int, float], candidates: Sequence[int], target: float) -> int | None:
    """The calibration search over fact counts (`tried`: count -> full fine-tuning's final recall):
    start in the middle of `candidates`; then the next larger count above the largest that reached
    `target`, or, while none has, the next smaller below the smallest that failed; None once no
    untried candidate lies between the two."""
    cands = sorted(candidates)
    if not tried:
        return cands[(len(cands) - 1) // 2]
    passed = [f for f, r in tried.items() if r >= target]
    failed = [f for f, r in tried.items() if r < target]
    lo, hi = (max(passed) if passed else None), (min(failed) if failed else None)
    between = [c for c in cands if c not in tried and (lo is None or c > lo) and (hi is None or c < hi)]
    if not between:
        return None
    return between[0] if lo is not None else between[-1]


def choose_facts(tried: Mapping[int, float], target: float) -> tuple[int, str]:
    """(fact count, why): the largest count whose full fine-tune reached `target`; else the one
    closest to it (the study then cannot meet the target and says so)."""
    passed = [f for f, r in tried.items() if r >= target]
    if passed:
        return max(passed), f"the largest fact count at which full fine-tuning reached {target:.0%} recall"
    best = max(tried, key=lambda f: (tried[f], -f))
    return best, (f"NO fact count reached {target:.0%} with full fine-tuning; taking the best one "
                  f"({tried[best]:.1%}): give more steps or fewer facts")



def choose_steps(full: Sequence[Sequence[float]], lora: Sequence[Sequence[float]], most: int, every: int,
                 target: float, saturation: float) -> tuple[int, str]:
    """(steps, why) from the calibration runs' recall curves ([[step, recall], ...], one recall
    record every `every` steps): the most steps, a multiple of `every` and at most `most` (what the
    budget fits), at which full fine-tuning has reached `target` and LoRA is still below
    `saturation`, so that the task separates the methods; else the most the budget fits."""
    at = lambda pts, s: next((r for t, r in pts if t == s), None)  # noqa: E731
    top = max(every, most // every * every)
    for s in range(top, 0, -every):
        f, l = at(full, s), at(lora, s)
        if f is not None and l is not None and f >= target and l < saturation:
            return s, (f"the most steps (a multiple of the {every}-step recall interval, at most the {most} the "
                       f"budget fits) at which the calibration's full fine-tune had reached {target:.0%} recall "
                       f"({f:.1%}) and LoRA was below {saturation:.0%} ({l:.1%})")
    return top, (f"NO step count up to the {most} the budget fits had full fine-tuning at {target:.0%} with LoRA "
                 f"below {saturation:.0%}; taking the most the budget fits")


# ---- the runs and their cost -------------------------------------------------------------------------
def step_cost(method: str, facts_per_step: int, measured: Mapping[str, float] | None = None) -> float:
    if measured and method in measured:
        return measured[method]
    tokens = facts_per_step * sb.FACT_POSITIONS
    return STEP_OVERHEAD_S + sb.STEP_S[method] * tokens / sb.STEP_TOKENS


def recall_eval_s(num_facts: int) -> float:
    return RECALL_SLOWDOWN * sb.forward_s(num_facts * sb.FACT_POSITIONS)


def run_s(a, method: str, steps: int, measured=None, evals: int | None = None) -> float:
    """One fine-tune: launch, steps, recall evaluations, export."""
    evals = a.recall_points if evals is None else evals
    return (sb.LAUNCH_S[method] + steps * step_cost(method, a.facts_per_step, measured)
            + evals * recall_eval_s(a.num_facts) + EXPORT_S)


def export_eval_s(a) -> float:
    """The evaluations of one export: load, recall and losses of every fact (two passes), Botchan."""
    return sb.MODEL_LOAD_S + sb.forward_s(2 * a.num_facts * sb.FACT_POSITIONS + a.botchan_windows * a.botchan_length)


def estimate(a, measured: Mapping[str, float] | None = None) -> dict:
    """Seconds per stage of the main run (not calibration) for the capacity arguments `a`;
    widening counted as one extra LR for half the methods (the worst case apart)."""
    ms, steps = a.methods, a.steps
    sweep = sum(a.lrs * run_s(a, m, steps, measured) for m in ms)
    k_runs = [k for k in a.k_sweep if k != a.k] if "hd-pissa" in ms else []
    stages = {
        "material and base evaluation": 20.0 + export_eval_s(a),
        "learning-rate sweeps (seed 1)": sweep,
        "widenings (expected: one for half the methods)": 0.5 * sum(run_s(a, m, steps, measured) for m in ms),
        "second seeds at the chosen LR": sum(run_s(a, m, steps, measured) for m in ms),
        "K sweep of HD-PiSSA": len(k_runs) * run_s(a, "hd-pissa", steps, measured),
        "evaluations of the reported exports": (2 * len(ms) + len(k_runs)) * export_eval_s(a),
        "effective rank": (len(ms) + len(k_runs)) * (sb.MODEL_LOAD_S + sb.RANK_S_PER_MATRIX * 7 * a.rank_layer_count),
    }
    worst = sum((a.max_lrs - a.lrs - 0.5) * run_s(a, m, steps, measured) for m in ms)
    runs = round(len(ms) * (a.lrs + 0.5 + 1) + len(k_runs))
    return {"stages": stages, "total_s": sum(stages.values()), "worst_case_extra_s": worst, "runs": runs,
            "costs": "measured by --calibrate" if measured else "assumed (run --calibrate to measure them)",
            "step_s": {m: step_cost(m, a.facts_per_step, measured) for m in ms}}


def max_steps(a, budget_s: float, measured=None) -> int:
    """The most steps (a multiple of 10) whose estimate fits `budget_s`."""
    steps, saved = 10, a.steps
    try:
        while True:
            a.steps = steps + 10
            if estimate(a, measured)["total_s"] > budget_s:
                return steps
            steps += 10
    finally:
        a.steps = saved


def calibration_s(a, candidates: Sequence[int], steps: int) -> float:
    """Calibration's expected cost: about 3 full fine-tunes over the fact counts, one LoRA run,
    a short HD-PiSSA run for its step cost (evaluations every tenth of the steps)."""
    f = max(candidates)
    saved, a.num_facts = a.num_facts, f
    try:
        return (3 * run_s(a, "full", steps, evals=10) + run_s(a, "lora", steps, evals=10)
                + run_s(a, "hd-pissa", a.cost_steps, evals=1))
    finally:
        a.num_facts = saved


def format_estimate(est: dict) -> str:
    lines = [f"  {name:<48s} {s / 60:6.1f} min" for name, s in est["stages"].items()]
    lines.append(f"  {'total':<48s} {est['total_s'] / 60:6.1f} min (up to {est['worst_case_extra_s'] / 60:.0f} min "
                 f"more if every sweep widens to the limit); about {est['runs']} fine-tunes")
    lines.append("  step costs (s): " + ", ".join(f"{m} {s:.2f}" for m, s in est["step_s"].items())
                 + f" -- {est['costs']}")
    return "\n".join(lines)
