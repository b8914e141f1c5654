"""Bases the user brings as --pretrained-checkpoint: Megatron-LM checkpoints (torch_dist and legacy
TP / TP+PP, written the way Megatron-LM's save_checkpoint writes them) and Megatron-Bridge's
(torch_dist, the model in run_config.yaml) give the source model's
logits and fine-tune; a pickled class or code in their state is refused; an HF folder loads at
TP=2 exactly as converting it first would."""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import megatron_lm_checkpoints as mlm
from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import tiny_llama_with_smollm2_tokenizer
from tests.helpers.trainer import finetune_main

REPO = Path(__file__).resolve().parents[2]


def _write_tp2(root: str, tokenizer: str):
    """TP=2 source model: its logits, and the same weights saved as torch_dist and legacy."""
    config = mlm.tiny_config()
    model = mlm.random_model(config)
    ref = mlm.logits(model)
    mlm.save_torch_dist(model, Path(root) / "dist", mlm.megatron_lm_args(config, 2, 1, "torch_dist", tokenizer))
    mlm.save_legacy(model, Path(root) / "legacy", mlm.megatron_lm_args(config, 2, 1, "torch", tokenizer))
    mlm.save_bridge(model, Path(root) / "bridge", config, tokenizer)
    return ref


def _write_pp2(root: str, tokenizer: str):
    """PP=2 source model saved as legacy mp_rank_00_000 / mp_rank_00_001; its stage tensors."""
    config = mlm.tiny_config()
    model = mlm.random_model(config)
    mlm.save_legacy(model, Path(root) / "legacy_pp", mlm.megatron_lm_args(config, 1, 2, "torch", tokenizer))
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smollm2_hf_dir):
    root = tmp_path_factory.mktemp("mlm")
    ref = run_distributed(_write_tp2, 2, tp=2, args=(str(root), str(smollm2_hf_dir)))[0]
    stages = run_distributed(_write_pp2, 2, tp=1, pp=2, args=(str(root), str(smollm2_hf_dir)))
    tiny_llama_with_smollm2_tokenizer(root / "hf", smollm2_hf_dir, seed=3, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return {"root": root, "ref": ref, "stages": stages}


def _load_logits(dirs: list[str], tokens=mlm.TOKENS):
    """Logits of each base, resolved and loaded at this job's layout."""
    from megatron_hdpissa.convert.pretrained import resolve_pretrained
    from megatron_hdpissa.models.gpt import build_gpt_model

    out = []
    for d in dirs:
        base = resolve_pretrained(d)
        model = build_gpt_model(base.model_config, parallel_output=False, seed=None, perform_initialization=False)
        base.load_into(model)
        out.append((base.kind, mlm.logits(model.eval(), tokens)))
    return out


def test_torch_dist_and_legacy_give_the_source_logits(checkpoints):
    root, ref = checkpoints["root"], checkpoints["ref"]
    for tp in (1, 2):  # resliced from TP=2 to 1, and at the saved TP
        dirs = [str(root / name) for name in ("dist", "legacy", "bridge")]
        results = run_distributed(_load_logits, tp, tp=tp, args=(dirs,))
        assert len(results[0]) == 3
        for kind, logits in results[0]:
            assert kind == "Megatron-LM"
            assert logits.shape == ref.shape == (2, 8, 49152)
            torch.testing.assert_close(logits, ref, rtol=0, atol=2e-6)


def test_legacy_pipeline_stages_are_joined_with_global_layer_numbers(checkpoints):
    """mp_rank_00_000 / _001: stage 1's local layer 0 is layer 1 of the model; the TE norm names
    and `_extra_state` are mapped back to the local spec."""
    from megatron_hdpissa.convert.pretrained import resolve_pretrained

    stage0, stage1 = checkpoints["stages"]
    base = resolve_pretrained(checkpoints["root"] / "legacy_pp")
    whole = base.state_dict(0, 1)
    expected = dict(stage0)
    expected.update({k.replace("decoder.layers.0.", "decoder.layers.1."): v for k, v in stage1.items()})
    got = {k: v for k, v in whole.items() if v is not None}
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_megatron_lm_args_map_to_the_model_config(checkpoints):
    from megatron_hdpissa.convert.megatron_lm_checkpoint import megatron_lm_model_config

    want = mlm.tiny_config()
    for name in ("dist", "legacy", "legacy_pp", "bridge"):
        got = megatron_lm_model_config(checkpoints["root"] / name)
        assert got.to_dict() == want.to_dict(), name


@pytest.mark.parametrize("name, value, message", [
    ("normalization", "LayerNorm", "args.normalization='LayerNorm'"),
    ("swiglu", False, "args.swiglu=False"),
    ("add_bias_linear", True, "args.add_bias_linear=True"),
    ("num_experts", 8, "args.num_experts=8"),
    ("position_embedding_type", "learned_absolute", "args.position_embedding_type"),
    ("padded_vocab_size", None, "args.padded_vocab_size is missing"),
])
def test_unmappable_args_are_one_error_naming_the_arg(name, value, message):
    from megatron_hdpissa.convert.megatron_lm_checkpoint import model_config_from_args

    args = mlm.megatron_lm_args(mlm.tiny_config(), 1, 1, "torch")
    assert model_config_from_args(args, "f.pt").num_query_groups == 2
    setattr(args, name, value)
    with pytest.raises(ValueError, match=f"^f.pt: {message}"):
        model_config_from_args(args, "f.pt")


def test_a_tensor_with_no_place_is_named(checkpoints, tmp_path):
    """A bias the args do not announce (add_bias_linear off) is refused, not dropped."""
    import shutil

    from megatron_hdpissa.convert.pretrained import resolve_pretrained

    src = checkpoints["root"] / "legacy"
    shutil.copytree(src, tmp_path / "ckpt")
    for t in range(2):
        path = tmp_path / "ckpt" / "iter_0000005" / f"mp_rank_{t:02d}" / "model_optim_rng.pt"
        state = torch.load(path, weights_only=False)
        state["model"]["decoder.layers.0.mlp.linear_fc2.bias"] = torch.zeros(64)
        torch.save(state, path)
    with pytest.raises(ValueError, match="'decoder.layers.0.mlp.linear_fc2.bias' has no place in the llama model"):
        resolve_pretrained(tmp_path / "ckpt").state_dict(0, 1)


# ---- nothing in their pickled state runs code --------------------------------------------------
class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


class Arbitrary:  # a plain class: rebuilding it needs its module imported, so it is refused too
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("payload, named", [(_Boom(), "posix.system"), (Arbitrary(), "Arbitrary")])
@pytest.mark.parametrize("layout", ["dist", "legacy"])
def test_code_or_an_arbitrary_class_in_the_state_is_refused(checkpoints, tmp_path, payload, named, layout):
    import shutil

    from megatron_hdpissa.convert.pretrained import resolve_pretrained

    shutil.copytree(checkpoints["root"] / layout, tmp_path / "ckpt")
    it = tmp_path / "ckpt" / "iter_0000005"
    path = it / "common.pt" if layout == "dist" else it / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["args"].evil = payload
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"refers to \\S*{named}, which a Megatron checkpoint never holds") as e:
        resolve_pretrained(tmp_path / "ckpt")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_the_allow_list_alone_admits_a_namespace(tmp_path):
    """In a fresh interpreter, without megatron-core imported (which registers its own safe
    globals with torch), the Namespace of Megatron-LM's args loads through our allow-list."""
    buf = io.BytesIO()
    torch.save({"args": argparse.Namespace(num_layers=2, params_dtype=torch.bfloat16), "iteration": 3}, buf)
    (tmp_path / "common.pt").write_bytes(buf.getvalue())
    code = ("import sys; from megatron_hdpissa.checkpoint.safe_load import load_common_state; "
            f"s = load_common_state({str(tmp_path)!r}); assert 'megatron.core' not in sys.modules; "
            "print(s['args'].num_layers, s['args'].params_dtype, s['iteration'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2", "torch.bfloat16", "3"]


