"""A small model holding real megatron-core parallel linears (fused QKV with GQA, a row-parallel
projection, fused gate/up and a row-parallel down projection), built from logical full weights so
the same model can be instantiated at any TP size, plus its dense single-process twin."""
from __future__ import annotations

import torch
import torch.nn.functional as F

H, HEADS, GROUPS, HD, FFN = 32, 4, 2, 8, 48
QKV_OUT = (HEADS + 2 * GROUPS) * HD


def logical_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(m, n):  # decaying spectrum, like trained weights
        u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        k = min(m, n)
        s = torch.logspace(0, -1.5, k)
        return (u[:, :k] * s) @ v[:, :k].t() * (m * n) ** 0.25 / 3

    return {
        "q": rnd(HEADS * HD, H), "k": rnd(GROUPS * HD, H), "v": rnd(GROUPS * HD, H),
        "proj": rnd(H, QKV_OUT), "gate": rnd(FFN, H), "up": rnd(FFN, H), "fc2": rnd(H, FFN),
    }


def fuse_qkv(q, k, v):
    """megatron-core's global fused order: per query group [q heads of group g, k_g, v_g]."""
    qpg = HEADS // GROUPS
    rows = []
    for g in range(GROUPS):
        rows += [q[g * qpg * HD:(g + 1) * qpg * HD], k[g * HD:(g + 1) * HD], v[g * HD:(g + 1) * HD]]
    return torch.cat(rows, 0)


def split_qkv(fused):
    qpg = HEADS // GROUPS
    per = (qpg + 2) * HD
    q, k, v = [], [], []
    for g in range(GROUPS):
        blk = fused[g * per:(g + 1) * per]
        q.append(blk[:qpg * HD]); k.append(blk[qpg * HD:(qpg + 1) * HD]); v.append(blk[(qpg + 1) * HD:])
    return torch.cat(q), torch.cat(k), torch.cat(v)


def dense_forward(w: dict, x: torch.Tensor) -> torch.Tensor:
    """The toy block on full logical weights: x + proj(tanh(qkv x)), then a SwiGLU MLP."""
    h1 = x + torch.tanh(x @ fuse_qkv(w["q"], w["k"], w["v"]).t()) @ w["proj"].t()
    return h1 + (F.silu(h1 @ w["gate"].t()) * (h1 @ w["up"].t())) @ w["fc2"].t()


def loss_fn(out, target):
    return ((out - target) ** 2).mean()


class MegatronToy(torch.nn.Module):
    """Same block on megatron-core ColumnParallelLinear / RowParallelLinear (module names as in
    GPTModel, so fused layouts are recognised)."""

    def __init__(self, weights: dict, tp_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer import TransformerConfig

        cfg = TransformerConfig(
            num_layers=1, hidden_size=H, num_attention_heads=HEADS, num_query_groups=GROUPS,
            kv_channels=HD, ffn_hidden_size=FFN, gated_linear_unit=True, add_bias_linear=False,
            use_cpu_initialization=True, params_dtype=dtype, bf16=dtype == torch.bfloat16,
            tensor_model_parallel_size=tp_size,
        )
        init = lambda t: None  # noqa: E731 - weights are copied in below
        kw = dict(config=cfg, init_method=init, bias=False)
        self.linear_qkv = ColumnParallelLinear(H, QKV_OUT, gather_output=False, **kw)
        self.linear_proj = RowParallelLinear(QKV_OUT, H, input_is_parallel=True, skip_bias_add=True, **kw)
        self.linear_fc1 = ColumnParallelLinear(H, 2 * FFN, gather_output=False, **kw)
        self.linear_fc2 = RowParallelLinear(FFN, H, input_is_parallel=True, skip_bias_add=True, **kw)
        t = ps.get_tensor_model_parallel_rank()
        with torch.no_grad():
            self.linear_qkv.weight.copy_(shard_rows(fuse_qkv(weights["q"], weights["k"], weights["v"]), t, tp_size))
            self.linear_proj.weight.copy_(shard_cols(weights["proj"], t, tp_size))
            self.linear_fc1.weight.copy_(torch.cat([shard_rows(weights["gate"], t, tp_size),
                                                    shard_rows(weights["up"], t, tp_size)]))
            self.linear_fc2.weight.copy_(shard_cols(weights["fc2"], t, tp_size))

    def forward(self, x):
        qkv, _ = self.linear_qkv(x)
        a, _ = self.linear_proj(torch.tanh(qkv))
        h1 = x + a
        fc1, _ = self.linear_fc1(h1)
        gate, up = torch.chunk(fc1, 2, dim=-1)
        b, _ = self.linear_fc2(F.silu(gate) * up)
        return h1 + b

    def logical_weights(self) -> dict:
        """Gather the TP shards back into the logical full matrices."""
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()

        def gather(w, dim):
            if tp == 1:
                return w.detach().clone()
            parts = [torch.empty_like(w) for _ in range(tp)]
            torch.distributed.all_gather(parts, w.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
            return torch.cat(parts, dim)

        q, k, v = split_qkv(gather(self.linear_qkv.weight, 0))
        fc1 = [torch.chunk(p, 2, 0) for p in torch.chunk(gather(self.linear_fc1.weight, 0), tp, 0)]
        return {
            "q": q, "k": k, "v": v, "proj": gather(self.linear_proj.weight, 1),
            "gate": torch.cat([g for g, _ in fc1]), "up": torch.cat([u for _, u in fc1]),
            "fc2": gather(self.linear_fc2.weight, 1),
        }


def shard_rows(w, t, tp):
    m = w.shape[0] // tp
    return w[t * m:(t + 1) * m]


def shard_cols(w, t, tp):
    n = w.shape[1] // tp
    return w[:, t * n:(t + 1) * n]


def make_data(steps: int, slices: int, micro: int, seq: int = 5, batch: int = 2, seed: int = 1):
    """data[step][slice][micro] = (x, target); each slice (DP or virtual rank) has its own."""
    g = torch.Generator().manual_seed(seed)
    return [[[(torch.randn(seq, batch, H, generator=g), torch.randn(seq, batch, H, generator=g))
              for _ in range(micro)] for _ in range(slices)] for _ in range(steps)]
