"""Megatron-LM plug-in, model side: zero-factor adapters hidden from DDP, decomposed once after the checkpoint loads."""
from __future__ import annotations

from typing import Optional

from torch import nn

from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.peft.hd_pissa.config import HDPiSSAConfig
from megatron_hdpissa.peft.hd_pissa.model import apply_hd_pissa, decompose_hd_pissa, iter_adapters

ATTACHED, DECOMPOSED, RESTORED = "attached", "decomposed", "restored"
_STATE = "_hd_pissa_megatron"  # attribute on the model: {"state", "hidden", "hook"}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module the provider returned, below DDP / Float16Module wrappers."""
    while not hasattr(model, _STATE) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _drop_adapter_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _ignore_missing_adapter_keys(module, incompatible_keys):
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if ".hd_pissa." not in "." + k]


def prepare_hd_pissa_model(model: nn.Module, config: HDPiSSAConfig,
                           groups: Optional[ParallelGroups] = None) -> nn.Module:
    """Attach adapters with zero factors (decomposition waits for the checkpoint), hide the
    trainable parameters from megatron-core DDP until the optimizer hook, keep the adapters out of
    the model's state dict, and arm the one-shot post-load decomposition."""
    if config.virtual_ranks != 1:
        raise ValueError("--hd-pissa-virtual-ranks must be 1 under Megatron-LM (its training loop "
                         "feeds every micro-batch to one slice); use python -m megatron_hdpissa.finetune")
    # Pipeline stages decompose at their own first forward, each over its own stage's ranks
    # (megatron-core's tensor-and-data-parallel group).
    apply_hd_pissa(model, config, groups, progress=False, decompose=False)
    # Only the factors are hidden: other trainable parameters (--hd-pissa-trainable-modules) go
    # into Megatron's DDP and Megatron's own optimizer, as in any Megatron-LM run.
    hidden = [p for _, _, adapter in iter_adapters(model) for p in adapter.parameters()]
    for p in hidden:
        p.allreduce = False  # never data-parallel reduced by DDP (see megatron_hdpissa.integrations.megatron_lm)
        p.requires_grad_(False)
    for _, _, adapter in iter_adapters(model):
        # Megatron checkpoints stay plain model checkpoints; the factors live in the optimizer state.
        adapter._register_state_dict_hook(_drop_adapter_keys)
        adapter.register_load_state_dict_post_hook(_ignore_missing_adapter_keys)
    hook = model.register_forward_pre_hook(_first_forward)
    setattr(model, _STATE, {"state": ATTACHED, "hidden": hidden, "hook": hook, "after_decompose": []})
    return model


def keep_adapters_fp32(model: nn.Module) -> None:
    """Undo Megatron-LM's `Float16Module` cast (`--bf16`) on the adapters: the factors (zero until
    the post-load decomposition) and their gathered copies stay fp32, as in the trainer; the
    adapters' backward casts to the activations' dtype and back."""
    for _, _, adapter in iter_adapters(model):
        adapter.float()


def on_decompose(model: nn.Module, callback) -> None:
    """Call `callback()` right after the post-load decomposition (the optimizer hook re-reads its
    fp32 masters from the loaded weights there)."""
    getattr(model, _STATE)["after_decompose"].append(callback)


def _first_forward(module, inputs):
    state = getattr(module, _STATE)
    if module.training and state["hidden"] and not state["hidden"][0].requires_grad:
        raise RuntimeError(
            "HD-PiSSA parameters are still frozen at the first training step: the optimizer hook did "
            "not run. Call megatron_lm.use_hd_pissa_optimizer() before pretrain() (and keep "
            "--optimizer adam), or get_hd_pissa_optimizer(model, args) in a custom loop")
    hd_pissa_after_load(module)


def hd_pissa_after_load(model, progress: bool = False) -> bool:
    """Decompose the loaded weights into every rank's factors, once. Call after the checkpoint
    is loaded (the wrapped provider's model does it at its first forward). Does nothing when a
    resumed optimizer state restored the factors. Collective over all ranks. Returns whether it
    decomposed."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    done = False
    for chunk in chunks:
        inner = unwrap_model(chunk)
        state = getattr(inner, _STATE, None)
        if state is None:
            continue
        if state["hook"] is not None:
            state["hook"].remove()
            state["hook"] = None
        if state["state"] == ATTACHED:
            decompose_hd_pissa(inner, progress)
            state["state"] = DECOMPOSED
            for callback in state["after_decompose"]:
                callback()
            done = True
    return done


def is_hd_pissa_model(model) -> bool:
    """Whether `prepare_hd_pissa_model` prepared `model` (below any DDP / Float16Module wrapper)."""
    return hasattr(unwrap_model(model), _STATE)


def hidden_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The HD-PiSSA factors, kept frozen (away from megatron-core DDP) until the optimizer hook."""
    return getattr(model, _STATE)["hidden"]


def mark_restored(model: nn.Module) -> None:
    """A resumed optimizer state restored the factors: the post-load decomposition must not run."""
    getattr(model, _STATE)["state"] = RESTORED
