"""What the trainer does about non-finite numbers: the finite-flag checks, the per-step decision
(stop or skip, per `--nonfinite-loss`, and `--max-skipped-steps`), and the check that no
checkpoint is written with a non-finite weight.

The optimizers never write a non-finite update (`optimizer.finite_guard`); this module turns
their skips and the loss check into one line a person can act on."""
from __future__ import annotations

import math
from typing import Callable

import torch

NONFINITE_STOP, NONFINITE_SKIP = "stop", "skip"  # --nonfinite-loss
DEFAULT_MAX_SKIPPED_STEPS = 10
# flag -> (attribute, smallest allowed value, whether that value itself is allowed); all must be finite
FINITE_FLAGS = {
    "--lr": ("lr", 0.0, True), "--min-lr": ("min_lr", 0.0, True), "--clip-grad": ("clip_grad", 0.0, True),
    "--weight-decay": ("weight_decay", 0.0, True), "--adam-eps": ("adam_eps", 0.0, True),
}


def numeric_flag_errors(args) -> list[str]:
    """Messages for the optimisation flags that are not finite numbers in range (`--lr nan` is not
    below 0, so a plain `lr < 0` check lets it through)."""
    errors = []
    for flag, (attr, low, inclusive) in FINITE_FLAGS.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            errors.append(f"{flag} must be a finite number >= {low:g}, got {value}")
    for flag, attr in (("--adam-beta1", "adam_beta1"), ("--adam-beta2", "adam_beta2")):
        value = getattr(args, attr, None)
        if value is not None and not (math.isfinite(value) and 0.0 <= value < 1.0):
            errors.append(f"{flag} must be in [0, 1), got {value}")
    if getattr(args, "max_skipped_steps", 0) < 0:
        errors.append(f"--max-skipped-steps must be >= 0 (0: no limit), got {args.max_skipped_steps}")
    return errors


class StepGuard:
    """Per optimizer step: whether to take it, and what a non-finite loss, gradient norm or update
    means under `--nonfinite-loss` (stop: raise FloatingPointError, one `error:` line; skip: log
    one line and go on, until `--max-skipped-steps` consecutive skips). fp16 loss-scale
    overflows are the scaler's business and neither count nor reset the run of skips."""

    def __init__(self, mode: str, max_skipped: int, log: Callable[[str], None], loss_scaling: bool = False):
        self.mode, self.max_skipped, self.log, self.loss_scaling = mode, max_skipped, log, loss_scaling
        self.consecutive = 0

    def loss_ok(self, iteration: int, finite: bool) -> bool:
        """Whether to step after a loss that is `finite` on every rank (the same on every rank)."""
        if finite:
            return True
        self._nonfinite(iteration, "non-finite loss", "no step was taken")
        return False

    def after_step(self, iteration: int, optimizer) -> None:
        """After `optimizer.step()`: its skip (if any) stops the run or is logged and counted."""
        reason = getattr(optimizer, "last_skip_reason", None) if optimizer.last_step_skipped else None
        if reason is None:
            self.consecutive = 0
        elif reason == "update":
            self._nonfinite(iteration, "non-finite update", "the step was skipped on every rank")
        elif not self.loss_scaling:
            self._nonfinite(iteration, f"non-finite gradient norm ({optimizer.last_grad_norm})",
                            "the step was skipped on every rank")

    def _nonfinite(self, iteration: int, what: str, done: str) -> None:
        untouched = "W and the optimizer state were not touched"
        if self.mode == NONFINITE_STOP:
            raise FloatingPointError(f"{what} at iteration {iteration} on some rank (--nonfinite-loss stop): "
                                     f"{done}, {untouched}; no checkpoint holds a non-finite weight")
        self.consecutive += 1
        self.log(f"iteration {iteration}: {what} on some rank; {done}, {untouched} "
                 f"(--nonfinite-loss skip, {self.consecutive} in a row)")
        if self.max_skipped and self.consecutive >= self.max_skipped:
            raise FloatingPointError(
                f"{self.consecutive} consecutive steps skipped (iterations {iteration - self.consecutive + 1}-"
                f"{iteration}; --max-skipped-steps {self.max_skipped}): the run is not training; W was not "
                f"touched by them; lower --lr or check the data")


def check_finite_weights(tensors: dict, groups, iteration: int) -> None:
    """Refuse a checkpoint with a non-finite value anywhere: `tensors` maps a name to each tensor
    this rank would save (weights, factors, masters); one count all-reduced over the grid, so
    every rank refuses together. The error names this rank's first bad tensor."""
    from megatron_hdpissa.distributed.collectives import collective_device, sum_over_grid

    bad, first = 0, None
    for name, t in tensors.items():
        n = int(t.numel() - torch.isfinite(t.detach()).sum()) if t.is_floating_point() else 0
        if n and first is None:
            first = f"{name} ({n} of {t.numel()})"
        bad += n
    total = int(sum_over_grid(torch.tensor([float(bad)], dtype=torch.float64, device=collective_device()), groups)[0])
    if total:
        where = f"; first on this rank: {first}" if first else ""
        raise FloatingPointError(f"refusing to save iteration {iteration}: {total} non-finite values in the "
                                 f"weights{where}; the previous checkpoint is kept")
