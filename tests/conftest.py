"""Session fixtures: real SmolLM2 weights (cached on disk, truncated for speed) and tiny random
LLaMA / Qwen2 / Mistral / Qwen3 Hugging Face folders (built by tests/helpers/hf_models.py)."""
from __future__ import annotations

import pytest

from tests.helpers.hf_models import save_random_hf_model

SMOLLM2_TEST_LAYERS = 2


@pytest.fixture(scope="session")
def smollm2_hf_dir():
    """Real SmolLM2-135M-Instruct weights, first layers only (built once into the cache folder:
    about a minute the first time, instant afterwards)."""
    from megatron_hdpissa.data.material import smollm2_hf_dir

    return smollm2_hf_dir(num_layers=SMOLLM2_TEST_LAYERS)


@pytest.fixture(scope="session")
def gsm8k_path():
    from megatron_hdpissa.data.material import gsm8k_test_path

    return gsm8k_test_path()


@pytest.fixture(scope="session")
def tiny_llama_hf_dir(tmp_path_factory):
    """LLaMA, 8 heads / 4 KV groups (GQA), untied embeddings, non-default RoPE theta."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        architectures=["LlamaForCausalLM"],
    )
    return save_random_hf_model(config, tmp_path_factory.mktemp("tiny_llama"), seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2_hf_dir(tmp_path_factory):
    """Qwen2: q/k/v biases, 4 heads / 2 KV groups, tied embeddings."""
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.1,
        architectures=["Qwen2ForCausalLM"],
    )
    return save_random_hf_model(config, tmp_path_factory.mktemp("tiny_qwen2"), seed=2)


@pytest.fixture(scope="session")
def tiny_mistral_hf_dir(tmp_path_factory):
    """Mistral with a sliding window shorter than the test sequences."""
    from transformers import MistralConfig

    config = MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        sliding_window=5, tie_word_embeddings=False, initializer_range=0.1,
        architectures=["MistralForCausalLM"],
    )
    return save_random_hf_model(config, tmp_path_factory.mktemp("tiny_mistral"), seed=3)


@pytest.fixture(scope="session")
def tiny_qwen3_hf_dir(tmp_path_factory):
    """Qwen3 (dense): per-head q/k RMSNorm, explicit head_dim (16, not hidden/heads = 8), 8 heads /
    4 KV groups, tied embeddings, RoPE theta 1e6, no biases."""
    from transformers import Qwen3Config

    config = Qwen3Config(
        vocab_size=192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        architectures=["Qwen3ForCausalLM"],
    )
    return save_random_hf_model(config, tmp_path_factory.mktemp("tiny_qwen3"), seed=5)
