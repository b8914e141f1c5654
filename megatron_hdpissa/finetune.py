"""Megatron-style supervised fine-tuning with HD-PiSSA (or LoRA / PiSSA / full baselines).

Reads top to bottom: arguments, set-up (process groups, base model, adapters, optimizer, data),
the training loop (one optimizer step = every local slice's micro-batches, then the aggregating
step), evaluation, checkpoints and the merged Hugging Face export.

    torchrun --nproc-per-node 2 -m megatron_hdpissa.finetune \
        --pretrained-checkpoint ckpt/smollm2-tp1 --data-path train.jsonl \
        --valid-data-path heldout.jsonl --hd-pissa-rank 16 --micro-batch-size 2 \
        --global-batch-size 16 --seq-length 512 --lr 2e-5 --train-iters 100 --save out
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
import torch
import torch.distributed as dist

from . import checkpointing, distributed
from .apply import active_slice
from .config import DEFAULT_TARGET_MODULES, SVD_METHODS, HDPiSSAConfig

PEFT_METHODS = ("hd-pissa", "pissa", "lora", "full")


# ---- arguments -------------------------------------------------------------------------------
def add_hd_pissa_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The HD-PiSSA flags; also usable as (part of) a Megatron-LM `extra_args_provider`."""
    g = parser.add_argument_group("HD-PiSSA")
    g.add_argument("--peft", choices=PEFT_METHODS, default="hd-pissa",
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
                   choices=["auto", "fp32-base", "sharded-fp32", "compensated-bf16", "none"],
                   help="where updates accumulate; auto: fp32-base for fp32 weights, sharded-fp32 with --bf16")
    g.add_argument("--hd-pissa-aggregation", default="auto", choices=["auto", "factors", "dense"],
                   help="per layer: all-gather the deltas (factors) or all-reduce the dense update; auto: smaller")
    g.add_argument("--hd-pissa-bucket-size", type=int, default=1 << 24, help="elements per communication bucket")
    g.add_argument("--hd-pissa-check-interval", type=int, default=50,
                   help="verify identical weights on all DP ranks every N steps (0: never)")
    g.add_argument("--hd-pissa-ddp", choices=["megatron", "builtin"], default="megatron",
                   help="gradient reduction: megatron-core's DistributedDataParallel (factors kept "
                        "out of the DP all-reduce) or the optimizer's own all-reduce")
    g.add_argument("--hd-pissa-others-optimizer", choices=["auto", "megatron", "builtin"], default="auto",
                   help="optimizer of ordinary trainable parameters (--hd-pissa-trainable-modules) under "
                        "megatron DDP: megatron-core's get_megatron_optimizer, or the built-in AdamW; "
                        "auto: megatron-core's where it can run (CUDA, or fp32 parameters)")
    return parser


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's flag names where they exist."""
    g = parser.add_argument_group("model and parallelism")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="converted base checkpoint (tools/convert_hf_to_megatron.py)")
    g.add_argument("--load", default=None, help="resume from this training checkpoint folder "
                   "(if it holds one); otherwise it is used as the base checkpoint")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--exit-interval", type=int, default=0, help="exit after this many iterations")
    g.add_argument("--export-hf", default=None, help="write the merged model here (HF safetensors)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", required=True, help="training JSONL")
    g.add_argument("--valid-data-path", default=None, help="held-out JSONL")
    g.add_argument("--prompt-field", default="question")
    g.add_argument("--response-field", default="answer")
    g.add_argument("--input-field", default=None)
    g.add_argument("--prompt-template", default="alpaca", help="alpaca | chat | a string with {prompt}")
    g.add_argument("--tokenizer-type", default="HuggingFaceTokenizer",
                   choices=["HuggingFaceTokenizer", "SentencePieceTokenizer"])
    g.add_argument("--tokenizer-model", default=None,
                   help="HF tokenizer folder or SentencePiece .model (default: the checkpoint's tokenizer/)")
    g.add_argument("--seq-length", type=int, default=512)
    g.add_argument("--pack", action="store_true", help="pack several examples per sequence")
    g = parser.add_argument_group("optimization")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--epochs", type=float, default=None)
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
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
    g.add_argument("--nonfinite-loss", choices=["stop", "skip"], default="stop",
                   help="a NaN/inf loss on any rank: stop (default, after saving nothing) or skip the step on all ranks")
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=0, help="micro-batches per rank per evaluation (0: all)")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--log-json", default=None, help="append one JSON line per logged step here")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_args(parser)
    add_hd_pissa_args(parser)
    args = parser.parse_args(argv)
    if args.fp16 and args.bf16:
        parser.error("give at most one of --fp16 and --bf16")
    if args.fp16 and args.peft != "hd-pissa":
        parser.error(f"--fp16 (loss scaling) is implemented for --peft hd-pissa only; use --bf16 with --peft {args.peft}")
    if args.clip_grad < 0:
        parser.error(f"--clip-grad must be >= 0 (0 disables clipping), got {args.clip_grad}")
    if args.pipeline_model_parallel_size != 1:
        parser.error("--pipeline-model-parallel-size must be 1")
    if (args.train_iters is None) == (args.epochs is None):
        parser.error("give exactly one of --train-iters and --epochs")
    if not args.pretrained_checkpoint and not args.load:
        parser.error("give --pretrained-checkpoint (a converted base) or --load")
    if args.peft != "hd-pissa" and args.hd_pissa_virtual_ranks != 1:
        parser.error("--hd-pissa-virtual-ranks only applies to --peft hd-pissa")
    return args


