"""Where each logical projection lives inside a (possibly fused) tensor-parallel weight shard."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Part:
    """One logical matrix inside a parallel linear's local weight shard.

    For column-parallel layers a part is a set of local output rows (`rows`, or the contiguous
    range `row_range` when it is one); the same pattern repeats on every TP rank, and
    concatenating the parts' local rows over TP ranks in rank order gives the logical matrix.
    Row-parallel layers have a single part covering the whole shard.
    """

    name: str
    rows: Optional[torch.Tensor]  # local output-row indices; None means all rows
    row_range: Optional[tuple[int, int]]  # (start, stop) when the rows are contiguous

    def select(self, weight: torch.Tensor) -> torch.Tensor:
        """The part's local rows of a local weight (a view when contiguous)."""
        if self.rows is None:
            return weight
        if self.row_range is not None:
            return weight[self.row_range[0]:self.row_range[1]]
        return weight.index_select(0, self.rows)

    def select_cols(self, t: torch.Tensor) -> torch.Tensor:
        """The part's columns of an activation-gradient tensor (..., m_local)."""
        if self.rows is None:
            return t
        if self.row_range is not None:
            return t[..., self.row_range[0]:self.row_range[1]]
        return t.index_select(-1, self.rows)

    @property
    def num_rows(self) -> Optional[int]:
        return None if self.rows is None else int(self.rows.numel())


def _part(name: str, rows: torch.Tensor) -> Part:
    rows = rows.to(torch.long)
    contiguous = rows.numel() > 0 and bool(
        (rows == torch.arange(int(rows[0]), int(rows[0]) + rows.numel())).all()
    )
    rng = (int(rows[0]), int(rows[0]) + rows.numel()) if contiguous else None
    return Part(name, rows, rng)


def whole() -> list[Part]:
    return [Part("w", None, None)]


def qkv_parts(num_heads: int, num_query_groups: int, head_dim: int, tp_size: int, layer: str) -> list[Part]:
    """megatron-core's fused QKV rows: per query group `[q heads of the group, k, v]`; TP takes
    whole groups, so every TP rank holds `num_query_groups / tp` groups in that pattern."""
    if num_heads % num_query_groups != 0:
        raise ValueError(f"{layer}: num_attention_heads {num_heads} not divisible by num_query_groups {num_query_groups}")
    if num_query_groups % tp_size != 0:
        raise ValueError(
            f"{layer}: --tensor-model-parallel-size {tp_size} does not divide num_query_groups "
            f"{num_query_groups} (TP must take whole query groups)"
        )
    groups_local = num_query_groups // tp_size
    q_per_group = num_heads // num_query_groups
    per_group = (q_per_group + 2) * head_dim
    q_rows, k_rows, v_rows = [], [], []
    for g in range(groups_local):
        base = g * per_group
        q_rows.append(torch.arange(base, base + q_per_group * head_dim))
        k_rows.append(torch.arange(base + q_per_group * head_dim, base + (q_per_group + 1) * head_dim))
        v_rows.append(torch.arange(base + (q_per_group + 1) * head_dim, base + per_group))
    return [_part("q", torch.cat(q_rows)), _part("k", torch.cat(k_rows)), _part("v", torch.cat(v_rows))]


def gate_up_parts(local_rows: int, layer: str) -> list[Part]:
    """megatron-core's fused gate/up (SwiGLU) rows: `[gate_t; up_t]` on each TP rank."""
    if local_rows % 2 != 0:
        raise ValueError(f"{layer}: fused gate/up shard has an odd number of rows ({local_rows})")
    half = local_rows // 2
    return [_part("gate", torch.arange(0, half)), _part("up", torch.arange(half, local_rows))]
