"""Qwen3-MoE, Mixtral and Qwen2-MoE (gated shared expert) through the converters: bit-exact round trips in both checkpoint formats,
the fused 3-D expert layout read, logits against transformers at TP=2, EP=2, expert-TP=2 and PP=2
(real gloo runs, the all-to-all token dispatcher), and unsupported variants."""
from __future__ import annotations

import pytest
import torch

from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_hdpissa.convert.load import load_megatron_state_dict
from megatron_hdpissa.models.config import ModelConfig
from tests.helpers.conversion import (assert_bit_exact, assert_logits_close, hf_logits, megatron_logits,
                                      pipeline_logits, random_ids, safetensors_folder)
from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import save_random_hf_model, tiny_moe_hf_config

# Qwen3-MoE with norm_topk_prob False (softmax over all experts, top-k not renormalised) and
# Mixtral (top-k renormalised): megatron-core's two softmax routers.
FAMILIES = {"qwen3_moe": dict(initializer_range=0.1, norm_topk_prob=False),
            "mixtral": dict(initializer_range=0.1, tie_word_embeddings=True),
            "qwen2_moe": dict(initializer_range=0.1, norm_topk_prob=True)}  # gated shared expert, q/k/v biases


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Per family: the HF folder and its conversions (legacy TP=1 / TP=2, torch_dist)."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for seed, (family, overrides) in enumerate(FAMILIES.items()):
        hf = save_random_hf_model(tiny_moe_hf_config(family, **overrides), root / f"{family}_hf", seed=seed)
        out[family] = {"hf": hf, **{
            name: convert_hf_to_megatron(hf, root / f"{family}_{name}", tp, progress=False, ckpt_format=fmt)
            for name, tp, fmt in (("tp1", 1, "torch"), ("tp2", 2, "torch"), ("dist", 1, "torch_dist"))}}
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact_in_both_formats(moe, family, tmp_path):
    hf = moe[family]["hf"]
    names = set(safetensors_folder(hf))
    assert {n for n in names if ".experts.3." in n}, "per-expert HF layout expected from save_pretrained"
    for name in ("tp2", "dist"):
        back = convert_megatron_to_hf(moe[family][name], tmp_path / name, progress=False)
        assert_bit_exact(hf, back)


