"""CPU compatibility layer: masks and RNG streams against independent computations, and the real
GPTModel's forward + backward at TP=2 on gloo against transformers' gradients."""
from __future__ import annotations

import pytest
import torch

from megatron_hdpissa.models import compat
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compatibility layer")


def test_ensure_cpu_compat_is_idempotent_and_resolves_cpu():
    assert compat.ensure_cpu_compat() is True
    assert compat.ensure_cpu_compat() is True
    assert torch.cuda.current_device() == torch.device("cpu")
    from megatron.core.utils import GlobalMemoryBuffer  # what attention allocates scores in

    assert GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "test").device.type == "cpu"


def test_does_nothing_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(compat, "_applied", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sentinel = object()
    monkeypatch.setattr(torch.cuda, "current_device", sentinel)
    assert compat.ensure_cpu_compat() is False
    assert torch.cuda.current_device is sentinel


@pytest.mark.parametrize("module_name, attribute", [
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.transformer.utils", "get_sliding_window_causal_mask"),
    ("megatron.core.pipeline_parallel.schedules", "torch"),
])
def test_a_renamed_megatron_core_attribute_fails_loudly_before_any_patch(monkeypatch, module_name, attribute):
    import importlib
    from importlib.metadata import version

    from megatron.core.transformer import utils as transformer_utils

    module = importlib.import_module(module_name)
    monkeypatch.delattr(module, attribute)  # what a megatron-core rename looks like to the shim
    monkeypatch.setattr(compat, "_applied", False)
    sentinel = object()
    monkeypatch.setattr(transformer_utils, "get_default_causal_mask", sentinel)
    with pytest.raises(compat.MegatronCoreChanged) as raised:
        compat.ensure_cpu_compat()
    message = str(raised.value)
    assert f"{module_name}.{attribute}" in message
    assert f"megatron-core {version('megatron-core')} " in message
    assert transformer_utils.get_default_causal_mask is sentinel  # checked before anything was patched


def test_a_renamed_class_attribute_names_the_class(monkeypatch):
    from megatron.core.models.common.language_module.language_module import LanguageModule

    monkeypatch.delattr(LanguageModule, "setup_embeddings_and_output_layer")
    monkeypatch.setattr(compat, "_applied", False)
    with pytest.raises(compat.MegatronCoreChanged, match=r"language_module\.LanguageModule\."
                       r"setup_embeddings_and_output_layer, which megatron-core"):
        compat.ensure_cpu_compat()


def test_causal_masks_match_their_definition():
    compat.ensure_cpu_compat()
    from megatron.core.fusions import fused_softmax

    i = torch.arange(6).view(-1, 1)
    j = torch.arange(6).view(1, -1)
    assert torch.equal(fused_softmax.get_default_causal_mask(6), j > i)  # True = masked
    # window (2, 0): each query sees itself and the 2 keys before it
    expected = (j > i) | (j < i - 2)
    assert torch.equal(fused_softmax.get_sliding_window_causal_mask(6, 6, (2, 0)), expected)


def _draws(seed: int, n: int) -> list[torch.Tensor]:
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    draws = [torch.rand(4) for _ in range(n)]
    torch.set_rng_state(state)
    return draws


def test_rng_tracker_streams_on_cpu():
    compat.ensure_cpu_compat()
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tp_stream = _draws(123 + 2718 + 1, 3)  # megatron-core's TP seed: seed + 2718 + tp_rank
    default_stream = _draws(7, 2)

    torch.manual_seed(7)
    first = torch.rand(4)
    with tracker.fork():
        forked = [torch.rand(4), torch.rand(4)]
    second = torch.rand(4)
    with tracker.fork():  # the TP stream continues where it stopped
        forked.append(torch.rand(4))
    assert torch.equal(first, default_stream[0]) and torch.equal(second, default_stream[1])
    assert all(torch.equal(a, b) for a, b in zip(forked, tp_stream))


# ---- the real GPTModel at TP=2 ----------------------------------------------------------------
_RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def _forward_backward(ckpt_dir: str, token_ids, out_weight: torch.Tensor):
    """Gradients of sum(logits * out_weight), plain and with activation recomputation."""
    from megatron.core import parallel_state

    from megatron_hdpissa.convert.load import load_gpt_model

    ids = torch.tensor(token_ids)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    runs = []
    for overrides in ({}, _RECOMPUTE):
        model, _ = load_gpt_model(ckpt_dir, parallel_output=False, **overrides)
        model.train()
        logits = model(ids, positions, None)
        (logits * out_weight).sum().backward()
        runs.append({name: p.grad.clone() for name, p in model.named_parameters()})
    return parallel_state.get_tensor_model_parallel_rank(), runs


def test_gpt_model_forward_backward_tp2_matches_hf_gradients(tiny_llama_hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    ckpt = convert_hf_to_megatron(tiny_llama_hf_dir, tmp_path / "ckpt", 2, progress=False)
    gen = torch.Generator().manual_seed(0)
    token_ids = torch.randint(0, 256, (2, 10), generator=gen).tolist()
    out_weight = torch.randn(2, 10, 256, generator=gen)

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_hf_dir, dtype=torch.float32).train()
    (hf(torch.tensor(token_ids)).logits * out_weight).sum().backward()
    hf_grad = {n: p.grad for n, p in hf.named_parameters()}

    for tp_rank, (plain, recomputed) in run_distributed(
        _forward_backward, world_size=2, tp=2, args=(str(ckpt), token_ids, out_weight)
    ):
        rows, ffn_cols = slice(128 * tp_rank, 128 * (tp_rank + 1)), slice(48 * tp_rank, 48 * (tp_rank + 1))
        expected = {
            "embedding.word_embeddings.weight": hf_grad["model.embed_tokens.weight"][rows],
            "output_layer.weight": hf_grad["lm_head.weight"][rows],
            "decoder.layers.0.mlp.linear_fc2.weight": hf_grad["model.layers.0.mlp.down_proj.weight"][:, ffn_cols],
            "decoder.layers.1.input_layernorm.weight": hf_grad["model.layers.1.input_layernorm.weight"],
            "decoder.layers.0.pre_mlp_layernorm.weight": hf_grad["model.layers.0.post_attention_layernorm.weight"],
            "decoder.final_layernorm.weight": hf_grad["model.norm.weight"],
        }
        for name, want in expected.items():
            err = (plain[name] - want).abs().max().item()
            assert err <= 1e-4 * want.abs().max().item(), f"rank {tp_rank} {name}: {err:.3g}"
        for name, grad in plain.items():
            assert torch.allclose(recomputed[name], grad, rtol=0, atol=1e-6), f"recompute {name}"
