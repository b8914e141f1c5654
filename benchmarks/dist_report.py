"""bench_dist's report: one method over its ranks and rounds, ratios, tables, notes, progress line."""
from __future__ import annotations

import json
import statistics

from benchmarks.common.args import tokens_per_step as tokens_per_rank
from benchmarks.common.markdown import describe_machine, describe_model, fmt
from benchmarks.dist_bytes import payload_bytes, ring_bytes_sent

REFS = ("lora", "full", "floor", "published")


def combine(rounds: list[list[dict]], wall_s: float, args) -> dict:
    """One method's result over its ranks and rounds (fresh process sets): per timed step the
    slowest rank (the step is done when every rank is done), median over the steps of all
    rounds; memory the maximum over ranks and rounds; init the per-rank maximum, median over
    rounds."""
    ranks = rounds[0]
    r0 = ranks[0]
    res = {key: r0[key] for key in ("method", "dtype", "dp", "tp", "slices", "trainable_params", "formula",
                                     "collectives", "paths", "has_agg")}
    res["wall_s"] = wall_s
    res["rounds"] = len(rounds)
    res["ms"], res["min_ms"] = {}, {}

    def per_step(key, ci):  # the slowest rank of every timed step, all rounds
        return [max(r["series"][key][i][ci] for r in rr) for rr in rounds for i in range(len(rr[0]["series"][key]))]

    for ci, clock in enumerate(("wall", "cpu")):
        ms = {}
        for key in ("step", "fwd_bwd", "wait", "opt", "agg"):
            values = per_step(key, ci)
            ms[key] = 1e3 * statistics.median(values) if values else None
        if not r0["has_agg"]:
            ms["agg"] = None
        res["ms"][clock] = ms
        res["min_ms"][clock] = 1e3 * min(per_step("step", ci))
    res["steps_wall_ms"] = [round(1e3 * x) for x in per_step("step", 0)]
    res["steps_cpu_ms"] = [round(1e3 * x) for x in per_step("step", 1)]
    everyone = [r for rr in rounds for r in rr]
    res["mem_delta_mb"] = max(r["mem_delta_mb"] for r in everyone)
    res["mem_delta_mb_per_rank"] = [round(max(rr[i]["mem_delta_mb"] for rr in rounds), 1) for i in range(len(ranks))]
    res["mem_peak_mb"] = max(r["mem_peak_mb"] for r in everyone)
    for key, src, ci in (("init_ms", "init", 0), ("init_cpu_ms", "init", 1), ("init_apply_ms", "init_apply", 0)):
        res[key] = 1e3 * statistics.median(max(r[src][ci] for r in rr) for rr in rounds)
    with_retime = [rr for rr in rounds if rr[0]["retime"]]
    rt = with_retime[0] if with_retime else ranks
    res["retime_ms"] = {m: 1e3 * max(r["retime"][m][0] for r in rt) for m in rt[0]["retime"]}
    res["retime_cpu_ms"] = {m: 1e3 * max(r["retime"][m][1] for r in rt) for m in rt[0]["retime"]}
    res["final_loss_mean"] = statistics.mean(r["final_loss"] for r in ranks)
    states = {r.get("consistency") for r in everyone}
    res["consistency"] = "; ".join(sorted(str(x) for x in states)) if states != {None} else None
    # bytes: every rank, every round and every step (warm-up included) must count the same
    seen = {json.dumps(b, sort_keys=True) for r in everyone for b in r["bytes_steps"]}
    counted = r0["bytes_steps"][-1]
    res["bytes_counted"] = counted
    res["bytes_uniform"] = len(seen) <= 1
    keys = sorted(set(counted) | set(res["formula"]))
    res["bytes_match"] = all(counted.get(k, 0) == res["formula"].get(k, 0) for k in keys) and res["bytes_uniform"]
    res["bytes_total"] = sum(counted.values())
    res["formula_total"] = sum(res["formula"].values())
    res["wire_bytes_est"] = ring_bytes_sent(counted, res["collectives"], res["dp"])
    res["payload_bytes"] = payload_bytes(counted, res["collectives"], res["dp"])
    return res


def summarise(results: list[dict], args) -> None:
    """Ratios against lora / full / floor / published of the same dtype, on args.basis."""
    by = {(r["dtype"], r["method"]): r for r in results if "error" not in r and "skipped" not in r}
    tokens = tokens_per_rank(args) * args.dp
    for r in results:
        if "error" in r or "skipped" in r:
            continue
        t = r["ms"][args.basis]["step"]
        for ref in REFS:
            other = by.get((r["dtype"], ref))
            r[f"vs_{ref}"] = t / other["ms"][args.basis]["step"] if other else None
        pub = by.get((r["dtype"], "published"))
        r["published_speedup"] = pub["ms"][args.basis]["step"] / t if pub else None
        r["tokens_per_s"] = tokens / (t / 1e3)


def mb(n):
    """Bytes as MiB with three decimals ("0" for none)."""
    return f"{n / 2**20:.3f}" if n else "0"


