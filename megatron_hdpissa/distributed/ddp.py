"""megatron-core's own data-parallel machinery around an HD-PiSSA model.

`wrap_ddp` puts the model in megatron-core's `DistributedDataParallel` (contiguous gradient
buffers, bucketed all-reduce, overlapped with the backward pass when asked). The HD-PiSSA factors
are per-rank parameters: every data-parallel rank trains its own slice, so their gradients must
not be averaged over DP. megatron-core supports per-rank parameters only through its MoE route
(docs/DESIGN.md §10): the factors are marked `allreduce = False`, which puts them in DDP's "expert" buffer,
and the process-group collection handed to DDP gives that buffer a one-rank expert-DP group, so
its reduction is a no-op. DDP still pre-scales those gradients by 1/dp (it assumes the loss is
averaged over all DP ranks); `HDPiSSAOptimizer` reads the scale back from DDP's buffers and
undoes it, so each rank's factors see the gradient of its own loss, exactly as without DDP.

Ordinary trainable parameters (a norm someone unfreezes) stay in DDP's dense buffer and are
averaged over DP as usual; `build_others_optimizer` gives them megatron-core's optimizer
(`get_megatron_optimizer`) and `HDPiSSAOptimizer` steps it inside its own step, after the loss
scale, the overflow check and the gradient clipping that both share.

Works with NCCL on GPU and gloo on CPU (`compat.ensure_cpu_compat` makes megatron-core's
buffers and its fp32 optimizer path allocate on the CPU there).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_hdpissa.distributed.groups import singleton_group
from megatron_hdpissa.models.compat import ensure_cpu_compat
from megatron_hdpissa.peft.common import ConfigError
from megatron_hdpissa.peft.hd_pissa.model import iter_adapters

OTHERS_OPTIMIZERS = ("auto", "megatron", "builtin")  # who steps the non-factor parameters under DDP


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The HD-PiSSA factors (`hd_pissa.a[*]`, `hd_pissa.b[*]`) of every adapted layer."""
    out = []
    for _, _, ad in iter_adapters(model):
        for part in ad.parts:
            out += [ad.a[part.name], ad.b[part.name]]
    return out


def hd_pissa_process_groups():
    """megatron-core's process groups from `parallel_state`, except that the expert-data-parallel
    groups (where DDP reduces parameters marked `allreduce = False`) hold one rank each."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    one = singleton_group()
    for name in ("expt_dp", "intra_expt_dp"):
        setattr(pgs, name, one)
    return pgs


def _transformer_config(model: nn.Module):
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "tensor_model_parallel_size"):
            return cfg
    raise ValueError("wrap_ddp: the model holds no megatron-core module with a TransformerConfig; "
                     "pass config=")


def wrap_ddp(model: nn.Module, config=None, ddp_config=None, overlap_grad_reduce: Optional[bool] = None,
             grad_reduce_in_fp32: bool = False, bucket_size: Optional[int] = None):
    """Wrap an HD-PiSSA model (adapters already applied) in megatron-core's
    `DistributedDataParallel`, keeping the factors out of the DP reduction.

    `overlap_grad_reduce` defaults to True on CUDA (bucketed all-reduce under the backward pass)
    and False on CPU. Call `ddp.finish_grad_sync()` after the last micro-batch's backward (what
    Megatron's `finalize_model_grads` does) and `ddp.zero_grad_buffer()` before the next step
    (`HDPiSSAOptimizer.zero_grad` does the latter).
    """
    ensure_cpu_compat()  # no-op with CUDA; on CPU, DDP's buffers need current_device -> cpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    factors = factor_parameters(model)
    if not factors:
        raise ValueError("wrap_ddp: the model has no HD-PiSSA adapters; call apply_hd_pissa(model, config) first")
    for p in factors:
        p.allreduce = False
    if ddp_config is None:
        if overlap_grad_reduce is None:
            overlap_grad_reduce = torch.cuda.is_available()
        ddp_config = DistributedDataParallelConfig(
            overlap_grad_reduce=overlap_grad_reduce, grad_reduce_in_fp32=grad_reduce_in_fp32,
            use_distributed_optimizer=False, bucket_size=bucket_size,
        )
    config = config or _transformer_config(model)
    kwargs = {}
    if "pg_collection" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["pg_collection"] = hd_pissa_process_groups()
    else:  # pragma: no cover - megatron-core before process-group collections
        raise RuntimeError("this megatron-core has no pg_collection argument to DistributedDataParallel; "
                           "HD-PiSSA needs megatron-core >= 0.14 for per-rank factors under DDP")
    ddp = DistributedDataParallel(config, ddp_config, model, **kwargs)
    ddp.hd_pissa_config = getattr(model, "hd_pissa_config", None)
    ddp.hd_pissa_groups = getattr(model, "hd_pissa_groups", None)
    return ddp


def is_megatron_ddp(model: nn.Module) -> bool:
    return hasattr(model, "ddp_config") and hasattr(model, "finish_grad_sync") and hasattr(model, "module")


def factor_gradient_prescale(ddp) -> float:
    """The factor DDP applied to the factors' gradients (the expert buffers' pre-scaling)."""
    scales = {float(b.gradient_scaling_factor) for b in getattr(ddp, "expert_parallel_buffers", [])}
    if len(scales) > 1:  # pragma: no cover - one scaling per DDP instance
        raise RuntimeError(f"DDP expert buffers use different gradient scalings {sorted(scales)}")
    return scales.pop() if scales else 1.0


def build_others_optimizer(ddp, lr: float, weight_decay: float, betas, eps: float, choice: str = "auto"):
    """megatron-core's optimizer (`get_megatron_optimizer`) over the ordinary trainable
    parameters of a DDP-wrapped model, the factors left out. None (the built-in AdamW steps them)
    when there are none, when `choice` is "builtin", or when it is "auto" and megatron-core's
    optimizer cannot run here (low-precision parameters without CUDA: its mixed-precision path
    checks for CUDA tensor types). `choice` "megatron" insists.

    It is built without clipping and without a loss scaler: `HDPiSSAOptimizer` unscales, checks
    for overflow and clips the gradients of all parameters together (the factors' differ per
    rank, so those decisions need all ranks) before it calls this optimizer's `step()`.
    """
    if choice not in OTHERS_OPTIMIZERS:
        raise ConfigError("others_optimizer", f"{{name}} must be one of {OTHERS_OPTIMIZERS}, got {choice!r}")
    factors = {id(p) for p in factor_parameters(ddp.module)}
    others = [p for p in ddp.module.parameters() if p.requires_grad and id(p) not in factors]
    if not others or choice == "builtin":
        return None
    low_precision = any(p.dtype in (torch.float16, torch.bfloat16) for p in others)
    if choice == "auto" and low_precision and not torch.cuda.is_available():
        return None
    ensure_cpu_compat()
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=0.0, weight_decay=weight_decay, adam_beta1=betas[0],
        adam_beta2=betas[1], adam_eps=eps, clip_grad=0.0, bf16=low_precision,
        params_dtype=others[0].dtype, loss_scale=None,
    )
    hidden = [p for p in ddp.module.parameters() if id(p) in factors and p.requires_grad]
    for p in hidden:  # get_megatron_optimizer takes every parameter that requires grad
        p.requires_grad_(False)
    try:
        kwargs = {}
        if "use_gloo_process_groups" in inspect.signature(get_megatron_optimizer).parameters:
            kwargs["use_gloo_process_groups"] = dist.get_backend() != "gloo"
        opt = get_megatron_optimizer(cfg, [ddp], **kwargs)
    finally:
        for p in hidden:
            p.requires_grad_(True)
    return opt
