"""Megatron-LM plug-in: HD-PiSSA flags, a model-provider wrapper, post-load decomposition and the optimizer hook.

Adds HD-PiSSA to a `pretrain_gpt.py`-style script of Megatron-LM without changing Megatron-LM.
Megatron-LM is not a dependency of this package; nothing here imports it at module level.

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
4. The first forward pass then calls `hd_pissa_after_load(model)` (a one-shot forward pre-hook),
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
own factor gradients (DESIGN §4). megatron-core DDP all-reduces every parameter it holds; the
MoE route (`param.allreduce = False`) alone still reduces over the expert-data-parallel group,
which for a dense model is the data-parallel group, and Megatron-LM builds DDP inside
`get_model` with its global groups, so a one-rank expert-DP group cannot be passed in before
0.19. DDP registers its gradient hooks and buffers only for parameters that require gradients
when it is constructed. So the wrapper keeps every HD-PiSSA-trainable parameter frozen while DDP
is built (they get `allreduce = False` as well) and the optimizer hook, which Megatron-LM calls
after DDP is built, unfreezes them: their gradients then accumulate in `param.grad` over the
micro-batches, un-reduced and un-scaled, which is what `HDPiSSAOptimizer` expects. The hook
checks that DDP did not take them (no `main_grad`).

What Megatron-LM gets from the optimizer hook (`MegatronHDPiSSAOptimizer`): `step()` returns
`(update_successful, grad_norm, num_zeros_in_grad)`; a non-finite gradient on any rank skips the
step on all ranks. `grad_norm` is the global norm over every data-parallel rank's factors (and
any other trainable parameters), which `--clip-grad` clips, one coefficient on every rank.
`zero_grad`, `param_groups` (for the LR scheduler), `scale_loss`/`get_loss_scale` (fp32: scale 1), `reload_model_params` (nothing to refresh: no
fp32 copies are kept), `state_dict`/`load_state_dict` and `sharded_state_dict` (`torch_dist`).

Checkpoints: the model state dict is the base model's (updated `W`, no adapter keys), so every
Megatron-LM checkpoint is an ordinary model checkpoint that converts back to Hugging Face. This
rank's factors and moments go in the optimizer state. With `--ckpt-format torch_dist` (Megatron's
default) each data-parallel rank stores its own, so `--load` resumes exactly. The legacy
`--ckpt-format torch` stores only data-parallel rank 0's optimizer state, so with more than one
data-parallel rank it cannot resume the factors: loading it stops with a message; add
`--no-load-optim` (or `--finetune`) to continue from the saved weights with a fresh decomposition.

Megatron-LM flags HD-PiSSA needs: `--transformer-impl local` (the adapters wrap megatron-core's
own parallel linears, not Transformer Engine's), fp32 weights (no `--bf16`/`--fp16`), and for an
exact resume `--ckpt-format torch_dist` (the default).

Pipeline parallelism (`--pipeline-model-parallel-size`) works: each stage's provider call attaches
the adapters of its own layers, each stage decomposes its layers over its own ranks at its first
forward, and the optimizer's global gradient norm spans the stages.

Not supported here (clear errors): `--bf16`/`--fp16` (per-step updates are lost in 16-bit
weights; the method runs on fp32 weights), `--use-distributed-optimizer`, virtual pipeline
stages, `--hd-pissa-virtual-ranks` > 1, `--peft lora|pissa` (use `megatron_hdpissa.training.finetune`),
Transformer Engine layers.
`--peft full` leaves Megatron-LM untouched. Megatron's `--weight-decay` (default 0.01) applies to
the factors' AdamW; pass `--weight-decay 0` to match `megatron_hdpissa.training.finetune`.

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

`args_provider_api()` says which of the two flag routes the installed Megatron-LM takes.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch
from torch import nn

from megatron_hdpissa.peft.hd_pissa.model import apply_hd_pissa, decompose_hd_pissa, iter_adapters
from megatron_hdpissa.training.arguments import add_hd_pissa_args, hd_pissa_config
from megatron_hdpissa.peft.hd_pissa.config import HDPiSSAConfig
from megatron_hdpissa.distributed.groups import ParallelGroups

ATTACHED, DECOMPOSED, RESTORED = "attached", "decomposed", "restored"
_STATE = "_hd_pissa_megatron"  # attribute on the model: {"state", "hidden", "hook"}
SHARDED_KEY = "optimizer.hd_pissa_state"


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
def _unwrap(model: nn.Module) -> nn.Module:
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
                         "feeds every micro-batch to one slice); use megatron_hdpissa.training.finetune")
    # Pipeline stages decompose at their own first forward, each over its own stage's ranks
    # (megatron-core's tensor-and-data-parallel group).
    apply_hd_pissa(model, config, groups, progress=False, decompose=False)
    hidden = [p for p in model.parameters() if p.requires_grad]
    for p in hidden:
        p.allreduce = False  # never data-parallel reduced by DDP (see the module docstring)
        p.requires_grad_(False)
    for _, _, adapter in iter_adapters(model):
        # Megatron checkpoints stay plain model checkpoints; the factors live in the optimizer state.
        adapter._register_state_dict_hook(_drop_adapter_keys)
        adapter.register_load_state_dict_post_hook(_ignore_missing_adapter_keys)
    hook = model.register_forward_pre_hook(_first_forward)
    setattr(model, _STATE, {"state": ATTACHED, "hidden": hidden, "hook": hook})
    return model


def wrap_model_provider(model_provider: Callable, args=None) -> Callable:
    """A Megatron-LM model provider that builds the model with `model_provider` and, for
    `--peft hd-pissa`, prepares it for HD-PiSSA (`prepare_hd_pissa_model`). `args` defaults to
    Megatron-LM's parsed arguments at call time."""

    @functools.wraps(model_provider)  # same name and signature as the user's provider
    def provider(*a, **kw):
        opts = args if args is not None else _megatron_args()
        peft = getattr(opts, "peft", "hd-pissa")
        if peft == "full":
            return model_provider(*a, **kw)
        if peft != "hd-pissa":
            raise NotImplementedError(f"--peft {peft} is not offered through the Megatron-LM plug-in; "
                                      "use python -m megatron_hdpissa.finetune for the baselines")
        impl = getattr(opts, "transformer_impl", "local")
        if impl != "local":
            raise ValueError(f"--transformer-impl {impl}: the HD-PiSSA adapters wrap megatron-core's own "
                             "ColumnParallelLinear/RowParallelLinear layers; add --transformer-impl local")
        return prepare_hd_pissa_model(model_provider(*a, **kw), hd_pissa_config(opts))

    return provider


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
        inner = _unwrap(chunk)
        state = getattr(inner, _STATE, None)
        if state is None:
            continue
        if state["hook"] is not None:
            state["hook"].remove()
            state["hook"] = None
        if state["state"] == ATTACHED:
            decompose_hd_pissa(inner, progress)
            state["state"] = DECOMPOSED
            done = True
    return done