# ---- an HF folder as the base ------------------------------------------------------------------
def _hf_vs_converted(hf_dir: str, converted: str, tokens):
    from tests.helpers.conversion import megatron_logits

    return _load_logits([hf_dir], tokens)[0], megatron_logits([converted], tokens)[0]


def test_hf_folder_at_tp2_equals_converting_first(tiny_llama_hf_dir, tmp_path):
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    tokens = [[t % 256 for t in row] for row in mlm.TOKENS]
    conv = convert_hf_to_megatron(tiny_llama_hf_dir, tmp_path / "conv", tp_size=2, progress=False)
    results = run_distributed(_hf_vs_converted, 2, tp=2, args=(str(tiny_llama_hf_dir), str(conv), tokens))
    for (kind, direct), first in results:
        assert kind == "Hugging Face" and direct.shape == first.shape == (2, 8, 256)
        assert torch.equal(direct, first)


def test_moe_hf_folder_at_ep2_equals_converting_first(tmp_path):
    """Qwen3-MoE at expert-parallel size 2: each rank reads its own two of the four experts."""
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
    from tests.helpers.hf_models import save_random_hf_model, tiny_moe_hf_config

    hf = save_random_hf_model(tiny_moe_hf_config("qwen3_moe", initializer_range=0.1), tmp_path / "hf", seed=4)
    conv = convert_hf_to_megatron(hf, tmp_path / "conv", tp_size=1, progress=False)
    tokens = [[t % 128 for t in row] for row in mlm.TOKENS]
    results = run_distributed(_hf_vs_converted, 2, tp=1, ep=2, args=(str(hf), str(conv), tokens))
    for (kind, direct), first in results:
        assert kind == "Hugging Face" and direct.shape == first.shape == (2, 8, 128)
        assert torch.equal(direct, first)


