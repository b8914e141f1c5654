"""bench_e2e's plain training loops, one rank each (started by torchrun): HF PEFT LoRA / PiSSA on
transformers under torch DDP, the published formulation and the frozen floor on our megatron-core
model. Every loop reads the trainer's flags (after `--`) and builds the trainer's own dataset and
micro-batches (`SFTBatchIterator`, same seed, shards and padding), so all methods see the same rows.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/e2e_loop.py \
        --method hf-lora --steps 3 --hf-dir DIR --out result.json -- <trainer flags>

Rank 0 writes {"method", "steps", "real_tokens": [per step, over all ranks], "losses": [...],
"step_s": [seconds per step, from one step's end to the next], "peak_rss_mib": [per rank]}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOOP_METHODS = ("hf-lora", "hf-pissa", "published", "floor")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # = linear_qkv..fc2


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=LOOP_METHODS, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--hf-dir", required=True, help="the HF folder the trainer's base was converted from")
    p.add_argument("--out", required=True)
    p.add_argument("trainer_flags", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    args.trainer_flags = args.trainer_flags[1:] if args.trainer_flags[:1] == ["--"] else args.trainer_flags
    return args


def batches(targs, base: Path, rank: int, world: int):
    """The trainer's dataset and this rank's micro-batch iterator (HD-PiSSA K = world: one slice per rank)."""
    from megatron_hdpissa.convert.pretrained import resolve_pretrained
    from megatron_hdpissa.data.batches import SFTBatchIterator
    from megatron_hdpissa.training.arguments import effective_pad_multiple
    from megatron_hdpissa.training.validation import read_inputs

    _, train, _ = read_inputs(targs, resolve_pretrained(base))  # as the trainer reads them
    return SFTBatchIterator(train, targs.micro_batch_size, num_shards=world, shard_index=rank, seed=targs.seed,
                            pack=targs.pack, pad_to_max_length=targs.pad_to_max_length,
                            pad_multiple=effective_pad_multiple(targs))


# ---- HF PEFT on transformers under torch DDP -------------------------------------------------
def hf_setup(args, targs):
    """(DDP model, AdamW, trainable params): PEFT LoRA (or PiSSA init) on all seven projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)  # default: SDPA attention
    model.config.use_cache = False
    init = "pissa_niter_4" if args.method == "hf-pissa" else True
    rank = targs.lora_rank or targs.hd_pissa_rank
    alpha = targs.lora_alpha or targs.hd_pissa_alpha or rank
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=HF_TARGETS,
                                             init_lora_weights=init))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(params, lr=targs.lr, betas=(targs.adam_beta1, targs.adam_beta2), eps=targs.adam_eps,
                            weight_decay=targs.weight_decay)
    return ddp, opt, params


def hf_micro_batch(ddp, batch, n_micro):
    """Forward (full logits, as a user's loop computes them) and backward of one micro-batch: its
    mean token loss / n_micro. Packed rows: transformers builds the per-example causal mask from
    the restarting position ids (no attention mask given)."""
    import torch
    import torch.nn.functional as F

    labels = torch.where(batch["loss_mask"] > 0, batch["labels"], torch.full_like(batch["labels"], -100))
    logits = ddp(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
    (loss / n_micro).backward()
    return loss.detach()


# ---- our megatron-core model: published formulation, frozen floor ---------------------------
def megatron_setup(args, targs, base: Path, groups):
    """(model, published optimizer or None): the trainer's GPTModel (SDPA, TP = 1) from `base`."""
    import torch

    from benchmarks.common.model import make_floor
    from benchmarks.common.published import DistPublishedAdapter, DistPublishedOptimizer, published_targets
    from megatron_hdpissa.convert.load import load_gpt_model

    model, _ = load_gpt_model(base, torch.float32, attention_backend=targs.attention_backend, seed=targs.seed)
    model.train()
    if args.method == "floor":
        make_floor(model)
        return model, None
    rank = targs.hd_pissa_rank
    scale = (targs.hd_pissa_alpha or rank) / rank
    adapters = [DistPublishedAdapter(t, rank, scale, groups.dp_rank, groups.dp_size, "exact", targs.seed)
                for t in published_targets(model)]
    return model, DistPublishedOptimizer(adapters, targs.lr, groups.dp_group, groups.dp_size)


def megatron_micro_batch(model, batch, n_micro):
    """The trainer's own forward (`training.step.run_micro_batch`: document masks, logits at the
    supervised positions only) and backward of the mean token loss / n_micro."""
    from megatron_hdpissa.training.step import run_micro_batch

    per_token, mask = run_micro_batch(model, batch, "cpu")
    loss = (per_token.float() * mask).sum() / mask.sum()
    (loss / n_micro).backward()
    return loss.detach()


# ---- the loop --------------------------------------------------------------------------------
def main(argv=None) -> None:
    import torch
    import torch.distributed as dist

    from megatron_hdpissa.distributed.collectives import all_gather_object, all_reduce_
    from megatron_hdpissa.distributed.groups import initialize, shutdown
    from megatron_hdpissa.training.arguments import parse_args as trainer_args
    from megatron_hdpissa.training.monitoring import real_tokens

    args = parse_args(sys.argv[1:] if argv is None else argv)
    targs = trainer_args(args.trainer_flags)
    torch.manual_seed(targs.seed)
    groups = initialize(1, 1, backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = Path(targs.pretrained_checkpoint)
    n_micro = targs.global_batch_size // (targs.micro_batch_size * world)
    it = batches(targs, base, rank, world)
    hf = args.method.startswith("hf-")
    if hf:
        ddp, opt, params = hf_setup(args, targs)
    else:
        model, published = megatron_setup(args, targs, base, groups)
    tokens, losses, seconds, last = [], [], [], time.perf_counter()
    for _ in range(args.steps):
        step = torch.zeros(2, dtype=torch.float64)  # (sum of micro-batch mean losses, real tokens)
        for i in range(n_micro):
            batch = next(it)
            step[1] += real_tokens(batch)
            if hf:
                sync = i == n_micro - 1  # DDP all-reduces the adapter gradients once, after the last
                with ddp.no_sync() if not sync else contextlib.nullcontext():
                    step[0] += hf_micro_batch(ddp, batch, n_micro)
            else:
                step[0] += megatron_micro_batch(model, batch, n_micro)
        if hf:
            torch.nn.utils.clip_grad_norm_(params, targs.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
        elif published is not None:
            published.step()
        else:
            model.zero_grad(set_to_none=True)
        all_reduce_(step, groups.dp_group)  # the step's loss and tokens over DP, as the trainer logs them
        losses.append(float(step[0]) / (n_micro * world))
        tokens.append(float(step[1]))
        now = time.perf_counter()  # after the all-reduce: every rank has finished the step
        seconds.append(now - last)
        last = now
    gathered = all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, groups.dp_group)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"method": args.method, "steps": args.steps, "real_tokens": tokens, "losses": losses,
                       "step_s": seconds, "peak_rss_mib": [float(g) for g in gathered]}, f)
    shutdown()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
