"""The rank the method is about, measured by the tool: after one optimizer step on real megatron-core
layers, rank(W_T - W_0) is r for LoRA, 2r for PiSSA and 2Kr for HD-PiSSA over K slices, counted
by `analysis.effective_rank` and by an independent float64 SVD (numpy), with a clear spectral gap
at that rank; HD-PiSSA keeps rank >= 2Kr - 2 over several steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_hdpissa.analysis.effective_rank import DEFAULT_THRESHOLD, effective_rank, singular_values
from tests.helpers.distributed import run_distributed

# Column-parallel `up` (N -> M) and row-parallel `down` (M -> N); r per slice; K = DP x virtual slices.
M, N, R, SLICES_PER_PROC, DP, STEPS, LR = 64, 48, 4, 2, 2, 6, 1e-3
K = DP * SLICES_PER_PROC
LAYERS = ("up", "down")


def _w0(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed({"up": 0, "down": 1}[name])
    shape = (M, N) if name == "up" else (N, M)
    return torch.randn(*shape, generator=g) / shape[1] ** 0.5


def _data(slice_index: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + slice_index)
    return torch.randn(16, 2, N, generator=g), torch.randn(16, 2, N, generator=g)


def _model():
    """`up` then `down`: megatron-core's parallel linears, W_0 loaded (TP = 1)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=N, num_attention_heads=1, use_cpu_initialization=True)
    model = torch.nn.Module()
    model.up = ColumnParallelLinear(N, M, config=cfg, init_method=lambda t: None, bias=False)
    model.down = RowParallelLinear(M, N, config=cfg, init_method=lambda t: None, bias=False,
                                   input_is_parallel=True, skip_bias_add=False)
    with torch.no_grad():
        for name in LAYERS:
            getattr(model, name).weight.copy_(_w0(name))
    return model


def _loss(model, x, y):
    h, _ = model.up(x)
    out, _ = model.down(h)
    return ((out - y) ** 2).mean()


def _weights(model) -> dict:
    return {name: getattr(model, name).weight.detach().clone() for name in LAYERS}


def train_all_methods():
    """On each of the DP ranks: HD-PiSSA (its own slices), then LoRA and PiSSA through
    `apply_lowrank` (identical adapters, DP-averaged gradients), all on the same K data slices.
    Returns W after the first and after the last step of each method (merged for the baselines)."""
    from megatron.core import parallel_state as ps

    from megatron_hdpissa import (DataParallelAdamW, HDPiSSAConfig, HDPiSSAOptimizer, LowRankConfig, active_slice,
                                  apply_hd_pissa, apply_lowrank, merge_lowrank)

    dp_rank = ps.get_data_parallel_rank()
    out = {}
    model = apply_hd_pissa(_model(), HDPiSSAConfig(rank=R, alpha=R, target_modules=list(LAYERS),
                                                   virtual_ranks=SLICES_PER_PROC), progress=False)
    opt = HDPiSSAOptimizer(model, lr=LR)
    for step in range(STEPS):
        for v in range(SLICES_PER_PROC):
            with active_slice(model, v):
                _loss(model, *_data(dp_rank * SLICES_PER_PROC + v, step)).backward()
        opt.step()
        opt.zero_grad()
        if step in (0, STEPS - 1):
            out[("hd-pissa", step + 1)] = _weights(model)
    for method in ("lora", "pissa"):
        for steps in (1, STEPS):
            model = apply_lowrank(_model(), LowRankConfig(method=method, rank=R, alpha=R,
                                                          target_modules=list(LAYERS)), progress=False)
            opt = DataParallelAdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
            for step in range(steps):
                for v in range(SLICES_PER_PROC):
                    (_loss(model, *_data(dp_rank * SLICES_PER_PROC + v, step)) / SLICES_PER_PROC).backward()
                opt.step()
                opt.zero_grad()
            out[(method, steps)] = _weights(merge_lowrank(model))
    return out


@pytest.fixture(scope="module")
def trained():
    per_rank = run_distributed(train_all_methods, DP, 1)
    for key, weights in per_rank[0].items():  # every DP rank holds the same W
        for name, w in weights.items():
            assert torch.equal(w, per_rank[1][key][name]), (key, name)
    return per_rank[0]


def _numpy_count(delta: torch.Tensor, threshold: float) -> tuple[int, np.ndarray]:
    """Independent count: numpy's float64 SVD, values above threshold x the largest."""
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    return int((s > threshold * s[0]).sum()), s / s[0]


@pytest.mark.parametrize("method, expected", [("lora", R), ("pissa", 2 * R), ("hd-pissa", 2 * K * R)])
def test_one_step_update_has_the_rank_of_the_method(trained, method, expected):
    """One step moves both factors (LoRA's B from 0; PiSSA's and HD-PiSSA's A and B), so the update
    reaches its rank bound exactly: LoRA s B'A (r), PiSSA s (B'A' - BA) (2r), HD-PiSSA
    sum_k (B'_k A'_k - B_k A_k) over K orthogonal slices (2Kr)."""
    steps = 1
    if method == "lora":  # LoRA's first step leaves A (g_A = s B^T G = 0 at B = 0): count after STEPS
        steps = STEPS
    for name in LAYERS:
        delta = trained[(method, steps)][name].double() - _w0(name).double()
        sigma = singular_values(delta)
        count, rel = _numpy_count(delta, DEFAULT_THRESHOLD)
        assert np.allclose(sigma.numpy() / float(sigma[0]), rel, rtol=0, atol=1e-9)
        assert effective_rank(sigma) == count == expected, (method, name, effective_rank(sigma), count)
        # a gap, not a threshold accident: every counted value well above it, the next one far below
        assert rel[expected - 1] > 10 * DEFAULT_THRESHOLD and rel[expected] < DEFAULT_THRESHOLD / 20, \
            (method, name, rel[expected - 1], rel[expected])


def test_hd_pissa_keeps_its_rank_over_steps_and_lora_stays_at_r(trained):
    """Over STEPS steps HD-PiSSA's update keeps rank >= 2Kr - 2 (the second-order terms
    dB_k dA_k of later steps may add more), LoRA's stays <= r and PiSSA's <= 2r."""
    for name in LAYERS:
        ranks = {}
        for method in ("hd-pissa", "lora", "pissa"):
            delta = trained[(method, STEPS)][name].double() - _w0(name).double()
            ranks[method] = effective_rank(singular_values(delta))
            assert ranks[method] == _numpy_count(delta, DEFAULT_THRESHOLD)[0], (method, name)
        assert ranks["hd-pissa"] >= 2 * K * R - 2, ranks
        assert ranks["lora"] <= R and ranks["pissa"] <= 2 * R, ranks
