"""One megatron-core MoE layer (router, SequentialMLP experts with SwiGLU, all-to-all dispatcher)
built from logical full weights, so the same layer exists at any EP / expert-TP size, and a float64
reference of its forward with the routing fixed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

H, FFN, EXPERTS, TOPK = 16, 12, 4, 2  # hidden, expert FFN, experts, top-k
SEQ, BATCH = 8, 2


def logical_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """router (E, H); gate, up (E, FFN, H); down (E, H, FFN); decaying spectra."""
    g = torch.Generator().manual_seed(seed)

    def rnd(m, n):
        u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        k = min(m, n)
        return (u[:, :k] * torch.logspace(0, -1.2, k)) @ v[:, :k].t() * (m * n) ** 0.25 / 2

    return {"router": torch.randn(EXPERTS, H, generator=g),
            "gate": torch.stack([rnd(FFN, H) for _ in range(EXPERTS)]),
            "up": torch.stack([rnd(FFN, H) for _ in range(EXPERTS)]),
            "down": torch.stack([rnd(H, FFN) for _ in range(EXPERTS)])}


def shard_input(shard: int, micro: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [SEQ, BATCH, H], loss weights R of the same shape) of data shard `shard`, micro-batch `micro`."""
    g = torch.Generator().manual_seed(1000 + 97 * seed + 31 * shard + micro)
    return torch.randn(SEQ, BATCH, H, generator=g), torch.randn(SEQ, BATCH, H, generator=g)


def moe_config(ep: int, etp: int, dtype: torch.dtype = torch.float32, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        use_cpu_initialization=True, params_dtype=dtype, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp, moe_grouped_gemm=False)
    return TransformerConfig(**{**kw, **overrides})


class MoEBlock(torch.nn.Module):
    """`mlp` is megatron-core's MoELayer (names as inside a GPT layer); forward returns its output."""

    def __init__(self, ep: int, etp: int, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 **overrides):
        super().__init__()
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.spec_utils import build_module

        from megatron_hdpissa.models.moe_compat import ensure_moe_compat

        ensure_moe_compat()
        spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False).submodules.mlp
        self.mlp = build_module(spec, config=moe_config(ep, etp, dtype, **overrides))
        self.load(weights)

    @torch.no_grad()
    def load(self, w: dict[str, torch.Tensor]) -> None:
        """Copy the logical weights: this EP rank's experts, this expert-TP rank's rows / columns."""
        disp = self.mlp.token_dispatcher
        etp, t = disp.tp_size, disp.tp_rank
        self.mlp.router.weight.copy_(w["router"][:self.mlp.router.weight.shape[0]])
        f = FFN // etp
        for i, expert in enumerate(self.mlp.experts.local_experts):
            e = disp.local_expert_indices[i]
            expert.linear_fc1.weight.copy_(torch.cat([w["gate"][e, t * f:(t + 1) * f], w["up"][e, t * f:(t + 1) * f]]))
            expert.linear_fc2.weight.copy_(w["down"][e][:, t * f:(t + 1) * f])

    def local_weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """{global expert: {"fc1", "fc2"}} of this rank's (shards of) expert weights."""
        disp = self.mlp.token_dispatcher
        return {disp.local_expert_indices[i]: {"fc1": ex.linear_fc1.weight.detach().clone(),
                                               "fc2": ex.linear_fc2.weight.detach().clone()}
                for i, ex in enumerate(self.mlp.experts.local_experts)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.mlp(x)
        return out


def reference_routing(w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron-core's default router (softmax after top-k): (top-k expert indices, their
    probabilities) per token of `x` (tokens x H), in float64."""
    logits = x.double() @ w["router"].double().t()
    top, idx = torch.topk(logits, TOPK, dim=-1)
    return idx, torch.softmax(top, dim=-1)


def reference_expert_grads(w: dict[str, torch.Tensor], x: torch.Tensor, r: torch.Tensor, expert: int):
    """float64 dL/dW of expert `expert`'s gate, up, down for the loss sum(R * out) over the tokens
    of `x` (tokens x H) routed to it: out = sum_e p_e down_e (silu(gate_e x) * up_e x)."""
    idx, p = reference_routing(w, x)
    hit = (idx == expert)
    rows = hit.any(-1)
    prob = (p * hit).sum(-1)[rows]
    xe, re = x.double()[rows], r.double()[rows]
    gate, up, down = (w[k][expert].double().clone().requires_grad_(True) for k in ("gate", "up", "down"))
    out = ((F.silu(xe @ gate.t()) * (xe @ up.t())) * prob[:, None]) @ down.t()
    (out * re).sum().backward()
    return {"gate": gate.grad, "up": up.grad, "down": down.grad}, int(rows.sum())
