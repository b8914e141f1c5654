"""Pipeline-parallel checkpoints: the legacy `mp_rank_TT_PPP` layout, bit-exact round trips at
PP=2 and TP=2 x PP=2, resharding the stages on load, a real PP=2 forward (megatron-core's
pipeline schedule, p2p between two processes) against transformers' logits, and bad input."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info
from megatron_hdpissa.convert.hf_mapping import hf_tensors_from_megatron
from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_hdpissa.convert.load import load_megatron_state_dict
from megatron_hdpissa.models.pipeline_stages import merge_pipeline_stages, split_pipeline_stages
from megatron_hdpissa.models.config import ModelConfig
from tests.helpers.conversion import assert_bit_exact, assert_logits_close, hf_logits, pipeline_logits, random_ids
from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import save_random_hf_model
from tests.helpers.tools import load_tool


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_llama4_hf_dir(tmp_path_factory):
    """LLaMA with 4 layers (2 KV groups, untied), so stages of PP=2 and PP=4 differ."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, initializer_range=0.1, architectures=["LlamaForCausalLM"],
    )
    return save_random_hf_model(config, tmp_path_factory.mktemp("tiny_llama4"), seed=4)


@pytest.fixture(scope="module")
def pp_converted(tmp_path_factory, tiny_llama_hf_dir, tiny_qwen2_hf_dir, tiny_llama4_hf_dir):
    root = tmp_path_factory.mktemp("converted_pp")
    jobs = {
        "llama_pp2": (tiny_llama_hf_dir, 1, 2), "llama_tp2_pp2": (tiny_llama_hf_dir, 2, 2),
        "qwen2_pp2": (tiny_qwen2_hf_dir, 1, 2), "qwen2_tp2_pp2": (tiny_qwen2_hf_dir, 2, 2),
        "qwen2_tp1": (tiny_qwen2_hf_dir, 1, 1), "qwen2_tp2": (tiny_qwen2_hf_dir, 2, 1),
        "llama4_pp4": (tiny_llama4_hf_dir, 1, 4), "llama4_pp2": (tiny_llama4_hf_dir, 1, 2),
        "llama4_pp1": (tiny_llama4_hf_dir, 1, 1),
    }
    return {name: convert_hf_to_megatron(src, root / name, tp, pp_size=pp, progress=False)
            for name, (src, tp, pp) in jobs.items()}


