"""The benchmark model (LLaMA-shaped megatron-core linears, GPTModel names), its data and loss."""
from __future__ import annotations

import contextlib
import functools
import types


def rms(x, eps=1e-5):
    """Parameter-free RMS norm: keeps the residual stream bounded; no trainable parameters."""
    return x * (x.float().pow(2).mean(-1, keepdim=True) + eps).rsqrt().to(x.dtype)


def attention_forward(att, x, mixer, groups, qpg, hd):
    """linear_qkv, the mixer over `groups` query groups of `qpg` heads of dim `hd` each, linear_proj."""
    import torch
    import torch.nn.functional as F

    qkv, _ = att.linear_qkv(x)
    s, b = qkv.shape[:2]
    heads = groups * qpg
    qkv = qkv.view(s, b, groups, (qpg + 2) * hd)  # megatron-core: [q heads of g, k_g, v_g]
    q = qkv[..., :qpg * hd].reshape(s, b, groups, qpg, hd)
    k = qkv[..., qpg * hd:(qpg + 1) * hd].unsqueeze(3)
    v = qkv[..., (qpg + 1) * hd:].unsqueeze(3)
    if mixer == "gate":
        o = q * torch.sigmoid(k) + v
        o = o.reshape(s, b, heads * hd)
    else:
        qh = q.reshape(s, b, heads, hd).permute(1, 2, 0, 3)
        kh = k.squeeze(3).permute(1, 2, 0, 3)
        vh = v.squeeze(3).permute(1, 2, 0, 3)
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
        o = o.permute(2, 0, 1, 3).reshape(s, b, heads * hd)
    out, _ = att.linear_proj(o)
    return out


def build_model(args, device, dtype):
    """`decoder.layers.<i>.{self_attention.linear_qkv, self_attention.linear_proj, mlp.linear_fc1,
    mlp.linear_fc2}` (the names GPTModel uses), weights drawn from args.seed on the CPU."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, kv_channels=args.head_dim, ffn_hidden_size=args.ffn,
        gated_linear_unit=True, add_bias_linear=False, use_cpu_initialization=True,
        params_dtype=dtype, tensor_model_parallel_size=1,
    )
    init = functools.partial(torch.nn.init.normal_, mean=0.0, std=0.02)
    kw = dict(config=cfg, init_method=init, bias=False)
    h, hd, heads, groups = args.hidden, args.head_dim, args.heads, args.groups
    qkv_out = (heads + 2 * groups) * hd
    qpg = heads // groups

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_qkv = ColumnParallelLinear(h, qkv_out, gather_output=False, **kw)
            self.linear_proj = RowParallelLinear(heads * hd, h, input_is_parallel=True,
                                                 skip_bias_add=True, **kw)

        def forward(self, x):
            return attention_forward(self, x, args.mixer, groups, qpg, hd)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_fc1 = ColumnParallelLinear(h, 2 * args.ffn, gather_output=False, **kw)
            self.linear_fc2 = RowParallelLinear(args.ffn, h, input_is_parallel=True,
                                                skip_bias_add=True, **kw)

        def forward(self, x):
            fc1, _ = self.linear_fc1(x)
            gate, up = torch.chunk(fc1, 2, dim=-1)
            out, _ = self.linear_fc2(F.silu(gate) * up)
            return out

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attention = Attention()
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.self_attention(rms(x))
            return x + self.mlp(rms(x))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer() for _ in range(args.layers)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = Decoder()

        def forward(self, x):
            return self.decoder(x)

    torch.manual_seed(args.seed)
    return Stack().to(device=device)


def localise_mixer(model, args, tp: int) -> None:
    """build_model's attention reshapes the fused QKV output with the global head counts; at
    TP > 1 each rank holds groups / tp query groups, so rebind the mixer to those (the parallel
    linears themselves are built with the global sizes and shard by TP)."""
    hd, groups = args.head_dim, args.groups // tp
    qpg = args.heads // args.groups

    def forward(self, x):
        return attention_forward(self, x, args.mixer, groups, qpg, hd)

    for layer in model.decoder.layers:
        att = layer.self_attention
        att.forward = types.MethodType(forward, att)


def make_data(args, device, dtype):
    """args.grad_accum (input, target) pairs of shape [seq, micro-batch, hidden], from args.seed + 1."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.seq, args.micro_batch, args.hidden)  # megatron layout [s, b, h]
    return [(torch.randn(shape, generator=g).to(device, dtype), torch.randn(shape, generator=g).to(device, dtype))
            for _ in range(args.grad_accum)]


def loss_fn(kind, out, target):
    if kind == "mse":
        return (out.float() - target.float()).pow(2).mean()
    return out.float().sum() * 1e-6


def set_trainable(model, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


def make_full(model, lr):
    """Every weight trainable; DataParallelAdamW over them."""
    from megatron_hdpissa.optimizer.data_parallel import DataParallelAdamW

    set_trainable(model, True)
    return DataParallelAdamW(list(model.parameters()), lr=lr)


def make_floor(model) -> None:
    """Frozen base, no trainable parameters: the backward graph starts at the output of the
    first linear (layer 0's linear_qkv), made a leaf that requires grad, so backward runs
    exactly the input-gradient GEMMs the adapter methods run (none of them needs the
    gradient of the model input itself)."""
    set_trainable(model, False)
    first = model.decoder.layers[0].self_attention.linear_qkv
    first.register_forward_hook(lambda mod, inp, out: (out[0].requires_grad_(True), out[1]))


def count_trainable(model, published=None) -> int:
    """Trainable parameters of the model, or of the published optimizer's adapters."""
    if published is not None:
        return sum(p.numel() for ad in published.adapters for p in ad.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def forward_backward(model, x, target, i, slices, loss_kind, n):
    """Micro-batch i of n: forward (through local slice i % slices when there are several),
    loss / n, backward; returns that loss."""
    if slices > 1:
        from megatron_hdpissa import active_slice

        ctx = active_slice(model, i % slices)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        loss = loss_fn(loss_kind, model(x), target) / n
        loss.backward()
    return loss