# ---- fine-tuning from them ------------------------------------------------------------------------
@pytest.mark.parametrize("name, tp", [("dist", 2), ("legacy_pp", 1), pytest.param("bridge", 1, marks=pytest.mark.slow),
                                      pytest.param("hf", 2, marks=pytest.mark.slow)])
def test_finetune_from_a_megatron_lm_checkpoint_or_hf_folder(checkpoints, gsm8k_path, name, tp):
    """Two steps from the Megatron-LM checkpoint (its args name the tokenizer folder) or the HF
    folder (its own tokenizer); the run's checkpoint is an ordinary one of ours (model_config.json
    from the args / config.json, the tokenizer)."""
    from megatron_hdpissa.data.gsm8k import split_gsm8k
    from megatron_hdpissa.data.sft import write_jsonl
    from megatron_hdpissa.models.config import ModelConfig

    root = checkpoints["root"]
    train, _ = split_gsm8k(str(gsm8k_path), num_heldout=319, seed=0)
    write_jsonl(train[:16], str(root / "train.jsonl"))
    save = root / f"run_{name}"
    argv = ["--pretrained-checkpoint", str(root / name), "--data-path", str(root / "train.jsonl"),
            "--tensor-model-parallel-size", str(tp), "--micro-batch-size", "2", "--seq-length", "256",
            "--train-iters", "2", "--hd-pissa-rank", "4", "--no-progress", "--save", str(save),
            "--export-hf", str(root / f"export_{name}")]
    results = run_distributed(finetune_main, 2, tp=tp, args=(argv,))
    assert torch.isfinite(torch.tensor(results[0]["train_loss"]))
    want = ModelConfig.from_hf(root / "hf") if name == "hf" else mlm.tiny_config()
    assert ModelConfig.load(save).to_dict() == want.to_dict()
    assert (save / "tokenizer" / "tokenizer.json").is_file()
    assert ModelConfig.from_hf(root / f"export_{name}").num_layers == 2  # the merged export
    assert (root / f"export_{name}" / "tokenizer.json").is_file()


# ---- the Megatron -> HF converter reads them too -------------------------------------------------
@pytest.mark.parametrize("name", ["dist", "legacy"])
def test_convert_megatron_lm_checkpoint_to_hf(checkpoints, tmp_path, name):
    """tools/convert_megatron_to_hf.py on the Megatron-LM checkpoint: transformers gives the
    source model's logits."""
    from tests.helpers.conversion import assert_logits_close, hf_logits
    from tests.helpers.tools import load_tool

    out = tmp_path / "hf"
    tool = load_tool("convert_megatron_to_hf")
    assert tool.main(["--megatron-dir", str(checkpoints["root"] / name), "--save", str(out), "--no-progress"]) == 0
    assert_logits_close(hf_logits(out, mlm.TOKENS), checkpoints["ref"], f"Megatron-LM {name} -> HF")
