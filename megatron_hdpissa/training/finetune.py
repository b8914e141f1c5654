"""Megatron-style supervised fine-tuning with HD-PiSSA (or LoRA / PiSSA / full baselines).

A recipe that reads top to bottom: `setup` (process groups, base model, adapters, optimizer,
data), `train_step` (every local slice's micro-batches through megatron-core's pipeline schedule,
then the aggregating optimizer step), `evaluate`, `save`, and `main` calling them.

    torchrun --nproc-per-node 2 -m megatron_hdpissa.finetune \
        --pretrained-checkpoint ckpt/smollm2-tp1 --data-path train.jsonl \
        --valid-data-path heldout.jsonl --hd-pissa-rank 16 --micro-batch-size 2 \
        --global-batch-size 16 --seq-length 512 --lr 2e-5 --train-iters 100 --save out
"""
from __future__ import annotations

import itertools
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_hdpissa.checkpoint import trainer_dist, trainer_legacy
from megatron_hdpissa.checkpoint.dist import TORCH, TORCH_DIST
from megatron_hdpissa.checkpoint.trainer_state import TrainerState, is_training_checkpoint, read_meta
from megatron_hdpissa.convert.export import export_merged_hf
from megatron_hdpissa.training.adapter_export import export_trained_adapter
from megatron_hdpissa.distributed.collectives import MIN, all_reduce_
from megatron_hdpissa.distributed.groups import initialize, shutdown
from megatron_hdpissa.models.moe import expert_parallel_sizes, moe_flag_overrides
from megatron_hdpissa.training.arguments import effective_pad_multiple, flag_errors, grad_scaler, parse_args, peft_config
from megatron_hdpissa.training.guards import StepGuard, check_finite_weights
from megatron_hdpissa.training.quiet import hidden_notices_line, quiet_megatron_notices
from megatron_hdpissa.training.validation import check_outputs, read_inputs
from megatron_hdpissa.peft.common import HD_PISSA
from megatron_hdpissa.peft.lowrank.config import LOWRANK_METHODS
from megatron_hdpissa.training.lr_schedule import lr_at
from megatron_hdpissa.training.monitoring import Logger, StopSignal, Throughput
from megatron_hdpissa.training.step import configure_schedule, evaluate_batches, forward_backward

CHECKPOINT_FORMATS = {TORCH: trainer_legacy, TORCH_DIST: trainer_dist}  # --ckpt-format -> its module


