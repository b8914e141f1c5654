"""Megatron-LM plug-in: the HD-PiSSA flags, the model-provider wrapper and the optimizer hook a script calls.

Adds HD-PiSSA to a `pretrain_gpt.py`-style script of Megatron-LM without changing Megatron-LM.
Megatron-LM is not a dependency of this package; nothing here imports it at module level. The
model side lives in `megatron_lm_model`, the optimizer Megatron-LM drives in `megatron_lm_optimizer`.

What Megatron-LM does, and where each piece plugs in (`setup_model_and_optimizer`):

1. `get_model(model_provider)` calls the model provider, moves the model to the GPU and wraps it
   in megatron-core `DistributedDataParallel` (DDP). `wrap_model_provider` attaches the adapters
   here with zero factors (`apply_hd_pissa(decompose=False)`): the weights are still the random
   initialisation, so there is nothing worth decomposing yet.
2. `get_megatron_optimizer(config, model)` builds the optimizer. `use_hd_pissa_optimizer()`
   replaces that name in `megatron.training.training` by a function that returns
   `get_hd_pissa_optimizer(model, config)` for HD-PiSSA models (and Megatron's optimizer for any
   other model).
3. `load_checkpoint` loads `--load` (or `--pretrained-checkpoint`): the base weights, and on a
   resume the optimizer state, which holds this rank's factors and AdamW moments.
4. The first forward pass then calls `megatron_lm_model.hd_pissa_after_load(model)` (a one-shot hook),
   which decomposes the *loaded* weights and gives every data-parallel rank its slice, unless a
   resumed optimizer state already restored the factors. Call it yourself after loading in a
   custom loop; it runs once.

Why a post-load hook rather than loading the base checkpoint inside the provider: Megatron-LM
owns checkpoint loading (legacy `torch` or `torch_dist` format, resharding, `--finetune`,
`--no-load-optim`, resumes from `--load`); loading it a second time inside the provider would
duplicate that logic and still be overwritten by `load_checkpoint` afterwards. Decomposition does
not change the forward value (the forward is the frozen base exactly), so doing it at the first
forward, after every load, is exact.

Why the factor gradients never reach Megatron's DDP: HD-PiSSA needs each data-parallel rank's
own factor gradients (docs/DESIGN.md §10). megatron-core DDP all-reduces every parameter it holds; the
MoE route (`param.allreduce = False`) alone still reduces over the expert-data-parallel group,
which for a dense model is the data-parallel group, and Megatron-LM builds DDP inside
`get_model` with its global groups, so a one-rank expert-DP group cannot be passed in before
0.19. DDP registers its gradient hooks and buffers only for parameters that require gradients
when it is constructed. So the wrapper keeps the factors frozen while DDP is built (they get
`allreduce = False` as well) and the optimizer hook, which Megatron-LM calls after DDP is built,
unfreezes them: their gradients then accumulate in `param.grad` over the micro-batches,
un-reduced and un-scaled, which is what `HDPiSSAOptimizer` expects. The hook checks that DDP did
not take them (no `main_grad`). Other trainable parameters (`--hd-pissa-trainable-modules`, e.g.
norms) are ordinary: Megatron's DDP averages them and Megatron's own optimizer, which the hook
builds over them (`get_megatron_optimizer`, before unfreezing the factors), steps them.

What Megatron-LM gets from the optimizer hook (`MegatronHDPiSSAOptimizer`): `step()` returns
`(update_successful, grad_norm, num_zeros_in_grad)`; a non-finite gradient on any rank skips the
step on all ranks. `grad_norm` is the global norm over every data-parallel rank's factors and
Megatron's optimizer's parameters (its own `get_grad_norm()`, right under
`--use-distributed-optimizer` too), which `--clip-grad` clips, one coefficient for both.
`zero_grad`, `param_groups` (HD-PiSSA's group, then Megatron's, for the LR scheduler),
`scale_loss`/`get_loss_scale` (scale 1), `reload_model_params` (re-reads the fp32 masters from the
loaded weights), `state_dict`/`load_state_dict` and `sharded_state_dict` (`torch_dist`), each
with Megatron's optimizer's state beside HD-PiSSA's.

`--bf16`: Megatron-LM's `Float16Module` casts the whole model, adapters included; the hook casts
the adapters back to fp32 (their factors are still zero then). The targeted weights stay bf16
and their updates accumulate in HD-PiSSA's masters (`--hd-pissa-master-weights`, `auto` =
DP-sharded fp32), re-read from the weights after the checkpoint loads (`reload_model_params`,
and again at the post-load decomposition); Megatron's optimizer keeps its own fp32 copies of the
other parameters. `--use-distributed-optimizer` shards those; the factors are per rank and the
masters DP-sharded already.

Checkpoints: the model state dict is the base model's (updated `W`, no adapter keys), so every
Megatron-LM checkpoint is an ordinary model checkpoint that converts back to Hugging Face. This
rank's factors and moments go in the optimizer state. With `--ckpt-format torch_dist` (Megatron's
default) each data-parallel rank stores its own, so `--load` resumes exactly. The legacy
`--ckpt-format torch` stores only data-parallel rank 0's optimizer state, so with more than one
data-parallel rank it cannot resume the factors: loading it stops with a message; add
`--no-load-optim` (or `--finetune`) to continue from the saved weights with a fresh decomposition.

Megatron-LM flags HD-PiSSA needs: `--transformer-impl local` (the adapters wrap megatron-core's
own parallel linears, not Transformer Engine's), and for an exact resume `--ckpt-format
torch_dist` (the default).

Pipeline parallelism (`--pipeline-model-parallel-size`) works: each stage's provider call attaches
the adapters of its own layers, each stage decomposes its layers over its own ranks at its first
forward, and the optimizer's global gradient norm spans the stages.

Not supported here (clear errors): `--fp16` (its loss scaling would have to span every rank's
factors; use `--bf16`), virtual pipeline stages, `--hd-pissa-virtual-ranks` > 1, `--peft lora|pissa` (use `python -m megatron_hdpissa.finetune`),
Transformer Engine layers.
`--peft full` leaves Megatron-LM untouched. Megatron's `--weight-decay` (default 0.01) applies to
the factors' AdamW; pass `--weight-decay 0` to match `python -m megatron_hdpissa.finetune`.

Adding HD-PiSSA to `pretrain_gpt.py` (Megatron-LM up to 0.17; `pretrain` takes the flags):

    from megatron_hdpissa.integrations import megatron_lm as hd_pissa            # new

    if __name__ == "__main__":
        ...
        hd_pissa.use_hd_pissa_optimizer()                             # new
        pretrain(
            train_valid_test_datasets_provider,
            hd_pissa.wrap_model_provider(partial(model_provider, gpt_builder)),      # changed
            ModelType.encoder_or_decoder,
            forward_step,
            args_defaults={'tokenizer_type': 'GPT2BPETokenizer'},
            extra_args_provider=hd_pissa.compose_args_providers(                     # changed
                add_modelopt_args if has_nvidia_modelopt else None, hd_pissa.extra_args_provider),
            store=store,
            get_embedding_ranks=get_embedding_ranks,
        )

Megatron-LM 0.18 (flags go to `parse_and_validate_args`):

    args = parse_and_validate_args(
        extra_args_provider=hd_pissa.compose_args_providers(                         # changed
            add_modelopt_args if has_nvidia_modelopt else None, hd_pissa.extra_args_provider),
        args_defaults={'tokenizer_type': 'GPT2BPETokenizer'},
    )
    full_config = pretrain_cfg_container_from_args(args)
    hd_pissa.use_hd_pissa_optimizer()                                                 # new
    pretrain(full_config, train_valid_test_datasets_provider,
             hd_pissa.wrap_model_provider(partial(model_provider, gpt_builder)),     # changed
             ModelType.encoder_or_decoder, forward_step, store=store,
             get_embedding_ranks=get_embedding_ranks)

Megatron-LM 0.19 and later: as 0.18, but build the container without a model config so that the
model provider is used, and pass the provider by keyword:

    full_config = pretrain_cfg_container_from_args(args)          # not (args, model_cfg)
    hd_pissa.use_hd_pissa_optimizer()
    pretrain(full_config, train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=hd_pissa.wrap_model_provider(
                 partial(model_provider, gpt_builder)),
             store=store, get_embedding_ranks=get_embedding_ranks)

`args_provider_api()` says which of the two flag routes the installed Megatron-LM takes. A
complete script that picks the route itself: `examples/megatron_lm/pretrain_gpt_hdpissa.py`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from typing import Callable, Optional

from megatron_hdpissa.integrations.megatron_lm_model import (hidden_parameters, is_hd_pissa_model,
                                                             keep_adapters_fp32, prepare_hd_pissa_model,
                                                             unwrap_model)
from megatron_hdpissa.integrations.megatron_lm_optimizer import MegatronHDPiSSAOptimizer
from megatron_hdpissa.peft.common import HD_PISSA
from megatron_hdpissa.training.arguments import FULL, add_hd_pissa_args, hd_pissa_config


# ---- flags ------------------------------------------------------------------------------------
def extra_args_provider(parser):
    """Megatron-LM `extra_args_provider`: adds the HD-PiSSA flags (`--peft`, `--hd-pissa-*`)."""
    add_hd_pissa_args(parser)
    return parser


def compose_args_providers(*providers: Optional[Callable]) -> Callable:
    """One `extra_args_provider` that calls each given provider in turn (None entries skipped),
    so the HD-PiSSA flags join a provider the script already has."""
    chosen = [p for p in providers if p is not None]

    def provider(parser):
        for p in chosen:
            result = p(parser)
            parser = parser if result is None else result
        return parser

    return provider


def args_provider_api(pretrain: Optional[Callable] = None,
                      parse_and_validate_args: Optional[Callable] = None) -> str:
    """Which Megatron-LM call takes `extra_args_provider`: "pretrain" (up to 0.17) or
    "parse_and_validate_args" (0.18 on). Inspects the given functions, else the installed
    `megatron.training` (ImportError when Megatron-LM is not installed)."""
    if pretrain is None and parse_and_validate_args is None:
        from megatron.training import arguments, training

        pretrain = training.pretrain
        parse_and_validate_args = getattr(arguments, "parse_and_validate_args", None)

    def takes(fn) -> bool:
        if fn is None:
            return False
        fn = inspect.unwrap(fn)
        return "extra_args_provider" in inspect.signature(fn).parameters

    if takes(pretrain):
        return "pretrain"
    if takes(parse_and_validate_args):
        return "parse_and_validate_args"
    raise RuntimeError("neither pretrain() nor parse_and_validate_args() of this Megatron-LM takes "
                       "extra_args_provider; add the flags with megatron_lm.extra_args_provider(parser) "
                       "wherever this version builds its argument parser")


def _megatron_args():
    from megatron.training import get_args

    return get_args()


# ---- model ------------------------------------------------------------------------------------
def wrap_model_provider(model_provider: Callable, args=None) -> Callable:
    """A Megatron-LM model provider that builds the model with `model_provider` and, for
    `--peft hd-pissa`, prepares it for HD-PiSSA (`prepare_hd_pissa_model`). `args` defaults to
    Megatron-LM's parsed arguments at call time."""

    @functools.wraps(model_provider)  # same name and signature as the user's provider
    def provider(*a, **kw):
        opts = args if args is not None else _megatron_args()
        peft = getattr(opts, "peft", HD_PISSA)
        if peft == FULL:
            return model_provider(*a, **kw)
        if peft != HD_PISSA:
            raise NotImplementedError(f"--peft {peft} is not offered through the Megatron-LM plug-in; "
                                      "use python -m megatron_hdpissa.finetune for the baselines")
        impl = getattr(opts, "transformer_impl", "local")
        if impl != "local":
            raise ValueError(f"--transformer-impl {impl}: the HD-PiSSA adapters wrap megatron-core's own "
                             "ColumnParallelLinear/RowParallelLinear layers; add --transformer-impl local")
        return prepare_hd_pissa_model(model_provider(*a, **kw), hd_pissa_config(opts))

    return provider


