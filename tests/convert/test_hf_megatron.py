"""HF <-> megatron-core conversion: logits of the converted GPTModel against transformers at
TP=1/2/3 (real multi-process runs), bit-exact round trips, and bad input."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info
from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_hdpissa.convert.load import load_megatron_state_dict
from megatron_hdpissa.models.config import ModelConfig
from megatron_hdpissa.models.gpt import build_gpt_model
from tests.helpers.conversion import assert_bit_exact, assert_logits_close, hf_logits, megatron_logits, random_ids
from tests.helpers.distributed import run_distributed
from tests.helpers.tools import load_tool


# ---- converted checkpoints, shared by the tests of this module --------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory, smollm2_hf_dir, tiny_llama_hf_dir, tiny_qwen2_hf_dir, tiny_mistral_hf_dir):
    root = tmp_path_factory.mktemp("converted")
    jobs = {
        "smollm2_tp1": (smollm2_hf_dir, 1), "smollm2_tp3": (smollm2_hf_dir, 3),
        "llama_tp2": (tiny_llama_hf_dir, 2), "qwen2_tp2": (tiny_qwen2_hf_dir, 2),
        "mistral_tp2": (tiny_mistral_hf_dir, 2),
    }
    return {name: convert_hf_to_megatron(src, root / name, tp, progress=False)
            for name, (src, tp) in jobs.items()}


# ---- logits against transformers --------------------------------------------------------------
def test_smollm2_logits_match_hf_at_tp1_and_tp3(converted, smollm2_hf_dir, gsm8k_path):
    from transformers import AutoTokenizer

    # Real text through the tokenizer copied next to the checkpoint.
    tokenizer = AutoTokenizer.from_pretrained(converted["smollm2_tp3"] / "tokenizer")
    with open(gsm8k_path) as f:
        questions = [json.loads(next(f))["question"] for _ in range(2)]
    token_ids = [tokenizer(q)["input_ids"][:24] for q in questions]
    assert all(len(ids) == 24 for ids in token_ids)

    hf = hf_logits(smollm2_hf_dir, token_ids)
    (tp1,) = run_distributed(megatron_logits, world_size=1, tp=1, args=([str(converted["smollm2_tp1"])], token_ids))
    tp3 = run_distributed(megatron_logits, world_size=3, tp=3, args=([str(converted["smollm2_tp3"])], token_ids))
    assert_logits_close(tp1[0], hf, "SmolLM2 TP=1")
    for rank, (logits,) in enumerate(tp3):
        assert_logits_close(logits, hf, f"SmolLM2 TP=3 rank {rank}")


def test_random_llama_qwen2_mistral_logits_match_hf_at_tp2(
    converted, tiny_llama_hf_dir, tiny_qwen2_hf_dir, tiny_mistral_hf_dir
):
    cases = [("LLaMA 8 heads / 4 groups", "llama_tp2", tiny_llama_hf_dir),
             ("Qwen2 with q/k/v biases", "qwen2_tp2", tiny_qwen2_hf_dir),
             ("Mistral sliding window 5", "mistral_tp2", tiny_mistral_hf_dir)]
    token_ids = random_ids(128, (2, 16))  # within every vocabulary
    per_rank = run_distributed(
        megatron_logits, world_size=2, tp=2,
        args=([str(converted[key]) for _, key, _ in cases], token_ids),
    )
    for index, (what, _, hf_dir) in enumerate(cases):
        hf = hf_logits(hf_dir, token_ids)
        for rank, logits in enumerate(per_rank):
            assert_logits_close(logits[index], hf, f"{what}, TP=2 rank {rank}")
    # the window is in force: without it, positions past it differ
    no_window = hf_logits(tiny_mistral_hf_dir, token_ids, sliding_window=None)
    assert (no_window - per_rank[0][2])[:, 5:].abs().amax() > 0.1


# ---- layout and round trips -------------------------------------------------------------------
def test_checkpoint_layout_loads_with_weights_only(converted, tiny_llama_hf_dir):
    ckpt = converted["llama_tp2"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    info = read_checkpoint_info(ckpt)
    assert info.tp_size == 2
    assert [p.relative_to(ckpt).as_posix() for p in info.rank_files] == [
        "iter_0000000/mp_rank_00/model_optim_rng.pt", "iter_0000000/mp_rank_01/model_optim_rng.pt"]
    state = torch.load(info.rank_files[1], weights_only=True)
    assert state["tensor_model_parallel_rank"] == 1 and state["iteration"] == 0
    assert state["model"]["embedding.word_embeddings.weight"].shape == (128, 64)  # vocab 256 / 2
    config = ModelConfig.load(ckpt)
    assert (config.num_attention_heads, config.num_query_groups, config.rope_theta) == (8, 4, 50000.0)
    assert config == ModelConfig.from_hf(tiny_llama_hf_dir)


def test_model_config_from_hf_objects_and_back(tiny_qwen2_hf_dir):
    from transformers import AutoConfig

    from_dir = ModelConfig.from_hf(tiny_qwen2_hf_dir)
    from_object = ModelConfig.from_hf(AutoConfig.from_pretrained(tiny_qwen2_hf_dir))
    strip = lambda c: {**c.to_dict(), "hf_config": None}  # noqa: E731
    assert strip(from_dir) == strip(from_object)
    assert (from_dir.qkv_bias, from_dir.tie_word_embeddings, from_dir.kv_channels) == (True, True, 16)
    rebuilt = ModelConfig.from_hf(ModelConfig.from_dict(strip(from_dir)).to_hf_config())
    assert strip(rebuilt) == strip(from_dir)


def test_qkv_interleave_per_query_group(converted, tiny_llama_hf_dir):
    """Rank 1 of TP=2 holds query groups 2, 3; each group is [its 2 q heads, k, v]."""
    from safetensors.torch import load_file

    hf = load_file(str(tiny_llama_hf_dir / "model.safetensors"))
    qkv = load_megatron_state_dict(converted["llama_tp2"], tp_rank=1, tp_size=2)[
        "decoder.layers.1.self_attention.linear_qkv.weight"]
    hd = 8
    q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    expected = []
    for g in (2, 3):
        expected += [q[2 * g * hd:(2 * g + 2) * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
    assert torch.equal(qkv, torch.cat(expected))
    fc1 = load_megatron_state_dict(converted["llama_tp2"], tp_rank=1, tp_size=2)[
        "decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate[48:], up[48:]]))


@pytest.mark.parametrize("key", ["smollm2_tp3", "qwen2_tp2"])
def test_round_trip_is_bit_exact_and_loads_in_transformers(
    converted, key, smollm2_hf_dir, tiny_qwen2_hf_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    source = smollm2_hf_dir if key.startswith("smollm2") else tiny_qwen2_hf_dir
    out = convert_megatron_to_hf(converted[key], tmp_path / "hf", progress=False)
    assert_bit_exact(source, out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    if key.startswith("smollm2"):
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(out)("2 + 2")["input_ids"]
        assert (out / "generation_config.json").is_file()


def test_round_trip_sharded_output_via_cli(tiny_llama_hf_dir, tmp_path):
    """The two CLIs, with the HF side split into several safetensors files plus an index."""
    to_megatron = load_tool("convert_hf_to_megatron")
    to_hf = load_tool("convert_megatron_to_hf")
    ckpt, back, again = tmp_path / "ckpt", tmp_path / "hf", tmp_path / "ckpt2"
    assert to_megatron.main(["--ckpt-format", "torch", "--hf-dir", str(tiny_llama_hf_dir), "--save", str(ckpt),
                             "--tensor-model-parallel-size", "4", "--no-progress"]) == 0
    assert to_hf.main(["--megatron-dir", str(ckpt), "--save", str(back), "--no-progress",
                       "--max-shard-size-gb", str(40_000 / 1024**3)]) == 0
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 2
    assert (back / "model.safetensors.index.json").is_file()
    assert_bit_exact(tiny_llama_hf_dir, back)
    # the sharded HF folder converts again (read through its index)
    assert to_megatron.main(["--ckpt-format", "torch", "--hf-dir", str(back), "--save", str(again),
                             "--tensor-model-parallel-size", "2", "--no-progress"]) == 0
    assert read_checkpoint_info(again).tp_size == 2


# ---- bad input --------------------------------------------------------------------------------
def test_missing_checkpoint_and_tracker(tmp_path, converted):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint_info(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="latest_checkpointed_iteration.txt"):
        convert_megatron_to_hf(tmp_path / "empty", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_hf_to_megatron(tmp_path / "no_hf", tmp_path / "out", 1, progress=False)


def test_mismatched_tp_size_is_named(converted, tmp_path):
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 3 .*--tensor-model-parallel-size 1"):
        load_megatron_state_dict(converted["smollm2_tp3"], tp_rank=0, tp_size=1)
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 2, not 4"):
        convert_megatron_to_hf(converted["llama_tp2"], tmp_path / "out", tp_size=4, progress=False)
    # the running megatron-core TP group (1 here: uninitialised) must match what was asked
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 2 differs"):
        build_gpt_model(converted["llama_tp2"], tp_size=2)


def test_tp_not_dividing_heads_or_groups_is_rejected(smollm2_hf_dir, tiny_llama_hf_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size 2 does not divide "
                       r"num_attention_heads=9 .*valid sizes: \[1, 3\]"):
        convert_hf_to_megatron(smollm2_hf_dir, tmp_path / "out", 2, progress=False)
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size 8 does not divide num_key_value_heads \(query groups\)=4"):
        convert_hf_to_megatron(tiny_llama_hf_dir, tmp_path / "out", 8, progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())  # no temp folder left behind


def test_existing_output_is_kept_without_force(tiny_qwen2_hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--force"):
        convert_hf_to_megatron(tiny_qwen2_hf_dir, out, 1, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    tool = load_tool("convert_hf_to_megatron")
    assert tool.main(["--hf-dir", str(tiny_qwen2_hf_dir), "--save", str(out), "--no-progress"]) == 1
    assert (out / "keep.txt").read_text() == "precious"
    convert_hf_to_megatron(tiny_qwen2_hf_dir, out, 1, force=True, progress=False)
    assert not (out / "keep.txt").exists() and read_checkpoint_info(out).tp_size == 1
    with pytest.raises(ValueError, match="overwrite the input"):
        convert_hf_to_megatron(tiny_qwen2_hf_dir, tiny_qwen2_hf_dir, 1, force=True, progress=False)
    assert (tiny_qwen2_hf_dir / "model.safetensors").is_file()


def test_missing_tensor_and_unknown_architecture(tiny_llama_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(str(tiny_llama_hf_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    config = json.loads((tiny_llama_hf_dir / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        convert_hf_to_megatron(broken, tmp_path / "out", 1, progress=False)
    assert not (tmp_path / "out").exists()

    (broken / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        convert_hf_to_megatron(broken, tmp_path / "out", 1, progress=False)


def test_missing_tensor_in_megatron_shard_is_named(converted, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted["qwen2_tp2"], ckpt)
    path = read_checkpoint_info(ckpt).rank_files[1]
    state = torch.load(path, weights_only=True)
    del state["model"]["decoder.layers.0.self_attention.linear_qkv.bias"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"linear_qkv\.bias' is missing from the mp_rank_01"):
        convert_megatron_to_hf(ckpt, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()
