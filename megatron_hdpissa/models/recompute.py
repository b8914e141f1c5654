"""Activation recompute with frozen embeddings: make the first checkpointed block's input require
grad, so megatron-core's checkpoint runs its backward and the adapters inside get gradients."""
from __future__ import annotations

import torch
from torch import nn

# megatron-core's --recompute-granularity and --recompute-method values.
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# megatron-core's CheckpointFunction is a reentrant autograd.Function: the adapter factors are
# not among its inputs, so if none of its tensor inputs requires grad its outputs do not either,
# its backward never runs and every adapter inside it silently keeps a zero gradient. With a
# frozen embedding that is exactly the decoder's input on the first pipeline stage (later
# stages receive activations that require grad from the p2p schedule).


def _requires_grad_hook(module, args, output):
    if isinstance(output, tuple):
        head, *rest = output
        return (_requires_grad_hook(module, args, head), *rest)
    if output.is_floating_point() and not output.requires_grad and torch.is_grad_enabled():
        return output.requires_grad_(True)
    return output


def uses_recompute(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "recompute_granularity", None) is not None


def ensure_block_input_requires_grad(model: nn.Module) -> int:
    """Register (once) a forward hook on every megatron-core `LanguageModelEmbedding` in `model`
    that marks its output as requiring grad, when the model uses activation recompute. The cost
    is one tokens x hidden input gradient at the first layer. Returns the number of hooks."""
    if not uses_recompute(model):
        return 0
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

    count = 0
    for module in model.modules():
        if isinstance(module, LanguageModelEmbedding) and not hasattr(module, "_hd_pissa_grad_hook"):
            module._hd_pissa_grad_hook = module.register_forward_hook(_requires_grad_hook)
            count += 1
    return count
