"""Exact packing: per-document causal masks from `document_ids`, passed by the trainer only where a
row holds several examples, make `--pack` give the unpacked run's loss and gradients on a real
megatron-core GPTModel (both attention backends)."""
from __future__ import annotations

import pytest
import torch

from megatron_hdpissa.data.batches import SFTBatchIterator, attention_mask, document_causal_mask
from megatron_hdpissa.data.sft import SFTDataset
from tests.helpers.distributed import run_distributed


def test_document_causal_mask_is_causal_within_each_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1]])
    mask = document_causal_mask(ids)
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(8):
            for j in range(8):
                attended = j <= i and ids[b, i] == ids[b, j]
                assert bool(mask[b, 0, i, j]) == (not attended), (b, i, j)


def test_attention_mask_only_for_rows_holding_several_examples(sp_tok, gsm8k_examples):
    dataset = SFTDataset(gsm8k_examples[:8], sp_tok, seq_length=384, template="{prompt}")
    kw = dict(micro_batch_size=2, shuffle=False, num_epochs=1, drop_last=False)
    unpacked = list(SFTBatchIterator(dataset, **kw))
    it = SFTBatchIterator(dataset, pack=True, **kw)
    packed, rows = list(it), it.rows(0)
    assert all(attention_mask(b) is None for b in unpacked)  # plain causal: the fused kernels' fast path
    several = [max(len(r) for r in rows[2 * i: 2 * i + 2]) > 1 for i in range(len(packed))]
    assert any(several)
    for batch, expect in zip(packed, several):
        mask = attention_mask(batch)
        assert (mask is not None) == expect
        if expect:
            assert torch.equal(mask, document_causal_mask(batch["document_ids"]))


def _packed_and_unpacked(config_dict: dict, batch_sets: dict) -> dict:
    """Per backend and batch set: the trainer's per-token losses summed over every micro-batch,
    divided by the number of loss tokens (the same examples either way), and the gradients of
    every parameter (full fine-tuning) and of HD-PiSSA's factors."""
    from megatron_hdpissa import HDPiSSAConfig, apply_hd_pissa
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import build_gpt_model
    from megatron_hdpissa.training.step import run_micro_batch

    config = ModelConfig.from_dict(config_dict)
    out = {}
    for backend in ("sdpa", "local"):
        for method in ("full", "hd-pissa"):
            for name, batches in batch_sets.items():
                torch.manual_seed(7)
                model = build_gpt_model(config, seed=7, attention_backend=backend)
                if method == "hd-pissa":
                    apply_hd_pissa(model, HDPiSSAConfig(rank=4, alpha=4), progress=False)
                else:
                    for p in model.parameters():
                        p.requires_grad_(True)
                total, count = 0.0, 0.0
                for batch in batches:
                    per_token, mask = run_micro_batch(model, batch, torch.device("cpu"))
                    total = total + (per_token.float() * mask).sum()
                    count += float(mask.sum())
                loss = total / count
                loss.backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
                out[backend, method, name] = (float(loss.detach()), grads)
    return out


def test_pack_gives_the_unpacked_loss_and_gradients_on_gptmodel(sp_tok, gsm8k_examples):
    from megatron_hdpissa.models.config import ModelConfig

    dataset = SFTDataset(gsm8k_examples[:10], sp_tok, seq_length=512, template="{prompt}")
    kw = dict(micro_batch_size=2, shuffle=False, num_epochs=1, drop_last=False)
    unpacked = list(SFTBatchIterator(dataset, **kw))
    packed = list(SFTBatchIterator(dataset, pack=True, **kw))
    per_row = [int((b["position_ids"][r] == 0).sum()) for b in packed for r in range(2)]
    assert max(per_row) >= 3 and len(packed) < len(unpacked), per_row  # rows really hold several examples
    assert sum(float(b["loss_mask"].sum()) for b in packed) == sum(float(b["loss_mask"].sum()) for b in unpacked)
    config = ModelConfig(  # LLaMA-shaped (GQA, untied embeddings), the SentencePiece vocabulary
        model_type="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
        num_query_groups=4, kv_channels=8, vocab_size=32000, max_position_embeddings=512,
        rope_theta=10000.0, norm_epsilon=1e-5, tie_word_embeddings=False, init_method_std=0.1,
    )
    (out,) = run_distributed(_packed_and_unpacked, 1, args=(config.to_dict(), {"unpacked": unpacked, "packed": packed}))
    for backend in ("sdpa", "local"):
        for method in ("full", "hd-pissa"):
            loss_u, grads_u = out[backend, method, "unpacked"]
            loss_p, grads_p = out[backend, method, "packed"]
            assert loss_p == pytest.approx(loss_u, rel=1e-6) and loss_u > 1.0
            assert set(grads_u) == set(grads_p) and len(grads_u) > 4
            for n in grads_u:
                diff, scale = (grads_p[n] - grads_u[n]).norm(), grads_u[n].norm()
                assert diff <= 1e-5 * scale, (backend, method, n, float(diff / scale))
