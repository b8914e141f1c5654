"""bench_e2e's arithmetic and table: method names, seconds per step from two run lengths, real
tokens per step, ratios against HF PEFT LoRA + DDP, the published formulation and the floor, the
wall-time estimate."""
from __future__ import annotations

import json
import statistics

TRAINER_METHODS = ("hd-pissa", "lora", "pissa")  # python -m megatron_hdpissa.finetune --peft <m>
LOOP_METHODS = ("hf-lora", "hf-pissa", "published", "floor")  # benchmarks/e2e_loop.py
DATA_MODES = ("variable", "padded", "packed")
# Seconds per step on 2 idle cores, full SmolLM2, 1615 real tokens per step (issue 20's table;
# the floor a guess), and start-up seconds per run: only for the estimate printed first.
STEP_S = {"hd-pissa": 6.5, "lora": 6.7, "pissa": 6.7, "hf-lora": 5.9, "hf-pissa": 6.2, "published": 11.4,
          "floor": 5.0}
START_S = {"hd-pissa": 40, "lora": 35, "pissa": 40, "hf-lora": 30, "hf-pissa": 35, "published": 45, "floor": 30}
REFERENCE_TOKENS = 1615


def parse_method(spec: str, pack: bool) -> tuple[str, str]:
    """'hd-pissa:padded' -> ('hd-pissa', 'padded'); the data mode defaults to packed with --pack,
    else variable-length (each micro-batch padded to its longest row)."""
    name, _, mode = spec.strip().partition(":")
    if name not in TRAINER_METHODS + LOOP_METHODS:
        raise ValueError(f"--methods: unknown method {name!r}; choose from {', '.join(TRAINER_METHODS + LOOP_METHODS)}")
    mode = mode or ("packed" if pack else "variable")
    if mode not in DATA_MODES:
        raise ValueError(f"--methods: unknown data mode {mode!r} in {spec!r}; choose from {', '.join(DATA_MODES)}")
    return name, mode


def parse_steps(text: str) -> tuple[int, int]:
    """'A,B' with 1 <= A < B: the two run lengths."""
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--steps must be two step counts 'A,B', got {text!r}") from None
    if not 1 <= a < b:
        raise ValueError(f"--steps A,B needs 1 <= A < B, got {text!r}")
    return a, b


def step_seconds(short: dict, long: dict) -> float:
    """Seconds per step from two runs of the same method that differ only in length: start-up,
    loading and decomposition cancel. Each run: {"steps", "wall_s"} (or any clock key)."""
    return (long["wall_s"] - short["wall_s"]) / (long["steps"] - short["steps"])


def cpu_seconds(short: dict, long: dict, nproc: int) -> float:
    """Process CPU seconds per step and rank, the same way (all ranks' CPU time / nproc)."""
    return (long["cpu_s"] - short["cpu_s"]) / (long["steps"] - short["steps"]) / nproc


def tokens_per_step(real_tokens: list[float], first: int) -> float:
    """Mean real tokens of the steps after the first `first` (those the difference times)."""
    later = real_tokens[first:]
    return statistics.mean(later) if later else float("nan")


def trainer_log(path) -> tuple[list[float], list[float], list[float]]:
    """(real tokens, loss, seconds) per step from the trainer's --log-json lines (--log-interval 1:
    a step's seconds are its real tokens over its logged tokens/s)."""
    tokens, losses, seconds = [], [], []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec and "real_tokens" in rec:
                tokens.append(float(rec["real_tokens"]))
                losses.append(float(rec["loss"]))
                seconds.append(tokens[-1] / rec["tokens_per_s"] if rec["tokens_per_s"] > 0 else float("nan"))
    return tokens, losses, seconds


