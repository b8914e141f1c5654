"""The trainer's command line: Megatron-LM's flag names where they exist, plus the HD-PiSSA flags."""
from __future__ import annotations

import argparse
import contextlib
import math
from typing import Union

from megatron_hdpissa.peft.common import DEFAULT_TARGET_MODULES, HD_PISSA, PEFT_METHODS, SVD_METHODS, ConfigError
from megatron_hdpissa.peft.hd_pissa.config import (
    AGGREGATION, BUCKET_SIZE, CONSISTENCY_CHECK_INTERVAL, MASTER_WEIGHTS, HDPiSSAConfig,
)
from megatron_hdpissa.checkpoint.dist import CKPT_FORMATS, TORCH_DIST
from megatron_hdpissa.data.batches import DEFAULT_PAD_MULTIPLE
from megatron_hdpissa.data.chat import AUTO, DATA_FORMATS
from megatron_hdpissa.data.sft import ALPACA
from megatron_hdpissa.data.tokenizer import TOKENIZER_TYPES
from megatron_hdpissa.models.gpt import ATTENTION_BACKENDS, DEFAULT_SEED, SDPA
from megatron_hdpissa.models.moe_router import ROUTER_FLAG, with_router
from megatron_hdpissa.models.recompute import RECOMPUTE_GRANULARITIES, RECOMPUTE_METHODS
from megatron_hdpissa.peft.lowrank.config import LOWRANK_METHODS, LowRankConfig
from megatron_hdpissa.training.guards import (  # --nonfinite-loss, --max-skipped-steps
    DEFAULT_MAX_SKIPPED_STEPS, NONFINITE_SKIP, NONFINITE_STOP, numeric_flag_errors,
)
from megatron_hdpissa.training.lr_schedule import COSINE, LR_DECAY_STYLES

FULL = "full"
PEFT_CHOICES = (*PEFT_METHODS, FULL)  # --peft

# The library's parameter -> the trainer's flag, for the ConfigErrors of each method.
HD_PISSA_FLAGS = {
    "method": "--peft", "rank": "--hd-pissa-rank", "alpha": "--hd-pissa-alpha",
    "target_modules": "--hd-pissa-target-modules", "trainable_modules": "--hd-pissa-trainable-modules",
    "fused_decomposition": "--hd-pissa-fused-decomposition", "svd_method": "--hd-pissa-svd",
    "svd_oversampling": "--hd-pissa-svd-oversampling", "svd_niter": "--hd-pissa-svd-niter",
    "virtual_ranks": "--hd-pissa-virtual-ranks", "master_weights": "--hd-pissa-master-weights",
    "aggregation": "--hd-pissa-aggregation", "bucket_size": "--hd-pissa-bucket-size",
    "consistency_check_interval": "--hd-pissa-check-interval", "seed": "--seed",
    # the optimizers' parameters
    "lr": "--lr", "weight_decay": "--weight-decay", "clip_grad": "--clip-grad",
    "others_optimizer": "--hd-pissa-others-optimizer",
}
# The baselines share the decomposition and trainable-module flags, and have their own rank,
# alpha and targets.
LOWRANK_FLAGS = {**HD_PISSA_FLAGS, "rank": "--lora-rank", "alpha": "--lora-alpha",
                 "target_modules": "--lora-target-modules"}
# convert.peft_adapter's parameters -> the flags of the trainer and tools/convert_megatron_to_hf.py
ADAPTER_FLAGS = {"rank": "--export-adapter-rank", "base": "--pretrained-checkpoint", "method": "--peft",
                 "target_modules": "--hd-pissa-target-modules / --lora-target-modules"}


