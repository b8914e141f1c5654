"""bench_dist's byte formulas from the layer shapes alone, and ring-algorithm estimates of bytes sent."""
from __future__ import annotations


def hd_formula(model, spec, dp: int) -> tuple[dict, dict]:
    """Bytes this rank hands to each collective per optimizer step, by formula, and the paths.

    deltas (all-gather input): per factor-path part, this rank's L slices of dA (r x n_loc) and
    dB (m_loc x r): L r (m_loc + n_loc) elements of the factor dtype (fp32). The all-gather's
    output is dp times that: K r (m_loc + n_loc), docs/DESIGN.md §7's per-layer figure.
    dense (all-reduce buffer): per dense-path part, this rank's m_loc x n_loc update (fp32); with
    sharded-fp32 (reduce-scatter input): per weight with a dense-path part, its update in weight
    rows padded to dp x ceil(m_w / dp) rows, x n_w (fp32).
    params (all-gather input, sharded-fp32): per targeted weight, this rank's padded row block
    ceil(m_w / dp) x n_w in the weight's dtype."""
    from megatron_hdpissa.peft.hd_pissa.model import iter_adapters

    out = {"deltas": 0, "dense": 0, "params": 0}
    paths = {"factors": 0, "dense": 0}
    sharded = spec["mode"] == "sharded-fp32" and dp > 1
    for _, module, ad in iter_adapters(model):
        dense_weight = False
        for part in ad.parts:
            slices, m, r = ad.b[part.name].shape
            n = ad.a[part.name].shape[-1]
            k = ad.num_slices
            path = spec["path"]
            if path == "auto":  # the rule stated in HDPiSSAConfig / docs/DESIGN.md §7: the smaller payload
                path = "dense" if m * n < k * r * (m + n) else "factors"
            paths[path] += 1
            esize = ad.a[part.name].element_size()
            if path == "factors":
                out["deltas"] += slices * r * (m + n) * esize
            elif sharded:
                dense_weight = True
            else:
                out["dense"] += m * n * esize
        m_w, n_w = module.weight.shape
        if dense_weight:  # one reduce-scatter buffer per weight (4 bytes: fp32 updates)
            out["dense"] += dp * -(-m_w // dp) * n_w * 4
        if spec["mode"] == "sharded-fp32":
            out["params"] += -(-m_w // dp) * n_w * module.weight.element_size()
    if dp == 1:
        out = {key: 0 for key in out}
    return out, paths


def baseline_formula(opt, dp: int) -> dict:
    """LoRA, PiSSA, full: DataParallelAdamW all-reduces every trainable gradient in fp32."""
    n_grad = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return {"grads": 4 * n_grad if dp > 1 else 0}


def published_formula(adapters, grad_accum: int, dp: int) -> dict:
    """The published step: all-gathers of dA, dB, A and B per projection (2 r (m + n) elements of
    fp32 per part and rank), and one fp32 loss all-reduce per micro-batch."""
    fd = sum(2 * (a.numel() + b.numel()) * a.element_size() for ad in adapters for a, b in zip(ad.a, ad.b))
    return {"factors+deltas": fd if dp > 1 else 0, "loss": 4 * grad_accum if dp > 1 else 0}


def ring_bytes_sent(counted: dict, collectives: dict, dp: int) -> float:
    """Bytes a rank sends in a ring algorithm: (DP - 1) x input for an all-gather, (DP - 1) / DP x
    buffer for a reduce-scatter and 2 (DP - 1) / DP x buffer for an all-reduce."""
    wire = 0.0
    for key, n in counted.items():
        op = collectives.get(key)
        wire += {"all_gather": (dp - 1) * n, "reduce_scatter": (dp - 1) / dp * n}.get(op, 2 * (dp - 1) / dp * n)
    return wire


def payload_bytes(counted: dict, collectives: dict, dp: int) -> int:
    """The all-gather outputs (DP x input) plus the all-reduce / reduce-scatter buffers."""
    return sum(dp * n if collectives.get(k) == "all_gather" else n for k, n in counted.items())