def render_markdown(results, info, args, command) -> str:
    cuda = args.device.startswith("cuda")
    k = args.dp * args.virtual_ranks
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {describe_machine(info, ' per process')}, backend {'nccl' if cuda else 'gloo'}.",
        "",
        f"Parallelism: {args.nproc} processes = DP {args.dp} x TP {args.tp}; HD-PiSSA K = {k} slices "
        f"({args.dp} DP ranks x {args.virtual_ranks} per process), r = {args.rank}, alpha = {args.alpha:g}, "
        f"init SVD {args.svd}.",
        f"Model: {describe_model(args)}, {args.loss} loss.",
        f"Tokens per optimizer step: {args.micro_batch} x {args.seq} x {args.grad_accum} = {tokens_per_rank(args)} "
        f"per rank, {tokens_per_rank(args) * args.dp} in all; {args.warmup} warm-up + {args.iters} timed steps; "
        "each method in its own fresh set of processes"
        + (f"; {args.rounds} rounds (method order alternating), timed steps pooled." if args.rounds > 1 else "."),
        "",
        f"Times: per timed step the slowest rank, median over steps. Ratios, fwd+bwd, optimizer, aggregation "
        f"and tokens/s on **{'process CPU time' if args.basis == 'cpu' else 'wall-clock time'}**"
        + ("" if cuda else " (other jobs on a shared machine inflate wall time far more; CPU time counts the "
           "work of gloo's threads but not idle waiting)") + ". "
        "wait (wall) = a barrier between backward and optimizer: the time a rank waits for the slowest one, "
        "kept out of the optimizer time; the step includes it. aggregation = time in the HD-PiSSA "
        "optimizer's \"aggregate\" and \"param_gather\" phases, timed through its phase_hook (communication "
        "included; with sharded masters also the parameter "
        "all-gather, whose wait falls into the next forward, so that part is also inside fwd+bwd).",
        "",
    ]
    for dtype in args.dtypes:
        rows = [r for r in results if r["dtype"] == dtype]
        lines += [f"### {dtype}", "",
                  "| method | step wall ms (min) | step CPU ms | fwd+bwd ms | wait ms | optimizer ms | aggregation ms "
                  "| x LoRA | x full | x floor | published / this | tokens/s | peak mem MB (max rank) | init ms wall / CPU "
                  "| trainable / rank |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['method']} | skipped: {r['skipped']} ||||||||||||||")
                continue
            if "error" in r:
                lines.append(f"| {r['method']} | FAILED: {r['error']} ||||||||||||||")
                continue
            t = r["ms"][args.basis]
            lines.append(
                f"| {r['method']} | {fmt(r['ms']['wall']['step'])} ({fmt(r['min_ms']['wall'])}) | "
                f"{fmt(None if cuda else r['ms']['cpu']['step'])} | {fmt(t['fwd_bwd'])} | {fmt(r['ms']['wall']['wait'])} | "
                f"{fmt(t['opt'])} | "
                f"{fmt(t['agg'], '.1f')} | {fmt(r['vs_lora'], '.2f')} | {fmt(r['vs_full'], '.2f')} | "
                f"{fmt(r['vs_floor'], '.2f')} | {fmt(r['published_speedup'], '.2f')} | {fmt(r['tokens_per_s'])} | "
                f"{fmt(r['mem_delta_mb'])} | {fmt(r['init_ms'])} / {fmt(r['init_cpu_ms'])} | {r['trainable_params']:,} |")
        lines += ["", "Communication per rank per optimizer step (MiB; counted = what the optimizer handed to "
                  "the collective: the all-gather input / the all-reduce buffer):", "",
                  "| method | paths (parts) | collective: counted / formula | counted total | formula total | "
                  "match | all-gather output + all-reduce buffer | ring estimate sent | DP weights |",
                  "|---|---|---|---:|---:|---|---:|---:|---|"]
        for r in rows:
            if "skipped" in r or "error" in r:
                continue
            keys = [key for key in sorted(set(r["bytes_counted"]) | set(r["formula"]))]
            detail = "; ".join(f"{key} ({r['collectives'].get(key, '?')}) {mb(r['bytes_counted'].get(key, 0))} / "
                               f"{mb(r['formula'].get(key, 0))}" for key in keys
                               if r["bytes_counted"].get(key, 0) or r["formula"].get(key, 0)) or "none"
            paths = ", ".join(f"{p} {n}" for p, n in r["paths"].items() if n) or "-"
            match = "yes" if r["bytes_match"] else "**NO**"
            lines.append(f"| {r['method']} | {paths} | {detail} | {mb(r['bytes_total'])} | {mb(r['formula_total'])} | "
                         f"{match} | {mb(r['payload_bytes'])} | {mb(r['wire_bytes_est'])} | {r['consistency'] or '-'} |")
        lines.append("")
    lines += notes(results, args)
    return "\n".join(lines) + "\n"