def hd_pissa_config(args) -> HDPiSSAConfig:
    return HDPiSSAConfig(
        rank=args.hd_pissa_rank, alpha=args.hd_pissa_alpha, target_modules=args.hd_pissa_target_modules,
        fused_decomposition=args.hd_pissa_fused_decomposition, svd_method=args.hd_pissa_svd,
        svd_oversampling=args.hd_pissa_svd_oversampling, svd_niter=args.hd_pissa_svd_niter,
        virtual_ranks=args.hd_pissa_virtual_ranks, update_factors=args.hd_pissa_update_factors,
        trainable_modules=args.hd_pissa_trainable_modules,
        consistency_check_interval=args.hd_pissa_check_interval, seed=args.seed,
        master_weights=args.hd_pissa_master_weights, aggregation=args.hd_pissa_aggregation,
        bucket_size=args.hd_pissa_bucket_size,
    )


def grad_scaler(args):
    """megatron-core's loss scaler for --fp16 (constant with --loss-scale, else dynamic)."""
    if not args.fp16:
        return None
    from .compat import ensure_cpu_compat

    ensure_cpu_compat()  # its scale tensors are created on 'cuda' literally
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    if args.loss_scale:
        return ConstantGradScaler(args.loss_scale)
    return DynamicGradScaler(initial_scale=args.initial_loss_scale, min_scale=args.min_loss_scale,
                             growth_factor=2.0, backoff_factor=0.5, growth_interval=args.loss_scale_window,
                             hysteresis=args.hysteresis)


# ---- learning-rate schedule ------------------------------------------------------------------
def lr_at(it: int, args, train_iters: int) -> float:
    """Linear warm-up, then constant / linear / cosine decay to --min-lr (Megatron's shapes)."""
    warmup = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * train_iters)
    if warmup and it < warmup:
        return args.lr * (it + 1) / warmup
    if args.lr_decay_style == "constant" or train_iters <= warmup:
        return args.lr
    frac = min(1.0, (it - warmup) / max(1, train_iters - warmup))
    coeff = 1 - frac if args.lr_decay_style == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return args.min_lr + coeff * (args.lr - args.min_lr)