class FinetuneRecipe:
    """One fine-tuning run. `setup()`, then `train()` (calls `train_step`, `evaluate`, `save`)."""

    def __init__(self, args):
        self.args = args
        self.results: dict = {}

    def log(self, msg: str) -> None:
        if self.rank0:
            print(msg, flush=True)

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        args = self.args
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        self.check_layout()
        check_outputs(args)
        self.groups = g = initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                     **expert_parallel_sizes(args))
        if (g.tp_size, g.pp_size) != (args.tensor_model_parallel_size, args.pipeline_model_parallel_size):
            raise ValueError(f"megatron-core is initialised with TP={g.tp_size}, PP={g.pp_size}, but the flags "
                             f"ask for --tensor-model-parallel-size {args.tensor_model_parallel_size} "
                             f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}")
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.rank0 = dist.get_rank() == 0
        if not self.rank0:  # data warnings (truncation counts) once, from rank 0
            logging.getLogger("megatron_hdpissa").setLevel(logging.ERROR)
        self.tokenizer, self.train_ds, self.valid_ds = read_inputs(args, self.base)  # before the model
        self.setup_model()
        self.setup_adapters()
        if hidden_notices_line():  # megatron-core's import-time notices, once (training/quiet.py)
            self.log(hidden_notices_line())
        self.setup_data()
        self.resume()
        self.guard = StepGuard(args.nonfinite_loss, args.max_skipped_steps, self.log,  # --nonfinite-loss
                               loss_scaling=args.peft == HD_PISSA and args.fp16)

    def check_layout(self) -> None:
        """Before any process group: the base checkpoint exists and the pipeline splits its layers."""
        from megatron_hdpissa.convert.pretrained import resolve_pretrained

        args = self.args
        self.resuming = bool(args.load) and is_training_checkpoint(args.load)
        self.base_dir = Path(args.load if (self.resuming or not args.pretrained_checkpoint) else args.pretrained_checkpoint)
        if not self.base_dir.is_dir():
            raise FileNotFoundError(f"--pretrained-checkpoint/--load {self.base_dir} does not exist")
        self.base = resolve_pretrained(self.base_dir)  # ours, Megatron-LM / -Bridge, or an HF folder
        layers, pp = self.base.model_config.num_layers, args.pipeline_model_parallel_size
        if layers % pp:
            raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide the {layers} layers of this "
                             f"model (valid: {[p for p in range(1, layers + 1) if layers % p == 0]})")

    def setup_model(self) -> None:
        from megatron_hdpissa.models.gpt import build_gpt_model, check_attention_backend, parallelism_overrides

        args, g = self.args, self.groups
        model_config = self.base.model_config
        check_attention_backend(args.attention_backend, model_config, document_masks=args.pack)
        overrides = parallelism_overrides(
            g.tp_size, args.seq_length, model_config.num_layers, pp_size=g.pp_size,
            sequence_parallel=args.sequence_parallel, recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers,
            recompute_modules=args.recompute_modules)
        overrides.update(moe_flag_overrides(model_config, g, args))  # --num-experts, --moe-*, expert layout
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        if g.pp_size > 1:
            overrides.update(pipeline_model_parallel_size=g.pp_size, pipeline_dtype=dtype)
        self.model = build_gpt_model(model_config, dtype=dtype, seed=args.seed, pre_process=g.is_first_stage,
                                     post_process=g.is_last_stage, attention_backend=args.attention_backend,
                                     **overrides)
        self.base.load_into(self.model)  # this rank's TP shard and stage
        self.model.to(self.device)
        self.log(f"loaded {'training checkpoint' if self.resuming else 'base'} {self.base_dir} (TP={g.tp_size}, "
                 f"PP={g.pp_size}, DP={g.dp_size}, {sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M "
                 f"parameters on this rank)")

    def setup_adapters(self) -> None:
        from megatron_hdpissa import apply_hd_pissa
        from megatron_hdpissa.optimizer.data_parallel import DataParallelAdamW
        from megatron_hdpissa.optimizer.expert_grads import tag_expert_params
        from megatron_hdpissa.peft.lowrank.model import apply_lowrank
        from megatron_hdpissa.optimizer.hd_pissa import HDPiSSAOptimizer

        args, g, model = self.args, self.groups, self.model
        self.cfg = cfg = peft_config(args)
        t0 = time.time()
        adam = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                    weight_decay=args.weight_decay)
        progress = self.rank0 and not args.no_progress
        self.train_model, self.ddp = model, None  # what the micro-batches run through
        if args.peft == HD_PISSA:
            with flag_errors(args.peft):
                apply_hd_pissa(model, cfg, g, progress=progress, decompose=not self.resuming)
            if args.hd_pissa_ddp == "megatron":
                from megatron_hdpissa.distributed.ddp import wrap_ddp

                self.train_model = self.ddp = wrap_ddp(model, overlap_grad_reduce=args.overlap_grad_reduce)
            others = args.hd_pissa_others_optimizer if args.hd_pissa_ddp == "megatron" else "builtin"
            with flag_errors(args.peft):
                self.optimizer = HDPiSSAOptimizer(self.train_model, groups=g, clip_grad=args.clip_grad,
                                                  grad_scaler=grad_scaler(args), others_optimizer=others, **adam)
        else:
            if args.peft in LOWRANK_METHODS:
                with flag_errors(args.peft):
                    apply_lowrank(model, cfg, g, progress=progress, decompose=not self.resuming)
            else:  # full fine-tuning; expert weights reduce over expert-DP (optimizer/expert_grads.py)
                for p in model.parameters():
                    p.requires_grad_(True)
                tag_expert_params(model)
            with flag_errors(args.peft):
                self.optimizer = DataParallelAdamW([p for p in model.parameters() if p.requires_grad], groups=g,
                                                   clip_grad=args.clip_grad, **adam)
        configure_schedule(self.train_model, g, self.ddp, variable_seq_lengths=not args.pad_to_max_length,
                           grad_scale_func=self.optimizer.scale_loss if args.peft == HD_PISSA else None)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.log(f"--peft {args.peft}: {trainable / 1e6:.3f}M trainable parameters per rank, set-up "
                 f"{time.time() - t0:.1f}s" + (f", K = {g.dp_size * cfg.virtual_ranks} slices of rank {cfg.rank}, "
                                              f"s = {cfg.scale:g}" if args.peft == HD_PISSA else ""))

    def setup_data(self) -> None:
        """Every slice (DP rank x virtual rank) reads its own shard of each epoch; every pipeline
        stage of a DP rank reads the same micro-batches."""
        from megatron_hdpissa.data.batches import SFTBatchIterator

        args, g = self.args, self.groups
        self.slices = self.cfg.virtual_ranks if args.peft == HD_PISSA else 1
        shards = g.dp_size * self.slices
        self.global_batch = args.global_batch_size or args.micro_batch_size * shards
        if self.global_batch % (args.micro_batch_size * shards):
            raise ValueError(f"--global-batch-size {self.global_batch} is not a multiple of --micro-batch-size "
                             f"{args.micro_batch_size} x {g.dp_size} data-parallel ranks x {self.slices} virtual ranks")
        self.micro_per_slice = self.global_batch // (args.micro_batch_size * shards)
        pad = dict(pack=args.pack, pad_to_max_length=args.pad_to_max_length, pad_multiple=effective_pad_multiple(args))
        train_ds, valid_ds = self.train_ds, self.valid_ds  # read before the model (validation.read_inputs)
        self.valid_batches = None
        if valid_ds is not None:
            it = SFTBatchIterator(valid_ds, args.micro_batch_size, num_shards=g.dp_size, shard_index=g.dp_rank,
                                  shuffle=False, drop_last=False, num_epochs=1, **pad)
            self.valid_batches = list(itertools.islice(it, args.eval_iters or None))
        self.iterators = [SFTBatchIterator(train_ds, args.micro_batch_size, num_shards=shards,
                                           shard_index=g.dp_rank * self.slices + v, seed=args.seed, **pad)
                          for v in range(self.slices)]
        self.train_iters = args.train_iters if args.train_iters is not None else max(
            1, int(args.epochs * self.iterators[0].batches_in_epoch(0) / self.micro_per_slice))
        self.log(f"data: {len(train_ds)} training examples ({train_ds.num_truncated} truncated), global batch "
                 f"{self.global_batch} = {self.micro_per_slice} micro-batches x {args.micro_batch_size} x {shards} "
                 f"slices; {self.train_iters} iterations")

    def resume(self) -> None:
        args, g, cfg = self.args, self.groups, self.cfg
        self.iteration, self.resumed_from = 0, None
        self.meta = {"peft": args.peft, "dp_size": g.dp_size, "tp_size": g.tp_size, "pp_size": g.pp_size,
                     "virtual_ranks": self.slices, "rank": cfg.rank, "config": cfg.to_dict(),
                     "args": {k: v for k, v in vars(args).items()}}
        if not self.resuming:
            return
        from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info

        fmt = read_checkpoint_info(args.load).ckpt_format  # torch_dist: any TP / PP, the same K
        CHECKPOINT_FORMATS[fmt].check_compatible(read_meta(args.load), self.meta, args.load)
        restored = CHECKPOINT_FORMATS[fmt].load(self.checkpoint_state(), args.load)
        self.iteration = restored.iteration
        self.resumed_from = Path(args.load) / f"iter_{self.iteration:07d}"  # never removed by --save-retain
        self.log(f"resumed at iteration {self.iteration} from {args.load} ({fmt}; {restored.note})")

    def checkpoint_state(self) -> TrainerState:
        """What a checkpoint saves and restores of this run."""
        return TrainerState(model=self.model, optimizer=self.optimizer, groups=self.groups, data=self.iterators,
                            iteration=self.iteration, meta=self.meta, seed=self.args.seed, base_dir=self.base)

    # ---- one step, evaluation, checkpoint ------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step: the schedule over every slice's micro-batches, then the step."""
        args, opt = self.args, self.optimizer
        self.lr = lr_at(self.iteration, args, self.train_iters)
        for group in opt.param_groups:
            group["lr"] = self.lr
        step_loss = forward_backward(
            self.train_model, self.model, self.iterators, self.micro_per_slice, args.seq_length,
            args.micro_batch_size, self.groups, self.device, self.slices, self.ddp)
        finite = all_reduce_(torch.tensor([1.0 if math.isfinite(step_loss[0].item()) else 0.0]), op=MIN)
        opt.last_grad_norm = None  # a step skipped for its loss logs no norm, never the previous step's
        if self.guard.loss_ok(self.iteration + 1, finite.item() != 0):
            opt.step()  # refuses a non-finite update on every rank (optimizer.finite_guard)
            self.guard.after_step(self.iteration + 1, opt)
        opt.zero_grad(set_to_none=True)
        self.iteration += 1
        all_reduce_(step_loss, self.groups.dp_group)  # losses and real tokens (throughput) over DP
        self.step_tokens = float(step_loss[2])
        return float(step_loss[0] / step_loss[1])

    def evaluate(self) -> float:
        """Mean token loss over the whole held-out set (each DP rank a shard, summed over DP)."""
        return evaluate_batches(self.train_model, self.valid_batches, self.args.seq_length,
                                self.args.micro_batch_size, self.groups, self.device)

    def save(self) -> None:
        if self.args.peft == HD_PISSA:
            self.optimizer.finish_param_gather()
        masters = {f"master {i}": m.data for i, m in enumerate(getattr(self.optimizer, "masters", []))}
        check_finite_weights({**dict(self.model.named_parameters()), **masters}, self.groups, self.iteration)
        path = CHECKPOINT_FORMATS[self.args.ckpt_format].save(self.checkpoint_state(), self.args.save)
        self.log(f"saved checkpoint {path} ({self.args.ckpt_format})")
        if self.args.save_retain and self.rank0:  # the tracker names `path`: older ones may go
            from megatron_hdpissa.checkpoint.atomic import prune_iterations

            removed = prune_iterations(self.args.save, self.args.save_retain, keep=self.resumed_from)
            if removed:
                self.log(f"--save-retain {self.args.save_retain}: removed {', '.join(removed)}")

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        """Steps until --train-iters, with logging, evaluation, interval checkpoints, and an
        early exit (--exit-interval, SIGTERM) that saves first."""
        args, r = self.args, self.results
        others = self.optimizer.others_optimizer if args.peft == HD_PISSA else None
        r.update(iterations=self.train_iters, start=self.iteration, others_optimizer=type(others).__name__)
        self.logger = Logger(args, self.train_iters, self.iteration)
        self.guard.log = self.logger.print  # the skip lines go where the step lines go
        try:
            if self.valid_batches is not None:
                r["valid_loss_before"] = self._evaluate_and_log("held-out loss at iteration")
            stop, self.throughput = StopSignal(), Throughput()
            self.model.train()
            while self.iteration < self.train_iters:
                r["train_loss"] = self.train_step()
                self._log_step(r["train_loss"])
                it, more = self.iteration, self.iteration < self.train_iters
                if self.valid_batches is not None and args.eval_interval and it % args.eval_interval == 0 and more:
                    self._evaluate_and_log("held-out loss at iteration")
                saved = bool(args.save and args.save_interval and it % args.save_interval == 0 and more)
                if saved:
                    self.save()
                exiting = args.exit_interval and it % args.exit_interval == 0 and more
                if exiting or stop.agreed():
                    self.logger.print(f"--exit-interval {args.exit_interval}: exiting at iteration {it}" if exiting
                                      else f"stop requested: saving at iteration {it} and exiting")
                    if args.save and not saved:
                        self.save()
                    r["exited_at"] = it
                    return r
            if args.peft == HD_PISSA:  # sharded masters: the last step's gather
                self.optimizer.finish_param_gather()
            if self.valid_batches is not None:
                r["valid_loss_after"] = self._evaluate_and_log("held-out loss at iteration")
        finally:
            self.logger.close()
        return r

    def _evaluate_and_log(self, what: str) -> float:
        loss = self.evaluate()
        self.logger.scalars(self.iteration, valid_loss=loss)
        self.logger.print(f"{what} {self.iteration}: {loss:.4f}")
        return loss

    def _log_step(self, loss: float) -> None:
        args, it = self.args, self.iteration
        self.throughput.add(self.step_tokens)
        if it % args.log_interval == 0 or it == self.train_iters:
            tokens, seconds = self.throughput.take()  # real (non-pad) tokens of every DP rank
            self.logger.log_step(it, self.train_iters, loss, self.lr, tokens / seconds, real_tokens=tokens,
                                 **self._optimizer_report())
        self.logger.step({"loss": f"{loss:.3f}"})

    def _optimizer_report(self) -> dict:
        """The log line's optimizer numbers: the gradient norm; under HD-PiSSA also the bytes this
        rank sent in the step's aggregation and the --fp16 loss scaler's state."""
        opt = self.optimizer
        report = {"grad_norm": opt.last_grad_norm}
        if self.args.peft == HD_PISSA:
            report["comm_bytes"] = int(sum(opt.last_step_bytes.values()))
            if opt.grad_scaler is not None:
                report.update(loss_scale=float(opt.grad_scaler.scale), skipped_steps=opt.skipped_steps)
        return report

def main(argv=None) -> dict:
    recipe = FinetuneRecipe(parse_args(argv))
    recipe.setup()
    results = recipe.train()
    if "exited_at" in results:
        return results
    if recipe.args.save:
        recipe.save()
    if recipe.args.export_hf_adapter:  # before export_merged_hf, which merges LoRA / PiSSA into W in place
        export_trained_adapter(recipe.args, recipe.rank0, lambda d: CHECKPOINT_FORMATS[recipe.args.ckpt_format].save(
            recipe.checkpoint_state(), d), recipe.log)
    if recipe.args.export_hf:
        export_merged_hf(recipe.model, recipe.groups, recipe.base, recipe.args.export_hf, recipe.args.peft,
                         recipe.log)
    return results


def cli(argv=None) -> None:
    quiet_megatron_notices()
    from megatron_hdpissa.training.errors import run_cli

    run_cli(main, argv, shutdown, parse=parse_args)


if __name__ == "__main__":
    cli()
