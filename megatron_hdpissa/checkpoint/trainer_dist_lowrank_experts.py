"""Where LoRA / PiSSA adapters live in a `--ckpt-format torch_dist` checkpoint (`trainer_dist`),
experts included.

A dense layer's factors are keyed by the layer's global name and replicated over DP. An expert
linear's factors are keyed by its GLOBAL expert (local expert j of EP rank p is expert
p x local experts + j, megatron-core's numbering; `peft/lowrank/experts.ExpertSite`):

    "lora.<layer>.mlp.experts.local_experts.<global expert>.<linear>.<a|b>.<part>"

with the whole factor's shape; expert-TP splits what the layer splits (column: B's rows, row: A's
columns), the other factor is replicated over expert-TP, and the expert-DP replicas hold copies.
The Adam moments follow their factor. So a run saved at one EP / expert-TP size resumes at another.
"""
from __future__ import annotations

from megatron_hdpissa.peft.common import global_layer_name


def lowrank_placement(model, name: str, ad) -> tuple[str, None, object]:
    """(the name the adapter's keys use, None: one slice, the groups it is sharded over or None for
    the run's) of LoRA / PiSSA adapter `ad` of layer `name`: a dense layer by its global name over
    the run's TP and DP, an expert by its global expert over its expert-TP and expert-DP groups."""
    site = getattr(ad, "expert_site", None)
    if site is None:
        return global_layer_name(model, name), None, None
    return site.global_name, None, site.groups
