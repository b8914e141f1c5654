"""LeanLoRA: the package's LoRA parameters with one fused `addmm` forward per layer (lora-lean)."""
from __future__ import annotations

import functools


class LeanLoRA:
    """Reference LoRA forward with the package's own parameters (so the same initial values):
    `y = base(x) + (s x A_cat^T) B_bd^T` as one fused `addmm` per layer, where `A_cat` stacks the
    parts' A_p (P r x n) and `B_bd` (m x P r) holds each B_p in its part's rows and block of
    columns (zeros elsewhere, rebuilt every forward so only the B_p are trained). No full-size
    intermediate beyond the output itself; the zero blocks cost P-fold thin products. TP=1 only."""

    def __init__(self, module, adapter):
        module._lora_hook.remove()
        self.adapter = adapter
        self.rows = [None if p.rows is None else p.rows.to(module.weight.device) for p in adapter.parts]
        self.out_local = module.weight.shape[0]
        module._lora_hook = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        import torch

        ad = self.adapter
        x = args[0] if args else kwargs.get("input_")
        out, bias = output
        dtype, r = x.dtype, ad.rank
        names = [p.name for p in ad.parts]
        a = torch.cat([ad.a[n] for n in names], 0) if len(names) > 1 else ad.a[names[0]]
        if len(names) == 1:
            b = ad.b[names[0]]
        else:
            b = a.new_zeros(self.out_local, len(names) * r)
            for i, (n, rows) in enumerate(zip(names, self.rows)):
                b = _place(b, rows, i * r, ad.b[n])
        h = (x.reshape(-1, x.shape[-1]) @ a.to(dtype).t()).mul_(ad.scale)
        y = torch.addmm(out.reshape(-1, out.shape[-1]), h, b.to(dtype).t())
        return y.view_as(out), bias


def _place(b, rows, col, block):
    """b with `block` written at (rows, col:col + r), differentiably w.r.t. `block`."""
    return b.index_put((rows.view(-1, 1), col + _arange(block.shape[1], b.device).view(1, -1)), block)


@functools.lru_cache(maxsize=None)
def _arange(n, device):
    import torch

    return torch.arange(n, device=device)