# ---- helpers ---------------------------------------------------------------------------------
class Logger:
    """Rank-0 console lines, a progress bar, optional JSON lines and TensorBoard."""

    def __init__(self, args, total: int, start: int):
        self.rank0 = (dist.get_rank() if dist.is_initialized() else 0) == 0
        self.bar = None
        if self.rank0 and not args.no_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.json = open(args.log_json, "a") if (self.rank0 and args.log_json) else None
        self.tb = None
        if self.rank0 and args.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(args.tensorboard_dir)
            except ImportError:
                self.print("tensorboard is not installed: pip install tensorboard (logging without it)")

    def print(self, msg: str):
        if self.rank0:
            (self.bar.write if self.bar else print)(msg, **({} if self.bar else {"flush": True}))

    def scalars(self, it: int, **values):
        if not self.rank0:
            return
        if self.json:
            self.json.write(json.dumps({"iteration": it, **values}) + "\n")
            self.json.flush()
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, it)

    def step(self, postfix: dict):
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        if self.bar:
            self.bar.close()
        if self.json:
            self.json.close()
        if self.tb:
            self.tb.close()


def _all_reduce(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op, group=group)
    return t


def micro_batch_loss(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of masked token losses, number of loss tokens) of one micro-batch."""
    tokens = batch["tokens"].to(device)
    per_token = model(input_ids=tokens, position_ids=batch["position_ids"].to(device), attention_mask=None,
                      labels=batch["labels"].to(device))
    mask = batch["loss_mask"].to(device)
    return (per_token.float() * mask).sum(), mask.sum()


@torch.no_grad()
def evaluate(model, dataset, args, groups, device) -> float:
    """Mean token loss over the whole held-out set (each DP rank a shard, summed over DP)."""
    from .data import SFTBatchIterator

    was_training = model.training
    model.eval()
    it = SFTBatchIterator(dataset, args.micro_batch_size, num_shards=groups.dp_size, shard_index=groups.dp_rank,
                          shuffle=False, drop_last=False, num_epochs=1, pack=args.pack)
    total = torch.zeros(2, dtype=torch.float64)
    for i, batch in enumerate(it):
        if args.eval_iters and i >= args.eval_iters:
            break
        loss_sum, count = micro_batch_loss(model, batch, device)
        total += torch.stack([loss_sum.double().cpu(), count.double().cpu()])
    _all_reduce(total, groups.dp_group)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


class StopSignal:
    """SIGTERM/SIGINT (SLURM pre-emption, Ctrl-C) ask for a checkpoint at the next step boundary;
    a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        return bool(_all_reduce(flag, op=dist.ReduceOp.MAX).item() > 0)


