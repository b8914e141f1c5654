"""`SDPAttention` (--attention-backend sdpa) against a float64 reference of softmax attention, against
megatron-core's `DotProductAttention` (core attention, and whole GPTModels at TP=2 with and without
sequence parallelism), and against transformers' eager attention (logits and gradients); the fused
kernel is what runs (no s x s score matmul, no expanded grouped-query K / V)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed

TINY = dict(model_type="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
            num_query_groups=2, kv_channels=8, vocab_size=300, max_position_embeddings=256,
            rope_theta=10000.0, norm_epsilon=1e-5, tie_word_embeddings=False, init_method_std=0.1)


def _reference(q, k, v, keep, scale):
    """softmax(q k^T scale, masked) v in float64, K / V heads repeated per query group; q
    `[s, b, np, hn]`, k / v `[s, b, ng, hn]`, keep `[b or 1, 1, s, s]` True where attended."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1)


def _core_attention_cases():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_hdpissa.data.batches import document_causal_mask
    from megatron_hdpissa.models.attention import SDPAttention
    from megatron_hdpissa.models.compat import ensure_cpu_compat
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import transformer_config

    from megatron.core import tensor_parallel

    ensure_cpu_compat()
    tensor_parallel.model_parallel_cuda_manual_seed(1)  # megatron-core forks its stream even without dropout
    s, b, hn = 24, 2, 8
    causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    docs = torch.tensor([[0] * 10 + [1] * 9 + [2] * 5, [0] * 24])
    arbitrary = (torch.rand(2, 1, s, s, generator=torch.Generator().manual_seed(3)) < 0.7) | torch.eye(s, dtype=torch.bool)
    cases = {  # name: (heads, groups, TransformerConfig overrides, softmax_scale, mask given, keep)
        "causal-gqa": (8, 2, {}, None, None, causal),
        "causal-mha": (4, 4, {}, None, None, causal),
        "documents-gqa": (8, 2, {}, None, document_causal_mask(docs), ~document_causal_mask(docs)),
        "window": (8, 2, {"window_size": (3, 0)}, None, None,
                   causal & torch.ones(s, s, dtype=torch.bool).triu(-3)[None, None]),
        "layer-scaling-and-scale": (8, 2, {"apply_query_key_layer_scaling": True}, 0.2, None, causal),
        "arbitrary-mask": (8, 2, {}, None, ~(causal & arbitrary), causal & arbitrary),  # not per-document
        # megatron-core's local path lets the window replace a given mask: SDPAttention only
        "documents-and-window": (8, 2, {"window_size": (3, 0)}, None, document_causal_mask(docs),
                                 ~document_causal_mask(docs) & torch.ones(s, s, dtype=torch.bool).triu(-3)[None, None]),
    }
    out = {}
    for name, (heads, groups, over, softmax_scale, given, keep) in cases.items():
        config = transformer_config(ModelConfig(**{**TINY, "num_attention_heads": heads, "num_query_groups": groups,
                                                   "hidden_size": heads * hn}), 1, **over)
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randn(s, b, n, hn, generator=gen) for n in (heads, groups, groups)]
        weight = torch.randn(s, b, heads * hn, generator=gen)
        results = {}
        for cls in (DotProductAttention, SDPAttention):
            module = cls(config, layer_number=3, attn_mask_type=AttnMaskType.causal, attention_type="self",
                         softmax_scale=softmax_scale)
            q, k, v = (t.clone().requires_grad_(True) for t in inputs)
            y = module(q, k, v, given)
            (y * weight).sum().backward()
            results[cls.__name__] = (y.detach(), [t.grad for t in (q, k, v)])
        scale = softmax_scale or hn ** -0.5
        q, k, v = (t.double().requires_grad_(True) for t in inputs)
        y = _reference(q, k, v, keep, scale)
        (y * weight.double()).sum().backward()
        results["reference"] = (y.detach(), [t.grad for t in (q, k, v)])
        out[name] = results
    return out


