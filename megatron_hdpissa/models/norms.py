"""Torch RMSNorm / LayerNorm for megatron-core's local layer spec that also run under sequence
parallelism (megatron-core's own torch fallback refuses SP when apex is absent)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SequenceParallelTorchNorm(nn.Module):
    """A norm over the last dimension with megatron-core's norm constructor signature.

    Under sequence parallelism each TP rank normalises only its own tokens, so the weight's
    gradient is a partial sum: the weight passes through `copy_to_tensor_model_parallel_region`
    (identity forward, TP all-reduce of the gradient in backward), which keeps a trainable norm
    identical on every TP rank whichever optimizer steps it. The parameter is therefore not
    marked `sequence_parallel` (megatron-core would all-reduce it a second time). State-dict
    keys (`weight`, and `bias` for LayerNorm) are those of the torch norms."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str | None = None):
        super().__init__()
        kind = normalization or config.normalization
        if kind not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization {kind!r}: only RMSNorm and LayerNorm are supported")
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by the torch norm")
        self.kind, self.eps, self.shape = kind, eps, (hidden_size,)
        self.sequence_parallel = bool(config.sequence_parallel)
        dtype = config.params_dtype
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype)) if kind == "LayerNorm" else None

    def _tp_summed(self, p):
        if p is None or not (self.sequence_parallel and p.requires_grad):
            return p
        from megatron.core.tensor_parallel import mappings

        return mappings.copy_to_tensor_model_parallel_region(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._tp_summed(self.weight)
        if self.kind == "RMSNorm":
            return F.rms_norm(x, self.shape, weight, self.eps)
        return F.layer_norm(x, self.shape, weight, self._tp_summed(self.bias), self.eps)


class HeadTorchNorm(SequenceParallelTorchNorm):
    """Qwen3's q / k layernorm (over each attention head): the heads are split over TP, not the
    sequence, so it needs nothing of SP (megatron-core's torch fallback refuses it under SP
    all the same). A trainable one's gradient is summed over TP by megatron-core's
    `finalize_model_grads` (by name, with `qk_layernorm`)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(config, hidden_size, eps, **kwargs)
        self.sequence_parallel = False


def needs_own_norm() -> bool:
    """True where megatron-core's local spec would fall back to its torch norm (no apex)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer import transformer_block

    return transformer_block.LayerNormImpl is WrappedTorchNorm


def sequence_parallel_block_spec(layer_spec, tconfig, vp_stage=None):
    """The decoder-block spec of `layer_spec` with every norm (layers' and the final one)
    replaced by `SequenceParallelTorchNorm`, for this pipeline stage's number of layers."""
    import copy

    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    layer = copy.deepcopy(layer_spec)
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(layer.submodules, name, None) is WrappedTorchNorm:
            setattr(layer.submodules, name, SequenceParallelTorchNorm)
    attention = getattr(getattr(layer.submodules, "self_attention", None), "submodules", None)
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attention, name, None) is WrappedTorchNorm:
            setattr(attention, name, HeadTorchNorm)
    num_layers = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SequenceParallelTorchNorm)
