"""Logits only where there is a loss: megatron-core GPTModel's output layer and cross-entropy run on
the supervised positions of a micro-batch, not on every position."""
from __future__ import annotations

import contextlib

import torch


def supervised_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices, in megatron-core's sequence-first `[s, b]` order, of the positions of
    `loss_mask` `(b, s)` that carry a loss. A micro-batch without any keeps position 0 (its mask
    value 0 makes it contribute nothing), so every rank still runs the output layer's collectives."""
    positions = loss_mask.t().reshape(-1).nonzero().squeeze(1)
    if positions.numel() == 0:
        positions = torch.zeros(1, dtype=torch.long, device=loss_mask.device)
    return positions


def at_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`values` `(b, s)` (labels, loss mask) at `positions` as one row `(1, n)`."""
    return values.t().reshape(-1).index_select(0, positions)[None]


def output_layer_of(model):
    """The model's output layer (through DDP / Float16 wrappers), or None on a pipeline stage
    without one."""
    while not hasattr(model, "output_layer"):
        if not hasattr(model, "module"):
            return None
        model = model.module
    return model.output_layer


@contextlib.contextmanager
def logits_at(model, positions: torch.Tensor):
    """Within the block, the model's output layer sees only the hidden states at `positions`
    (`supervised_positions`), as a batch of one row `[n, 1, h]`: called with labels
    `at_positions(labels, positions)`, the GPTModel returns the per-token losses `(1, n)` of those
    positions, each what the full forward computes there.

    Only the output layer's input changes: the decoder runs every position (attention needs
    them). The output layer is frozen under every PEFT method, and a trained (e.g. tied) weight
    gets the same gradient, as positions without a loss contribute none. Under sequence
    parallelism the hidden states are all-gathered over the sequence first (the output layer
    would do that itself) and the layer runs without SP for the call; the gather's backward then
    keeps this rank's part of the input gradient, which the layer has already summed over TP.
    """
    layer = output_layer_of(model)
    if layer is None:
        yield
        return
    sequence_parallel = layer.sequence_parallel

    def pick(module, args, kwargs):
        hidden = args[0]
        if sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=module.tp_group)
            module.sequence_parallel = False
        picked = hidden.reshape(-1, hidden.size(-1)).index_select(0, positions.to(hidden.device))
        return (picked[:, None], *args[1:]), kwargs

    handle = layer.register_forward_pre_hook(pick, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        layer.sequence_parallel = sequence_parallel
