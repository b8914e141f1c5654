"""megatron-core MoE layers from build_gpt_model on CPU / gloo: the all-to-all token dispatcher's
forward and backward at EP=2 and expert-TP=2 against the same model at EP=1 (real multi-process runs)."""
from __future__ import annotations

import pytest
import torch

from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
from tests.helpers.conversion import random_ids
from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import save_random_hf_model, tiny_moe_hf_config

EXPERT = "mlp.experts.local_experts."


def _close(grad, want, what: str) -> None:
    """fp32 sums in another order: within 1e-5 of the tensor's largest entry."""
    scale = want.abs().max().item()
    err = (grad - want).abs().max().item()
    assert grad.shape == want.shape and err <= 1e-5 * scale, f"{what}: max |diff| {err:.3g}, scale {scale:.3g}"


@pytest.fixture(scope="module")
def qwen3_moe_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_model")
    hf = save_random_hf_model(tiny_moe_hf_config("qwen3_moe", initializer_range=0.1, norm_topk_prob=True),
                              root / "hf", seed=7)
    return convert_hf_to_megatron(hf, root / "base", 1, progress=False, ckpt_format="torch_dist")


def _grads(base, batches, dispatcher):
    """Gradients of one train-mode forward / backward on this data-parallel rank's batch (the
    loss weighs the logits with fixed random weights), expert tensors keyed by global expert id."""
    from megatron.core import parallel_state as ps

    from megatron_hdpissa.convert.load import load_gpt_model

    model, config = load_gpt_model(base, parallel_output=False, moe_token_dispatcher_type=dispatcher,
                                   moe_aux_loss_coeff=0.0)
    model.train()
    ids = torch.tensor(batches[ps.get_data_parallel_rank()])
    logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    (logits * weights).sum().backward()
    local = config.num_experts // ps.get_expert_model_parallel_world_size()
    out = {}
    for name, param in model.named_parameters():
        if EXPERT in name:
            head, tail = name.split(EXPERT)
            j, rest = tail.split(".", 1)
            name = f"{head}{EXPERT}{ps.get_expert_model_parallel_rank() * local + int(j)}.{rest}"
        out[name] = param.grad.clone()
    return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(), out


@pytest.mark.parametrize("dispatcher", ["alltoall", pytest.param("allgather", marks=pytest.mark.slow)])
def test_expert_gradients_at_ep2_and_expert_tp2_match_ep1(qwen3_moe_base, dispatcher):
    """EP=1, DP=2: each rank's experts see its own tokens; at EP=2 an expert's one replica serves
    both ranks' tokens, so its gradient is the sum of the two EP=1 gradients (dense and router
    gradients stay per rank). At expert-TP=2 each rank holds its rows of fc1's gate and up and
    its columns of fc2 of that sum."""
    batches = [random_ids(128, (2, 10), seed=11), random_ids(128, (2, 10), seed=12)]
    ep1 = run_distributed(_grads, world_size=2, args=(str(qwen3_moe_base), batches, dispatcher))
    ep2 = run_distributed(_grads, world_size=2, ep=2, args=(str(qwen3_moe_base), batches, dispatcher))
    etp2 = run_distributed(_grads, world_size=2, etp=2, args=(str(qwen3_moe_base), batches, dispatcher))
    summed = {k: ep1[0][2][k] + ep1[1][2][k] for k in ep1[0][2] if EXPERT in k}
    assert len(summed) == 2 * 4 * 2  # layers x experts x (fc1, fc2)
    for rank in range(2):
        grads = ep2[rank][2]
        assert sum(EXPERT in k for k in grads) == 2 * 2 * 2  # two experts per rank
        for name, grad in grads.items():
            want = summed[name] if EXPERT in name else ep1[rank][2][name]
            _close(grad, want, f"EP=2 rank {rank} {name}")
        etp_rank, etp_size, grads = etp2[rank]
        assert etp_size == 2
        for name, grad in grads.items():
            if EXPERT not in name:
                _close(grad, ep1[rank][2][name], f"ETP=2 rank {rank} {name}")
                continue
            full = summed[name]
            if "linear_fc1" in name:  # [gate rows; up rows] of this expert-TP rank
                gate, up = full.chunk(2, dim=0)
                want = torch.cat([gate.chunk(2, dim=0)[etp_rank], up.chunk(2, dim=0)[etp_rank]])
            else:
                want = full.chunk(2, dim=1)[etp_rank]
            _close(grad, want, f"ETP=2 rank {rank} {name}")