def add_hd_pissa_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The HD-PiSSA flags; also usable as (part of) a Megatron-LM `extra_args_provider`."""
    g = parser.add_argument_group("HD-PiSSA")
    g.add_argument("--peft", choices=PEFT_CHOICES, default=HD_PISSA,
                   help="hd-pissa (default), or the data-parallel baselines pissa / lora / full")
    g.add_argument("--hd-pissa-rank", type=int, default=16, help="per-rank adapter rank r")
    g.add_argument("--hd-pissa-alpha", type=float, default=None,
                   help="scale numerator: s = alpha / r (default alpha = r, s = 1)")
    g.add_argument("--hd-pissa-target-modules", default=",".join(DEFAULT_TARGET_MODULES),
                   help="comma-separated module-name suffixes, or re:<regex>")
    g.add_argument("--hd-pissa-svd", choices=SVD_METHODS, default="exact")
    g.add_argument("--hd-pissa-svd-oversampling", type=int, default=None,
                   help="randomized SVD: extra sketch columns (default K*r, i.e. q = 2Kr)")
    g.add_argument("--hd-pissa-svd-niter", type=int, default=4, help="randomized SVD power iterations")
    g.add_argument("--hd-pissa-fused-decomposition", action="store_true",
                   help="decompose fused linear_qkv / linear_fc1 as one matrix each")
    g.add_argument("--hd-pissa-virtual-ranks", type=int, default=1,
                   help="slices per process: K = data-parallel size x this")
    g.add_argument("--hd-pissa-update-factors", action="store_true",
                   help="let the factors move (A <- A - dA) instead of resetting every step")
    g.add_argument("--hd-pissa-trainable-modules", default="",
                   help="other parameters to train data-parallel (e.g. re:.*layernorm.*)")
    g.add_argument("--hd-pissa-master-weights", default="auto",
                   choices=MASTER_WEIGHTS,
                   help="where updates accumulate; auto: fp32-base for fp32 weights, sharded-fp32 with --bf16")
    g.add_argument("--hd-pissa-aggregation", default="auto", choices=AGGREGATION,
                   help="per layer: all-gather the deltas (factors) or all-reduce the dense update; auto: smaller")
    g.add_argument("--hd-pissa-bucket-size", type=int, default=BUCKET_SIZE, help="elements per communication bucket")
    g.add_argument("--hd-pissa-check-interval", type=int, default=CONSISTENCY_CHECK_INTERVAL,
                   help="verify identical weights on all DP ranks every N steps (0: never)")
    g.add_argument("--hd-pissa-ddp", choices=["megatron", "builtin"], default="megatron",
                   help="gradient reduction: megatron-core's DistributedDataParallel (factors kept "
                        "out of the DP all-reduce) or the optimizer's own all-reduce")
    g.add_argument("--hd-pissa-others-optimizer", choices=["auto", "megatron", "builtin"], default="auto",
                   help="optimizer of ordinary trainable parameters (--hd-pissa-trainable-modules) under "
                        "megatron DDP: megatron-core's get_megatron_optimizer, or the built-in AdamW; "
                        "auto: megatron-core's where it can run (CUDA, or fp32 parameters)")
    g = parser.add_argument_group("LoRA / PiSSA baselines (--peft lora | pissa)")
    g.add_argument("--lora-rank", type=int, default=None, help="adapter rank r (default: --hd-pissa-rank)")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help="scale numerator: s = alpha / r (default: --hd-pissa-alpha, else alpha = r)")
    g.add_argument("--lora-target-modules", default=None,
                   help="comma-separated module-name suffixes, or re:<regex> (default: --hd-pissa-target-modules)")
    return parser


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's flag names where they exist."""
    g = parser.add_argument_group("model and parallelism")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="base model: a converted checkpoint (tools/convert_hf_to_megatron.py), a "
                        "Megatron-LM / Megatron-Bridge checkpoint, or a Hugging Face folder")
    g.add_argument("--load", default=None, help="resume from this training checkpoint folder "
                   "(if it holds one); otherwise it is used as the base checkpoint")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--save-retain", type=int, default=0, metavar="N",
                   help="keep only the newest N checkpoints in --save (0: keep all); the one resumed from is kept")
    g.add_argument("--ckpt-format", choices=CKPT_FORMATS, default=TORCH_DIST,
                   help="training checkpoint format (Megatron-LM's names). torch_dist: megatron-core "
                        "dist_checkpointing, resumes at any TP / PP with the same K = DP x virtual ranks. "
                        "torch: legacy per-rank mp_rank_XX files, resumes at the same layout only")
    g.add_argument("--async-save", action="store_true",
                   help="Megatron-LM's asynchronous torch_dist save: refused here (see checkpoint/dist.py)")
    g.add_argument("--exit-interval", type=int, default=0, help="exit after this many iterations")
    g.add_argument("--export-hf", default=None, help="write the merged model here (HF safetensors)")
    g.add_argument("--export-hf-adapter", default=None, metavar="DIR",
                   help="write an HF PEFT LoRA adapter for the original base here (adapter_config.json, "
                        "adapter_model.safetensors, README.md): LoRA / PiSSA exactly, HD-PiSSA as the rank-R "
                        "truncated SVD of W_T - W_0 with its remainder reported")
    g.add_argument("--export-adapter-rank", type=int, default=None, metavar="R",
                   help="HD-PiSSA: the exported adapter's rank R (default 2 K r)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages; must divide the number of layers")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="mixture-of-experts models: ranks the experts are split over (must divide them)")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="MoE: tensor-parallel size inside each expert (default: --tensor-model-parallel-size)")
    g.add_argument("--num-experts", type=int, default=None,
                   help="MoE: checked against the checkpoint's model (default: its model_config.json)")
    g.add_argument("--moe-router-topk", type=int, default=None,
                   help="MoE: checked against the checkpoint's model (default: its model_config.json)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None,
                   help="MoE load-balancing loss coefficient (default: the HF config's router_aux_loss_coef)")
    g.add_argument(ROUTER_FLAG, action="store_true",
                   help="MoE: train the routers (mlp.router.weight) as ordinary data-parallel parameters, with "
                        "every --peft method (--peft full trains them anyway); frozen by default")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard activations outside the TP regions over the sequence (needs TP > 1)")
    g.add_argument("--recompute-granularity", choices=RECOMPUTE_GRANULARITIES, default=None)
    g.add_argument("--recompute-method", choices=RECOMPUTE_METHODS, default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-modules", nargs="*", default=None,
                   help="selective recompute: the submodules to recompute (megatron-core's names)")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=SDPA,
                   help="core attention: sdpa (torch's scaled_dot_product_attention: fused kernels, no "
                        "s x s scores in memory) or local (megatron-core's DotProductAttention)")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED)
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", required=True, help="training JSONL")
    g.add_argument("--valid-data-path", default=None, help="held-out JSONL")
    g.add_argument("--prompt-field", default="question")
    g.add_argument("--response-field", default="answer")
    g.add_argument("--input-field", default=None)
    g.add_argument("--prompt-template", default=ALPACA, help="alpaca | chat | a string with {prompt}")
    g.add_argument("--data-format", choices=DATA_FORMATS, default=AUTO,
                   help="messages: multi-turn chat records (OpenAI `messages` or ShareGPT `conversations`) "
                        "rendered with the tokenizer's chat template, loss on every assistant turn; "
                        "prompt-response: --prompt-field / --response-field records; auto: per file, "
                        "messages when its first record holds `messages` or `conversations`")
    g.add_argument("--tokenizer-type", default=TOKENIZER_TYPES[0],
                   choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None,
                   help="HF tokenizer folder or SentencePiece .model (default: the checkpoint's tokenizer/)")
    g.add_argument("--seq-length", type=int, default=512)
    g.add_argument("--pack", action="store_true", help="pack several examples per sequence")
    g.add_argument("--pad-to-max-length", action="store_true",
                   help="pad every micro-batch to --seq-length (default: to its longest sequence)")
    g.add_argument("--pad-multiple", type=int, default=DEFAULT_PAD_MULTIPLE,
                   help="round each micro-batch's length up to a multiple of this (made a multiple "
                        "of TP under --sequence-parallel)")
    g = parser.add_argument_group("optimization")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--epochs", type=float, default=None)
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default=COSINE)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="clip the global gradient L2 norm (all ranks' HD-PiSSA factors and the "
                        "averaged other parameters) to this; 0 disables")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="megatron DDP: all-reduce gradient buckets during the backward pass")
    g = parser.add_argument_group("mixed precision (--fp16 loss scaling, Megatron-LM's flags)")
    g.add_argument("--loss-scale", type=float, default=None, help="constant loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g = parser.add_argument_group("optimization (continued)")
    g.add_argument("--nonfinite-loss", choices=(NONFINITE_STOP, NONFINITE_SKIP), default=NONFINITE_STOP,
                   help="a NaN/inf loss, gradient norm or update on any rank: stop (default, after saving nothing) "
                        "or skip the step on all ranks (W is never touched by a non-finite update)")
    g.add_argument("--max-skipped-steps", type=int, default=DEFAULT_MAX_SKIPPED_STEPS,
                   help="--nonfinite-loss skip: stop after this many consecutive skipped steps (0: no limit)")
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=0, help="micro-batches per rank per evaluation (0: all)")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--log-json", default=None, help="append one JSON line per logged step here")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Megatron-style supervised fine-tuning with HD-PiSSA "
                                     "(or LoRA / PiSSA / full baselines).",
                                     # one line, not the ~60 of every flag above each error message
                                     usage="%(prog)s --pretrained-checkpoint DIR --data-path FILE "
                                           "(--train-iters N | --epochs E) [options: see --help]",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_args(parser)
    add_hd_pissa_args(parser)
    args = parser.parse_args(argv)
    if args.fp16 and args.bf16:
        parser.error("give at most one of --fp16 and --bf16")
    if args.fp16 and args.peft != HD_PISSA:
        parser.error(f"--fp16 (loss scaling) is implemented for --peft hd-pissa only; use --bf16 with --peft {args.peft}")
    for message in numeric_flag_errors(args):  # finite and in range: --lr nan is not < 0
        parser.error(message)
    if args.save_retain < 0:
        parser.error(f"--save-retain must be >= 0 (0 keeps every checkpoint), got {args.save_retain}")
    if args.expert_model_parallel_size < 1 or (args.expert_tensor_parallel_size or 1) < 1:
        parser.error("--expert-model-parallel-size and --expert-tensor-parallel-size must be >= 1")
    if args.pipeline_model_parallel_size < 1:
        parser.error(f"--pipeline-model-parallel-size must be >= 1, got {args.pipeline_model_parallel_size}")
    if args.pad_multiple < 1:
        parser.error(f"--pad-multiple must be >= 1, got {args.pad_multiple}")
    if (args.train_iters is None) == (args.epochs is None):
        parser.error("give exactly one of --train-iters and --epochs")
    if not args.pretrained_checkpoint and not args.load:
        parser.error("give --pretrained-checkpoint (a converted base) or --load")
    if args.async_save:
        parser.error("--async-save is not supported: megatron-core's asynchronous torch_dist writer starts a "
                     "spawn-context Manager and forks writer processes, which hangs under launchers that set up "
                     "the process group on import (see megatron_hdpissa/checkpoint/dist.py); checkpoints are "
                     "written synchronously, atomically")
    if args.export_adapter_rank is not None and (not args.export_hf_adapter or args.export_adapter_rank < 1
                                                 or args.peft != HD_PISSA):
        parser.error(f"--export-adapter-rank must be >= 1 and goes with --export-hf-adapter and --peft hd-pissa "
                     f"(LoRA / PiSSA adapters are exported at their own rank), got {args.export_adapter_rank}")
    if args.export_hf_adapter and (args.peft == FULL or not args.pretrained_checkpoint):
        parser.error("--export-hf-adapter needs an adapter method (--peft hd-pissa, lora or pissa) and "
                     "--pretrained-checkpoint (the original base W_0 the adapter is applied to)")
    if args.moe_router_trainable and args.export_hf_adapter:
        parser.error(f"{ROUTER_FLAG} changes the routers, which an HF PEFT LoRA adapter cannot carry "
                     "(--export-hf-adapter): use --export-hf (the merged model)")
    if args.peft != HD_PISSA and args.hd_pissa_virtual_ranks != 1:
        parser.error("--hd-pissa-virtual-ranks only applies to --peft hd-pissa")
    lora_flags = [f for f in ("rank", "alpha", "target_modules") if getattr(args, f"lora_{f}") is not None]
    if lora_flags and args.peft not in LOWRANK_METHODS:
        parser.error(f"{LOWRANK_FLAGS[lora_flags[0]]} only applies to --peft {' | '.join(LOWRANK_METHODS)}")
    return args


