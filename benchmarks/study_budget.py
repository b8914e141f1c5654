"""The study's compute estimate: seconds per stage on 2 idle CPU cores, from measured unit costs.

Unit costs (full 30-layer SmolLM2-135M, fp32, torch 2.13 CPU, 2 cores of an AMD EPYC, measured
2026-12-01 on a shared machine, then scaled to an idle one where noted):
  * one GSM8K training step (8 rows, alpaca template, seq 256, about 1,750 tokens), 2 processes:
    HD-PiSSA 8.2 s (2 x 4 virtual ranks, r 8), LoRA / PiSSA 8.0 s, full fine-tuning 14 s;
  * launch + model load + decomposition + merged export per run: 14 to 22 s;
  * forward only in transformers, batched: 2.3 ms per token on one core (so about 1.3 ms on two);
  * greedy decoding, batch 40: 7 to 10 ms per generated token per row on one core (contended), about
    4 ms on two idle ones (an estimate: decoding is the least certain cost here);
  * effective rank (float64 spectra): 0.35 s per layer (7 matrices) on one core.

What the defaults buy (benchmarks/study.py --estimate-only prints this table): 3 learning rates per
method (4 methods, widened on average for half of them) plus a second seed of each best one, 20
GSM8K runs of 10 steps x 8 rows; 4 fact runs of 10 steps x 128 facts (400 facts, 3.2 epochs); 48
validation and 200 test problems (loss), 200 decoded with at most 160 new tokens for the base and
the 4 best runs; 16 x 256 tokens of Botchan per run: about 74 minutes. Training is about 60% of
it, evaluation 40%, of which decoding is half. More steps cost about 3 minutes each (20 runs).
"""
from __future__ import annotations

STEP_S = {"hd-pissa": 8.2, "pissa": 8.0, "lora": 8.0, "full": 14.0}
STEP_TOKENS = 1750  # the tokens of the GSM8K step STEP_S was measured on
LAUNCH_S = {"hd-pissa": 22.0, "pissa": 18.0, "lora": 14.0, "full": 16.0}
FORWARD_S_PER_TOKEN = 1.3e-3
DECODE_S_PER_ROW_TOKEN = 4.0e-3
RANK_S_PER_MATRIX = 0.05
MODEL_LOAD_S = 3.0
GSM8K_TOKENS = 217  # mean tokens of a GSM8K problem + answer under the alpaca template
GSM8K_PROMPT_TOKENS = 91
FACT_POSITIONS = 16  # one fact padded to a multiple of 8


def train_s(method: str, steps: int, tokens_per_step: float) -> float:
    return LAUNCH_S[method] + steps * STEP_S[method] * tokens_per_step / STEP_TOKENS


def forward_s(tokens: float) -> float:
    return tokens * FORWARD_S_PER_TOKEN


def decode_s(problems: int, max_new_tokens: int) -> float:
    return problems * (max_new_tokens * DECODE_S_PER_ROW_TOKEN + GSM8K_PROMPT_TOKENS * FORWARD_S_PER_TOKEN)


def estimate(a) -> dict:
    """Seconds per stage for the study arguments `a` (argparse namespace or dict-like with the
    study's flags). Widening is counted as one extra learning rate for half the methods; the worst
    case (every method widened to `max_lrs`) is reported apart."""
    get = a.__getitem__ if isinstance(a, dict) else lambda k: getattr(a, k)
    methods, steps = get("methods"), get("steps")
    gsm_tokens = get("global_batch") * min(GSM8K_TOKENS, get("seq_length"))
    per_eval = MODEL_LOAD_S + forward_s(get("num_val") * GSM8K_TOKENS + get("botchan_windows") * get("botchan_length"))
    test = forward_s(get("num_test") * GSM8K_TOKENS)
    curve_evals = 1 + (steps // max(1, steps // 2) if steps >= 2 else 1)
    facts_tokens = get("facts_global_batch") * FACT_POSITIONS
    stages = {
        "base model evaluations": per_eval + test + forward_s(get("num_facts") * FACT_POSITIONS)
        + decode_s(get("num_em"), get("max_new_tokens")),
        "learning-rate sweeps": sum(get("lrs") * (train_s(m, steps, gsm_tokens) + per_eval) for m in methods),
        "widenings (expected: one for half the methods)": 0.5 * sum(train_s(m, steps, gsm_tokens) + per_eval
                                                                    for m in methods),
        "second seeds (with held-out curves)": sum(
            train_s(m, steps, gsm_tokens) + per_eval + test
            + curve_evals * 1.5 * forward_s(min(get("curve_problems"), get("num_val")) * GSM8K_TOKENS)
            for m in methods),
        "facts (capacity) runs": sum(train_s(m, get("facts_steps"), facts_tokens) + MODEL_LOAD_S
                                     + forward_s(get("num_facts") * FACT_POSITIONS
                                                 + get("botchan_windows") * get("botchan_length"))
                                     for m in methods),
        "test loss and exact match of the best runs": len(methods) * (MODEL_LOAD_S + test + decode_s(
            get("num_em"), get("max_new_tokens"))),
        "effective rank": len(methods) * (MODEL_LOAD_S + RANK_S_PER_MATRIX * 7 * get("rank_layer_count")),
    }
    worst = sum((get("max_lrs") - get("lrs") - 0.5) * (train_s(m, steps, gsm_tokens) + per_eval) for m in methods)
    return {"stages": stages, "total_s": sum(stages.values()), "worst_case_extra_s": worst}


def format_estimate(est: dict) -> str:
    lines = [f"  {name:<48s} {s / 60:6.1f} min" for name, s in est["stages"].items()]
    lines.append(f"  {'total':<48s} {est['total_s'] / 60:6.1f} min (up to {est['worst_case_extra_s'] / 60:.0f} min "
                 "more if every sweep widens to the limit)")
    return "\n".join(lines)