# ---- optimizer --------------------------------------------------------------------------------
def get_hd_pissa_optimizer(model_chunks, args=None, megatron_optimizer=None) -> MegatronHDPiSSAOptimizer:
    """The HD-PiSSA optimizer for Megatron-LM's model chunks (DDP-wrapped or not). `args`:
    Megatron's parsed arguments or its `OptimizerConfig` (same field names; default `get_args()`).
    `megatron_optimizer`: Megatron's own optimizer over the other trainable parameters (built
    while the factors were still frozen; the hook builds it), needed when there are any.
    Unfreezes the factors the wrapped provider kept away from DDP, and keeps them fp32 under
    `--bf16` (their updates accumulate in HD-PiSSA's master weights: `--hd-pissa-master-weights`,
    sharded fp32 by default)."""
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if len(chunks) != 1:
        raise ValueError(f"{len(chunks)} model chunks: virtual pipeline stages are not supported with HD-PiSSA")
    model = unwrap_model(chunks[0])
    if not is_hd_pissa_model(model):
        raise ValueError("the model has no HD-PiSSA adapters: build it with megatron_lm.wrap_model_provider(...)")
    args = args if args is not None else _megatron_args()
    if getattr(args, "fp16", False):
        raise ValueError("--fp16 is not supported with HD-PiSSA under Megatron-LM (its loss scaling would "
                         "have to span every rank's factors); use --bf16")
    factors = hidden_parameters(model)
    factor_ids = {id(p) for p in factors}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in factor_ids]
    if others and megatron_optimizer is None:
        raise ValueError("--hd-pissa-trainable-modules: the other trainable parameters need Megatron-LM's own "
                         "optimizer; install the hook with megatron_lm.use_hd_pissa_optimizer() or pass "
                         "megatron_optimizer=")
    keep_adapters_fp32(model)
    for p in factors:
        p.requires_grad_(True)
    for p in others:  # Megatron's optimizer steps them; HDPiSSAOptimizer takes the factors only
        p.requires_grad_(False)
    try:
        opt = MegatronHDPiSSAOptimizer(model, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                       eps=args.adam_eps, weight_decay=args.weight_decay,
                                       clip_grad=getattr(args, "clip_grad", 0.0) or 0.0,
                                       others=megatron_optimizer if others else None)
    finally:
        for p in others:
            p.requires_grad_(True)
    opt.check_not_in_ddp()
    return opt


