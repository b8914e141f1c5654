"""Effective-rank tool: constructed deltas of known rank, the same numbers from HF folders and
Megatron checkpoints (TP=2, PP=2, and LoRA factors merged from a training checkpoint, constructed
and real), and the CLIs writing JSON and PNG."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_hdpissa.analysis import effective_rank as analysis
from tests.helpers.tools import load_tool

# Ranks of the deltas added to the tiny LLaMA (hidden 64, 8 heads / 4 KV groups of dim 8, FFN 96).
PLANTED = {"q_proj": 5, "k_proj": 1, "v_proj": 3, "o_proj": 7, "gate_proj": 2, "up_proj": 4, "down_proj": 6}


def _low_rank(m: int, n: int, k: int, seed: int, smallest: float = 1e-2) -> torch.Tensor:
    """An m x n matrix of rank k with singular values spread from 1 down to `smallest`."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, np.log10(smallest), k, dtype=torch.float64) if k > 1 else torch.ones(1, dtype=torch.float64)
    return (u * s) @ v.t()


# ---- the mathematics, against numpy ------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 40), (96, 32), (32, 96)])
def test_singular_values_and_rank_of_constructed_deltas(shape):
    m, n = shape
    for k in (1, 4, 17):
        delta = _low_rank(m, n, k, seed=k)
        ours = analysis.singular_values(delta.float())
        theirs = np.linalg.svd(delta.float().double().numpy(), compute_uv=False)
        assert np.allclose(ours.numpy(), theirs, rtol=0, atol=1e-9 * theirs[0])
        assert analysis.effective_rank(ours) == k
    # values straddling the threshold: 1, 5e-3, 2e-3 count; 5e-4 and 1e-4 do not
    u = torch.linalg.qr(torch.randn(m, 5, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, 5, dtype=torch.float64)).Q
    delta = (u * torch.tensor([1.0, 5e-3, 2e-3, 5e-4, 1e-4], dtype=torch.float64)) @ v.t()
    sigma = analysis.singular_values(delta)
    assert analysis.effective_rank(sigma, 1e-3) == 3
    assert analysis.effective_rank(sigma, 1e-2) == 1
    assert analysis.effective_rank(analysis.singular_values(torch.zeros(m, n))) == 0
    with pytest.raises(ValueError, match="--threshold"):
        analysis.effective_rank(sigma, 1.5)