def notes(results, args) -> list[str]:
    cuda = args.device.startswith("cuda")
    out = []
    for r in results:
        if r.get("retime_ms"):
            rt, rc = r["retime_ms"], r["retime_cpu_ms"]
            timed = ", ".join(f"{m} {rt[m]:.0f} / {rc[m]:.0f} ms" for m in rt)
            out.append(f"- Decomposition of all targeted matrices re-timed warm after {r['dtype']} {r['method']}'s "
                       f"steps (top K*r = {args.dp * args.virtual_ranks * args.rank} components, spread over the "
                       f"{args.nproc} ranks, max over ranks, wall / CPU): {timed} (randomized: sketch q = 2Kr; "
                       "the exact SVD replaces it where q > min(m, n) / 2).")
    out.append("- init (cold, first call in a fresh process): apply (TP gather, decomposition spread over the "
               "ranks, broadcast) + optimizer construction; published: " +
               ("a full SVD of every projection on every rank, as the published code." if args.svd == "exact"
                else "the top K*r components by the randomized decomposition on every rank (--svd randomized; "
                     "the published code runs a full SVD)."))
    bad = [r for r in results if "bytes_match" in r and not r["bytes_match"]]
    if bad:
        out.append("- **BYTES MISMATCH** (counted != formula, or not the same on every rank and step): "
                   + ", ".join(f"{r['dtype']} {r['method']}" for r in bad) + ".")
    elif any("bytes_match" in r for r in results):
        out.append("- Counted bytes equal the formula for every method, on every rank and every step.")
    out += [
        "- Formulas (per part of each targeted layer, local shapes m x n; K = all slices, L = slices per "
        "process): deltas L r (m + n) x 4 B (fp32 factor deltas; the all-gather output is K r (m + n), "
        "docs/DESIGN.md §7); dense m n x 4 B (fp32 update, all-reduced); params ceil(m_w / DP) n_w x the "
        "weight's bytes (sharded-fp32: the low-precision row blocks, all-gathered; per weight); grads "
        "(LoRA, PiSSA, full) trainable x 4 B (DataParallelAdamW's fp32 all-reduce); published 2 r (m + n) "
        "x 4 B (four all-gathers per projection: dA, dB and the factors A, B, as the published code) plus "
        "4 B per micro-batch (its loss all-reduce). With one DP rank nothing is sent: all zero.",
        "- ring estimate: bytes a rank sends in a ring algorithm, (DP - 1) x input for an all-gather, "
        "(DP - 1) / DP x buffer for a reduce-scatter (the dense path with sharded-fp32) and "
        "2 (DP - 1) / DP x buffer for an all-reduce.",
        ("- peak memory: `torch.cuda.max_memory_allocated()` delta after `reset_peak_memory_stats()` once "
         "the base model and data were on the device; the largest of the ranks." if cuda else
         "- peak memory: max RSS (`ru_maxrss`) of each rank's fresh process minus its RSS once the base model "
         "and data were built (decomposition, adapters, activations, gradients, optimizer state, communication "
         "buffers); the largest of the ranks. glibc keeps freed heap: take +-20 %."),
        "- floor: frozen base, forward + input-gradient backward (from layer 0's linear_qkv output), no "
        "optimizer, no communication. full: every weight trainable, DataParallelAdamW (fp32 gradient all-reduce, "
        "torch AdamW on the weights in their dtype). lora: the package's `apply_lowrank` + DataParallelAdamW.",
        "- published: the published formulation (MuLabPKU/HD-PiSSA hd_pissa.py) on the same megatron-core layers, "
        "one rank per slice: full SVD of each projection on every rank, a second full-size fp32 linear "
        "scaled by 1e-16 with the dense B A on every forward, gradients x1e16, manual Adam, per projection "
        "blocking all-gathers of dA, dB, A, B and `W -= sum_k (dB_k A_k + B_k dA_k - dB_k dA_k)` in fp32, "
        "added to W in W's dtype.",
        "- DP weights: `HDPiSSAOptimizer.check_consistency()` after the timed steps.",
    ]
    return out


def progress_line(res: dict) -> str:
    w, c = res["ms"]["wall"], res["ms"]["cpu"]
    agg = f", aggregation {w['agg']:.1f}" if w["agg"] is not None else ""
    flag = "match" if res["bytes_match"] else "!!! MISMATCH !!!"
    return (f"step {w['step']:.0f} ms wall (fwd+bwd {w['fwd_bwd']:.0f}, wait {w['wait']:.0f}, optimizer "
            f"{w['opt']:.0f}{agg}), {c['step']:.0f} ms CPU; steps {res['steps_wall_ms']} ms wall, "
            f"{res['steps_cpu_ms']} ms CPU; peak mem +{res['mem_delta_mb']:.0f} MB (ranks "
            f"{res['mem_delta_mb_per_rank']}); sent {res['bytes_total']:,} B/step (formula "
            f"{res['formula_total']:,}: {flag}) {res['bytes_counted']}; init {res['init_ms']:.0f} ms"
            + (" (re-timed warm: " + ", ".join(f"{m} {t:.0f} ms" for m, t in res["retime_ms"].items()) + ")"
               if res["retime_ms"] else "")
            + (f"; DP weights {res['consistency']}" if res["consistency"] else "")
            + f"; {res['wall_s']:.0f} s")