def export_merged_hf(model, groups, base_dir: Path, out_dir: str, peft: str, log) -> None:
    """Merge adapters (LoRA / PiSSA; HD-PiSSA's weights already are) and write an HF folder."""
    from .baselines import merge_lowrank
    from .conversion import CHECKPOINT_FILE, TOKENIZER_DIR, convert_megatron_to_hf
    from .models import MODEL_CONFIG_FILE

    if peft in ("lora", "pissa"):
        merge_lowrank(model)
    rank0 = (dist.get_rank() if dist.is_initialized() else 0) == 0
    parent = Path(out_dir).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=parent)) if rank0 else None
    if dist.is_initialized():
        box = [str(tmp) if tmp else None]
        dist.broadcast_object_list(box, src=0)
        tmp = Path(box[0])
    base, _ = checkpointing.split_state_dict(model)
    if groups.dp_rank == 0:
        path = tmp / "iter_0000000" / f"mp_rank_{groups.tp_rank:02d}" / CHECKPOINT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": base, "iteration": 0, "tensor_model_parallel_size": groups.tp_size}, path)
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        try:
            shutil.copy2(base_dir / MODEL_CONFIG_FILE, tmp / MODEL_CONFIG_FILE)
            if (base_dir / TOKENIZER_DIR).is_dir():
                shutil.copytree(base_dir / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
            (tmp / "latest_checkpointed_iteration.txt").write_text("0\n")
            convert_megatron_to_hf(tmp, out_dir, force=True, progress=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"exported the merged model to {out_dir}")
    if dist.is_initialized():
        dist.barrier()


# ---- main ------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    from .baselines import DataParallelAdamW, apply_lowrank
    from .conversion import TOKENIZER_DIR, load_megatron_checkpoint
    from .data import SFTBatchIterator, SFTDataset
    from .models import ModelConfig, build_gpt_model
    from .optimizer import HDPiSSAOptimizer
    from .tokenizer import build_tokenizer, check_vocab_fits
    from . import apply_hd_pissa

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    groups = distributed.initialize(args.tensor_model_parallel_size)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rank0 = dist.get_rank() == 0
    if not rank0:  # data warnings (truncation counts) once, from rank 0
        logging.getLogger("megatron_hdpissa").setLevel(logging.ERROR)

    def log(msg):
        if rank0:
            print(msg, flush=True)

    # Which checkpoint to start from: resume if --load holds a training checkpoint.
    resume = bool(args.load) and checkpointing.is_training_checkpoint(args.load)
    base_dir = Path(args.load if (resume or not args.pretrained_checkpoint) else args.pretrained_checkpoint)
    if not base_dir.is_dir():
        raise FileNotFoundError(f"--pretrained-checkpoint/--load {base_dir} does not exist")
    model_config = ModelConfig.load(base_dir)
    tokenizer_path = args.tokenizer_model or str(base_dir / TOKENIZER_DIR)
    tokenizer = build_tokenizer(args.tokenizer_type, tokenizer_path)
    check_vocab_fits(tokenizer, model_config.vocab_size)

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    model = build_gpt_model(model_config, dtype=dtype, seed=args.seed)
    load_megatron_checkpoint(model, base_dir)
    model.to(device)
    log(f"loaded {'training checkpoint' if resume else 'base'} {base_dir} "
        f"(TP={groups.tp_size}, DP={groups.dp_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters on this rank)")

    # Adapters and optimizer.
    cfg = hd_pissa_config(args)
    t0 = time.time()
    adam = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                weight_decay=args.weight_decay)
    train_model = model  # what the micro-batches run through (megatron DDP wraps it)
    if args.peft == "hd-pissa":
        apply_hd_pissa(model, cfg, groups, progress=rank0 and not args.no_progress, decompose=not resume)
        if args.hd_pissa_ddp == "megatron":
            from .ddp import wrap_ddp

            train_model = wrap_ddp(model, overlap_grad_reduce=args.overlap_grad_reduce)
        optimizer = HDPiSSAOptimizer(train_model, groups=groups, clip_grad=args.clip_grad,
                                     grad_scaler=grad_scaler(args), others_optimizer=(
                                         args.hd_pissa_others_optimizer if args.hd_pissa_ddp == "megatron"
                                         else "builtin"), **adam)
    elif args.peft in ("lora", "pissa"):
        apply_lowrank(model, cfg, args.peft, groups, progress=rank0 and not args.no_progress, decompose=not resume)
        optimizer = DataParallelAdamW([p for p in model.parameters() if p.requires_grad], groups=groups,
                                      clip_grad=args.clip_grad, **adam)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        optimizer = DataParallelAdamW(list(model.parameters()), groups=groups, clip_grad=args.clip_grad, **adam)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"--peft {args.peft}: {trainable / 1e6:.3f}M trainable parameters per rank, "
        f"set-up {time.time() - t0:.1f}s" + (f", K = {groups.dp_size * cfg.virtual_ranks} slices of rank "
                                             f"{cfg.rank}, s = {cfg.scale:g}" if args.peft == "hd-pissa" else ""))

    # Data: every slice (DP rank x virtual rank) reads its own shard of each epoch.
    slices = cfg.virtual_ranks if args.peft == "hd-pissa" else 1
    shards = groups.dp_size * slices
    global_batch = args.global_batch_size or args.micro_batch_size * shards
    if global_batch % (args.micro_batch_size * shards):
        raise ValueError(f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {groups.dp_size} data-parallel ranks x {slices} virtual ranks")
    micro_per_slice = global_batch // (args.micro_batch_size * shards)
    train_ds = SFTDataset.from_jsonl(args.data_path, tokenizer, args.seq_length, prompt_field=args.prompt_field,
                                     response_field=args.response_field, input_field=args.input_field,
                                     template=args.prompt_template)
    valid_ds = None
    if args.valid_data_path:
        valid_ds = SFTDataset.from_jsonl(args.valid_data_path, tokenizer, args.seq_length,
                                         prompt_field=args.prompt_field, response_field=args.response_field,
                                         input_field=args.input_field, template=args.prompt_template)
    iterators = [SFTBatchIterator(train_ds, args.micro_batch_size, num_shards=shards,
                                  shard_index=groups.dp_rank * slices + v, seed=args.seed, pack=args.pack)
                 for v in range(slices)]
    if args.train_iters is not None:
        train_iters = args.train_iters
    else:
        train_iters = max(1, int(args.epochs * iterators[0].batches_in_epoch(0) / micro_per_slice))
    log(f"data: {len(train_ds)} training examples ({train_ds.num_truncated} truncated), global batch "
        f"{global_batch} = {micro_per_slice} micro-batches x {args.micro_batch_size} x {shards} slices; "
        f"{train_iters} iterations")

    # Resume.
    start = 0
    meta = {"peft": args.peft, "dp_size": groups.dp_size, "tp_size": groups.tp_size,
            "virtual_ranks": slices, "rank": cfg.rank, "config": cfg.to_dict(),
            "args": {k: v for k, v in vars(args).items()}}
    if resume:
        checkpointing.check_resume_compatible(checkpointing.read_meta(args.load), meta, args.load)
        state = checkpointing.load_rank_state(args.load, groups)
        checkpointing.load_adapter_params(model, state["adapter"], args.load)
        optimizer.load_state_dict(state["optimizer"])
        if args.peft == "hd-pissa":
            optimizer.refresh_gathered_factors()
        for it_, st in zip(iterators, state["data"]):
            it_.load_state_dict(st)
        checkpointing.set_rng_state(state["rng"])
        start = int(state["iteration"])
        log(f"resumed at iteration {start} from {args.load}")

    def save(iteration: int):
        rank_state = {"optimizer": optimizer.state_dict(), "data": [i.state_dict() for i in iterators],
                      "rng": checkpointing.rng_state(), "iteration": iteration}
        path = checkpointing.save_checkpoint(args.save, iteration, model, rank_state, meta, groups,
                                             base_dir=str(base_dir))
        log(f"saved checkpoint {path}")

    # Train.
    results = {"iterations": train_iters, "start": start,
               "others_optimizer": type(getattr(optimizer, "others_optimizer", None)).__name__}
    logger = Logger(args, train_iters, start)
    if valid_ds is not None:
        results["valid_loss_before"] = evaluate(model, valid_ds, args, groups, device)
        logger.scalars(start, valid_loss=results["valid_loss_before"])
        logger.print(f"held-out loss at iteration {start}: {results['valid_loss_before']:.4f}")
    stop = StopSignal()
    model.train()
    tokens_per_step = global_batch * args.seq_length
    ddp = train_model if train_model is not model else None
    scale_loss = getattr(optimizer, "scale_loss", lambda x: x)  # fp16: the loss scale
    it = start
    last_log = time.time()
    try:
        while it < train_iters:
            lr = lr_at(it, args, train_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros(2, dtype=torch.float64)
            for v in range(slices):
                ctx = active_slice(model, v) if args.peft == "hd-pissa" else contextlib.nullcontext()
                with ctx:
                    for i in range(micro_per_slice):
                        last = v == slices - 1 and i == micro_per_slice - 1
                        # megatron DDP: reduce gradients only after the step's last micro-batch
                        sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
                        with sync:
                            loss_sum, count = micro_batch_loss(train_model, next(iterators[v]), device)
                            loss = loss_sum / count.clamp(min=1)
                            scale_loss(loss / micro_per_slice).backward()
                        step_loss += torch.tensor([float(loss.detach()), 1.0], dtype=torch.float64)
            if ddp is not None:
                ddp.finish_grad_sync()
            finite = torch.tensor([1.0 if math.isfinite(step_loss[0].item()) else 0.0])
            _all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 0:
                if args.nonfinite_loss == "stop":
                    raise FloatingPointError(
                        f"non-finite loss at iteration {it + 1} on some rank (--nonfinite-loss stop); the "
                        "weights of the last checkpoint are intact")
                log(f"iteration {it + 1}: non-finite loss on some rank, step skipped on all ranks "
                    "(--nonfinite-loss skip)")
                optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            it += 1
            _all_reduce(step_loss, groups.dp_group)
            train_loss = float(step_loss[0] / step_loss[1])
            results["train_loss"] = train_loss
            if it % args.log_interval == 0 or it == train_iters:
                now = time.time()
                tps = tokens_per_step * args.log_interval / max(now - last_log, 1e-9)
                last_log = now
                extra, text = {}, ""
                if getattr(optimizer, "last_grad_norm", None) is not None:
                    extra["grad_norm"] = optimizer.last_grad_norm
                    text += f" | grad norm {optimizer.last_grad_norm:.3f}"
                sent = getattr(optimizer, "last_step_bytes", None)
                if isinstance(sent, dict):  # HD-PiSSA aggregation: bytes this rank sent this step
                    extra["comm_bytes"] = int(sum(sent.values()))
                    text += f" | sent {extra['comm_bytes'] / 2 ** 20:.2f} MiB"
                if getattr(optimizer, "grad_scaler", None) is not None:
                    extra["loss_scale"] = float(optimizer.grad_scaler.scale)
                    extra["skipped_steps"] = optimizer.skipped_steps
                    text += f" | loss scale {extra['loss_scale']:.0f} | skipped {optimizer.skipped_steps}"
                logger.scalars(it, loss=train_loss, lr=lr, tokens_per_s=tps, **extra)
                logger.print(f"iteration {it:6d}/{train_iters} | loss {train_loss:.4f} | lr {lr:.3e} | "
                             f"{tps:,.0f} tokens/s" + text)
            logger.step({"loss": f"{train_loss:.3f}"})
            if valid_ds is not None and args.eval_interval and it % args.eval_interval == 0 and it < train_iters:
                vl = evaluate(model, valid_ds, args, groups, device)
                logger.scalars(it, valid_loss=vl)
                logger.print(f"iteration {it:6d} | held-out loss {vl:.4f}")
            if args.save and args.save_interval and it % args.save_interval == 0 and it < train_iters:
                save(it)
            if args.exit_interval and it % args.exit_interval == 0 and it < train_iters:
                logger.print(f"--exit-interval {args.exit_interval}: exiting at iteration {it}")
                if args.save and not (args.save_interval and it % args.save_interval == 0):
                    save(it)
                results["exited_at"] = it
                return results
            if stop.agreed():
                logger.print(f"stop requested: saving at iteration {it} and exiting")
                if args.save:
                    save(it)
                results["exited_at"] = it
                return results
        if hasattr(optimizer, "finish_param_gather"):  # sharded masters: the last step's gather
            optimizer.finish_param_gather()
        if valid_ds is not None:
            results["valid_loss_after"] = evaluate(model, valid_ds, args, groups, device)
            logger.scalars(it, valid_loss=results["valid_loss_after"])
            logger.print(f"held-out loss at iteration {it}: {results['valid_loss_after']:.4f} "
                         f"(before: {results['valid_loss_before']:.4f})")
    finally:
        logger.close()

    if args.save:
        save(it)
    if args.export_hf:
        export_merged_hf(model, groups, base_dir, args.export_hf, args.peft, log)
    return results


def cli(argv=None) -> None:
    try:
        main(argv)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    cli()
