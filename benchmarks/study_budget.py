"""The study's compute estimate: seconds per stage on 2 idle CPU cores, from measured unit costs.

Unit costs (full 30-layer SmolLM2-135M, fp32, torch 2.13 CPU, 2 cores of an AMD EPYC, measured
2026-12-01 on a shared machine, then scaled to an idle one where noted):
  * one GSM8K training step (8 rows, alpaca template, seq 256, about 1,750 tokens), 2 processes:
    HD-PiSSA 8.2 s (2 x 4 virtual ranks, r 8), LoRA / PiSSA 8.0 s, full fine-tuning 14 s;
  * launch + model load + decomposition + merged export per run: 14 to 22 s;
  * forward only in transformers, batched: 2.3 ms per token on one core (so about 1.3 ms on two);
  * greedy decoding, batch about 40: about 4 ms per generated token per row on one core, 2.3 ms on two;
  * effective rank (float64 spectra): 0.35 s per layer (7 matrices) on one core.
"""
from __future__ import annotations

STEP_S = {"hd-pissa": 8.2, "pissa": 8.0, "lora": 8.0, "full": 14.0}
STEP_TOKENS = 1750  # the tokens of the GSM8K step STEP_S was measured on
LAUNCH_S = {"hd-pissa": 22.0, "pissa": 18.0, "lora": 14.0, "full": 16.0}
FORWARD_S_PER_TOKEN = 1.3e-3
DECODE_S_PER_ROW_TOKEN = 2.3e-3
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
    study's flags); `widen` counts one extra learning rate per method (the usual case), the
    worst case adds `max_lrs - lrs` per method."""
    get = a.__getitem__ if isinstance(a, dict) else lambda k: getattr(a, k)
    methods, steps = get("methods"), get("steps")
    gsm_tokens = get("global_batch") * min(GSM8K_TOKENS, get("seq_length"))
    per_eval = MODEL_LOAD_S + forward_s(get("num_val") * GSM8K_TOKENS + get("botchan_windows") * get("botchan_length"))
    test = forward_s(get("num_test") * GSM8K_TOKENS)
    curve_evals = 1 + (steps // max(1, steps // 3) if steps >= 3 else 1)
    facts_tokens = get("facts_global_batch") * FACT_POSITIONS
    stages = {
        "base model evaluations": per_eval + test + forward_s(get("num_facts") * FACT_POSITIONS)
        + decode_s(get("num_em"), get("max_new_tokens")),
        "learning-rate sweeps": sum(get("lrs") * (train_s(m, steps, gsm_tokens) + per_eval) for m in methods),
        "one widening per method": sum(train_s(m, steps, gsm_tokens) + per_eval for m in methods),
        "second seeds (with held-out curves)": sum(
            train_s(m, steps, gsm_tokens) + per_eval + test + curve_evals * forward_s(get("num_val") * GSM8K_TOKENS) / 2
            for m in methods),
        "facts (capacity) runs": sum(train_s(m, get("facts_steps"), facts_tokens) + MODEL_LOAD_S
                                     + forward_s(get("num_facts") * FACT_POSITIONS
                                                 + get("botchan_windows") * get("botchan_length"))
                                     for m in methods),
        "test loss and exact match of the best runs": len(methods) * (MODEL_LOAD_S + test + decode_s(
            get("num_em"), get("max_new_tokens"))),
        "effective rank": len(methods) * (MODEL_LOAD_S + RANK_S_PER_MATRIX * 7 * get("rank_layer_count")),
    }
    worst = sum(max(0, get("max_lrs") - get("lrs") - 1) * (train_s(m, steps, gsm_tokens) + per_eval) for m in methods)
    return {"stages": stages, "total_s": sum(stages.values()), "worst_case_extra_s": worst}


def format_estimate(est: dict) -> str:
    lines = [f"  {name:<44s} {s / 60:6.1f} min" for name, s in est["stages"].items()]
    lines.append(f"  {'total':<44s} {est['total_s'] / 60:6.1f} min (up to {est['worst_case_extra_s'] / 60:.0f} min "
                 "more if every sweep widens to the limit)")
    return "\n".join(lines)