# ---- HF folders and Megatron checkpoints -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_llama_hf_dir):
    """Base and fine-tuned tiny LLaMA (known-rank deltas per projection), as HF folders and as
    Megatron TP=2 checkpoints."""
    from safetensors.torch import load_file, save_file

    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("analysis")
    tensors = load_file(str(next(Path(tiny_llama_hf_dir).glob("*.safetensors"))))
    ft_dir = root / "ft_hf"
    ft_dir.mkdir()
    deltas = {}
    for i in range(2):
        for j, (proj, k) in enumerate(PLANTED.items()):
            name = analysis.hf_weight_name(i, proj)
            w = tensors[name]
            deltas[name] = 1e-2 * _low_rank(*w.shape, k, seed=10 * i + j)
            tensors[name] = (w.double() + deltas[name]).float()
    save_file(tensors, str(ft_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(Path(tiny_llama_hf_dir) / "config.json", ft_dir / "config.json")
    base_mg = convert_hf_to_megatron(tiny_llama_hf_dir, root / "base_mg", tp_size=2, progress=False)
    ft_mg = convert_hf_to_megatron(ft_dir, root / "ft_mg", tp_size=2, progress=False)
    return {"root": root, "base_hf": Path(tiny_llama_hf_dir), "ft_hf": ft_dir, "base_mg": base_mg,
            "ft_mg": ft_mg, "deltas": deltas}


def _ranks(summary, name):
    return {m["name"]: m["effective_rank"] for m in summary["checkpoints"][name]["matrices"]}


def test_hf_and_megatron_inputs_give_the_same_numbers(tiny):
    assert analysis.detect_format(tiny["base_hf"]) == "hf"
    assert analysis.detect_format(tiny["ft_mg"]) == "megatron"
    summary, results = analysis.analyse(tiny["base_hf"], {"hf": tiny["ft_hf"]})
    summary_mg, results_mg = analysis.analyse(tiny["base_mg"], {"mg": tiny["ft_mg"], "mixed": tiny["ft_hf"]})
    expected = {name: PLANTED[name.split(".")[-2]] for name in tiny["deltas"]}
    assert _ranks(summary, "hf") == expected
    assert _ranks(summary_mg, "mg") == expected and _ranks(summary_mg, "mixed") == expected
    for a, b in zip(results["hf"], results_mg["mg"]):
        assert a.name == b.name and torch.allclose(a.sigma, b.sigma, rtol=0, atol=1e-9)
        # the planted delta's own spectrum (independent of the checkpoint code), up to fp32 storage
        planted = np.linalg.svd(tiny["deltas"][a.name].numpy(), compute_uv=False)
        assert np.allclose(a.sigma.numpy()[:len(planted)], planted, rtol=0, atol=1e-5 * planted[0])
    assert summary["threshold"] == 1e-3 and "above 0.001 x the largest" in summary["definition"]
    assert summary["checkpoints"]["hf"]["by_projection"]["o_proj"]["mean"] == 7


def _fake_lora_checkpoint(tiny, rank: int, alpha: float) -> tuple[Path, dict]:
    """A --peft lora --save folder at TP=2 with random factors, laid out as the trainer writes it;
    returns it and the expected HF-space deltas s * B_full @ A_full, computed independently."""
    from megatron_hdpissa.peft.hd_pissa.config import HDPiSSAConfig

    src, dst = tiny["base_mg"], tiny["root"] / f"lora_r{rank}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    (dst / "iter_0000000" / "hd_pissa").mkdir()
    meta = {"peft": "lora", "dp_size": 1, "tp_size": 2, "virtual_ranks": 1, "rank": rank,
            "config": HDPiSSAConfig(rank=rank, alpha=alpha).to_dict()}
    (dst / "iter_0000000" / "hd_pissa" / "meta.json").write_text(json.dumps(meta))
    g = torch.Generator().manual_seed(3)
    h, q, kv, ffn, tp, s = 64, 64, 32, 96, 2, alpha / rank
    adapters, expected = [{}, {}], {}
    for i in range(2):
        for part, m, layer in (("q", q, "self_attention.linear_qkv"), ("k", kv, "self_attention.linear_qkv"),
                               ("v", kv, "self_attention.linear_qkv"), ("gate", ffn, "mlp.linear_fc1"),
                               ("up", ffn, "mlp.linear_fc1")):
            a, b = torch.randn(rank, h, generator=g), torch.randn(m, rank, generator=g)
            for t in range(tp):  # column parallel: A replicated, B's rows sharded
                adapters[t][f"decoder.layers.{i}.{layer}.lora.a.{part}"] = a
                adapters[t][f"decoder.layers.{i}.{layer}.lora.b.{part}"] = b[t * m // tp:(t + 1) * m // tp]
            proj = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "gate": "gate_proj", "up": "up_proj"}[part]
            expected[analysis.hf_weight_name(i, proj)] = s * b.double() @ a.double()
        for proj, n, layer in (("o_proj", q, "self_attention.linear_proj"), ("down_proj", ffn, "mlp.linear_fc2")):
            a, b = torch.randn(rank, n, generator=g), torch.randn(h, rank, generator=g)
            for t in range(tp):  # row parallel: A's columns sharded, B replicated
                adapters[t][f"decoder.layers.{i}.{layer}.lora.a.w"] = a[:, t * n // tp:(t + 1) * n // tp]
                adapters[t][f"decoder.layers.{i}.{layer}.lora.b.w"] = b
            expected[analysis.hf_weight_name(i, proj)] = s * b.double() @ a.double()
    for t in range(tp):
        torch.save({"adapter": adapters[t], "iteration": 0},
                   dst / "iter_0000000" / "hd_pissa" / f"dp_000_tp_{t:02d}.pt")
    return dst, expected


def test_lora_training_checkpoint_factors_are_merged(tiny):
    ckpt_dir, expected = _fake_lora_checkpoint(tiny, rank=3, alpha=6.0)
    base = analysis.open_checkpoint(tiny["base_hf"])
    merged = analysis.open_checkpoint(ckpt_dir)
    assert "merged" in merged.description
    for name, delta in expected.items():
        got = merged.weight(name).double() - base.weight(name).double()
        assert torch.allclose(got, delta, rtol=0, atol=1e-5 * delta.abs().max()), name
    summary, _ = analysis.analyse(tiny["base_hf"], {"lora": ckpt_dir})
    assert set(_ranks(summary, "lora").values()) == {3}
    unmerged, _ = analysis.analyse(tiny["base_hf"], {"lora": ckpt_dir}, merge_adapters=False)
    assert set(_ranks(unmerged, "lora").values()) == {0}  # W_res of LoRA is W_0


# ---- pipeline-parallel checkpoints ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pp(tiny):
    """The base and fine-tuned tiny LLaMA as TP=2 x PP=2 checkpoints (one layer per stage)."""
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    return {name: convert_hf_to_megatron(tiny[src], tiny["root"] / name, tp_size=2, pp_size=2, progress=False)
            for name, src in (("base_pp", "base_hf"), ("ft_pp", "ft_hf"))}


def test_pipeline_parallel_checkpoints_give_the_same_numbers(tiny, tiny_pp):
    summary, results = analysis.analyse(tiny_pp["base_pp"], {"pp": tiny_pp["ft_pp"], "tp": tiny["ft_mg"]})
    expected = {name: PLANTED[name.split(".")[-2]] for name in tiny["deltas"]}
    assert _ranks(summary, "pp") == expected and _ranks(summary, "tp") == expected
    assert "TP=2, PP=2" in summary["checkpoints"]["pp"]["source"]
    for a, b in zip(results["pp"], results["tp"]):
        assert a.name == b.name and torch.equal(a.sigma, b.sigma)
    # the CLI reads them too
    tool = load_tool("effective_rank")
    out = tiny["root"] / "rank_pp.json"
    assert tool.main(["--base", str(tiny_pp["base_pp"]), "--finetuned", f"pp={tiny_pp['ft_pp']}",
                      "--layers", "1", "--json", str(out)]) == 0
    got = {m["name"]: m["effective_rank"] for m in json.loads(out.read_text())["checkpoints"]["pp"]["matrices"]}
    assert got == {k: v for k, v in expected.items() if k.startswith("model.layers.1.")}


def test_lora_training_checkpoint_saved_in_stages_is_merged(tiny, tiny_pp):
    """The same factors as the TP=2 fake LoRA checkpoint, laid out as the trainer saves them at
    TP=2 x PP=2: model files per (TP, stage), adapter files per (TP, stage) named by
    checkpointing.rank_file, layers numbered per stage (layer i -> stage i, local layer 0)."""
    from megatron_hdpissa.checkpoint.trainer_legacy import rank_file
    from megatron_hdpissa.distributed.groups import ParallelGroups

    def groups(t, p):
        return ParallelGroups(None, None, tp_rank=t, tp_size=2, dp_rank=0, dp_size=1, pp_rank=p, pp_size=2)

    iter_dir = tiny_pp["base_pp"] / "iter_0000000"
    if rank_file(iter_dir, groups(0, 0)) == rank_file(iter_dir, groups(0, 1)):
        pytest.skip("checkpointing.rank_file does not name pipeline stages yet")
    flat_dir, expected = _fake_lora_checkpoint(tiny, rank=2, alpha=4.0)
    dst = tiny["root"] / "lora_pp"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(tiny_pp["base_pp"], dst)
    (dst / "iter_0000000" / "hd_pissa").mkdir()
    shutil.copy2(flat_dir / "iter_0000000" / "hd_pissa" / "meta.json", dst / "iter_0000000" / "hd_pissa")
    for t in range(2):
        adapter = torch.load(flat_dir / "iter_0000000" / "hd_pissa" / f"dp_000_tp_{t:02d}.pt")["adapter"]
        for p in range(2):
            prefix = f"decoder.layers.{p}."
            local = {"decoder.layers.0." + k[len(prefix):]: v for k, v in adapter.items() if k.startswith(prefix)}
            torch.save({"adapter": local, "iteration": 0}, rank_file(dst / "iter_0000000", groups(t, p)))
    base = analysis.open_checkpoint(tiny["base_hf"])
    merged = analysis.open_checkpoint(dst)
    assert "merged" in merged.description and "PP=2" in merged.description
    for name, delta in expected.items():
        got = merged.weight(name).double() - base.weight(name).double()
        assert torch.allclose(got, delta, rtol=0, atol=1e-5 * delta.abs().max()), name


# ---- a real LoRA run of the trainer: its --save folder against its merged --export-hf ---------
@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_real_lora_checkpoint_agrees_with_its_export(tmp_path, smollm2_hf_dir, gsm8k_path, ckpt_format):
    """A tiny LLaMA with SmolLM2's tokenizer, 2 LoRA steps: the analysis of the training
    checkpoint (factors merged) equals that of the trainer's merged export, rank r everywhere."""
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
    from megatron_hdpissa.data.gsm8k import split_gsm8k
    from megatron_hdpissa.data.sft import write_jsonl
    from tests.helpers.distributed import run_distributed
    from tests.helpers.hf_models import tiny_llama_with_smollm2_tokenizer
    from tests.helpers.trainer import finetune_main

    hf = tiny_llama_with_smollm2_tokenizer(
        tmp_path / "hf", smollm2_hf_dir, seed=5, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base = convert_hf_to_megatron(hf, tmp_path / "base", progress=False, ckpt_format="torch_dist")
    train, _ = split_gsm8k(str(gsm8k_path), num_heldout=319, seed=0)
    write_jsonl(train[:4], str(tmp_path / "train.jsonl"))
    argv = ["--pretrained-checkpoint", str(base), "--data-path", str(tmp_path / "train.jsonl"),
            "--peft", "lora", "--hd-pissa-rank", "2", "--hd-pissa-alpha", "8", "--micro-batch-size", "1",
            "--global-batch-size", "2", "--seq-length", "160", "--train-iters", "2", "--lr", "1e-2",
            "--save", str(tmp_path / "run"), "--export-hf", str(tmp_path / "export"), "--no-progress",
            "--ckpt-format", ckpt_format, "--tensor-model-parallel-size", "2"]
    run_distributed(finetune_main, 2, 2, args=(argv,))
    summary, results = analysis.analyse(hf, {"export": tmp_path / "export", "ckpt": tmp_path / "run"},
                                        reference="export")
    assert set(_ranks(summary, "export").values()) == {2}
    assert _ranks(summary, "ckpt") == _ranks(summary, "export")
    for a, b in zip(results["export"], results["ckpt"]):
        assert torch.allclose(a.sigma, b.sigma, rtol=0, atol=1e-6 * float(a.sigma[0])), a.name
    # the converter merges the factors too (it used to export W without them)
    from safetensors.torch import load_file

    from megatron_hdpissa.convert.hf_megatron import convert_megatron_to_hf

    convert_megatron_to_hf(tmp_path / "run", tmp_path / "converted", progress=False)
    want, got = load_file(tmp_path / "export" / "model.safetensors"), load_file(tmp_path / "converted" / "model.safetensors")
    assert set(want) == set(got)
    for name, w in want.items():
        assert torch.allclose(got[name], w, rtol=0, atol=1e-6 * float(w.abs().max())), name


# ---- the command-line tools --------------------------------------------------------------------
def test_cli_writes_json_and_png(tiny, tmp_path, capsys):
    from megatron_hdpissa.analysis.plotting import read_log_json

    out_json, out_png = tmp_path / "rank.json", tmp_path / "spectra.png"
    rc = load_tool("effective_rank").main([
        "--base", str(tiny["base_hf"]), "--finetuned", f"planted={tiny['ft_mg']}", f"again={tiny['ft_hf']}",
        "--reference", "planted", "--json", str(out_json), "--plot", str(out_png), "--layers", "1"])
    assert rc == 0
    summary = json.loads(out_json.read_text())
    assert summary["threshold"] == 1e-3 and "above 0.001 x the largest" in summary["definition"]
    assert summary["checkpoints"]["planted"]["aggregate"]["count"] == 7
    assert summary["checkpoints"]["planted"]["aggregate"]["max"] == 7
    assert summary["ratio_to_reference"]["again"]["ratio_of_means"] == 1.0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| planted |" in printed and "0.001" in printed
    assert load_tool("effective_rank").main(["--base", str(tmp_path), "--finetuned", f"x={tmp_path}"]) == 1

    log = tmp_path / "run.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in (
        {"iteration": 1, "loss": 2.0, "lr": 1e-4, "tokens_per_s": 10.0}, {"iteration": 2, "loss": 1.5},
        {"iteration": 2, "valid_loss": 1.7})))
    curves = tmp_path / "curves.png"
    assert load_tool("plot_curves").main([f"a={log}", str(log), "--out", str(curves), "--smooth", "2"]) == 0
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parsed = read_log_json(log)
    assert parsed["train"] == [(1, 2.0), (2, 1.5)] and parsed["valid"] == [(2, 1.7)]