def _unclipped(config):
    """A copy of Megatron's optimizer config (a dataclass, or parsed arguments) with clip_grad 0."""
    if dataclasses.is_dataclass(config):
        return dataclasses.replace(config, clip_grad=0.0)
    copied = copy.copy(config)
    copied.clip_grad = 0.0
    return copied


def use_hd_pissa_optimizer(training_module=None) -> None:
    """Make Megatron-LM's `setup_model_and_optimizer` build `get_hd_pissa_optimizer` for HD-PiSSA
    models: replaces `get_megatron_optimizer` in `megatron.training.training` (or the module
    given) with a function that falls back to the original for any other model. Idempotent."""
    if training_module is None:
        from megatron.training import training as training_module
    original = training_module.get_megatron_optimizer
    if getattr(original, "_hd_pissa_original", None) is not None:
        return

    @functools.wraps(original)
    def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        if not any(is_hd_pissa_model(c) for c in chunks):
            return original(config, model_chunks, *args, **kwargs)
        others = None
        if any(p.requires_grad for c in chunks for p in c.parameters()):  # the factors are still frozen
            # Megatron's optimizer for the other trainable parameters, unclipped: the HD-PiSSA
            # optimizer clips everything with one global norm
            others = original(_unclipped(config), model_chunks, *args, **kwargs)
        return get_hd_pissa_optimizer(chunks, config, megatron_optimizer=others)

    get_megatron_optimizer._hd_pissa_original = original
    training_module.get_megatron_optimizer = get_megatron_optimizer