def test_fused_expert_layout_reads_as_the_per_expert_one(moe, tmp_path):
    """transformers 5's module layout (experts fused as 3-D gate_up_proj / down_proj, router
    `mlp.gate`), written by hand from the per-expert tensors, converts to the same shards."""
    from safetensors.torch import save_file

    for family in FAMILIES:
        hf = moe[family]["hf"]
        config = ModelConfig.from_hf(hf)
        tensors = safetensors_folder(hf)
        qwen = ("mlp.gate", "mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")
        per_expert = {"qwen3_moe": qwen, "qwen2_moe": qwen,
                      "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.w1",
                                  "block_sparse_moe.experts.{e}.w3", "block_sparse_moe.experts.{e}.w2")}[family]
        router, gate, up, down = per_expert
        fused = {}
        for k, v in tensors.items():
            if ".experts." not in k and f".{router}." not in k:
                fused[k] = v
        for i in range(config.num_layers):
            layer = f"model.layers.{i}."

            def pop(name, e):
                return tensors[layer + name.format(e=e) + ".weight"]

            fused[layer + "mlp.gate.weight"] = tensors[layer + router + ".weight"]
            fused[layer + "mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([pop(gate, e), pop(up, e)]) for e in range(config.num_experts)])
            fused[layer + "mlp.experts.down_proj"] = torch.stack([pop(down, e) for e in range(config.num_experts)])
        folder = tmp_path / f"{family}_fused"
        folder.mkdir()
        save_file(fused, str(folder / "model.safetensors"))
        (folder / "config.json").write_bytes((hf / "config.json").read_bytes())
        converted = convert_hf_to_megatron(folder, tmp_path / f"{family}_fused_tp2", 2, progress=False)
        for rank in range(2):
            ours, ref = (load_megatron_state_dict(d, rank, 2) for d in (converted, moe[family]["tp2"]))
            assert sorted(ours) == sorted(ref)
            for k in ref:
                assert (ours[k] is None and ref[k] is None) or torch.equal(ours[k], ref[k]), (family, k)


def _save_dist_in_job(ckpt_dir, out_dir):
    """Load at this job's expert layout, then save torch_dist from every rank (collective)."""
    from megatron_hdpissa.checkpoint.dist import FORMAT_TAG, save_model_checkpoint
    from megatron_hdpissa.convert.load import load_gpt_model

    model, _ = load_gpt_model(ckpt_dir)
    save_model_checkpoint(model, out_dir, 0, common_state={"iteration": 0, "checkpoint_version": 3.0,
                                                           "format": FORMAT_TAG})


@pytest.mark.parametrize("ep,etp", [(2, None), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_torch_dist_saved_at_ep2_or_expert_tp2_converts_back_bit_exact(moe, ep, etp, tmp_path):
    """A legacy checkpoint loaded at EP=2 (or expert-TP=2: experts split by rows / columns) and
    saved as torch_dist by megatron-core from both ranks converts back to the original HF tensors."""
    for family in FAMILIES:
        out = tmp_path / family
        run_distributed(_save_dist_in_job, world_size=2, ep=ep, etp=etp, args=(str(moe[family]["tp1"]), str(out)))
        ModelConfig.load(moe[family]["tp1"]).save(out)
        assert_bit_exact(moe[family]["hf"], convert_megatron_to_hf(out, tmp_path / f"{family}_hf", progress=False))


def _export_in_job(ckpt_dir, out_dir):
    from megatron_hdpissa.convert.export import export_merged_hf
    from megatron_hdpissa.convert.load import load_gpt_model
    from megatron_hdpissa.distributed.groups import ParallelGroups
    from megatron_hdpissa.peft.common import HD_PISSA

    model, _ = load_gpt_model(ckpt_dir)
    export_merged_hf(model, ParallelGroups.from_megatron(), ckpt_dir, out_dir, HD_PISSA, log=lambda msg: None)


@pytest.mark.parametrize("tp,ep,etp", [(1, 2, None), (2, 2, 1), pytest.param(1, 1, 2, marks=pytest.mark.slow)])
def test_merged_export_from_ep_or_expert_tp_layouts_is_bit_exact(moe, tp, ep, etp, tmp_path):
    """The trainer's merged HF export gathers every expert back (each rank holds only its EP
    rank's experts, split by expert-TP): the untouched model exports to the original tensors."""
    for family in FAMILIES:
        out = tmp_path / family
        run_distributed(_export_in_job, world_size=2, tp=tp, ep=ep, etp=etp,
                        args=(str(moe[family]["tp2" if tp == 2 else "tp1"]), str(out)))
        assert_bit_exact(moe[family]["hf"], out)


# ---- logits against transformers (fp32) ---------------------------------------------------------
def _expert_layout_logits(ckpt_dirs, batches):
    """Each data-parallel rank feeds its own batch: the experts' ranks serve tokens of both, so a
    token sent back to the wrong rank by the dispatcher shows in the logits."""
    from megatron.core import parallel_state as ps

    layout = (ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
              ps.get_expert_tensor_parallel_world_size())
    dp_rank = ps.get_data_parallel_rank()
    return layout, dp_rank, megatron_logits(ckpt_dirs, batches[dp_rank])


@pytest.mark.parametrize("tp,ep,etp,checkpoints", [
    (2, 1, None, ("tp2", "dist")),   # TP=2, experts split over expert-TP = TP = 2
    (1, 2, None, ("tp1", "dist")),   # EP=2: two experts per rank, tokens through the all-to-all
    (1, 1, 2, ("tp1", "dist")),      # expert-TP=2 with TP=1
    pytest.param(2, 2, 1, ("tp2", "dist"), marks=pytest.mark.slow),  # TP=2 with EP=2 and expert-TP=1
])
def test_logits_match_hf_at_tp_ep_and_expert_tp(moe, tp, ep, etp, checkpoints):
    batches = [random_ids(128, (2, 12), seed=3), random_ids(128, (2, 12), seed=5)]
    dirs = [str(moe[f][c]) for f in FAMILIES for c in checkpoints]
    per_rank = run_distributed(_expert_layout_logits, world_size=2, tp=tp, ep=ep, etp=etp,
                               args=(dirs, batches))
    assert sorted(dp for _, dp, _ in per_rank) == ([0, 0] if tp == 2 else [0, 1])
    for rank, (layout, dp_rank, logits) in enumerate(per_rank):
        assert layout == (tp, ep, tp if etp is None else etp)
        for index, d in enumerate(dirs):
            family = next(f for f in FAMILIES if f in d)
            hf = hf_logits(moe[family]["hf"], batches[dp_rank])
            assert_logits_close(logits[index], hf, f"{d} TP={tp} EP={ep} ETP={etp} rank {rank}")
            assert (logits[index] - hf).abs().max().item() <= 1e-5 * hf.abs().max().item(), d


@pytest.mark.slow
def test_logits_match_hf_at_pp2(moe):
    token_ids = random_ids(128, (2, 12), seed=4)
    dirs = [str(moe[f][c]) for f in FAMILIES for c in ("tp1", "dist")]
    per_rank = run_distributed(pipeline_logits, world_size=2, pp=2, args=(dirs, token_ids))
    for index, d in enumerate(dirs):
        family = next(f for f in FAMILIES if f in d)
        (first, _, _), (last, _, layers) = (r[index] for r in per_rank)
        assert first is None and layers == 1
        assert_logits_close(last, hf_logits(moe[family]["hf"], token_ids), f"{d} PP=2")


# ---- configs the converters do not support --------------------------------------------------------
@pytest.mark.parametrize("family,overrides,field", [
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("qwen3_moe", {"num_experts_per_tok": 1, "norm_topk_prob": True}, "num_experts_per_tok=1"),
    ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok=5"),
    ("qwen3_moe", {"shared_expert_intermediate_size": 16}, "shared_expert_intermediate_size"),
    ("mixtral", {"router_bias": True}, "router_bias"),
    ("qwen2_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
    ("qwen3_moe", {"model_type": "deepseek_v3"}, "deepseek_v3"),
])
def test_unsupported_moe_variants_name_the_field(family, overrides, field):
    d = tiny_moe_hf_config(family).to_dict()
    d.update(overrides)
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf(d)


def test_moe_config_fields_and_expert_layout_errors():
    from megatron_hdpissa.distributed.groups import check_expert_layout
    from megatron_hdpissa.models.moe import validate_expert_parallel

    qwen = ModelConfig.from_hf(tiny_moe_hf_config("qwen3_moe", norm_topk_prob=True, router_aux_loss_coef=0.01))
    mixtral = ModelConfig.from_hf(tiny_moe_hf_config("mixtral", router_jitter_noise=0.1))
    assert (qwen.num_experts, qwen.moe_router_topk, qwen.ffn_hidden_size, qwen.moe_router_pre_softmax,
            qwen.moe_aux_loss_coeff, qwen.qk_layernorm) == (4, 2, 32, False, 0.01, True)
    assert (mixtral.num_experts, mixtral.ffn_hidden_size, mixtral.moe_router_pre_softmax,
            mixtral.moe_input_jitter_eps) == (4, 32, False, 0.1)
    assert ModelConfig.from_hf(tiny_moe_hf_config("qwen3_moe")).moe_router_pre_softmax  # norm_topk_prob False
    # built back without the stored config.json
    hf = ModelConfig.from_dict({**qwen.to_dict(), "hf_config": None}).to_hf_config()
    assert (hf.num_experts, hf.moe_intermediate_size, hf.norm_topk_prob) == (4, 32, True)
    with pytest.raises(ValueError, match="--expert-model-parallel-size 3 does not divide the 4 experts"):
        validate_expert_parallel(qwen, 1, 3)
    with pytest.raises(ValueError, match="--expert-tensor-parallel-size 3 does not divide the expert FFN"):
        validate_expert_parallel(qwen, 1, 1, 3)
    with pytest.raises(ValueError, match="need a mixture-of-experts model"):
        validate_expert_parallel(ModelConfig.from_dict({**qwen.to_dict(), "num_experts": None}), 1, 2)
    with pytest.raises(ValueError, match="--expert-tensor-parallel-size 2 x --expert-model-parallel-size 2"):
        check_expert_layout(2, 1, 1, 2, 2)
    check_expert_layout(4, 2, 1, 2, 2)
