"""The learning-rate schedule: Megatron's linear warm-up, then constant, linear or cosine decay to --min-lr."""
from __future__ import annotations

import math

CONSTANT, LINEAR, COSINE = "constant", "linear", "cosine"
LR_DECAY_STYLES = (CONSTANT, LINEAR, COSINE)  # --lr-decay-style


def lr_at(it: int, args, train_iters: int) -> float:
    """Linear warm-up, then constant / linear / cosine decay to --min-lr (Megatron's shapes)."""
    warmup = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * train_iters)
    if warmup and it < warmup:
        return args.lr * (it + 1) / warmup
    if args.lr_decay_style == CONSTANT or train_iters <= warmup:
        return args.lr
    frac = min(1.0, (it - warmup) / max(1, train_iters - warmup))
    coeff = 1 - frac if args.lr_decay_style == LINEAR else 0.5 * (1 + math.cos(math.pi * frac))
    return args.min_lr + coeff * (args.lr - args.min_lr)