def test_trainer_moe_flags_are_checked_against_the_model():
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.moe import moe_overrides

    qwen = ModelConfig.from_hf(tiny_moe_hf_config("qwen3_moe", router_aux_loss_coef=0.01))
    dense = ModelConfig.from_dict({**qwen.to_dict(), "num_experts": None})
    assert moe_overrides(qwen, tp_size=1, ep_size=2, num_experts=4, router_topk=2) == {}
    assert moe_overrides(qwen, tp_size=2, sequence_parallel=True, aux_loss_coeff=0.0) == {
        "moe_aux_loss_coeff": 0.0, "moe_router_load_balancing_type": "none"}
    for kwargs, message in (
            (dict(tp_size=1, num_experts=8), "--num-experts 8 disagrees with the checkpoint's qwen3_moe model"),
            (dict(tp_size=1, router_topk=1), "--moe-router-topk 1 disagrees"),
            (dict(tp_size=2), "needs --sequence-parallel"),
            (dict(tp_size=1, aux_loss_coeff=-1.0), "--moe-aux-loss-coeff must be >= 0"),
            (dict(tp_size=1, ep_size=8), "--expert-model-parallel-size 8 does not divide the 4 experts")):
        with pytest.raises(ValueError, match=message):
            moe_overrides(qwen, **kwargs)
    with pytest.raises(ValueError, match="--num-experts: this qwen3_moe model is dense"):
        moe_overrides(dense, tp_size=1, num_experts=4)
    with pytest.raises(ValueError, match="--expert-model-parallel-size / --expert-tensor-parallel-size need"):
        moe_overrides(dense, tp_size=1, ep_size=2)
    assert moe_overrides(dense, tp_size=2, etp_size=2) == {}


def test_expert_layouts_a_job_cannot_save_or_run_are_refused():
    import argparse

    from megatron_hdpissa.models.moe import check_expert_job_flags

    def args(**kw):
        base = dict(save="/ckpt", ckpt_format="torch", pad_to_max_length=False)
        return argparse.Namespace(**{**base, **kw})

    # A legacy save at EP > 1 would keep expert-parallel rank 0's experts only.
    with pytest.raises(ValueError, match="--ckpt-format torch cannot save.*--expert-model-parallel-size 2"):
        check_expert_job_flags(args(), ep_size=2, etp_size=1, tp_size=1, backend="nccl")
    with pytest.raises(ValueError, match="--expert-tensor-parallel-size 2"):
        check_expert_job_flags(args(), ep_size=1, etp_size=2, tp_size=1, backend="nccl")
    check_expert_job_flags(args(ckpt_format="torch_dist"), ep_size=2, etp_size=1, tp_size=1, backend="nccl")
    check_expert_job_flags(args(save=None), ep_size=2, etp_size=1, tp_size=1, backend="nccl")
    check_expert_job_flags(args(), ep_size=1, etp_size=2, tp_size=2, backend="nccl")
    # gloo's all-gather takes equal sizes only: expert-TP over gloo needs fixed-length rows.
    with pytest.raises(ValueError, match="--expert-tensor-parallel-size 2 over gloo.*--pad-to-max-length"):
        check_expert_job_flags(args(save=None), ep_size=1, etp_size=2, tp_size=1, backend="gloo")
    check_expert_job_flags(args(save=None, pad_to_max_length=True), ep_size=1, etp_size=2, tp_size=1,
                           backend="gloo")
    check_expert_job_flags(args(save=None), ep_size=1, etp_size=2, tp_size=1, backend="nccl")
