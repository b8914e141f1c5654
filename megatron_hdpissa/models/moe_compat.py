"""megatron-core's MoE layer without TransformerEngine, and on CPU: the router's TE-only name, the
all-to-all token dispatcher's side stream and the aux-loss tracker's `device="cuda"` buffers."""
from __future__ import annotations

import contextlib
import types

import torch

_applied = {"te": False, "cpu": False}


class _NullEvent:
    def synchronize(self) -> None:
        pass


class _NullMoeStream:
    """A CUDA stream stand-in on CPU: one stream, so waits and events do nothing."""

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _NullEvent:
        return _NullEvent()

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _NullMoeStream()


class _CpuMoeCuda(types.ModuleType):
    """`torch.cuda` inside megatron-core's token dispatcher: `Stream()` and `current_stream()`
    are the same null stream (so the dispatcher sees no side stream), `stream(s)` does nothing."""

    def __init__(self):
        super().__init__("torch.cuda")

    @staticmethod
    def Stream(*args, **kwargs) -> _NullMoeStream:  # noqa: N802 - torch.cuda's name
        return _CPU_STREAM

    @staticmethod
    def current_stream(device=None) -> _NullMoeStream:
        return _CPU_STREAM

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron-core's `maybe_move_tensor_to_cpu` for tensors already on the CPU: split sizes
    become numpy arrays as on GPU (gloo's `all_to_all_single` takes sequences, not tensors)."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def ensure_moe_compat() -> None:
    """Patch megatron-core's MoE modules for what this machine lacks; idempotent.

    Without TransformerEngine, megatron-core 0.16's `RouterGatingLinearFunction` reads the
    undefined global `te_general_gemm` (its import sits in the TE-only branch): define it as
    None, which selects the plain `torch.mm` path. On CPU (no CUDA) the all-to-all dispatcher
    creates a `torch.cuda.Stream()` for its device-to-host copies and the aux-loss tracker
    allocates with `device="cuda"`: both modules get a `torch` whose CUDA streams are one null
    stream and whose tensor factories map "cuda" to the CPU; its host copies of the split sizes
    become numpy arrays, as they are on GPU."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    from megatron_hdpissa.models.compat import _CpuTorch, check_patch_targets, ensure_cpu_compat

    if not _applied["te"]:
        if not getattr(moe_utils, "HAVE_TE", True) and not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
        _applied["te"] = True
    if _applied["cpu"] or not ensure_cpu_compat():
        return
    check_patch_targets([(moe_utils, "torch"), (token_dispatcher, "torch"),
                         (token_dispatcher, "maybe_move_tensor_to_cpu"),
                         (token_dispatcher.MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream")])
    token_dispatcher.maybe_move_tensor_to_cpu = _to_host
    proxy = _CpuTorch()
    proxy.cuda = _CpuMoeCuda()
    for module in (moe_utils, token_dispatcher):
        if module.torch is torch:
            module.torch = proxy
    _applied["cpu"] = True