def test_core_attention_equals_reference_and_megatron_core():
    (out,) = run_distributed(_core_attention_cases, 1)
    for name, results in out.items():
        ref_y, ref_grads = results["reference"]
        for which in ("SDPAttention",) if name == "documents-and-window" else ("SDPAttention", "DotProductAttention"):
            y, grads = results[which]
            assert (y.double() - ref_y).abs().max() <= 1e-5 * ref_y.abs().max(), (name, which)
            for g, rg in zip(grads, ref_grads):
                assert (g.double() - rg).norm() <= 1e-5 * rg.norm(), (name, which, float((g.double() - rg).norm()))


def _dropout_follows_config():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_hdpissa.models.attention import SDPAttention
    from megatron_hdpissa.models.compat import ensure_cpu_compat
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import transformer_config
    from megatron.core import tensor_parallel

    ensure_cpu_compat()
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    module = SDPAttention(transformer_config(ModelConfig(**TINY), 1, attention_dropout=0.5), layer_number=1,
                          attn_mask_type=AttnMaskType.causal, attention_type="self")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, 1, n, 8, generator=gen) for n in (8, 2, 2))
    module.eval()
    plain = module(q, k, v, None)
    module.train()
    before = torch.get_rng_state()
    dropped = module(q, k, v, None)
    default_untouched = torch.equal(before, torch.get_rng_state())  # drawn from the model-parallel stream
    again = module(q, k, v, None)
    return float((dropped - plain).abs().max()), default_untouched, float((again - dropped).abs().max())


def test_attention_dropout_follows_the_config_and_the_model_parallel_rng():
    (diff, default_untouched, between_calls) = run_distributed(_dropout_follows_config, 1)[0]
    assert diff > 1e-2 and between_calls > 1e-2  # dropout applied in training, a fresh draw per call
    assert default_untouched


def _models_agree(sequence_parallel: bool):
    """Logits and every gradient of the same GPTModel with either backend (full fine-tuning)."""
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import build_gpt_model

    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    out = {}
    for backend in ("local", "sdpa"):
        torch.manual_seed(0)
        model = build_gpt_model(ModelConfig(**TINY), seed=3, attention_backend=backend,
                                sequence_parallel=sequence_parallel)
        for p in model.parameters():
            p.requires_grad_(True)
        logits = model(input_ids=tokens, position_ids=torch.arange(32)[None], attention_mask=None)
        (logits.float().square().mean()).backward()
        out[backend] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()},
                        type(model.decoder.layers[0].self_attention.core_attention).__name__)
    return out


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sequence-parallel"])
def test_gpt_model_sdpa_equals_local_at_tp2(sp):
    for out in run_distributed(_models_agree, 2, tp=2, args=(sp,)):
        (lo, glo, clo), (sd, gsd, csd) = out["local"], out["sdpa"]
        assert (clo, csd) == ("DotProductAttention", "SDPAttention")
        assert (sd - lo).abs().max() <= 1e-5 * lo.abs().max()
        assert set(glo) == set(gsd) and len(glo) > 8
        for n in glo:
            assert (gsd[n] - glo[n]).norm() <= 1e-5 * glo[n].norm(), n


# parameters with the same layout on both sides (q/k/v and gate/up are fused on megatron-core's)
HF_TO_MEGATRON = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
                  "lm_head.weight": "output_layer.weight", "model.norm.weight": "decoder.final_layernorm.weight"}
