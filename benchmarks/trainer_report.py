"""bench_trainer's report: per-mode step times from the ranks' data-side records, and the table."""
from __future__ import annotations

import statistics

FLOOR_EXAMPLES = 256  # the floor mode's one-line problems


def summarise_mode(args, mode: str, ranks: list[dict], losses: list[float], wall: float) -> dict:
    per_step_batches = args.global_batch_size // (args.micro_batch_size * args.nproc)
    total_steps = args.warmup + args.steps + 1
    step_wall, step_cpu, positions, real, supervised, slowest = [], [], [], [], [], []
    for s in range(args.warmup, args.warmup + args.steps):
        walls, cpus = [], []
        for rank in ranks:
            recs = rank["records"]
            if len(recs) != total_steps * per_step_batches:
                raise RuntimeError(f"mode {mode}: a rank drew {len(recs)} micro-batches, expected "
                                   f"{total_steps} steps x {per_step_batches}")
            first, nxt = recs[s * per_step_batches], recs[(s + 1) * per_step_batches]
            walls.append(nxt[0] - first[0])
            cpus.append(nxt[1] - first[1])
        step_wall.append(max(walls))  # the ranks meet in the aggregation: the slowest sets the step
        step_cpu.append(max(cpus))
        step = [r for rank in ranks for r in rank["records"][s * per_step_batches:(s + 1) * per_step_batches]]
        positions.append(sum(shape[0] * shape[1] for _, _, _, shape, _, _ in step))
        slowest.append(max(sum(r[3][0] * r[3][1] for r in rank["records"][s * per_step_batches:(s + 1) * per_step_batches])
                           for rank in ranks))
        real.append(sum(rec[4] for rec in step))
        supervised.append(sum(rec[5] for rec in step))
    lengths = sorted({rec[3][1] for rank in ranks for rec in rank["records"]})
    wall_med, cpu_med = statistics.median(step_wall), statistics.median(step_cpu)
    return {
        "mode": mode, "step_wall_s": step_wall, "step_cpu_s": step_cpu,
        "median_wall_s": wall_med, "median_cpu_s": cpu_med,
        "positions_per_step": statistics.mean(positions), "slowest_rank_positions_per_step": statistics.mean(slowest),
        "real_tokens_per_step": statistics.mean(real),
        "supervised_per_step": statistics.mean(supervised),
        "micro_batch_lengths": [lengths[0], lengths[-1]], "losses": losses, "run_wall_s": wall,
    }


def combine(rounds: list[dict]) -> dict:
    """Per mode: every round's timed steps together."""
    out = {}
    for res in rounds:
        cur = out.setdefault(res["mode"], {**res, "step_wall_s": [], "step_cpu_s": [], "losses_by_round": []})
        cur["step_wall_s"] += res["step_wall_s"]
        cur["step_cpu_s"] += res["step_cpu_s"]
        cur["losses_by_round"].append(res["losses"])
    for cur in out.values():
        cur["median_wall_s"] = statistics.median(cur["step_wall_s"])
        cur["median_cpu_s"] = statistics.median(cur["step_cpu_s"])
    return out


def render(results: dict, info: dict, args, command: str) -> str:
    lines = ["```", command, "```", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if v is not None), "",
             f"Model: SmolLM2-135M-Instruct, {args.num_layers or 30} layers, fp32; GSM8K train split (1000), "
             f"alpaca template, --seq-length {args.seq_length}; {args.nproc} ranks (torchrun, gloo), HD-PiSSA "
             f"r={args.hd_pissa_rank}; {args.global_batch_size} sequences per step = micro-batch "
             f"{args.micro_batch_size} x {args.global_batch_size // (args.micro_batch_size * args.nproc)} x "
             f"{args.nproc} ranks; {args.warmup} warm-up + {args.steps} timed steps per mode x {args.rounds} "
             f"round(s); --pad-multiple {args.pad_multiple}."
             + (f" floor: {FLOOR_EXAMPLES} one-line problems ('i + 1 =' / 'i+1'), --seq-length 16, padded."
                if "floor" in results else ""), "",
             f"Ratio basis: **{'process CPU time' if args.basis == 'cpu' else 'wall time'}** (medians of the "
             "timed steps; per step the slowest rank's CPU time).", "",
             "| mode | step CPU s (median) | step wall s (median) | steps CPU s | steps wall s | positions / step | "
             f"real tokens / step | real tokens/s ({args.basis}) | micro-batch lengths | losses |",
             "|---|---:|---:|---|---|---:|---:|---:|---|---|"]
    for mode, r in results.items():
        lines.append(
            f"| {mode} | {r['median_cpu_s']:.2f} | {r['median_wall_s']:.2f} | "
            f"{', '.join(f'{t:.2f}' for t in r['step_cpu_s'])} | "
            f"{', '.join(f'{t:.2f}' for t in r['step_wall_s'])} | {r['positions_per_step']:.0f} | "
            f"{r['real_tokens_per_step']:.0f} | {r['real_tokens_per_step'] / r['median_' + args.basis + '_s']:.0f} | "
            f"{r['micro_batch_lengths'][0]}-{r['micro_batch_lengths'][1]} | "
            f"{' '.join(f'{x:.4f}' for x in r['losses_by_round'][0])} |")
    lines.append("")
    lines += ratio_lines(results, args)
    return "\n".join(lines) + "\n"


def ratio_lines(results: dict, args) -> list[str]:
    out = []
    pad = results.get("padded")
    for mode in ("variable", "balanced", "packed"):
        r = results.get(mode)
        if pad is None or r is None:
            continue
        wall, cpu = pad["median_wall_s"] / r["median_wall_s"], pad["median_cpu_s"] / r["median_cpu_s"]
        ratio = cpu if args.basis == "cpu" else wall
        positions = pad["positions_per_step"] / r["positions_per_step"]
        slowest = pad["slowest_rank_positions_per_step"] / r["slowest_rank_positions_per_step"]
        tokens = (r["real_tokens_per_step"] / pad["real_tokens_per_step"]) * ratio
        line = (f"- padded / {mode} step time: **{ratio:.2f}x** {args.basis} ({cpu:.2f}x CPU, {wall:.2f}x wall); "
                f"positions computed per step {positions:.2f}x fewer, by the busiest rank {slowest:.2f}x fewer; real tokens/s {tokens:.2f}x")
        if mode in ("variable", "balanced"):
            line += f"; target >= {args.target:.2f}x: {'met' if ratio >= args.target else 'NOT met'}"
        out.append(line)
    floor = results.get("floor")
    if pad and floor and "variable" in results:
        key = f"median_{args.basis}_s"
        var = results["variable"]
        out.append(f"- floor (16-token rows): {floor[key]:.2f} s {args.basis} per step does not scale with the tokens; "
                   f"on the rest, padded / variable = {(pad[key] - floor[key]) / (var[key] - floor[key]):.2f}x; "
                   f"the best padded / variable this floor allows at the positions ratio above is "
                   f"{pad[key] / (floor[key] + (pad[key] - floor[key]) * var['positions_per_step'] / pad['positions_per_step']):.2f}x")
    if pad and "variable" in results:
        a, b = pad["losses_by_round"][0], results["variable"]["losses_by_round"][0]
        if a and len(a) == len(b):
            worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
            out.append(f"- losses padded vs variable (the same batches, masking exact): largest relative "
                       f"difference {worst:.1e} over {len(a)} steps")
    return out
