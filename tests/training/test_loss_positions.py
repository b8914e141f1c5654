"""Logits only where there is a loss (`models.output_positions`, the trainer's default): the same
token losses and gradients as the full-logits path through megatron-core's schedules, for full
fine-tuning with tied embeddings and for HD-PiSSA, at TP=1, TP=2 (with and without sequence
parallelism) and PP=2; a micro-batch without any loss token still runs."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed

TIED = dict(model_type="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
            num_query_groups=2, kv_channels=16, vocab_size=160, max_position_embeddings=128,
            rope_theta=10000.0, norm_epsilon=1e-5, tie_word_embeddings=True, init_method_std=0.1)


def _batches() -> list[dict]:
    """Two micro-batches of two rows, 24 positions: prompts (loss mask 0), responses, padding,
    and one packed row of two examples."""
    gen = torch.Generator().manual_seed(4)
    out = []
    for spans in ([(6, 18), (3, 24)], [(10, 24), (2, 9)]):
        tokens = torch.randint(0, 160, (2, 24), generator=gen)
        labels = torch.randint(0, 160, (2, 24), generator=gen)
        loss_mask = torch.zeros(2, 24)
        for row, (start, stop) in enumerate(spans):
            loss_mask[row, start:stop] = 1.0
        position_ids = torch.arange(24).repeat(2, 1)
        document_ids = torch.zeros(2, 24, dtype=torch.long)
        if len(out) == 1:  # second micro-batch, row 1: examples of 12 and 12 positions
            position_ids[1, 12:] -= 12
            document_ids[1, 12:] = 1
            loss_mask[1, 15:20] = 1.0
        out.append(dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
                        document_ids=document_ids))
    return out


def _through_the_schedule(sequence_parallel: bool):
    """{(method, supervised_logits): (reported per micro-batch (sum, count), gradients)}."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_hdpissa import HDPiSSAConfig, apply_hd_pissa
    from megatron_hdpissa.distributed.groups import ParallelGroups
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import build_gpt_model
    from megatron_hdpissa.training.step import configure_schedule, make_forward_step

    groups = ParallelGroups.from_megatron()
    batches = _batches()
    pp = dict(pipeline_model_parallel_size=groups.pp_size, pipeline_dtype=torch.float32) if groups.pp_size > 1 else {}
    out = {}
    for method in ("full", "hd-pissa"):
        for supervised in (True, False):
            torch.manual_seed(7)
            model = build_gpt_model(ModelConfig(**TIED), seed=7, pre_process=groups.is_first_stage,
                                    post_process=groups.is_last_stage, sequence_parallel=sequence_parallel, **pp)
            if method == "hd-pissa":
                apply_hd_pissa(model, HDPiSSAConfig(rank=4, alpha=4), groups, progress=False)
            else:
                for p in model.parameters():
                    p.requires_grad_(True)
            configure_schedule(model, groups, variable_seq_lengths=True)
            rows = []  # the hidden-state rows the output layer computes logits for, per micro-batch
            if groups.is_last_stage:
                model.output_layer.register_forward_hook(lambda m, args, y: rows.append(y[0].shape[0] * y[0].shape[1]))
            reported = get_forward_backward_func()(
                forward_step_func=make_forward_step(torch.device("cpu"), supervised_logits=supervised),
                data_iterator=iter(batches), model=model, num_microbatches=len(batches), seq_length=24,
                micro_batch_size=2, forward_only=False)
            out[method, supervised] = ([(float(r["sum"]), float(r["count"])) for r in reported],
                                       {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                                       rows)
    return out


@pytest.mark.parametrize("world, tp, pp, sp", [(1, 1, 1, False), (2, 2, 1, False), (2, 2, 1, True), (2, 1, 2, False)],
                         ids=["tp1", "tp2", "tp2-sequence-parallel", "pp2"])
def test_supervised_logits_equal_full_logits(world, tp, pp, sp):
    for rank, out in enumerate(run_distributed(_through_the_schedule, world, tp=tp, pp=pp, args=(sp,))):
        for method in ("full", "hd-pissa"):
            (rep_s, grads_s, rows_s), (rep_f, grads_f, rows_f) = out[method, True], out[method, False]
            assert len(rep_s) == len(rep_f) == (2 if pp == 1 or rank == pp - 1 else 0)
            # logits at the loss positions only (the output layer sees whole sequences under SP)
            assert rows_s == [int(count) for _, count in rep_s] and rows_f == [48] * len(rep_f)
            for (sum_s, count_s), (sum_f, count_f) in zip(rep_s, rep_f):
                assert count_s == count_f > 0 and sum_s == pytest.approx(sum_f, rel=1e-6)
            assert set(grads_s) == set(grads_f) and grads_s, (method, rank)
            if method == "full" and rank == 0:
                assert "embedding.word_embeddings.weight" in grads_s  # the tied weight
            for n in grads_f:
                diff, scale = (grads_s[n] - grads_f[n]).norm(), grads_f[n].norm()
                assert diff <= 1e-5 * scale and scale > 0, (method, rank, n, float(diff), float(scale))


def _no_loss_token():
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import build_gpt_model
    from megatron_hdpissa.training.step import run_micro_batch

    batch = _batches()[0]
    batch["loss_mask"].zero_()
    model = build_gpt_model(ModelConfig(**TIED), seed=7)
    for p in model.parameters():
        p.requires_grad_(True)
    per_token, mask = run_micro_batch(model, batch, torch.device("cpu"))
    (per_token * mask).sum().backward()
    return tuple(per_token.shape), mask.tolist(), max(float(p.grad.abs().max()) for p in model.parameters())


def test_micro_batch_without_loss_tokens_runs_one_position_of_weight_zero():
    shape, mask, largest_grad = run_distributed(_no_loss_token, 1)[0]
    assert shape == (1, 1) and mask == [[0.0]] and largest_grad == 0.0
