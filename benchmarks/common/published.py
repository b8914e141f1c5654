"""The published HD-PiSSA formulation (MuLabPKU/HD-PiSSA) on megatron-core layers, 1 or K ranks."""
from __future__ import annotations

from benchmarks.common.model import set_trainable
from benchmarks.common.timing import now, since

PUBLISHED_SCALE = 1e-16  # the published code scales the dense B A by 1e-16 and its gradients by 1e16


def published_targets(model):
    """Freeze the base; the targets of the published formulation (q/k/v, gate/up one by one)."""
    from megatron_hdpissa.peft.common import DEFAULT_TARGET_MODULES, find_targets

    set_trainable(model, False)
    return find_targets(model, DEFAULT_TARGET_MODULES, tp_size=1, fused=False)


class PublishedAdapter:
    """Per targeted layer: the published `CustomLinearLayer` forward added to the frozen
    megatron-core base: `y = W x + x (1e-16 * s * B A)^T`, with the dense m x n `B A` formed on
    every forward (one `B_p A_p` per logical projection, q/k/v and gate/up separately, as the
    published code targets q_proj, k_proj, ... one by one), so autograd also computes the dense
    m x n weight gradient of that second linear in backward. This rank's slice (rank 0 of K):
    components 0..r-1, A = sqrt(S) V^T, B = U sqrt(S)."""

    def __init__(self, target, rank, scale):
        import torch

        self.target, self.scale, self.rank = target, scale, rank
        self.a, self.b = [], []
        w = target.module.weight
        for i, part in enumerate(target.parts):
            u, s, v = self.components(part.select(w.detach()), i)
            sq = s.sqrt()
            self.a.append(torch.nn.Parameter((sq[:, None] * v.t()).contiguous()))  # fp32, like the published code
            self.b.append(torch.nn.Parameter((u * sq[None, :]).contiguous()))
        self.inverse = None
        if target.parts[0].rows is not None:
            perm = torch.cat([p.rows for p in target.parts]).to(w.device)
            if not torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
                self.inverse = torch.argsort(perm)
        target.module._published_hook = target.module.register_forward_hook(self._hook, with_kwargs=True)

    def components(self, full, i):
        """(U, S, V) of this rank's slice of `full`, part i of the target: the top r components."""
        from megatron_hdpissa.peft.decomposition import top_singular

        return top_singular(full, self.rank, "exact")

    def dense_delta(self):
        import torch

        d = torch.cat([b @ a for a, b in zip(self.a, self.b)], 0) if len(self.a) > 1 else self.b[0] @ self.a[0]
        if self.inverse is not None:
            d = d.index_select(0, self.inverse)
        return d * (PUBLISHED_SCALE * self.scale)

    def _hook(self, module, args, kwargs, output):
        import torch.nn.functional as F

        x = args[0] if args else kwargs.get("input_")
        out, bias = output
        extra = F.linear(x.float(), self.dense_delta()).to(out.dtype)
        return out + extra, bias

    def parameters(self):
        return self.a + self.b


class PublishedOptimizer:
    """The published optimizer loop for one rank: gradients x 1e16, hand-written Adam (no weight
    decay, moments as new tensors), then `W -= dB A + B dA - dB dA` (the sum over ranks has one
    term at world size 1), and the factor gradients dropped."""

    def __init__(self, adapters, lr, betas=(0.9, 0.999), eps=1e-8):
        import torch

        self.adapters, self.lr, self.betas, self.eps = adapters, lr, betas, eps
        self.t = 0
        self.moments = [[[torch.zeros_like(p) for _ in range(2)] for p in ad.a + ad.b] for ad in adapters]
        self.merge_s = []  # (wall, cpu) seconds of the merge, per step

    def updates(self):
        """Advance the step count; per part of every adapter: (W, part, A, B, dA, dB), the Adam
        steps of the factors (their gradients x 1e16); the factor gradients are dropped after."""
        import torch

        b1, b2 = self.betas
        self.t += 1
        t = self.t
        for ad, moments in zip(self.adapters, self.moments):
            n_parts = len(ad.a)
            for i, part in enumerate(ad.target.parts):
                a, b = ad.a[i], ad.b[i]
                steps = []
                for p, mom in ((a, moments[i]), (b, moments[n_parts + i])):
                    g = p.grad * 1e16
                    mom[0] = b1 * mom[0] + (1 - b1) * g
                    mom[1] = b2 * mom[1] + (1 - b2) * g ** 2
                    steps.append(self.lr * (mom[0] / (1 - b1 ** t)) / (torch.sqrt(mom[1] / (1 - b2 ** t)) + self.eps))
                yield ad.target.module.weight, part, a, b, steps[0], steps[1]
                a.grad = None
                b.grad = None

    def step(self, sync):
        import torch

        merge = [0.0, 0.0]
        with torch.no_grad():
            for w, part, a, b, d_a, d_b in self.updates():
                sync()
                t0 = now()
                add_delta(w, part, -(d_b @ a + b @ d_a - d_b @ d_a))
                sync()
                merge = [m + e for m, e in zip(merge, since(t0))]
        self.merge_s.append(tuple(merge))