def summarise(label: str, name: str, mode: str, short: dict, long: dict, nproc: int) -> dict:
    """One method's row: from its short and long run (each {"steps", "wall_s", "cpu_s",
    "real_tokens", "losses", "peak_rss_mib"})."""
    wall = step_seconds(short, long)
    tokens = tokens_per_step(long["real_tokens"], short["steps"])
    in_run = long.get("step_s", [])[short["steps"]:]
    return {"method": label, "name": name, "mode": mode, "step_wall_s": wall, "step_cpu_s": cpu_seconds(short, long, nproc),
            "step_in_run_s": statistics.median(in_run) if in_run else float("nan"),
            "real_tokens_per_step": tokens, "real_tokens_per_s": tokens / wall if wall > 0 else float("nan"),
            "peak_rss_mib": max(short["peak_rss_mib"], long["peak_rss_mib"]), "losses": long["losses"],
            "runs": {"short": short, "long": long}}


def reference(rows: list[dict], name: str, mode: str) -> dict | None:
    """The row of method `name` in data mode `mode`, else in any mode."""
    same = [r for r in rows if r["name"] == name and r["mode"] == mode]
    return (same or [r for r in rows if r["name"] == name] or [None])[0]


def add_ratios(rows: list[dict], basis: str = "wall") -> None:
    """Per row: speed-up vs HF PEFT LoRA + DDP and vs the published formulation (their step time /
    this one: > 1 is faster), and this step's time / the frozen floor's (>= 1), each against the
    reference of the same data mode where there is one."""
    key = f"step_{basis}_s"
    for r in rows:
        for ratio, name, invert in (("vs_hf_lora", "hf-lora", False), ("vs_published", "published", False),
                                    ("vs_floor", "floor", True)):
            ref = reference(rows, name, r["mode"])
            ok = ref is not None and ref[key] > 0 and r[key] > 0
            r[ratio] = None if not ok else (r[key] / ref[key] if invert else ref[key] / r[key])


def estimate_s(methods: list[tuple[str, str]], steps: tuple[int, int], tokens_per_step: float,
               num_layers: int | None) -> float:
    """Rough wall seconds of the whole benchmark on 2 idle cores (both runs of every method)."""
    layers = (num_layers or 30) / 30
    scale = layers * tokens_per_step / REFERENCE_TOKENS
    return sum(2 * START_S[n] * (0.3 + 0.7 * layers) + (steps[0] + steps[1]) * STEP_S[n] * scale
               for n, _ in methods)


def first_loss_spread(rows: list[dict]) -> dict:
    """Per data mode: the largest relative difference between the methods' first-step losses.
    Every method starts from the same weights (PiSSA / HD-PiSSA split them exactly) on the same
    rows, so these agree to rounding unless the data or the model differ."""
    out = {}
    for mode in DATA_MODES:
        first = [r["losses"][0] for r in rows if r["mode"] == mode and r["losses"]]
        if len(first) > 1:
            out[mode] = (max(first) - min(first)) / max(abs(min(first)), 1e-12)
    return out


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render(rows: list[dict], info: dict, setup: str, command: str, basis: str) -> str:
    lines = ["```", command, "```", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if v is not None),
             "", setup, "",
             f"Ratios on **{basis}** seconds per step. vs HF LoRA / vs published: their step time / this one "
             "(> 1: faster); vs floor: this step / the floor's (>= 1).", "",
             "In-run s / step: the median of the same steps timed inside the run (rank 0, from one step's "
             "end to the next), a check on the difference.", "",
             "| method | data | s / step (wall) | in-run s / step | CPU s / step / rank | real tokens / step | "
             "real tokens / s | peak RSS / rank (MiB) | vs HF PEFT LoRA + DDP | vs published | vs floor | last loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        loss = f"{r['losses'][-1]:.4f}" if r["losses"] else "-"
        lines.append(f"| {r['method']} | {r['mode']} | {r['step_wall_s']:.2f} | {r.get('step_in_run_s', float('nan')):.2f} | "
                     f"{r['step_cpu_s']:.2f} | "
                     f"{r['real_tokens_per_step']:.0f} | {r['real_tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{_x(r['vs_hf_lora'])} | {_x(r['vs_published'])} | {_x(r['vs_floor'])} | {loss} |")
    spread = first_loss_spread(rows)
    if spread:
        lines += ["", "First-step loss, largest relative difference between methods (same weights, same rows): "
                  + ", ".join(f"{mode} {v:.1e}" for mode, v in spread.items()) + "."]
    return "\n".join(lines) + "\n"
