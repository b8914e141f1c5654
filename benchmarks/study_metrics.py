"""The study's pure statistics: GSM8K answers, intervals, paired tests, recall, and the LR grid."""
from __future__ import annotations

import math
import random
import re
from decimal import Decimal, InvalidOperation
from typing import Mapping, Sequence

from megatron_hdpissa.data.gsm8k import extract_gsm8k_answer

Z95 = 1.959963984540054  # two-sided 95% normal quantile


# ---- GSM8K answers -------------------------------------------------------------------------------
def strict_answer(text: str) -> str | None:
    """The number after the first `####` (GSM8K's own answer format), canonical; None without one."""
    return extract_gsm8k_answer(text)


_ANY_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def flexible_answer(text: str) -> str | None:
    """The last number anywhere in `text`, canonical ("$1,000.00" -> "1000"): lm-eval's
    "flexible extract", for a model that has not learnt the `####` format."""
    found = _ANY_NUMBER.findall(text)
    if not found:
        return None
    try:
        value = Decimal(found[-1].replace(",", ""))
    except InvalidOperation:
        return None
    return "0" if value == 0 else format(value.normalize(), "f")


def score_answers(generated: Sequence[str], references: Sequence[str]) -> dict:
    """Per problem: strict and flexible correctness against the reference's `####` answer."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generations for {len(references)} references")
    strict, flexible, formatted = [], [], []
    for text, ref in zip(generated, references):
        gold = strict_answer(ref)
        if gold is None:
            raise ValueError(f"reference without a `####` answer: {ref[-80:]!r}")
        pred = strict_answer(text)
        strict.append(pred is not None and pred == gold)
        flexible.append(flexible_answer(text) == gold)
        formatted.append(pred is not None)
    return {"strict": strict, "flexible": flexible, "formatted": formatted}


# ---- intervals and tests -------------------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (95% by default)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(flags: Sequence[bool]) -> dict:
    """k, n, rate and its Wilson 95% interval."""
    k, n = sum(bool(f) for f in flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n, "ci95": [lo, hi]}


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of two paired binary outcomes (the same problems): discordant counts
    (a right / b wrong, a wrong / b right) and the two-sided binomial p-value."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes of unequal length {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    if n == 0:
        return {"only_a": 0, "only_b": 0, "p_value": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return {"only_a": only_a, "only_b": only_b, "p_value": min(1.0, 2 * tail)}


def token_mean(sums: Sequence[float], counts: Sequence[float]) -> float:
    """Token-weighted mean loss over items (sum of token losses / number of tokens)."""
    total = sum(counts)
    if total <= 0:
        raise ValueError("no loss tokens")
    return sum(sums) / total


def paired_bootstrap(a_sums: Sequence[float], b_sums: Sequence[float], counts: Sequence[float],
                     reps: int = 2000, seed: int = 0) -> dict:
    """Token-weighted mean loss difference a - b over the same items (equal token counts), with a
    95% percentile interval from resampling the items with replacement."""
    n = len(counts)
    if not n or len(a_sums) != n or len(b_sums) != n:
        raise ValueError("paired_bootstrap needs equally long, non-empty sequences")
    diff = [x - y for x, y in zip(a_sums, b_sums)]
    rng = random.Random(seed)
    stats = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        stats.append(sum(diff[i] for i in idx) / max(sum(counts[i] for i in idx), 1e-30))
    stats.sort()
    lo = stats[int(0.025 * (reps - 1))]
    hi = stats[int(math.ceil(0.975 * (reps - 1)))]
    return {"diff": sum(diff) / sum(counts), "ci95": [lo, hi]}


# ---- the learning-rate grid ----------------------------------------------------------------------
# Learning rates live on the half-decade grid 1, 3, 10, 30, ... x 10^e (geometric, ratio about
# sqrt(10)); index i stands for 10^(i/2) rounded to one significant digit.
def lr_index(lr: float) -> int:
    """The half-decade grid index nearest `lr` (1e-4 -> -8, 3e-4 -> -7)."""
    if not lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    return round(2 * math.log10(lr))


def lr_value(index: int) -> float:
    """The grid's learning rate at `index`: 10^(i/2) for even i, 3 x 10^((i-1)/2) for odd i."""
    exponent, odd = divmod(index, 2)
    return float(f"{3 if odd else 1}e{exponent}")


def lr_grid(centre: float, count: int = 3) -> list[float]:
    """`count` consecutive grid values centred on `centre` (one more above for even counts)."""
    if count < 1:
        raise ValueError(f"need at least one learning rate, got {count}")
    first = lr_index(centre) - (count - 1) // 2
    return [lr_value(first + i) for i in range(count)]


def _score(value) -> float:
    return value if value is not None and math.isfinite(value) else math.inf


def best_lr(scores: Mapping[float, float | None]) -> tuple[float, bool]:
    """(learning rate with the lowest score, whether it is the lowest or the highest one tried).
    A diverged run (None / NaN / inf) scores worst; ties go to the smaller learning rate."""
    if not scores:
        raise ValueError("no learning rates scored")
    lrs = sorted(scores)
    best = min(lrs, key=lambda lr: (_score(scores[lr]), lr))
    return best, len(lrs) > 1 and best in (lrs[0], lrs[-1])


def next_lr(scores: Mapping[float, float | None], max_count: int) -> float | None:
    """The sweep's widening rule: when the best score sits at the lowest (highest) learning rate
    tried, the next grid value below (above) it; None when the best is inside, when every run
    diverged, or when `max_count` learning rates have been tried."""
    if len(scores) >= max_count or not scores:
        return None
    if all(_score(v) == math.inf for v in scores.values()):
        return None
    lrs = sorted(scores)
    best, at_edge = best_lr(scores)
    if not at_edge:
        return None
    step = -1 if best == lrs[0] else 1
    return lr_value(lr_index(best) + step)


def sweep_flags(scores: Mapping[float, float | None]) -> list[str]:
    """What a reader must know about one method's sweep."""
    flags = []
    best, at_edge = best_lr(scores)
    if at_edge:
        side = "lowest" if best == min(scores) else "highest"
        flags.append(f"best LR {best:g} is the {side} value tried (the optimum may lie beyond it)")
    diverged = sorted(lr for lr, v in scores.items() if _score(v) == math.inf)
    if diverged:
        flags.append("diverged (non-finite loss) at LR " + ", ".join(f"{lr:g}" for lr in diverged))
    finite = sorted(_score(v) for v in scores.values() if _score(v) < math.inf)
    if len(finite) > 1 and finite[1] - finite[0] < 0.01:
        flags.append(f"the two best LRs are within {finite[1] - finite[0]:.4f} of each other (flat optimum)")
    return flags


def intervals_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two [lo, hi] intervals overlap."""
    return a[0] <= b[1] and b[0] <= a[1]