def add_delta(w, part, delta) -> None:
    """W += delta (fp32) in W's dtype, at the part's rows of W."""
    if part.rows is None:
        w.add_(delta.to(w.dtype))
    else:
        rows = part.rows.to(w.device)
        w.index_copy_(0, rows, (w.index_select(0, rows).float() + delta).to(w.dtype))


class DistPublishedAdapter(PublishedAdapter):
    """PublishedAdapter with data-parallel rank k's slice: like the published code, every rank
    runs the full SVD of each projection itself and keeps components k*r .. (k+1)*r - 1. With
    `svd="randomized"` (for quick runs at large shapes) the top K*r components come from the
    package's randomized decomposition instead of the full SVD."""

    def __init__(self, target, rank, scale, dp_rank, dp_size, svd="exact", seed=0):
        self.dp_rank, self.dp_size, self.svd, self.seed = dp_rank, dp_size, svd, seed
        super().__init__(target, rank, scale)

    def components(self, full, i):
        from megatron_hdpissa.peft.decomposition import top_singular

        if self.svd == "exact":  # the published code: torch.svd(W), all components
            u, s, v = top_singular(full, min(full.shape), "exact")
        else:
            u, s, v = top_singular(full, self.dp_size * self.rank, "randomized", seed=self.seed + i)
        lo, hi = self.dp_rank * self.rank, (self.dp_rank + 1) * self.rank
        return u[:, lo:hi], s[lo:hi], v[:, lo:hi]


class DistPublishedOptimizer(PublishedOptimizer):
    """The published optimizer step, per projection: gradients x 1e16, hand-written Adam, then
    four blocking all-gathers (dA, dB, and the factors A, B themselves) of every rank's r x n and
    m x r tensors, and `W -= sum_i (dB_i A_i + B_i dA_i - dB_i dA_i)` as a dense fp32 m x n sum
    added to W in W's dtype. The factors stay fixed (the published code never changes A, B)."""

    def __init__(self, adapters, lr, group, dp_size, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(adapters, lr, betas, eps)
        self.group, self.dp = group, dp_size
        self.bytes = {"factors+deltas": 0, "loss": 0}

    def _gather(self, t):
        import torch
        import torch.distributed as dist

        if self.dp == 1:
            return [t]
        out = [torch.zeros_like(t) for _ in range(self.dp)]
        dist.all_gather(out, t, group=self.group)
        self.bytes["factors+deltas"] += t.numel() * t.element_size()
        return out

    def step(self):
        import torch

        self.bytes["factors+deltas"] = 0
        with torch.no_grad():
            for w, part, a, b, d_a, d_b in self.updates():
                d_a_all, d_b_all = self._gather(d_a), self._gather(d_b)
                a_all, b_all = self._gather(a.data), self._gather(b.data)
                delta = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float32, device=a.device)
                for k in range(len(a_all)):
                    delta -= d_b_all[k] @ a_all[k] + b_all[k] @ d_a_all[k] - d_b_all[k] @ d_a_all[k]
                add_delta(w, part, delta)