@contextlib.contextmanager
def flag_errors(peft: str):
    """Re-raise the library's ConfigError (which names a library parameter) naming the trainer's
    flag for it: `--hd-pissa-*` for HD-PiSSA, `--lora-*` for the baselines' own settings."""
    try:
        yield
    except ConfigError as e:
        raise e.renamed(HD_PISSA_FLAGS if peft == HD_PISSA else LOWRANK_FLAGS) from e


def hd_pissa_config(args) -> HDPiSSAConfig:
    """HDPiSSAConfig from the `--hd-pissa-*` flags (errors name the flags)."""
    with flag_errors(HD_PISSA):
        return HDPiSSAConfig(
            rank=args.hd_pissa_rank, alpha=args.hd_pissa_alpha, target_modules=args.hd_pissa_target_modules,
            fused_decomposition=args.hd_pissa_fused_decomposition, svd_method=args.hd_pissa_svd,
            svd_oversampling=args.hd_pissa_svd_oversampling, svd_niter=args.hd_pissa_svd_niter,
            virtual_ranks=args.hd_pissa_virtual_ranks, update_factors=args.hd_pissa_update_factors,
            trainable_modules=with_router(args.hd_pissa_trainable_modules, getattr(args, "moe_router_trainable", False)),
            consistency_check_interval=args.hd_pissa_check_interval, seed=args.seed,
            master_weights=args.hd_pissa_master_weights, aggregation=args.hd_pissa_aggregation,
            bucket_size=args.hd_pissa_bucket_size,
        )