def is_hd_pissa_model(model) -> bool:
    return hasattr(_unwrap(model), _STATE)


# ---- optimizer --------------------------------------------------------------------------------
class MegatronHDPiSSAOptimizer:
    """`HDPiSSAOptimizer` with the interface Megatron-LM's training loop and checkpointing call."""

    is_stub_optimizer = False

    def __init__(self, model: nn.Module, lr: float, betas, eps: float, weight_decay: float,
                 clip_grad: float = 0.0):
        from megatron_hdpissa.optimizer.hd_pissa import HDPiSSAOptimizer

        self.model = model
        self.groups: ParallelGroups = model.hd_pissa_groups
        self.optimizer = HDPiSSAOptimizer(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                          groups=self.groups, clip_grad=clip_grad)
        self.optimizer.track_grad_norm = True  # Megatron-LM logs the gradient norm
        for group in self.optimizer.param_groups:
            group["default_config"] = True  # Megatron logs the lr of such a group
        self._checked = False

    # -- what train_step calls --------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=True)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def get_loss_scale(self) -> torch.Tensor:
        return torch.ones(1, device=self._device())

    def reload_model_params(self, state_dict=None):
        """Nothing to refresh: the optimizer keeps no copies of the model's weights."""

    def _device(self):
        return next(iter(self.optimizer.entries)).weight.device

    def _check_not_in_ddp(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if hasattr(p, "main_grad"):
                    raise RuntimeError(
                        "an HD-PiSSA parameter has a megatron DDP main_grad: DDP was built after the "
                        "optimizer hook and would all-reduce the per-rank factor gradients; build DDP "
                        "first (Megatron-LM's order) so the parameters are still frozen then")
        self._checked = True

    @torch.no_grad()
    def step(self):
        """(update_successful, grad_norm, num_zeros_in_grad), as Megatron's optimizers return.
        grad_norm is the global one (every DP rank's factors, TP shards summed once), the norm
        --clip-grad clips; a non-finite gradient on any rank skips the step on all ranks."""
        if not self._checked:
            self._check_not_in_ddp()
        self.optimizer.step()
        if self.optimizer.last_step_skipped:
            self.optimizer.zero_grad(set_to_none=True)
            return False, self.optimizer.last_grad_norm, None
        return True, self.optimizer.last_grad_norm, None

    # -- checkpoints ------------------------------------------------------------------------
    def _factors(self):
        return [p for e in self.optimizer.entries for p in (e.a, e.b)]

    def _local_state(self, complete: bool) -> dict:
        g = self.groups
        return {
            "optimizer": self.optimizer.state_dict(),
            "factors": [p.detach().clone() for p in self._factors()],
            "names": [f"{e.name}:{e.part.name}" for e in self.optimizer.entries],
            "dp_rank": g.dp_rank, "dp_size": g.dp_size, "tp_rank": g.tp_rank, "tp_size": g.tp_size,
            "pp_rank": g.pp_rank, "pp_size": g.pp_size, "complete": complete,
        }

    def state_dict(self) -> dict:
        """This rank's HD-PiSSA state. Megatron's legacy format saves only data-parallel rank 0's,
        which holds every rank's state only when there is one data-parallel rank."""
        return {"hd_pissa": self._local_state(complete=self.groups.dp_size == 1)}

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading: bool = False, **kwargs) -> dict:
        """`torch_dist` checkpoints: one object per (pipeline, tensor, data-parallel) rank."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        g = self.groups
        pp_size, pp_rank = 1, 0
        if ps.model_parallel_is_initialized():
            pp_size = ps.get_pipeline_model_parallel_world_size()
            pp_rank = ps.get_pipeline_model_parallel_rank()
        obj = ShardedObject(SHARDED_KEY, self._local_state(complete=True), (pp_size, g.tp_size, g.dp_size),
                            (pp_rank, g.tp_rank, g.dp_rank), replica_id=0)
        return {"hd_pissa": obj}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore this rank's factors and moments (then skip the post-load decomposition)."""
        st = state_dict.get("hd_pissa") if isinstance(state_dict, dict) else None
        if st is None:
            raise KeyError("the optimizer state has no 'hd_pissa' entry: it was not written by the HD-PiSSA "
                           "optimizer hook; load with --no-load-optim (or --finetune) to decompose afresh")
        g = self.groups
        if not st["complete"]:
            raise RuntimeError(
                f"this checkpoint holds the HD-PiSSA state of data-parallel rank 0 only (legacy --ckpt-format "
                f"torch with {st['dp_size']} data-parallel ranks); resume needs --ckpt-format torch_dist, or "
                "add --no-load-optim to continue from its weights with a fresh decomposition")
        saved = tuple(st.get(k, 0 if k == "pp_rank" else 1) for k in
                      ("dp_rank", "dp_size", "tp_rank", "tp_size", "pp_rank", "pp_size"))
        if saved != (g.dp_rank, g.dp_size, g.tp_rank, g.tp_size, g.pp_rank, g.pp_size):
            raise ValueError(f"HD-PiSSA optimizer state of DP {saved[0]}/{saved[1]}, TP {saved[2]}/{saved[3]}, "
                             f"PP {saved[4]}/{saved[5]} loaded on DP {g.dp_rank}/{g.dp_size}, TP "
                             f"{g.tp_rank}/{g.tp_size}, PP {g.pp_rank}/{g.pp_size}: resume with the same "
                             "parallel layout (--pipeline-model-parallel-size included)")
        names = [f"{e.name}:{e.part.name}" for e in self.optimizer.entries]
        if st["names"] != names:
            raise ValueError("the HD-PiSSA optimizer state targets other layers than this model "
                             "(--hd-pissa-target-modules differs from the saved run)")
        for p, saved in zip(self._factors(), st["factors"]):
            p.copy_(saved)
        self.optimizer.load_state_dict(st["optimizer"])
        self.optimizer.refresh_gathered_factors()
        state = getattr(self.model, _STATE)
        state["state"] = RESTORED


