"""The LoRA / PiSSA adapter: `s B A x` added to a parallel linear's output with megatron-core's TP mappings."""
from __future__ import annotations

import torch
from torch import nn

from megatron_hdpissa.peft.common import COLUMN

CHILD = "lora"  # the adapter's name under its base layer (state-dict prefix `<layer>.lora.`)


class LowRankAdapter(nn.Module):
    """Trainable `A_p` (r x n_local) and `B_p` (m_local x r) per part, registered as the `lora`
    child of the base layer; the forward hook adds `s B A x` with megatron-core's TP mappings."""

    def __init__(self, layer_name, kind, parts, rank, scale, in_local, rows_local, tp_group, tp_size,
                 gather_output, sequence_parallel=False, tp_rank=0, expert_site=None):
        super().__init__()
        self.layer_name, self.kind, self.parts = layer_name, kind, parts
        self.rank, self.scale = rank, scale
        self.tp_group, self.tp_size, self.gather_output = tp_group, tp_size, gather_output
        self.tp_rank = tp_rank
        self.sequence_parallel = sequence_parallel
        # an expert linear (peft/lowrank/experts.ExpertSite): split over expert-TP, explicit communication
        self.expert_site = expert_site
        self.scatter_input = False  # row-parallel layer that splits its full input itself
        self.a = nn.ParameterDict({p.name: nn.Parameter(torch.zeros(rank, in_local)) for p in parts})
        self.b = nn.ParameterDict({p.name: nn.Parameter(torch.zeros(m, rank)) for p, m in zip(parts, rows_local)})
        self.out_local = sum(rows_local) if parts[0].rows is not None else rows_local[0]
        for p in parts:  # TP shards (for gradient-norm clipping): column-parallel B, row-parallel A
            self.b[p.name].tensor_model_parallel = kind == COLUMN and tp_size > 1
            self.a[p.name].tensor_model_parallel = kind != COLUMN and tp_size > 1

    def thin_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, B) with `s B A x = h @ B^T`: h = s x A^T (tokens x P r, TP-reduced as the layout
        needs) and B the parts' factors placed in their local output rows (m_local x P r), so the
        adapter adds one thin GEMM and no full-size temporaries."""
        from megatron.core.tensor_parallel import mappings

        g, dtype = self.tp_group, x.dtype
        if self.expert_site is not None:
            return self._expert_thin_factors(x)
        sp = self.sequence_parallel and self.tp_size > 1
        if self.kind == COLUMN:
            a_cat = torch.cat([self.a[p.name] for p in self.parts], 0).to(dtype)
            if sp:
                # x is this rank's sequence shard: gather the thin h over the sequence (backward:
                # reduce-scatter of dL/dh, summed over TP); dL/dA then covers only local tokens,
                # so A (replicated) gets its gradient summed over TP in backward.
                a_cat = mappings.copy_to_tensor_model_parallel_region(a_cat, group=g)
                h = mappings.gather_from_sequence_parallel_region(
                    (x @ a_cat.t()) * self.scale, tensor_parallel_output_grad=True, group=g)
            else:
                # dL/dh differs per TP rank (B is row-sharded): sum it over TP in backward
                h = mappings.copy_to_tensor_model_parallel_region((x @ a_cat.t()) * self.scale, group=g)
            return h, self._column_b(dtype, x.device)
        (p,) = self.parts
        if self.scatter_input and self.tp_size > 1:
            x = mappings.scatter_to_tensor_model_parallel_region(x, group=g)
        if sp:
            # The output is reduce-scattered along the sequence: h likewise, and B (replicated)
            # then sees only local tokens, so its gradient is summed over TP in backward.
            h = mappings.reduce_scatter_to_sequence_parallel_region(
                (x @ self.a[p.name].to(dtype).t()) * self.scale, group=g)
            return h, mappings.copy_to_tensor_model_parallel_region(self.b[p.name], group=g).to(dtype)
        h = mappings.reduce_from_tensor_model_parallel_region((x @ self.a[p.name].to(dtype).t()) * self.scale, group=g)
        return h, self.b[p.name].to(dtype)

    def _column_b(self, dtype, device) -> torch.Tensor:
        """A column-parallel layer's B factors placed in their parts' local output rows (m_local x P r)."""
        if self.parts[0].rows is None:
            return self.b[self.parts[0].name].to(dtype)
        placed = [torch.zeros(self.out_local, self.rank, dtype=dtype, device=device)
                  .index_copy(0, p.rows.to(device), self.b[p.name].to(dtype)) for p in self.parts]
        return torch.cat(placed, 1)

    def _expert_thin_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, B) of an expert linear. megatron-core's expert linears communicate nothing themselves
        (the dispatcher all-gathers their input over expert-TP and reduce-scatters fc2's partial
        output), so neither does h: column, x is whole on every expert-TP rank and the partial
        dL/dx goes back through the dispatcher's reduce-scatter, so A (replicated) sums its
        gradient over expert-TP; row, each rank adds its partial s B A_t x_t to fc2's partial output
        (summed by the reduce-scatter) and dL/dout is whole, so B (replicated) sums its gradient."""
        from megatron.core.tensor_parallel import mappings

        g, dtype, split = self.tp_group, x.dtype, self.tp_size > 1
        if self.kind == COLUMN:
            a_cat = torch.cat([self.a[p.name] for p in self.parts], 0).to(dtype)
            a_cat = mappings.copy_to_tensor_model_parallel_region(a_cat, group=g) if split else a_cat
            h = (x @ a_cat.t()) * self.scale
            return h, self._column_b(dtype, x.device)
        (p,) = self.parts
        b = mappings.copy_to_tensor_model_parallel_region(self.b[p.name], group=g) if split else self.b[p.name]
        return (x @ self.a[p.name].to(dtype).t()) * self.scale, b.to(dtype)

    def add_to_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + s B A x, as one addmm on the thin factors."""
        from megatron.core.tensor_parallel import mappings

        h, b = self.thin_factors(x)
        if self.kind == COLUMN and self.gather_output and self.tp_size > 1:
            delta = mappings.gather_from_tensor_model_parallel_region(h @ b.t(), group=self.tp_group)
            return out + delta
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t()).view_as(out)

    @torch.no_grad()
    def merged_delta(self, part) -> torch.Tensor:
        """s B A of one part, in the local weight's row layout of that part."""
        return (self.b[part.name] @ self.a[part.name]) * self.scale
