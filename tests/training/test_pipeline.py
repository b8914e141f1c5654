"""Pipeline parallelism in the trainer, through megatron-core's schedules on real gloo process
groups and a real GPTModel (a tiny LLaMA with tied embeddings and SmolLM2's tokenizer): PP=2
gives the PP=1 losses and weights (HD-PiSSA, PiSSA, LoRA; with TP=2 and sequence parallelism too), the merged export of a
PP=2 run is the trained model in transformers, and bad PP input fails naming the flag."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import tiny_trainer_material
from tests.helpers.trainer import expect_error, expect_errors, finetune_main, flags


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_hf_dir, gsm8k_path):
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    m = tiny_trainer_material(
        tmp_path_factory.mktemp("pp"), smollm2_hf_dir, gsm8k_path, seed=11, num_train=48, num_heldout=6,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.05)
    m["base_tp2"] = convert_hf_to_megatron(m["hf"], m["root"] / "base_tp2", tp_size=2, progress=False)
    return m


def _argv(m, run: str, **over):
    args = {"--pretrained-checkpoint": m["base"], "--data-path": m["train"], "--valid-data-path": m["heldout"],
            "--micro-batch-size": 2, "--global-batch-size": 8, "--seq-length": 128, "--lr": 1e-2,
            "--lr-decay-style": "constant", "--hd-pissa-rank": 4, "--no-progress": None, "--seed": 3,
            "--train-iters": 3, "--save": m["root"] / run, "--log-json": m["root"] / f"{run}.jsonl",
            "--ckpt-format": "torch"}  # _merged_weights reads the legacy stage files
    args.update(over)
    return flags(args)


def _losses(m, run):
    return [json.loads(line)["loss"] for line in (m["root"] / f"{run}.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _merged_weights(save: Path, iteration: int, tp: int = 1, pp: int = 1) -> list[dict]:
    """Whole-model state dict of each TP rank of a training checkpoint (stages joined)."""
    from megatron_hdpissa.models.pipeline_stages import merge_pipeline_stages
    from megatron_hdpissa.models.config import ModelConfig

    it = save / f"iter_{iteration:07d}"
    out = []
    for t in range(tp):
        names = [f"mp_rank_{t:02d}"] if pp == 1 else [f"mp_rank_{t:02d}_{p:03d}" for p in range(pp)]
        stages = [torch.load(it / n / "model_optim_rng.pt", weights_only=True)["model"] for n in names]
        out.append(merge_pipeline_stages(stages, ModelConfig.load(save)))
    return out


def _assert_same_run(m, run_a, run_b, tp_b=1, pp_b=1, rel=1e-5, adapters_moved=False):
    """Identical logged losses; weights equal to `rel` of the update (TP shards compared whole)."""
    la, lb = _losses(m, run_a), _losses(m, run_b)
    assert len(la) == len(lb) == 3 and la == pytest.approx(lb, rel=1e-6, abs=1e-7), (la, lb)
    base = _merged_weights(m["base"], 0)[0]
    a = _merged_weights(m["root"] / run_a, 3)[0]
    shards = _merged_weights(m["root"] / run_b, 3, tp=tp_b, pp=pp_b)
    b = shards[0] if tp_b == 1 else {k: _join(k, [s[k] for s in shards], a[k]) if isinstance(a[k], torch.Tensor)
                                     else a[k] for k in a}
    assert set(a) == set(b)
    moved = 0
    for k in [k for k in a if isinstance(a[k], torch.Tensor)]:
        update = (a[k].double() - base[k].double()).norm()
        diff = (a[k].double() - b[k].double()).norm()
        assert diff <= rel * max(update, 1e-12) + 1e-7, (k, float(diff), float(update))
        moved += bool(update > 0)
    assert moved or adapters_moved, "nothing trained"  # LoRA leaves W and trains its adapters


def _join(key, shards, like):
    """Concatenate TP shards of a tensor along the dimension where they differ from the whole."""
    if shards[0].shape == like.shape:
        return shards[0]
    dim = next(d for d in range(like.dim()) if shards[0].shape[d] != like.shape[d])
    if "linear_fc1" in key:  # each TP rank holds [gate_t; up_t]
        halves = [s.chunk(2, 0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
    return torch.cat(shards, dim)  # QKV: whole query groups per rank, in order


def test_pp2_dp2_equals_pp1_dp2_and_export_matches(tiny):
    from transformers import AutoModelForCausalLM

    r1 = run_distributed(finetune_main, 2, 1, args=(_argv(tiny, "pp1"),))[0]
    export = tiny["root"] / "pp2_hf"
    r2 = run_distributed(finetune_main, 4, 1, args=(_argv(tiny, "pp2", **{"--pipeline-model-parallel-size": 2,
                                                                  "--export-hf": export}),), pp=2)[0]
    _assert_same_run(tiny, "pp1", "pp2", pp_b=2)
    assert r2["valid_loss_after"] == pytest.approx(r1["valid_loss_after"], rel=1e-6)
    # the merged export of the PP=2 run is the trained model (a PP=1 megatron model of its weights)
    tokens = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(0))
    ours = run_distributed(_logits, 1, 1, args=(tiny["root"] / "pp1", tokens))[0]
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max(), (ours - theirs).abs().max()


def _logits(ckpt_dir, tokens):
    from megatron_hdpissa.convert.load import load_gpt_model

    model, _ = load_gpt_model(ckpt_dir, parallel_output=False)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1])[None], attention_mask=None)


@pytest.mark.parametrize("method", ["pissa", "lora"])
def test_baselines_at_pp2(tiny, method):
    """The data-parallel baselines at PP=2 equal PP=1 (LoRA's A is drawn per global layer, so
    every pipeline layout starts from the same adapters)."""
    over = {"--peft": method, "--lr": 3e-3}
    run_distributed(finetune_main, 1, 1, args=(_argv(tiny, f"{method}1", **over),))
    run_distributed(finetune_main, 2, 1, args=(_argv(tiny, f"{method}2", **over, **{"--pipeline-model-parallel-size": 2}),),
                    pp=2)
    _assert_same_run(tiny, f"{method}1", f"{method}2", pp_b=2, adapters_moved=method == "lora")
    a, b = _adapters(tiny["root"] / f"{method}1", 3, 1), _adapters(tiny["root"] / f"{method}2", 3, 2)
    assert set(a) == set(b) and any(".lora.b." in k for k in a)
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-5 * a[k].norm() + 1e-8, k


def _adapters(save: Path, iteration: int, pp: int) -> dict:
    """The adapter tensors of DP rank 0 / TP rank 0, stages renumbered to global layers (the
    tiny model has one layer per stage at PP=2)."""
    out = {}
    for p in range(pp):
        name = "dp_000_tp_00" + (f"_pp_{p:03d}" if pp > 1 else "") + ".pt"
        state = torch.load(save / f"iter_{iteration:07d}" / "hd_pissa" / name, weights_only=True)["adapter"]
        for k, v in state.items():
            out[k.replace("decoder.layers.0.", f"decoder.layers.{p}.") if pp > 1 else k] = v
    return out


@pytest.fixture(scope="module")
def tp1_run(tiny):
    run_distributed(finetune_main, 1, 1, args=(_argv(tiny, "tp1"),))
    return "tp1"


@pytest.mark.parametrize("sp", [False, True], ids=["tp2pp2", "tp2pp2-sequence-parallel"])
def test_pp2_tp2_equals_tp1(tiny, tp1_run, sp):
    """PP=2 x TP=2 (with and without --sequence-parallel, and variable-length micro-batches
    crossing the stages) equals the TP=1 run."""
    run = "tp2pp2" + ("sp" if sp else "")
    run_distributed(finetune_main, 4, 2, args=(_argv(tiny, run, **{"--pipeline-model-parallel-size": 2,
                                                           "--tensor-model-parallel-size": 2,
                                                           "--sequence-parallel": None if sp else False,
                                                           "--pretrained-checkpoint": tiny["base_tp2"]}),),
                    pp=2)
    _assert_same_run(tiny, tp1_run, run, tp_b=2, pp_b=2, rel=1e-4)


def test_pp_must_divide_layers(tiny):
    # checked before any process group is created
    msg = expect_error(_argv(tiny, "bad", **{"--pipeline-model-parallel-size": 3}))
    assert "--pipeline-model-parallel-size 3 does not divide the 2 layers" in msg, msg


def test_sequence_parallel_and_recompute_flags_reach_the_model(tiny):
    from megatron_hdpissa.training.arguments import effective_pad_multiple, parse_args

    argv = _argv(tiny, "sp", **{"--tensor-model-parallel-size": 2, "--sequence-parallel": None,
                                "--pad-multiple": 3, "--recompute-granularity": "full",
                                "--recompute-method": "uniform", "--recompute-modules": None})
    args = parse_args(argv)
    assert effective_pad_multiple(args) == 6  # a multiple of TP under sequence parallelism
    assert args.recompute_modules == [] and args.recompute_num_layers is None
    msgs = run_distributed(expect_errors, 1, 1, args=([
        _argv(tiny, "sp1", **{"--sequence-parallel": None}),
        _argv(tiny, "rc", **{"--recompute-granularity": "full"}),
    ],))[0]
    assert "--sequence-parallel needs --tensor-model-parallel-size > 1" in msgs[0], msgs[0]
    assert "--recompute-method" in msgs[1], msgs[1]
