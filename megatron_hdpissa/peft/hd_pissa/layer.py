"""The HD-PiSSA adapter: the base layer's forward unchanged, factor gradients from thin products."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_hdpissa.distributed.collectives import all_gather_flat_, all_reduce_, reduce_scatter_flat_
from megatron_hdpissa.peft.common import COLUMN
from megatron_hdpissa.peft.layout import Part

CHILD = "hd_pissa"  # the adapter's name under its base layer (state-dict prefix `<layer>.hd_pissa.`)


def _tp_all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        all_reduce_(t, group)
    return t


# Sequence parallelism: activations are sequence-first ([s, b, h]), so flattening to (s*b, h)
# keeps each TP rank's sequence shard a contiguous block of rows; these thin collectives act on
# those row blocks (tokens x r), never on the tokens x hidden activations.
def _seq_all_gather(t: torch.Tensor, group, tp_size: int) -> torch.Tensor:
    out = t.new_empty((t.shape[0] * tp_size, *t.shape[1:]))
    all_gather_flat_(out, t, group)
    return out


def _seq_reduce_scatter(t: torch.Tensor, group, tp_size: int) -> torch.Tensor:
    out = t.new_empty((t.shape[0] // tp_size, *t.shape[1:]))
    reduce_scatter_flat_(out, t, group)
    return out


def thin_grads(ad, x2: torch.Tensor, dy2: torch.Tensor, a_list, b_list) -> list[torch.Tensor]:
    """[g_A, g_B] per part of adapter `ad` from the flattened input `x2` (tokens x n_local) and
    output gradient `dy2` (tokens x m_local), with thin products and TP collectives only."""
    s = ad.scale
    r = ad.rank
    grads = []
    sp = ad.sequence_parallel and ad.tp_size > 1
    if ad.kind == COLUMN:
        # u = dY B (tokens x P r) summed over TP shards of B's rows; v = X A^T is local.
        a_cat = torch.cat(a_list, 0) if len(a_list) > 1 else a_list[0]
        v = x2 @ a_cat.t()
        dy_parts = [p.select_cols(dy2) for p in ad.parts]
        u = torch.cat([dyp @ b for dyp, b in zip(dy_parts, b_list)], 1)
        if sp:
            # X is sequence-sharded: v over all tokens is an all-gather of x_l A^T; g_A sums
            # u^T X over TP ranks and sequence shards: reduce-scatter u to this rank's
            # tokens, u_l^T x_l, then one r x n all-reduce over TP.
            v = _seq_all_gather(v, ad.tp_group, ad.tp_size)
            u = _seq_reduce_scatter(u, ad.tp_group, ad.tp_size)
            g_a_cat = _tp_all_reduce(u.t() @ x2, ad.tp_group).mul_(s)
        else:
            _tp_all_reduce(u, ad.tp_group)
            g_a_cat = (u.t() @ x2).mul_(s)
        for i, dyp in enumerate(dy_parts):
            g_a = g_a_cat[i * r:(i + 1) * r]
            g_b = (dyp.t() @ v[:, i * r:(i + 1) * r]).mul_(s)
            grads += [g_a, g_b]
    else:
        # Row-parallel: X and A are sharded along n, so v = X A^T needs a TP sum.
        (a,), (b,) = a_list, b_list
        u = dy2 @ b
        if sp:
            # The output was reduce-scattered along the sequence, so dy is this rank's
            # tokens: dY B over all tokens is an all-gather of dy_l B; X A^T summed over TP
            # is reduce-scattered to these tokens, then dy_l^T v_l summed over TP (m x r).
            u = _seq_all_gather(u, ad.tp_group, ad.tp_size)
            v = _seq_reduce_scatter(x2 @ a.t(), ad.tp_group, ad.tp_size)
            g_a = (u.t() @ x2).mul_(s)
            g_b = _tp_all_reduce(dy2.t() @ v, ad.tp_group).mul_(s)
        else:
            v = _tp_all_reduce(x2 @ a.t(), ad.tp_group)
            g_a = (u.t() @ x2).mul_(s)
            g_b = (dy2.t() @ v).mul_(s)
        grads += [g_a, g_b]
    return grads


class _FactorGrad(torch.autograd.Function):
    """Identity on the base output; its backward turns dY and X into the factor gradients
    g_A = s (dY B)^T X and g_B = s dY^T (X A^T) without forming any m x n matrix.

    X is what the layer received, saved as the same tensor the base layer saves (no extra
    activation memory): under sequence parallelism that is the local sequence shard x_l for a
    column-parallel layer; a row-parallel layer gets all tokens and the hook sees dy_l.

    Inputs after (out, x, adapter): the active slice's factors, a_0, b_0, a_1, b_1, ... per part.
    """

    @staticmethod
    def forward(ctx, out, x, adapter, *factors):
        ctx.adapter = adapter
        ctx.save_for_backward(x, *factors)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, d_out):
        x, *factors = ctx.saved_tensors
        ad: HDPiSSAAdapter = ctx.adapter
        compute_dtype = d_out.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)
        if ad.scatter_input and ad.tp_size > 1:  # row-parallel layer that splits its input itself
            n_t = x2.shape[-1] // ad.tp_size
            x2 = x2[:, ad.tp_rank * n_t:(ad.tp_rank + 1) * n_t]
        dy = d_out
        if ad.kind == COLUMN and ad.gather_output and ad.tp_size > 1:
            m_t = dy.shape[-1] // ad.tp_size
            dy = dy[..., ad.tp_rank * m_t:(ad.tp_rank + 1) * m_t]
        dy2 = dy.reshape(-1, dy.shape[-1])
        a_list = [f.to(compute_dtype) for f in factors[0::2]]
        b_list = [f.to(compute_dtype) for f in factors[1::2]]
        grads = thin_grads(ad, x2, dy2, a_list, b_list)
        grads = [g.to(f.dtype) for g, f in zip(grads, factors)]
        return (d_out, None, None, *grads)


class HDPiSSAAdapter(nn.Module):
    """Per-layer HD-PiSSA state, registered as the `hd_pissa` child of the base parallel linear.

    Parameters `a[part]` of shape (L, r, n_local) and `b[part]` of shape (L, m_local, r) hold this
    process's L slices (L = virtual ranks). Buffers `a_all_<part>` / `b_all_<part>` hold all K
    slices' factors (gathered once at init), which the aggregation multiplies with the deltas.
    """

    def __init__(
        self,
        layer_name: str,
        kind: str,
        parts: list[Part],
        rank: int,
        scale: float,
        local_slices: int,
        num_slices: int,
        first_slice: int,
        in_features_local: int,
        part_rows_local: list[int],
        tp_group,
        tp_rank: int,
        tp_size: int,
        gather_output: bool = False,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.layer_name, self.kind, self.parts, self.rank, self.scale = layer_name, kind, parts, rank, scale
        self.local_slices, self.num_slices, self.first_slice = local_slices, num_slices, first_slice
        self.tp_group, self.tp_rank, self.tp_size = tp_group, tp_rank, tp_size
        self.gather_output = gather_output
        if sequence_parallel and gather_output:
            raise ValueError(f"{layer_name}: gather_output with sequence parallelism is not a "
                             "megatron-core layout the adapter supports")
        self.sequence_parallel = sequence_parallel
        self.scatter_input = False
        self.active_slice = 0
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for p, m_local in zip(parts, part_rows_local):
            self.a[p.name] = nn.Parameter(torch.zeros(local_slices, rank, in_features_local))
            self.b[p.name] = nn.Parameter(torch.zeros(local_slices, m_local, rank))
            self.register_buffer(f"a_all_{p.name}", torch.zeros(num_slices, rank, in_features_local), persistent=False)
            self.register_buffer(f"b_all_{p.name}", torch.zeros(num_slices, m_local, rank), persistent=False)

    def all_factors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"a_all_{part}"), getattr(self, f"b_all_{part}")

    def active_factors(self) -> list[torch.Tensor]:
        out = []
        for p in self.parts:
            out += [self.a[p.name][self.active_slice], self.b[p.name][self.active_slice]]
        return out

    def add_to_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`out` itself (HD-PiSSA's forward is the base layer's); its backward computes the
        active slice's factor gradients from `x` and dY."""
        if not torch.is_grad_enabled():
            return out
        return _FactorGrad.apply(out, x, self, *self.active_factors())

    def extra_repr(self) -> str:
        parts = ",".join(p.name for p in self.parts)
        return (f"layer={self.layer_name}, kind={self.kind}, parts=[{parts}], r={self.rank}, "
                f"s={self.scale:g}, slices={self.first_slice}..{self.first_slice + self.local_slices - 1}"
                f" of {self.num_slices}")
