"""The update of HD-PiSSA reaches rank ~2Kr; a LoRA update on the same data stays at rank <= r."""
from __future__ import annotations

import torch

from tests.helpers.distributed import run_distributed

M, N, R, SLICES_PER_PROC, DP, STEPS, LR = 64, 48, 4, 2, 2, 6, 1e-3


def _data(slice_index: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + slice_index)
    return torch.randn(16, 2, N, generator=g), torch.randn(16, 2, M, generator=g)


def _w0():
    g = torch.Generator().manual_seed(0)
    return torch.randn(M, N, generator=g) / N ** 0.5


def train_single_layer():
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, active_slice, apply_hd_pissa

    cfg = TransformerConfig(num_layers=1, hidden_size=N, num_attention_heads=1, use_cpu_initialization=True)
    model = torch.nn.Module()
    model.linear = ColumnParallelLinear(N, M, config=cfg, init_method=lambda t: None, bias=False)
    with torch.no_grad():
        model.linear.weight.copy_(_w0())
    apply_hd_pissa(model, HDPiSSAConfig(rank=R, target_modules=["linear"], virtual_ranks=SLICES_PER_PROC),
                   progress=False)
    opt = HDPiSSAOptimizer(model, lr=LR)
    dp_rank = ps.get_data_parallel_rank()
    for step in range(STEPS):
        for v in range(SLICES_PER_PROC):
            with active_slice(model, v):
                x, y = _data(dp_rank * SLICES_PER_PROC + v, step)
                ((model.linear(x)[0] - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.linear.weight.detach().clone()


def _rank_above(delta: torch.Tensor, rel: float = 1e-3) -> int:
    s = torch.linalg.svdvals(delta.double())
    return int((s > rel * s[0]).sum())


def test_effective_rank_hd_pissa_vs_lora():
    k = DP * SLICES_PER_PROC
    w_t = run_distributed(train_single_layer, DP, 1)[0]
    hd_rank = _rank_above(w_t - _w0())

    # LoRA on the same data: W + s B A, B = 0, Kaiming A, data-parallel mean of the same batches.
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.nn.init.kaiming_uniform_(torch.empty(R, N), a=5 ** 0.5))
    b = torch.nn.Parameter(torch.zeros(M, R))
    opt = torch.optim.AdamW([a, b], lr=LR, weight_decay=0.0)
    w0 = _w0()
    for step in range(STEPS):
        for sl in range(k):
            x, y = _data(sl, step)
            ((x @ (w0 + b @ a).t() - y) ** 2).mean().div(k).backward()
        opt.step()
        opt.zero_grad()
    lora_rank = _rank_above((b @ a).detach())
    assert hd_rank >= 2 * k * R - 2, hd_rank
    assert lora_rank <= R, lora_rank
