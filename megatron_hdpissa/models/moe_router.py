"""The MoE router as an ordinary trainable parameter (`--moe-router-trainable`): its name pattern, the flag's checks and the megatron-core fact its TP gradient sum relies on."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

if TYPE_CHECKING:
    from torch import nn

ROUTER_FLAG = "--moe-router-trainable"
# megatron-core's TopKRouter of every MoE layer: `decoder.layers.<i>.mlp.router` (weight (E, H), replicated
# over TP and EP). A module pattern of `trainable_modules` (peft.common.freeze_base).
ROUTER_MODULE = "mlp.router"


def with_router(trainable_modules: Union[str, Sequence[str]], router_trainable: bool) -> tuple[str, ...]:
    """`trainable_modules` plus the router's pattern when `router_trainable` (once)."""
    patterns = tuple(t for t in trainable_modules.split(",") if t) if isinstance(trainable_modules, str) \
        else tuple(trainable_modules)
    if router_trainable and ROUTER_MODULE not in patterns:
        patterns += (ROUTER_MODULE,)
    return patterns


def check_router_flag(config, router_trainable: bool) -> None:
    """A dense model has no router to train."""
    if router_trainable and not config.num_experts:
        raise ValueError(f"{ROUTER_FLAG}: this {config.model_type} model is dense (no experts, so no router "
                         "to train)")


def router_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The routers' parameters by name (through wrappers such as DDP)."""
    return {name: p for name, p in model.named_parameters()
            if name.rsplit(".", 1)[0] == ROUTER_MODULE or name.rsplit(".", 1)[0].endswith("." + ROUTER_MODULE)}


def check_router_reduction(model: nn.Module, sequence_parallel: bool, tp_size: int) -> None:
    """Under sequence parallelism each TP rank routes its own slice of the sequence, so a trainable
    router's gradient is a partial sum per TP rank. megatron-core's `finalize_model_grads` (megatron
    DDP) and `training.step.finalize_builtin_grads` sum over TP the parameters marked
    `sequence_parallel`, which megatron-core 0.16's `Router.reset_parameters` sets from the config.
    Refuse a trainable router without that mark (another megatron-core): it would step on a partial
    gradient, and TP ranks would drift apart."""
    if not sequence_parallel or tp_size == 1:
        return
    for name, p in router_parameters(model).items():
        if p.requires_grad and not getattr(p, "sequence_parallel", False):
            raise RuntimeError(f"{name.removeprefix('module.')} is trainable ({ROUTER_FLAG} / "
                               "--hd-pissa-trainable-modules) but megatron-core did not mark it `sequence_parallel`: "
                               "its gradient would not be summed over the tensor-parallel group under "
                               "--sequence-parallel (megatron-core version?)")