# ---- layout -----------------------------------------------------------------------------------
def test_stage_files_hold_their_layers_numbered_locally(pp_converted, tiny_llama4_hf_dir, tiny_qwen2_hf_dir):
    ckpt = pp_converted["llama4_pp2"]
    info = read_checkpoint_info(ckpt)
    assert (info.tp_size, info.pp_size) == (1, 2)
    assert [p.relative_to(ckpt).as_posix() for p in info.rank_files] == [
        "iter_0000000/mp_rank_00_000/model_optim_rng.pt", "iter_0000000/mp_rank_00_001/model_optim_rng.pt"]
    hf = _hf_tensors(tiny_llama4_hf_dir)
    stages = [torch.load(f, weights_only=True) for f in info.rank_files]
    assert [(s["pipeline_model_parallel_size"], s["pipeline_model_parallel_rank"]) for s in stages] == [(2, 0), (2, 1)]
    first, last = (s["model"] for s in stages)
    layer_ids = [sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")}) for sd in (first, last)]
    assert layer_ids == [[0, 1], [0, 1]]
    # local layer j of stage 1 is global layer 2 + j
    for j in (0, 1):
        assert torch.equal(last[f"decoder.layers.{j}.input_layernorm.weight"],
                           hf[f"model.layers.{2 + j}.input_layernorm.weight"])
        assert torch.equal(last[f"decoder.layers.{j}.mlp.linear_fc2.weight"],
                           hf[f"model.layers.{2 + j}.mlp.down_proj.weight"])
    assert torch.equal(first["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert not any(k.startswith(("output_layer.", "decoder.final_layernorm.")) for k in first)
    assert "embedding.word_embeddings.weight" not in last
    assert torch.equal(last["output_layer.weight"], hf["lm_head.weight"])
    assert torch.equal(last["decoder.final_layernorm.weight"], hf["model.norm.weight"])

    # tied embeddings at TP=2 x PP=2: the last stage holds its own copy of its vocabulary slice
    info = read_checkpoint_info(pp_converted["qwen2_tp2_pp2"])
    assert (info.tp_size, info.pp_size) == (2, 2)
    assert info.rank_file(1, 0).parent.name == "mp_rank_01_000"
    embed = _hf_tensors(tiny_qwen2_hf_dir)["model.embed_tokens.weight"]
    for t in (0, 1):
        first = torch.load(info.rank_file(t, 0), weights_only=True)["model"]
        last = torch.load(info.rank_file(t, 1), weights_only=True)["model"]
        assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])
        assert torch.equal(last["output_layer.weight"], embed[t * 96:(t + 1) * 96])


# ---- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["llama_pp2", "llama_tp2_pp2", "qwen2_pp2", "qwen2_tp2_pp2", "llama4_pp4"])
def test_round_trip_through_stages_is_bit_exact(pp_converted, key, tiny_llama_hf_dir, tiny_qwen2_hf_dir,
                                                tiny_llama4_hf_dir, tmp_path):
    source = {"llama": tiny_llama_hf_dir, "qwen2": tiny_qwen2_hf_dir, "llama4": tiny_llama4_hf_dir}[key.split("_")[0]]
    out = convert_megatron_to_hf(pp_converted[key], tmp_path / "hf", progress=False)
    assert_bit_exact(source, out)


def test_round_trip_via_cli_with_pipeline_flag(tiny_qwen2_hf_dir, tmp_path):
    to_megatron, to_hf = load_tool("convert_hf_to_megatron"), load_tool("convert_megatron_to_hf")
    ckpt, back = tmp_path / "ckpt", tmp_path / "hf"
    assert to_megatron.main(["--ckpt-format", "torch", "--hf-dir", str(tiny_qwen2_hf_dir), "--save", str(ckpt), "--no-progress",
                             "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]) == 0
    assert read_checkpoint_info(ckpt).pp_size == 2
    assert to_hf.main(["--megatron-dir", str(ckpt), "--save", str(tmp_path / "x"), "--no-progress",
                       "--pipeline-model-parallel-size", "1"]) == 1  # the expected size is checked
    assert to_hf.main(["--megatron-dir", str(ckpt), "--save", str(back), "--no-progress",
                       "--pipeline-model-parallel-size", "2"]) == 0
    assert_bit_exact(tiny_qwen2_hf_dir, back)


def test_hf_tensors_from_per_rank_stage_state_dicts(pp_converted, tiny_qwen2_hf_dir):
    """The trainer's merged export hands over every (tp_rank, pp_rank) state dict at once."""
    ckpt = pp_converted["qwen2_tp2_pp2"]
    shards = {(t, p): load_megatron_state_dict(ckpt, t, pp_rank=p) for t in range(2) for p in range(2)}
    config = ModelConfig.load(ckpt)
    hf = _hf_tensors(tiny_qwen2_hf_dir)
    ours = dict(hf_tensors_from_megatron(shards, config))
    nested = dict(hf_tensors_from_megatron([[shards[(t, p)] for p in range(2)] for t in range(2)], config))
    assert sorted(ours) == sorted(nested) == sorted(k for k in hf if k != "lm_head.weight")
    for name, tensor in ours.items():
        assert torch.equal(tensor, hf[name]) and torch.equal(nested[name], hf[name]), name
    with pytest.raises(ValueError, match=r"\(tp_rank, pp_rank\) \[\(1, 1\)\] are missing"):
        dict(hf_tensors_from_megatron({k: v for k, v in shards.items() if k != (1, 1)}, config))


# ---- resharding the stages on load --------------------------------------------------------------
def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for k in a:
        assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.mark.parametrize("saved,target", [
    ("llama4_pp4", "llama4_pp2"), ("llama4_pp2", "llama4_pp4"), ("llama4_pp4", "llama4_pp1"),
    ("llama4_pp1", "llama4_pp2"), ("qwen2_pp2", "qwen2_tp1"), ("qwen2_tp1", "qwen2_pp2"),
    ("qwen2_tp2_pp2", "qwen2_tp2"), ("qwen2_tp2", "qwen2_tp2_pp2"),
])
def test_stages_reshard_on_load(pp_converted, saved, target):
    """Loading a checkpoint at another pipeline size gives exactly what converting at that size
    wrote (which the logits tests check against transformers)."""
    want = read_checkpoint_info(pp_converted[target])
    for t in range(want.tp_size):
        for p in range(want.pp_size):
            expected = torch.load(want.rank_file(t, p), weights_only=True)["model"]
            got = load_megatron_state_dict(pp_converted[saved], t, want.tp_size, pp_rank=p, pp_size=want.pp_size)
            _assert_same_state(got, expected, f"{saved} -> {target} (tp {t}, pp {p})")


def test_split_and_merge_are_inverse(pp_converted):
    config = ModelConfig.load(pp_converted["qwen2_tp1"])
    whole = load_megatron_state_dict(pp_converted["qwen2_tp1"], 0)
    stages = split_pipeline_stages(whole, config, 2)
    assert stages[1]["output_layer.weight"] is stages[0]["embedding.word_embeddings.weight"]
    _assert_same_state(merge_pipeline_stages(stages, config), whole, "split then merge")


# ---- real pipeline-parallel runs ------------------------------------------------------------------
def test_pp2_model_loaded_from_stages_matches_hf_logits(pp_converted, tiny_llama_hf_dir, tiny_qwen2_hf_dir):
    """Two processes, one stage each: converted at PP=2 (untied and tied), and a PP=1 checkpoint
    resharded to PP=2 on load."""
    cases = [("LLaMA PP=2", "llama_pp2", tiny_llama_hf_dir), ("Qwen2 tied PP=2", "qwen2_pp2", tiny_qwen2_hf_dir),
             ("Qwen2 PP=1 checkpoint at PP=2", "qwen2_tp1", tiny_qwen2_hf_dir)]
    token_ids = random_ids(128, (2, 12))
    per_rank = run_distributed(pipeline_logits, world_size=2, tp=1, pp=2,
                               args=([str(pp_converted[key]) for _, key, _ in cases], token_ids))
    for index, (what, _, hf_dir) in enumerate(cases):
        (none, first_parts, first_layers), (logits, last_parts, last_layers) = (r[index] for r in per_rank)
        assert none is None and (first_layers, last_layers) == (1, 1), what
        assert first_parts == ["decoder", "embedding"] and last_parts == ["decoder", "output_layer"], what
        assert_logits_close(logits, hf_logits(hf_dir, token_ids), what)


def _pp1_logits(ckpt_dir: str, token_ids: list[list[int]]) -> torch.Tensor:
    from megatron_hdpissa.convert.load import load_gpt_model

    model, _ = load_gpt_model(ckpt_dir, parallel_output=False)
    ids = torch.tensor(token_ids)
    with torch.no_grad():
        return model.eval()(ids, torch.arange(ids.shape[1]).expand_as(ids), None)


def test_pp2_checkpoint_loads_at_pp1(pp_converted, tiny_qwen2_hf_dir):
    token_ids = random_ids(128, (2, 12))
    (logits,) = run_distributed(_pp1_logits, world_size=1, tp=1, args=(str(pp_converted["qwen2_pp2"]), token_ids))
    assert_logits_close(logits, hf_logits(tiny_qwen2_hf_dir, token_ids), "Qwen2 PP=2 checkpoint at PP=1")


# ---- bad input ----------------------------------------------------------------------------------
def test_pp_not_dividing_layers_is_rejected(tiny_llama_hf_dir, pp_converted, tmp_path):
    with pytest.raises(ValueError, match=r"--pipeline-model-parallel-size 3 does not divide "
                                         r"num_layers=2 .*valid sizes: \[1, 2\]"):
        convert_hf_to_megatron(tiny_llama_hf_dir, tmp_path / "out", 1, pp_size=3, progress=False)
    assert not list(tmp_path.iterdir())  # nothing written, no temp folder left
    assert load_tool("convert_hf_to_megatron").main([
        "--hf-dir", str(tiny_llama_hf_dir), "--save", str(tmp_path / "out"), "--no-progress",
        "--pipeline-model-parallel-size", "0"]) == 1
    with pytest.raises(ValueError, match=r"saved with --pipeline-model-parallel-size 4\) at "
                                         r"--pipeline-model-parallel-size 3: .*does not divide num_layers=4"):
        load_megatron_state_dict(pp_converted["llama4_pp4"], 0, 1, pp_rank=0, pp_size=3)
    # TP is still not resharded
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 2 but this run uses "
                                         "--tensor-model-parallel-size 1"):
        load_megatron_state_dict(pp_converted["llama_tp2_pp2"], 0, 1, pp_size=1)


def test_incomplete_or_mixed_stage_folders_are_named(pp_converted, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(pp_converted["llama_tp2_pp2"], ckpt)
    shutil.rmtree(ckpt / "iter_0000000" / "mp_rank_01_001")
    with pytest.raises(FileNotFoundError, match=r"lacks the shard folders \['mp_rank_01_001'\]"):
        read_checkpoint_info(ckpt)
    (ckpt / "iter_0000000" / "mp_rank_01").mkdir()
    with pytest.raises(ValueError, match="mixes mp_rank_TT and mp_rank_TT_PPP"):
        read_checkpoint_info(ckpt)
