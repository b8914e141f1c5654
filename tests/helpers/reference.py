"""Dense single-process reference of the HD-PiSSA equations (docs/DESIGN.md §1), written independently of
the package: autograd on W + s(BA - sg(BA)) for each of the K simulated ranks, torch.optim.AdamW
per rank, and W += sum_k [(B_k - dB_k)(A_k - dA_k) - B_k A_k], all in float64."""
from __future__ import annotations

import torch

from tests.helpers import toy


def svd_slices(w: torch.Tensor, num_slices: int, r: int):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    out = []
    for k in range(num_slices):
        sl = slice(k * r, (k + 1) * r)
        sq = s[sl].sqrt()
        out.append((sq[:, None] * vh[sl], u[:, sl] * sq[None, :]))  # (A_k, B_k)
    return out


def logical_matrices(w: dict, fused: bool) -> dict:
    """The matrices that get decomposed: per logical projection, or the fused ones whole."""
    if not fused:
        return dict(w)
    # fused mode decomposes the megatron-ordered fused matrices; with TP=1 and TP>1 their
    # row order differs, but the update computed from them does not (SVD is row-permutation
    # equivariant), so the reference uses the TP=1 order.
    return {"qkv": toy.fuse_qkv(w["q"], w["k"], w["v"]), "proj": w["proj"],
            "fc1": torch.cat([w["gate"], w["up"]]), "fc2": w["fc2"]}


def unfuse(mats: dict, fused: bool) -> dict:
    if not fused:
        return mats
    q, k, v = toy.split_qkv(mats["qkv"])
    gate, up = torch.chunk(mats["fc1"], 2, 0)
    return {"q": q, "k": k, "v": v, "proj": mats["proj"], "gate": gate, "up": up, "fc2": mats["fc2"]}


def hd_pissa_reference(weights: dict, data, r: int, scale: float, lr: float, steps: int,
                       weight_decay: float = 0.0, fused: bool = False, betas=(0.9, 0.999), eps=1e-8,
                       untargeted: tuple = (), clip_grad: float = 0.0, norms: list | None = None):
    """The logical weights after `steps` HD-PiSSA steps on `data[step][rank][micro]`.

    `untargeted`: logical weights (e.g. "fc2") that get no adapter but are trained as ordinary
    data-parallel parameters: AdamW on the gradient averaged over the K ranks.
    `clip_grad` > 0: clip the L2 norm of the gradient of the whole model (all K ranks' factors and
    the averaged untargeted weights) to it, as torch.nn.utils.clip_grad_norm_ would on one model
    holding all of them. `norms`, if given, receives that norm per step.
    """
    num_slices = len(data[0])
    logical = logical_matrices(weights, fused)
    mats = {n: t.double() for n, t in logical.items() if n not in untargeted}
    shared = {n: logical[n].double().clone().requires_grad_() for n in untargeted}
    init = {n: svd_slices(t, num_slices, r) for n, t in mats.items()}
    params = [{n: (init[n][k][0].clone().requires_grad_(), init[n][k][1].clone().requires_grad_())
               for n in mats} for k in range(num_slices)]
    opts = [torch.optim.AdamW([t for ab in params[k].values() for t in ab], lr=lr, betas=betas, eps=eps,
                              weight_decay=weight_decay) for k in range(num_slices)]
    shared_opt = (torch.optim.AdamW(list(shared.values()), lr=lr, betas=betas, eps=eps,
                                    weight_decay=weight_decay) if shared else None)
    for step in range(steps):
        if shared_opt is not None:
            shared_opt.zero_grad()
        for k in range(num_slices):
            with torch.no_grad():  # factors are reset to their initial values every step
                for n in mats:
                    params[k][n][0].copy_(init[n][k][0])
                    params[k][n][1].copy_(init[n][k][1])
            opts[k].zero_grad()
            micro = data[step][k]
            for x, target in micro:
                eff = dict(shared)
                for n, w in mats.items():
                    a, b = params[k][n]
                    ba = b @ a
                    eff[n] = w + scale * (ba - ba.detach())
                out = toy.dense_forward(unfuse(eff, fused), x.double())
                # each rank's loss is its own mean; shared weights see the mean over ranks
                (toy.loss_fn(out, target.double()) / len(micro)).backward()
        with torch.no_grad():
            for t in shared.values():
                t.grad.div_(num_slices)
            grads = [t.grad for k in range(num_slices) for ab in params[k].values() for t in ab]
            grads += [t.grad for t in shared.values()]
            total = torch.sqrt(sum((g * g).sum() for g in grads))
            if norms is not None:
                norms.append(float(total))
            if clip_grad > 0 and clip_grad / (total + 1e-6) < 1:
                for g in grads:
                    g.mul_(clip_grad / (total + 1e-6))
        for k in range(num_slices):
            opts[k].step()
        if shared_opt is not None:
            shared_opt.step()
        new = {n: t.clone() for n, t in mats.items()}
        with torch.no_grad():
            for k in range(num_slices):
                for n in mats:
                    a0, b0 = init[n][k]
                    a1, b1 = params[k][n]
                    new[n] += b1 @ a1 - b0 @ a0
        mats = new
    mats.update({n: t.detach().clone() for n, t in shared.items()})
    return unfuse(mats, fused)
