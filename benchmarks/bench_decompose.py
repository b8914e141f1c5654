"""bench_decompose: HD-PiSSA's initialisation cost, exact `torch.linalg.svd` against the randomized
top-K*r decomposition (`top_singular(..., method="randomized")`), and how accurate the latter is.

For each layer-shaped matrix: median time of each method, the speed-up, the largest principal-angle
sine between the exact and randomized top-K*r singular subspaces (left and right, `subspace_error`),
the same for the worst single rank slice of r components, and the largest relative error of the
top-K*r singular values. Run from the repository root:

    .venv/bin/python benchmarks/bench_decompose.py                    # CPU defaults
    .venv/bin/python benchmarks/bench_decompose.py --device cuda --llama7b
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SPECTRA = ("gaussian", "powerlaw")
SMOLLM2_LAYER_KEYS = (  # HF names of one decoder layer's targeted projections
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", default="1024x1024,2816x1024,1024x2816",
                   help="comma list of MxN (out x in) synthetic matrices")
    p.add_argument("--llama7b", action="store_true",
                   help="LLaMA-7B layer shapes 4096x4096, 11008x4096, 4096x11008 instead of --shapes")
    p.add_argument("--spectra", default=",".join(SPECTRA),
                   help="synthetic spectra: gaussian (i.i.d. entries: flat Marchenko-Pastur spectrum, the "
                        "hard case for randomized SVD) and powerlaw (s_i = (i+1)^-0.5, a slow decay like "
                        "trained weights)")
    p.add_argument("--smollm2-layer", type=int, default=0,
                   help="also decompose this decoder layer of the real SmolLM2-135M-Instruct (dequantized "
                        "from the packaged Q4_1 GGUF; cached by megatron_hdpissa.data.material); -1 to skip")
    p.add_argument("--K", type=int, default=8, help="data-parallel size (slices)")
    p.add_argument("--rank", type=int, default=16, help="per-slice rank r; K*r components are needed")
    p.add_argument("--oversampling", default="16",
                   help="q = K*r + oversampling (package default 16); a comma list sweeps several")
    p.add_argument("--niter", default="4", help="power iterations; a comma list sweeps several (package default 4)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per method (median)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown-out", default=None)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.llama7b:
        args.shapes = "4096x4096,11008x4096,4096x11008"
    args.shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    args.spectrum_list = [s for s in args.spectra.split(",") if s]
    bad = [s for s in args.spectrum_list if s not in SPECTRA]
    if bad:
        p.error(f"--spectra: unknown {bad}; choose from {SPECTRA}")
    args.niter_list = [int(v) for v in args.niter.split(",") if v]
    args.oversampling_list = [int(v) for v in args.oversampling.split(",") if v]
    return args


def synthetic(m: int, n: int, spectrum: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    if spectrum == "gaussian":
        return torch.randn(m, n, generator=g) / n ** 0.5
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = (torch.arange(k, dtype=torch.float32) + 1).pow(-0.5)
    return (u * s) @ v.t()


def smollm2_matrices(layer: int):
    """The targeted projections of one real SmolLM2-135M-Instruct layer (None if unavailable)."""
    try:
        from safetensors import safe_open

        from megatron_hdpissa.data.material import smollm2_hf_dir

        path = os.path.join(smollm2_hf_dir(), "model.safetensors")
        out = []
        with safe_open(path, framework="pt") as f:
            for key in SMOLLM2_LAYER_KEYS:
                out.append((f"smollm2 L{layer} {key.split('.')[-1]}",
                            f.get_tensor(f"model.layers.{layer}.{key}.weight").float()))
        return out
    except Exception as exc:  # noqa: BLE001 - optional real material
        print(f"note: SmolLM2 weights unavailable ({exc}); skipping them")
        return None


def time_call(fn, reps: int, sync):
    """Median wall time, median process CPU time (all threads) and the last result."""
    fn()  # warm-up: LAPACK / cuSOLVER workspace, first-call overheads
    wall, cpu = [], []
    for _ in range(reps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def mean_sin2(u_ref, u) -> float:
    """Mean squared sine of the principal angles: 1 - ||Q_ref^T Q||_F^2 / k (0 = same subspace)."""
    import torch

    q1, _ = torch.linalg.qr(u_ref.double())
    q2, _ = torch.linalg.qr(u.double())
    return float(1.0 - (q1.t() @ q2).pow(2).sum() / q1.shape[1])


def measure(name: str, w, args, device, sync) -> list[dict]:
    import torch

    from megatron_hdpissa.peft.decomposition import subspace_error, top_singular

    k, r = args.K * args.rank, args.rank
    m, n = w.shape
    if k > min(m, n):
        print(f"skip {name} ({m}x{n}): K*r = {k} > min(m, n)")
        return []
    w = w.to(device)
    t_exact, c_exact, (u_e, s_e, v_e) = time_call(lambda: top_singular(w, k, "exact"), args.reps, sync)
    rows = []
    w64 = w.double().cpu()
    u_e_c, v_e_c = u_e.double().cpu(), v_e.double().cpu()
    tail_exact = float(torch.linalg.svdvals(w64)[k:].pow(2).sum().sqrt())  # ||W - W_k|| (Eckart-Young)
    for oversampling in args.oversampling_list:
        for niter in args.niter_list:
            t_rand, c_rand, (u_r, s_r, v_r) = time_call(
                lambda: top_singular(w, k, "randomized", oversampling, niter, seed=args.seed), args.reps, sync)
            u_r_c, s_r_c, v_r_c = u_r.double().cpu(), s_r.double().cpu(), v_r.double().cpu()
            slice_err = max(
                max(subspace_error(u_e_c[:, i * r:(i + 1) * r], u_r_c[:, i * r:(i + 1) * r]),
                    subspace_error(v_e_c[:, i * r:(i + 1) * r], v_r_c[:, i * r:(i + 1) * r]))
                for i in range(args.K))
            sv_rel = (s_r_c - s_e.double().cpu()).abs() / s_e.double().cpu()
            tail_rand = float((w64 - (u_r_c * s_r_c) @ v_r_c.t()).norm())
            rows.append({
                "matrix": name, "m": m, "n": n, "components": k, "oversampling": oversampling,
                "niter": niter, "q": min(k + oversampling, min(m, n)),
                "exact_ms": 1e3 * t_exact, "randomized_ms": 1e3 * t_rand, "speedup": t_exact / t_rand,
                "exact_cpu_ms": 1e3 * c_exact, "randomized_cpu_ms": 1e3 * c_rand,
                "speedup_cpu": c_exact / c_rand if c_rand > 0 else None,
                "subspace_err_u": subspace_error(u_e_c, u_r_c), "subspace_err_v": subspace_error(v_e_c, v_r_c),
                "mean_sin2_u": mean_sin2(u_e_c, u_r_c), "mean_sin2_v": mean_sin2(v_e_c, v_r_c),
                "worst_slice_err": slice_err,
                "approx_excess": tail_rand / tail_exact - 1.0,
                "sv_rel_err_top": float(sv_rel[0]), "sv_rel_err_max": float(sv_rel.max()),
                "gap_at_kr": float(s_e[k - 1] / s_e[0]),
            })
            r0 = rows[-1]
            print(f"{name:24s} {m:>6d}x{n:<6d} q {r0['q']:4d} niter {niter}: exact {r0['exact_ms']:8.1f} ms, "
                  f"randomized {r0['randomized_ms']:8.1f} ms ({r0['speedup']:.1f}x, CPU time {r0['speedup_cpu']:.1f}x); max-angle sin U "
                  f"{r0['subspace_err_u']:.2e} V {r0['subspace_err_v']:.2e}, mean sin^2 U {r0['mean_sin2_u']:.1e}, "
                  f"worst slice {slice_err:.2e}, approx excess {r0['approx_excess']:.1e}, "
                  f"sv rel err max {r0['sv_rel_err_max']:.1e}", flush=True)
    del torch
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    from benchmarks.common.machine import cpu_name
    from benchmarks.common.runner import command_line
    from benchmarks.common.timing import device_sync

    sync = device_sync(cuda)
    cpu = cpu_name()
    command = command_line(__file__, argv)
    machine = (f"{cpu}, {os.cpu_count()} logical cores, 1-min load {os.getloadavg()[0]:.1f} at start, "
               f"torch threads {args.threads}, torch {torch.__version__}, device {args.device}"
               + (f" ({torch.cuda.get_device_name(0)})" if cuda else ""))
    print(f"command: {command}\nmachine: {machine}")

    rows = []
    for i, (m, n) in enumerate(args.shape_list):
        for spectrum in args.spectrum_list:
            rows += measure(f"{spectrum}", synthetic(m, n, spectrum, args.seed + i), args, device, sync)
    if args.smollm2_layer >= 0:
        for name, w in smollm2_matrices(args.smollm2_layer) or []:
            rows += measure(name, w, args, device, sync)

    lines = [
        f"Command: `{command}`", "",
        f"Machine: {machine}", "",
        f"K={args.K} slices x r={args.rank}: top {args.K * args.rank} singular components; randomized = "
        f"`torch.svd_lowrank` with q = K*r + oversampling and the stated power iterations, fp32; "
        f"median of {args.reps} timed calls after one warm-up (wall time, and process CPU time, "
        f"which other jobs on a shared machine disturb far less).", "",
        "| matrix | m x n | q | niter | exact ms | randomized ms | speed-up | CPU ms exact / rand | speed-up (CPU) "
        "| max-angle sin U | max-angle sin V "
        "| mean sin^2 U / V | worst slice | approx excess | s_1 rel err | max sv rel err | s_{K*r} / s_1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = "-" if cuda else f"{r['exact_cpu_ms']:.0f} / {r['randomized_cpu_ms']:.0f}"
        cpu_speedup = "-" if cuda or r["speedup_cpu"] is None else f"{r['speedup_cpu']:.1f}x"
        lines.append(
            f"| {r['matrix']} | {r['m']}x{r['n']} | {r['q']} | {r['niter']} | {r['exact_ms']:.1f} | "
            f"{r['randomized_ms']:.1f} | {r['speedup']:.1f}x | {cpu} | {cpu_speedup} | "
            f"{r['subspace_err_u']:.2e} | {r['subspace_err_v']:.2e} | "
            f"{r['mean_sin2_u']:.1e} / {r['mean_sin2_v']:.1e} | {r['worst_slice_err']:.2e} | "
            f"{r['approx_excess']:.1e} | {r['sv_rel_err_top']:.1e} | {r['sv_rel_err_max']:.1e} | {r['gap_at_kr']:.3f} |"
        )
    lines += [
        "",
        "- max-angle sin: largest principal-angle sine between the exact and randomized top-K*r "
        "singular subspaces (`megatron_hdpissa.peft.decomposition.subspace_error`, the requested metric; "
        "0 = identical, 1 = some direction orthogonal to the exact subspace). It is decided by the "
        "components next to the K*r boundary; mean sin^2 = 1 - ||U_exact^T U_rand||_F^2 / (K*r) is the "
        "average over all directions (the share of the subspace missed).",
        "- approx excess: ||W - U S V^T||_F of the randomized rank-K*r result over the optimal "
        "(Eckart-Young) one, minus 1.",
        "- worst slice err: the same for one rank's r components (left or right, the worst of the K "
        "slices); it is large where neighbouring singular values are nearly equal, because a single "
        "slice boundary is then ill-defined even for two exact SVDs.",
        "- s_1 rel err / max sv rel err: |s_randomized - s_exact| / s_exact for the largest and the "
        "worst of the top K*r singular values.",
        "- s_{K*r} / s_1: how far the spectrum decays over the needed components (1 = flat).",
    ]
    md = "\n".join(lines) + "\n"
    print()
    print(md)
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(md)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"command": command, "machine": machine,
                       "args": {k: v for k, v in vars(args).items()}, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
