"""Converters and readers with `--ckpt-format torch_dist`, and Qwen3 (qk-norm, GQA, explicit
head_dim) in both formats: HF -> torch_dist -> HF bit-exact, a torch_dist base (saved once, TP=1)
loaded at TP=2 and at PP=2 against transformers' logits, Qwen3 at TP=1 and TP=2 (legacy and
torch_dist), reading torch_dist at any layout equals the legacy shards, and unsupported configs."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info
from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_hdpissa.convert.load import load_megatron_state_dict
from megatron_hdpissa.models.config import ModelConfig
from tests.helpers.conversion import (
    assert_bit_exact,
    assert_logits_close,
    hf_logits,
    megatron_logits,
    pipeline_logits,
    random_ids,
)
from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import save_random_hf_model
from tests.helpers.tools import load_tool


@pytest.fixture(scope="module")
def tiny_qwen3_untied_hf_dir(tmp_path_factory):
    """Qwen3 with untied embeddings and head_dim = hidden / heads (8)."""
    from transformers import Qwen3Config

    config = Qwen3Config(
        vocab_size=160, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False, initializer_range=0.1, architectures=["Qwen3ForCausalLM"],
    )
    return save_random_hf_model(config, tmp_path_factory.mktemp("tiny_qwen3_untied"), seed=6)


@pytest.fixture(scope="module")
def dist_converted(tmp_path_factory, tiny_llama_hf_dir, tiny_qwen2_hf_dir, tiny_qwen3_hf_dir,
                   tiny_qwen3_untied_hf_dir):
    root = tmp_path_factory.mktemp("converted_dist")
    jobs = {
        "llama_dist": (tiny_llama_hf_dir, 1, "torch_dist"), "qwen2_dist": (tiny_qwen2_hf_dir, 1, "torch_dist"),
        "qwen3_dist": (tiny_qwen3_hf_dir, 1, "torch_dist"), "qwen3_tp1": (tiny_qwen3_hf_dir, 1, "torch"),
        "qwen3_tp2": (tiny_qwen3_hf_dir, 2, "torch"), "llama_tp2": (tiny_llama_hf_dir, 2, "torch"),
        "qwen3u_dist": (tiny_qwen3_untied_hf_dir, 1, "torch_dist"),
        "qwen3u_tp2": (tiny_qwen3_untied_hf_dir, 2, "torch"),
    }
    return {name: convert_hf_to_megatron(src, root / name, tp, ckpt_format=fmt, progress=False)
            for name, (src, tp, fmt) in jobs.items()}


# ---- layout and round trips --------------------------------------------------------------------
def test_torch_dist_layout_and_info(dist_converted):
    ckpt = dist_converted["llama_dist"]
    info = read_checkpoint_info(ckpt)
    assert (info.ckpt_format, info.iteration, info.tp_size, info.pp_size, info.rank_files) == (
        "torch_dist", 0, 1, 1, ())
    names = {p.name for p in info.iter_dir.iterdir()}
    assert {"metadata.json", "common.pt", ".metadata"} <= names and not any(n.startswith("mp_rank") for n in names)
    assert json.loads((info.iter_dir / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert (ckpt / "model_config.json").is_file() and (ckpt / "latest_checkpointed_iteration.txt").is_file()
    assert read_checkpoint_info(dist_converted["llama_tp2"]).ckpt_format == "torch"


@pytest.mark.parametrize("key,hf", [("llama_dist", "tiny_llama_hf_dir"), ("qwen2_dist", "tiny_qwen2_hf_dir"),
                                    ("qwen3_dist", "tiny_qwen3_hf_dir"), ("qwen3u_dist", "tiny_qwen3_untied_hf_dir"),
                                    ("qwen3_tp2", "tiny_qwen3_hf_dir")])
def test_round_trip_is_bit_exact(dist_converted, key, hf, request, tmp_path):
    hf_dir = request.getfixturevalue(hf)
    back = convert_megatron_to_hf(dist_converted[key], tmp_path / "hf", progress=False)
    assert_bit_exact(hf_dir, back)
    config = json.loads((back / "config.json").read_text())
    # written for both transformers 4.x (top-level rope_theta) and 5.x (rope_parameters)
    assert config["rope_theta"] == ModelConfig.from_hf(hf_dir).rope_theta


def test_cli_defaults_to_torch_dist_and_reads_both(tiny_qwen3_hf_dir, tmp_path):
    to_megatron, to_hf = load_tool("convert_hf_to_megatron"), load_tool("convert_megatron_to_hf")
    assert to_megatron.parse_args(["--hf-dir", "x", "--save", "y"]).ckpt_format == "torch_dist"
    for fmt in ("torch_dist", "torch"):
        ckpt, back = tmp_path / f"ckpt_{fmt}", tmp_path / f"hf_{fmt}"
        argv = ["--hf-dir", str(tiny_qwen3_hf_dir), "--save", str(ckpt), "--no-progress",
                "--tensor-model-parallel-size", "2"]
        assert to_megatron.main(argv + (["--ckpt-format", "torch"] if fmt == "torch" else [])) == 0
        assert read_checkpoint_info(ckpt).ckpt_format == fmt
        assert to_hf.main(["--megatron-dir", str(ckpt), "--save", str(back), "--no-progress"]) == 0
        assert_bit_exact(tiny_qwen3_hf_dir, back)
    assert to_megatron.main(["--hf-dir", str(tiny_qwen3_hf_dir), "--save", str(tmp_path / "bad"),
                             "--tensor-model-parallel-size", "3", "--no-progress"]) == 1


@pytest.mark.parametrize("legacy,dist,tp,pp", [("llama_tp2", "llama_dist", 2, 1), ("llama_tp2", "llama_dist", 2, 2),
                                               ("qwen3_tp2", "qwen3_dist", 2, 2), ("qwen3u_tp2", "qwen3u_dist", 2, 1)])
def test_torch_dist_reads_at_any_layout_as_the_legacy_shards(dist_converted, legacy, dist, tp, pp):
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            a = load_megatron_state_dict(dist_converted[dist], tp_rank, tp, pp_rank=pp_rank, pp_size=pp)
            b = load_megatron_state_dict(dist_converted[legacy], tp_rank, tp, pp_rank=pp_rank, pp_size=pp)
            assert sorted(a) == sorted(b)
            for k in a:
                assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), k


def test_qwen3_qk_norms_are_converted(dist_converted, tiny_qwen3_hf_dir):
    from safetensors.torch import load_file

    hf = load_file(str(tiny_qwen3_hf_dir / "model.safetensors"))
    for tp_rank in range(2):  # replicated over TP
        sd = load_megatron_state_dict(dist_converted["qwen3_tp2"], tp_rank, 2)
        for i in range(2):
            for hf_name, mc_name in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
                got = sd[f"decoder.layers.{i}.self_attention.{mc_name}.weight"]
                assert torch.equal(got, hf[f"model.layers.{i}.self_attn.{hf_name}.weight"])
                assert got.shape == (16,)  # head_dim, not hidden / heads


# ---- logits against transformers -----------------------------------------------------------------
def _logits_counting_mcore_loads(ckpt_dirs: list[str], token_ids):
    """`megatron_logits`, and how many of the loads went through megatron-core's
    dist_checkpointing.load (resharding) rather than the in-process slicing."""
    from megatron_hdpissa.checkpoint import dist as dist_checkpoint

    calls = []
    real = dist_checkpoint.load_dist_checkpoint

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    dist_checkpoint.load_dist_checkpoint = counting
    return megatron_logits(ckpt_dirs, token_ids), len(calls)


def test_torch_dist_and_qwen3_logits_at_tp1(dist_converted, tiny_llama_hf_dir, tiny_qwen3_hf_dir,
                                            tiny_qwen3_untied_hf_dir):
    cases = [("LLaMA torch_dist at TP=1", "llama_dist", tiny_llama_hf_dir),
             ("Qwen3 torch_dist at TP=1", "qwen3_dist", tiny_qwen3_hf_dir),
             ("Qwen3 legacy TP=1", "qwen3_tp1", tiny_qwen3_hf_dir),
             ("Qwen3 untied torch_dist at TP=1", "qwen3u_dist", tiny_qwen3_untied_hf_dir)]
    token_ids = random_ids(128, (2, 12))
    (logits,) = run_distributed(megatron_logits, world_size=1, tp=1,
                                args=([str(dist_converted[k]) for _, k, _ in cases], token_ids))
    for (what, _, hf_dir), got in zip(cases, logits):
        assert_logits_close(got, hf_logits(hf_dir, token_ids), what)


def test_torch_dist_and_qwen3_logits_at_tp2(dist_converted, tiny_llama_hf_dir, tiny_qwen3_hf_dir,
                                            tiny_qwen3_untied_hf_dir):
    """A base saved once at TP=1 (torch_dist) loaded by 2 ranks at TP=2: megatron-core reshards."""
    cases = [("LLaMA 8 heads / 4 groups torch_dist at TP=2", "llama_dist", tiny_llama_hf_dir),
             ("Qwen3 torch_dist at TP=2", "qwen3_dist", tiny_qwen3_hf_dir),
             ("Qwen3 legacy TP=2", "qwen3_tp2", tiny_qwen3_hf_dir),
             ("Qwen3 untied torch_dist at TP=2", "qwen3u_dist", tiny_qwen3_untied_hf_dir)]
    token_ids = random_ids(128, (2, 12))
    per_rank = run_distributed(_logits_counting_mcore_loads, world_size=2, tp=2,
                               args=([str(dist_converted[k]) for _, k, _ in cases], token_ids))
    assert [n for _, n in per_rank] == [3, 3]  # the torch_dist ones, resharded by megatron-core
    for index, (what, _, hf_dir) in enumerate(cases):
        hf = hf_logits(hf_dir, token_ids)
        for rank, (logits, _) in enumerate(per_rank):
            assert_logits_close(logits[index], hf, f"{what}, rank {rank}")


def test_torch_dist_logits_at_pp2(dist_converted, tiny_llama_hf_dir, tiny_qwen3_hf_dir):
    cases = [("LLaMA torch_dist at PP=2", "llama_dist", tiny_llama_hf_dir),
             ("Qwen3 tied torch_dist at PP=2", "qwen3_dist", tiny_qwen3_hf_dir)]
    token_ids = random_ids(128, (2, 12))
    per_rank = run_distributed(pipeline_logits, world_size=2, tp=1, pp=2,
                               args=([str(dist_converted[k]) for _, k, _ in cases], token_ids))
    for index, (what, _, hf_dir) in enumerate(cases):
        (none, _, first_layers), (logits, _, last_layers) = (r[index] for r in per_rank)
        assert none is None and (first_layers, last_layers) == (1, 1), what
        assert_logits_close(logits, hf_logits(hf_dir, token_ids), what)


# ---- configs the converters do not support -------------------------------------------------------
def _qwen3(**overrides) -> dict:
    d = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=64, hidden_size=32,
             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    d.update(overrides)
    return d


@pytest.mark.parametrize("overrides,field", [
    ({"model_type": "qwen3_moe", "num_experts": 8}, "num_experts=8"),
    ({"num_experts": 4}, "num_experts=4"),
    ({"moe_intermediate_size": 16}, "moe_intermediate_size"),
    ({"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"attention_bias": True}, "attention_bias"),
    ({"norm_type": "layernorm"}, "norm_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_name_the_field(overrides, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf(_qwen3(**overrides))


def test_qwen3_config_reads_both_rope_forms():
    new = ModelConfig.from_hf(_qwen3())
    old = _qwen3(rope_theta=1e6)
    del old["rope_parameters"]
    assert ModelConfig.from_hf(old).rope_theta == new.rope_theta == 1e6
    assert (new.qk_layernorm, new.qkv_bias, new.kv_channels) == (True, False, 8)
    assert ModelConfig.from_hf(_qwen3(layer_types=["full_attention"] * 2)).num_layers == 2
    # built without a stored config.json: what the installed transformers reads
    fields = {**new.to_dict(), "hf_config": None}
    hf = ModelConfig.from_dict(fields).to_hf_config()
    theta = hf.rope_parameters["rope_theta"] if hasattr(hf, "rope_parameters") else hf.rope_theta
    assert (type(hf).__name__, theta, hf.head_dim) == ("Qwen3Config", 1e6, 8)


def test_effective_rank_tool_reads_torch_dist(dist_converted, tiny_llama_hf_dir):
    from safetensors.torch import load_file

    from megatron_hdpissa.analysis.effective_rank import open_checkpoint

    hf = load_file(str(tiny_llama_hf_dir / "model.safetensors"))
    ckpt = open_checkpoint(dist_converted["llama_dist"])
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(ckpt.weight(name), hf[name]), name
