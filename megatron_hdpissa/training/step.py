"""One optimizer step's forward/backward and one evaluation, both through megatron-core's pipeline
schedules (`get_forward_backward_func`), for every --peft method and pipeline stage."""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from megatron_hdpissa.distributed.collectives import all_reduce_, broadcast_
from megatron_hdpissa.data.batches import attention_mask
from megatron_hdpissa.models.moe_router import check_router_reduction
from megatron_hdpissa.models.output_positions import at_positions, logits_at, supervised_positions
from megatron_hdpissa.peft.hd_pissa.model import active_slice
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.training.monitoring import real_tokens


# ---- the loss -----------------------------------------------------------------------------------
def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, num_real: int = 0):
    """megatron-core's 3-tuple: (sum of masked token losses, token count, what to report). The
    schedule divides the first by the count and by the number of micro-batches, so each
    micro-batch contributes its mean token loss / num_microbatches to the step's gradient.
    `num_real`: the micro-batch's real (non-pad) tokens, reported for the throughput."""
    loss_sum = (output_tensor.float() * loss_mask).sum()
    count = loss_mask.sum()
    # the schedule divides loss_sum in place: report copies
    reported = {"mean": loss_sum.detach() / count.clamp(min=1),
                "sum": loss_sum.detach().double().clone(), "count": count.detach().double(),
                "real_tokens": float(num_real)}
    return loss_sum, count.int(), reported


def run_micro_batch(model, batch: dict, device, supervised_logits: bool = True):
    """(per-token losses, their loss mask) of one micro-batch through the model. Packed rows get
    their per-document causal mask (`data.batches.attention_mask`). With `supervised_logits` the
    output layer and the cross-entropy run on the positions with a loss only
    (`models.output_positions`): both `(1, n)`; else on every position: `(b, s)`. The same sums."""
    mask = attention_mask(batch, device)
    inputs = dict(input_ids=batch["tokens"].to(device), position_ids=batch["position_ids"].to(device),
                  attention_mask=mask)
    if not supervised_logits:
        return model(labels=batch["labels"].to(device), **inputs), batch["loss_mask"].to(device)
    positions = supervised_positions(batch["loss_mask"])
    with logits_at(model, positions):
        out = model(labels=at_positions(batch["labels"], positions).to(device), **inputs)
    return out, at_positions(batch["loss_mask"], positions).to(device)


def micro_batch_loss(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of masked token losses, number of loss tokens) of one micro-batch (PP = 1)."""
    per_token, mask = run_micro_batch(model, batch, device)
    return (per_token.float() * mask).sum(), mask.sum()


def make_forward_step(device, supervised_logits: bool = True):
    """`forward_step_func(data_iterator, model)`: every stage reads the micro-batch (so all stages'
    iterators stay in step); the first stage uses the tokens, the last the labels and mask.
    `supervised_logits=False` computes the logits at every position (for comparison)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out, loss_mask = run_micro_batch(model, batch, device, supervised_logits)
        return out, functools.partial(loss_func, loss_mask, num_real=real_tokens(batch))

    return forward_step