def _lora_or_hd_pissa(args, name: str):
    value = getattr(args, f"lora_{name}", None)
    return getattr(args, f"hd_pissa_{name}") if value is None else value


def lowrank_config(args) -> LowRankConfig:
    """LowRankConfig for `--peft lora | pissa` from the `--lora-*` flags (each falling back to
    its `--hd-pissa-*` counterpart) and the shared decomposition flags (errors name the flags)."""
    with flag_errors(args.peft):
        return LowRankConfig(
            method=args.peft, rank=_lora_or_hd_pissa(args, "rank"), alpha=_lora_or_hd_pissa(args, "alpha"),
            target_modules=_lora_or_hd_pissa(args, "target_modules"),
            fused_decomposition=args.hd_pissa_fused_decomposition, svd_method=args.hd_pissa_svd,
            svd_oversampling=args.hd_pissa_svd_oversampling, svd_niter=args.hd_pissa_svd_niter,
            trainable_modules=with_router(args.hd_pissa_trainable_modules, args.moe_router_trainable), seed=args.seed,
        )


def peft_config(args) -> Union[HDPiSSAConfig, LowRankConfig]:
    """The method's config: LowRankConfig for the baselines, else HDPiSSAConfig (also what
    `--peft full` records in its checkpoints)."""
    return lowrank_config(args) if args.peft in LOWRANK_METHODS else hd_pissa_config(args)


def effective_pad_multiple(args) -> int:
    """--pad-multiple, raised to a multiple of TP under --sequence-parallel (each TP rank holds
    an equal slice of the sequence)."""
    m, tp = args.pad_multiple, args.tensor_model_parallel_size
    if args.sequence_parallel and m % tp:
        m = m * tp // math.gcd(m, tp)
    return m


def grad_scaler(args):
    """megatron-core's loss scaler for --fp16 (constant with --loss-scale, else dynamic)."""
    if not args.fp16:
        return None
    from megatron_hdpissa.models.compat import ensure_cpu_compat

    ensure_cpu_compat()  # its scale tensors are created on 'cuda' literally
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    if args.loss_scale:
        return ConstantGradScaler(args.loss_scale)
    return DynamicGradScaler(initial_scale=args.initial_loss_scale, min_scale=args.min_loss_scale,
                             growth_factor=2.0, backoff_factor=0.5, growth_interval=args.loss_scale_window,
                             hysteresis=args.hysteresis)