def get_hd_pissa_optimizer(model_chunks, args=None) -> MegatronHDPiSSAOptimizer:
    """The HD-PiSSA optimizer for Megatron-LM's model chunks (DDP-wrapped or not). `args`:
    Megatron's parsed arguments or its `OptimizerConfig` (same field names; default `get_args()`).
    Unfreezes the HD-PiSSA parameters the wrapped provider kept away from DDP."""
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if len(chunks) != 1:
        raise ValueError(f"{len(chunks)} model chunks: virtual pipeline stages are not supported with HD-PiSSA")
    model = _unwrap(chunks[0])
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("the model has no HD-PiSSA adapters: build it with megatron_lm.wrap_model_provider(...)")
    args = args if args is not None else _megatron_args()
    if getattr(args, "bf16", False) or getattr(args, "fp16", False):
        raise ValueError("--bf16/--fp16 with HD-PiSSA loses the per-step updates in 16-bit weights; "
                         "train in fp32 (drop --bf16/--fp16)")
    if getattr(args, "use_distributed_optimizer", False):
        raise ValueError("--use-distributed-optimizer is not supported with HD-PiSSA (its optimizer "
                         "replaces Megatron's); drop the flag")
    for p in state["hidden"]:
        p.requires_grad_(True)
    opt = MegatronHDPiSSAOptimizer(model, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                   eps=args.adam_eps, weight_decay=args.weight_decay,
                                   clip_grad=getattr(args, "clip_grad", 0.0) or 0.0)
    opt._check_not_in_ddp()
    return opt


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
        if any(is_hd_pissa_model(c) for c in chunks):
            return get_hd_pissa_optimizer(chunks, config)
        return original(config, model_chunks, *args, **kwargs)

    get_megatron_optimizer._hd_pissa_original = original
    training_module.get_megatron_optimizer = get_megatron_optimizer