PER_LAYER = {"input_layernorm.weight": "input_layernorm.weight",
             "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
             "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
             "mlp.down_proj.weight": "mlp.linear_fc2.weight"}


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _megatron_loss_grads(ckpt_dir: str, tokens: torch.Tensor):
    from megatron_hdpissa.convert.load import load_gpt_model

    model, _ = load_gpt_model(ckpt_dir, parallel_output=False)
    for p in model.parameters():
        p.requires_grad_(True)
    logits = model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1])[None], attention_mask=None)
    _next_token_loss(logits, tokens).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_logits_and_gradients_equal_transformers(tiny_llama_hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    base = convert_hf_to_megatron(tiny_llama_hf_dir, tmp_path / "base", tp_size=1, progress=False)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    logits, grads = run_distributed(_megatron_loss_grads, 1, args=(str(base), tokens))[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_hf_dir, dtype=torch.float32,
                                              attn_implementation="eager")  # not torch's SDPA
    hf_logits = hf(tokens).logits
    _next_token_loss(hf_logits, tokens).backward()
    assert (logits - hf_logits.detach()).abs().max() <= 1e-5 * hf_logits.abs().max()
    pairs = dict(HF_TO_MEGATRON)
    for i in range(hf.config.num_hidden_layers):
        pairs.update({f"model.layers.{i}.{h}": f"decoder.layers.{i}.{m}" for h, m in PER_LAYER.items()})
    hf_grads = dict((n, p.grad) for n, p in hf.named_parameters())
    for h, m in pairs.items():
        assert (grads[m] - hf_grads[h]).norm() <= 1e-5 * hf_grads[h].norm(), (h, m)


def _attention_ops(backend: str) -> set[str]:
    from torch.profiler import profile

    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import build_gpt_model

    model = build_gpt_model(ModelConfig(**TINY), seed=3, attention_backend=backend)
    tokens = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    with profile() as prof:
        model(input_ids=tokens, position_ids=torch.arange(64)[None], attention_mask=None).sum().backward()
    return {e.name for e in prof.events()}


def test_fused_kernel_runs_without_scores_or_expanded_kv():
    sdpa, local = (run_distributed(_attention_ops, 1, args=(b,))[0] for b in ("sdpa", "local"))
    assert "aten::baddbmm" in local and "aten::repeat_interleave" in local  # what the check would see
    assert any("scaled_dot_product" in name for name in sdpa)
    assert not {"aten::baddbmm", "aten::repeat_interleave", "aten::_scaled_dot_product_attention_math"} & sdpa


def test_pack_with_local_backend_on_a_sliding_window_model_is_refused():
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import check_attention_backend

    windowed = ModelConfig(**{**TINY, "sliding_window": 5})
    with pytest.raises(ValueError, match="--pack with --attention-backend local on a sliding-window model"):
        check_attention_backend("local", windowed, document_masks=True)
    check_attention_backend("sdpa", windowed, document_masks=True)  # SDPAttention intersects window and mask
    check_attention_backend("local", windowed, document_masks=False)
    check_attention_backend("local", ModelConfig(**TINY), document_masks=True)


def test_document_spans_recognise_exactly_the_per_document_causal_masks():
    from megatron_hdpissa.data.batches import document_causal_mask
    from megatron_hdpissa.models.attention import document_spans

    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8])
    assert document_spans(document_causal_mask(docs)) == [[(0, 3), (3, 5), (5, 8)], [(0, 8)]]
    other = document_causal_mask(docs).clone()
    other[0, 0, 6, 4] = False  # position 6 (third document) sees 4 (second): not per-document causal
    assert document_spans(other) is None
    assert document_spans(document_causal_mask(docs)[:, :, :, :7]) is None


def _sdpa_calls_per_micro_batch():
    from torch.profiler import profile

    from megatron_hdpissa.data.batches import document_causal_mask
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import build_gpt_model

    model = build_gpt_model(ModelConfig(**TINY), seed=3)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = document_causal_mask(torch.tensor([[0] * 10 + [1] * 9 + [2] * 5, [0] * 24]))
    with profile() as prof:
        model(input_ids=tokens, position_ids=torch.arange(24)[None], attention_mask=mask)
    return sum(e.name == "aten::scaled_dot_product_attention" for e in prof.events())


def test_packed_rows_run_one_causal_call_per_document():
    calls = run_distributed(_sdpa_calls_per_micro_batch, 1)[0]
    assert calls == TINY["num_layers"] * (3 + 1)
