"""Where HD-PiSSA's expert adapters live in a `--ckpt-format torch_dist` checkpoint (`trainer_dist`).

An expert linear's adapter is keyed like a dense one, by the expert's GLOBAL name (local expert j
of EP rank p is expert p x local experts + j, megatron-core's numbering), so another
expert-parallel size finds each expert under the same key:

    "hd_pissa.<layer>.mlp.experts.local_experts.<global expert>.<linear>.<a|b>.<part>"

Its global shape is (K, ...) as for a dense layer: the slice axis holds global slice ids. A
replica of an expert holds the slices of the data shards it serves, in the expert-DP gather order
(`ExpertLayout.slice_order`), so local slice v is global slice `slice_order[first_slice + v]`.
Each (expert, slice) lives on exactly one expert-DP replica; expert-TP splits the factor the layer
splits (column: B's rows, row: A's columns), the other factor is replicated over expert-TP. The
Adam moments follow their factor. The sharded-fp32 masters of expert weights are gathered over the
expert-DP group (not DP) and keyed like the expert weight in megatron-core's own sharded state
dict (global expert axis), so they too reshard over EP.
"""
from __future__ import annotations

from megatron_hdpissa.peft.common import global_layer_name


def expert_placement(model, name: str, ad) -> tuple[str, list[int] | None, object]:
    """(the name the adapter's keys use, the global slice id of each local slice or None for
    `first_slice + v`, the groups it is sharded over or None for the run's) of adapter `ad` of
    layer `name`. Dense: (global layer name, None, None); expert: its global expert name, its
    slices in expert-DP order and its expert groups (tp: expert-TP, dp: expert-DP)."""
    groups = getattr(ad, "expert_groups", None)
    if groups is None:
        return global_layer_name(model, name), None, None
    order = ad.layout.slice_order
    slices = [order[ad.first_slice + v] for v in range(ad.local_slices)]
    return ad.global_name, slices, groups  # global layer and global expert (build_expert_adapter)


def weight_stores(state) -> list[tuple[object, object]]:
    """(master-weight store, the groups its masters are sharded over) of an HD-PiSSA run: the
    dense weights' over DP, the expert weights' over expert-DP; none for the baselines."""
    if not state.is_hd_pissa:
        return []
    opt = state.optimizer
    stores = [(opt.weight_store, state.groups)]
    if getattr(opt, "experts", None) is not None:
        stores.append((opt.experts.weight_store, opt.experts.groups))
    return stores
