"""SFT micro-batches: packing, sharding, seeded shuffles, resume, variable lengths (exact on a real GPTModel), balancing."""
import json

import pytest
import torch

from megatron_hdpissa.data.batches import SFTBatchIterator, pad_batch
from megatron_hdpissa.data.sft import SFTDataset
from tests.helpers.sft_data import example_index, segments, supervised_end


def test_packing_keeps_examples_apart(sp_tok, gsm8k_examples):
    dataset = SFTDataset(gsm8k_examples[:23], sp_tok, seq_length=512, template="{prompt}")
    index = example_index(dataset)
    iterator = SFTBatchIterator(dataset, micro_batch_size=1, pack=True, seed=3, drop_last=False, num_epochs=1)
    seen, rows = [], 0
    for batch in iterator:
        rows += 1
        segs = segments(batch)
        assert len(segs) >= 1
        for tokens, labels, loss_mask, positions in segs:
            ex = dataset.examples[index[tuple(tokens.tolist())]]
            assert labels.tolist() == ex.ids[1:]
            assert positions.tolist() == list(range(len(ex.ids) - 1))
            assert loss_mask.nonzero().flatten().tolist() == list(range(ex.num_prompt - 1, len(ex.ids) - 1))
            seen.append(index[tuple(tokens.tolist())])
    assert sorted(seen) == list(range(23))
    total = sum(len(e.ids) - 1 for e in dataset.examples)
    assert -(-total // 512) <= rows < 23  # packed rows, each at most seq_length positions


def test_shards_disjoint_and_cover_epoch(sp_tok, gsm8k_examples):
    dataset = SFTDataset(gsm8k_examples[:23], sp_tok, seq_length=256, template="{prompt}")
    index = example_index(dataset)

    def shard_examples(shard, **kw):
        it = SFTBatchIterator(dataset, micro_batch_size=2, num_shards=3, shard_index=shard, seed=11, num_epochs=1, **kw)
        batches = list(it)
        return len(batches), [index[tuple(s[0].tolist())] for b in batches for s in segments(b)]

    train = [shard_examples(k) for k in range(3)]
    assert [n for n, _ in train] == [3, 3, 3]  # 23 rows // (3 shards x 2) steps, the rest dropped
    flat = [i for _, ids in train for i in ids]
    assert len(flat) == len(set(flat)) == 18
    evaluation = [shard_examples(k, shuffle=False, drop_last=False) for k in range(3)]
    assert [n for n, _ in evaluation] == [4, 4, 4]  # the last step is filled with empty rows
    flat = sorted(i for _, ids in evaluation for i in ids)
    assert flat == list(range(23))


def test_epoch_shuffle_is_seeded_by_seed_plus_epoch(sp_tok, gsm8k_examples):
    dataset = SFTDataset(gsm8k_examples[:12], sp_tok, seq_length=256, template="{prompt}")

    def epoch_batches(seed, epoch):
        it = SFTBatchIterator(dataset, micro_batch_size=3, seed=seed)
        it.load_state_dict({"epoch": epoch, "consumed": 0})
        return [next(it)["tokens"] for _ in range(4)]

    a, b = epoch_batches(5, 1), epoch_batches(6, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = epoch_batches(5, 0)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("pack", [False, True])
def test_resume_reproduces_batches(sp_tok, gsm8k_examples, pack):
    dataset = SFTDataset(gsm8k_examples[:30], sp_tok, seq_length=384, template="{prompt}")

    def make(num_shards=2, shard_index=1, micro_batch_size=2):
        return SFTBatchIterator(dataset, micro_batch_size, num_shards, shard_index, seed=7, pack=pack)

    original = make()
    per_epoch = original.batches_in_epoch(0)
    for _ in range(per_epoch + 1):  # into the second epoch
        next(original)
    state = original.state_dict()
    expected = [next(original) for _ in range(per_epoch)]  # across the next epoch boundary too
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    # Another shard count continues at the same global position: 1 shard x 4 rows = 2 shards x 2 rows.
    single, shard0, shard1 = make(1, 0, 4), make(2, 0), make(2, 1)
    for it in (single, shard0, shard1):
        it.load_state_dict(state)
    for _ in range(3):
        got = next(single)
        both = [pad_batch(next(shard), got["tokens"].shape[1], sp_tok.pad_id) for shard in (shard0, shard1)]
        assert all(torch.equal(got[k], torch.cat([both[0][k], both[1][k]])) for k in got)
    with pytest.raises(ValueError, match="seed=7 cannot resume with seed=8"):
        SFTBatchIterator(dataset, 2, seed=8, pack=pack).load_state_dict(state)


@pytest.mark.parametrize("pack", [False, True])
def test_variable_length_is_the_padded_batch_cut_after_its_longest_row(sp_tok, gsm8k_examples, pack):
    seq_length = 260  # not a multiple of 8, and shorter than some examples: the cap is reached
    dataset = SFTDataset(gsm8k_examples[:40], sp_tok, seq_length=seq_length, template="{prompt}")
    assert dataset.num_truncated > 0
    kw = dict(micro_batch_size=3, num_shards=2, shard_index=1, seed=5, pack=pack, drop_last=False, num_epochs=1)
    for multiple in (8, 1, 64):
        lengths = []
        full = list(SFTBatchIterator(dataset, pad_to_max_length=True, **kw))
        short = list(SFTBatchIterator(dataset, pad_multiple=multiple, **kw))
        assert len(short) == len(full) > 3
        for got, want in zip(short, full):
            assert want["tokens"].shape == (3, seq_length)
            longest = int(supervised_end(want).max())
            expected = min(seq_length, max(1, -(-longest // multiple)) * multiple)
            assert got["tokens"].shape == (3, expected)
            for key in want:
                assert got[key].dtype == want[key].dtype
                assert torch.equal(got[key], want[key][:, :expected]), key
            assert (want["loss_mask"][:, expected:] == 0).all() and (want["tokens"][:, expected:] == 2).all()
            padded = pad_batch(got, seq_length, sp_tok.pad_id)
            assert all(torch.equal(padded[key], want[key]) for key in want)
            lengths.append(expected)
        assert seq_length in lengths
        if not pack:
            assert min(lengths) < seq_length - multiple
        if multiple == 1:
            assert any(n % 8 for n in lengths if n < seq_length)


def test_variable_length_empty_micro_batch_and_bad_multiple(sp_tok, gsm8k_examples):
    dataset = SFTDataset(gsm8k_examples[:7], sp_tok, seq_length=256, template="{prompt}")
    # 7 rows over 3 shards x 2: the second step has one row, so shards 1 and 2 get only filler.
    batches = [list(SFTBatchIterator(dataset, 2, num_shards=3, shard_index=k, shuffle=False, drop_last=False,
                                     num_epochs=1, pad_multiple=16)) for k in range(3)]
    assert [len(b) for b in batches] == [2, 2, 2]
    for k in (1, 2):
        last = batches[k][1]
        assert last["tokens"].shape == (2, 16) and last["loss_mask"].sum() == 0
        assert last["position_ids"].tolist() == [list(range(16))] * 2
    assert batches[0][1]["tokens"].shape[1] == -(-(len(dataset.examples[6].ids) - 1) // 16) * 16
    with pytest.raises(ValueError, match="--pad-multiple must be positive"):
        SFTBatchIterator(dataset, 2, pad_multiple=0)


# ---- masking is exact on a real megatron-core GPTModel ---------------------------------------
def _loss_and_grads(config_dict: dict, batch_sets: dict) -> dict:
    """Per batch set and per method ("full": every parameter trains; "hd-pissa": the factors),
    the trainer's loss (masked token-loss sum / token count per micro-batch, averaged over the
    micro-batches) and the gradients after its backward. Runs in a spawned single-rank process."""
    from megatron_hdpissa import HDPiSSAConfig, apply_hd_pissa
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import build_gpt_model

    config = ModelConfig.from_dict(config_dict)
    out = {}
    for method in ("full", "hd-pissa"):
        for name, batches in batch_sets.items():
            torch.manual_seed(7)
            model = build_gpt_model(config, seed=7)
            if method == "hd-pissa":
                apply_hd_pissa(model, HDPiSSAConfig(rank=4, alpha=4), progress=False)
            else:
                for p in model.parameters():
                    p.requires_grad_(True)
            loss = 0.0
            for batch in batches:
                per_token = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                                  attention_mask=None, labels=batch["labels"])
                mask = batch["loss_mask"]
                loss = loss + (per_token.float() * mask).sum() / mask.sum().clamp(min=1) / len(batches)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            out[method, name] = (float(loss.detach()), grads)
    return out


def test_variable_length_loss_and_gradients_equal_padded_on_gptmodel(sp_tok, gsm8k_examples):
    from megatron_hdpissa.models.config import ModelConfig
    from tests.helpers.distributed import run_distributed

    seq_length = 384
    dataset = SFTDataset(gsm8k_examples[:12], sp_tok, seq_length=seq_length, template="{prompt}")
    kw = dict(micro_batch_size=3, seed=3, num_epochs=1)
    it = SFTBatchIterator(dataset, pad_multiple=8, **kw)
    variable = [next(it), next(it)]
    it = SFTBatchIterator(dataset, pad_to_max_length=True, **kw)
    padded = [next(it), next(it)]
    assert all(v["tokens"].shape[1] < seq_length - 64 for v in variable), [v["tokens"].shape for v in variable]
    # Arbitrary ids in the padding of the full-length batches: they must not reach any real position.
    generator = torch.Generator().manual_seed(0)
    for v, p in zip(variable, padded):
        n = v["tokens"].shape[1]
        for key in ("tokens", "labels"):
            p[key][:, n:] = torch.randint(3, 32000, p[key][:, n:].shape, generator=generator)
    config = ModelConfig(  # LLaMA-shaped (GQA, untied embeddings), the SentencePiece vocabulary
        model_type="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
        num_query_groups=4, kv_channels=8, vocab_size=32000, max_position_embeddings=512,
        rope_theta=50000.0, norm_epsilon=1e-5, tie_word_embeddings=False, init_method_std=0.1,
    )
    (out,) = run_distributed(_loss_and_grads, 1, args=(config.to_dict(), {"variable": variable, "padded": padded}))
    for method in ("full", "hd-pissa"):
        loss_v, grads_v = out[method, "variable"]
        loss_p, grads_p = out[method, "padded"]
        assert loss_v == pytest.approx(loss_p, rel=1e-6) and loss_v > 1.0
        assert set(grads_v) == set(grads_p) and len(grads_v) > 4
        for name, g in grads_p.items():
            scale = float(g.abs().max())
            assert scale > 0, name
            torch.testing.assert_close(grads_v[name], g, rtol=0, atol=1e-5 * scale, msg=name)


def test_balance_window_deals_each_window_evenly_and_resumes(sp_tok, gsm8k_examples):
    dataset = SFTDataset(gsm8k_examples[:45], sp_tok, seq_length=384, template="{prompt}")
    index = example_index(dataset)
    window, shards, mbs = 4, 2, 2
    kw = dict(micro_batch_size=mbs, num_shards=shards, seed=9, num_epochs=1)

    def shard_batches(**extra):
        return [list(SFTBatchIterator(dataset, shard_index=k, **kw, **extra)) for k in range(shards)]

    plain, balanced = shard_batches(), shard_batches(balance_window=window)
    steps = len(plain[0])
    assert steps == 45 // (shards * mbs) == 11 and [len(b) for b in balanced] == [steps] * shards
    ends = [[supervised_end(b).tolist() for b in batches] for batches in balanced]
    for first in range(0, steps, window):
        last = min(first + window, steps)  # the last window is shorter (11 = 4 + 4 + 3)

        def examples(batches):
            return sorted(index[tuple(s[0].tolist())] for b in batches[first:last] for s in segments(b))

        # The same examples in the window, only dealt out differently, and each one once.
        assert examples(plain[0]) + examples(plain[1]) != []
        assert sorted(examples(plain[0]) + examples(plain[1])) == sorted(examples(balanced[0]) + examples(balanced[1]))
        assert not set(examples(balanced[0])) & set(examples(balanced[1]))
        totals = [sum(sum(e) for e in ends[k][first:last]) for k in range(shards)]
        longest = max(max(e) for k in range(shards) for e in ends[k][first:last])
        assert abs(totals[0] - totals[1]) <= longest
        plain_totals = [sum(int(supervised_end(b).sum()) for b in plain[k][first:last]) for k in range(shards)]
        assert max(totals) <= max(plain_totals)
        # Longest first within a shard, so similar lengths share a micro-batch.
        for k in range(shards):
            flat = [n for e in ends[k][first:last] for n in e]
            assert flat == sorted(flat, reverse=True)
    # Resuming inside a window (and across the epoch end) yields the same batches.
    it = SFTBatchIterator(dataset, shard_index=1, **{**kw, "num_epochs": 2}, balance_window=window)
    for _ in range(steps - 2):  # inside the last (short) window of the first epoch
        next(it)
    state = it.state_dict()
    assert state["consumed"] // (shards * mbs) % window == 1
    want = [next(it) for _ in range(steps)]
    resumed = SFTBatchIterator(dataset, shard_index=1, **{**kw, "num_epochs": 2}, balance_window=window)
    resumed.load_state_dict(state)
    for w in want:
        got = next(resumed)
        assert all(torch.equal(got[k], w[k]) for k in w)
    # One window per epoch: the second epoch deals its own (reshuffled) rows.
    it = SFTBatchIterator(dataset, shard_index=0, **{**kw, "num_epochs": 2}, balance_window=steps)
    epochs = [[next(it)["tokens"] for _ in range(steps)] for _ in range(2)]
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(*epochs))
    with pytest.raises(ValueError, match="balance_window must be positive"):
        SFTBatchIterator(dataset, 2, balance_window=0)