# ---- wiring the model config the way Megatron-LM's training.py does -----------------------------
def finalize_builtin_grads(model_chunks, num_tokens=None, pg_collection=None, force_all_reduce=False, *,
                           groups: ParallelGroups):
    """`finalize_model_grads_func` without megatron DDP (the optimizer averages over DP itself):
    sequence-parallel norms' gradients summed over TP, the tied embedding's over the first and
    last pipeline stage, as megatron-core's `finalize_model_grads` does for DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_attr_wrapped_model, get_model_config

    model = model_chunks[0]
    config = get_model_config(model)
    if config.sequence_parallel and groups.tp_size > 1:
        params = [p for p in model.parameters()
                  if p.requires_grad and p.grad is not None and getattr(p, "sequence_parallel", False)]
        if params:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            all_reduce_(flat, groups.tp_group)
            off = 0
            for p in params:
                p.grad.copy_(flat[off:off + p.grad.numel()].view_as(p.grad))
                off += p.grad.numel()
    module = get_attr_wrapped_model(model, "pre_process", return_model_obj=True)
    if groups.pp_size > 1 and getattr(module, "share_embeddings_and_output_weights", False):
        group = ps.get_embedding_group(check_initialized=False)
        if group is not None and dist.get_rank() in dist.get_process_group_ranks(group):
            weight = module.shared_embedding_or_output_weight()
            if weight is not None and weight.requires_grad:
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
                all_reduce_(weight.grad, group)


def configure_schedule(train_model, groups: ParallelGroups, ddp=None, *, grad_scale_func=None,
                       variable_seq_lengths=False):
    """Set the TransformerConfig fields the schedules read: the loss scale (`grad_scale_func`,
    e.g. the optimizer's `scale_loss`), DDP's `no_sync` and `finalize_model_grads` (megatron DDP),
    or our own finalize (built-in DP reduction)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(train_model)
    check_router_reduction(train_model, config.sequence_parallel, groups.tp_size)  # a trainable router's TP sum
    config.grad_scale_func = grad_scale_func
    if ddp is not None:
        config.no_sync_func = ddp.no_sync
        config.finalize_model_grads_func = finalize_model_grads
    else:
        config.no_sync_func = None
        config.finalize_model_grads_func = functools.partial(finalize_builtin_grads, groups=groups)
    config.variable_seq_lengths = bool(variable_seq_lengths or groups.pp_size > 1)
    return config


def _from_last_stage(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    if groups.pp_size > 1:
        broadcast_(t, dist.get_global_rank(groups.pp_group, groups.pp_size - 1), groups.pp_group)
    return t


# ---- one step, one evaluation ------------------------------------------------------------------
def forward_backward(train_model, adapted_model, iterators, micro_per_slice: int, seq_length: int,
                     micro_batch_size: int, groups: ParallelGroups, device, slices: int = 1,
                     ddp=None) -> torch.Tensor:
    """Every local slice's micro-batches through the schedule with that slice active (virtual
    ranks); gradients accumulate over slices and DP is synchronised once, after the last.
    Returns (sum of micro-batch mean losses, micro-batch count, real tokens) of this DP rank, on
    every stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    schedule = get_forward_backward_func()
    config = get_model_config(train_model)
    finalize, no_sync = config.finalize_model_grads_func, config.no_sync_func
    step_loss = torch.zeros(3, dtype=torch.float64, device=device)  # summed on the device: no sync per micro-batch
    forward_step = make_forward_step(device)
    try:
        for v in range(slices):
            last = v == slices - 1
            # earlier slices: no DP sync at all (not even at their last micro-batch)
            config.finalize_model_grads_func = finalize if last else None
            config.no_sync_func = no_sync if last else None
            hold = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
            ctx = active_slice(adapted_model, v) if slices > 1 else contextlib.nullcontext()
            with ctx, hold:
                outs = schedule(forward_step_func=forward_step, data_iterator=iterators[v], model=train_model,
                                num_microbatches=micro_per_slice, seq_length=seq_length,
                                micro_batch_size=micro_batch_size, forward_only=False)
            for out in outs:
                step_loss[0] += out["mean"].detach().double()
                step_loss[1] += 1
                step_loss[2] += out["real_tokens"]
    finally:
        config.finalize_model_grads_func, config.no_sync_func = finalize, no_sync
    return _from_last_stage(step_loss, groups)


@torch.no_grad()
def evaluate_batches(train_model, batches: list, seq_length: int, micro_batch_size: int,
                     groups: ParallelGroups, device) -> float:
    """Mean token loss over `batches` (this DP rank's shard) summed over DP, forward only."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    was_training = train_model.training
    train_model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    if batches:
        outs = get_forward_backward_func()(
            forward_step_func=make_forward_step(device), data_iterator=iter(batches), model=train_model,
            num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=True)
        for out in outs:
            total += torch.stack([out["sum"].cpu(), out["count"].cpu()])
    _from_last_stage(total, groups)
    if groups.dp_size > 1:
        all_reduce_(total, groups.dp_group)
    train_model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))
