"""Sequence parallelism and activation recompute on a real megatron-core GPTModel (multi-process,
gloo): the same run with SP off, and without recompute, is the independent computation."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed

SEQ, MICRO, STEPS, R, ALPHA, LR = 16, 2, 3, 2, 4.0, 1e-2


def _batches(vocab: int, dp_rank: int, steps: int, seq: int):
    gen = torch.Generator().manual_seed(100 + dp_rank)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (MICRO, seq + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def _adapted_model(ckpt: str, method: str, overrides: dict):
    from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, LowRankConfig, apply_hd_pissa, apply_lowrank
    from megatron_hdpissa.optimizer.data_parallel import DataParallelAdamW
    from megatron_hdpissa.convert.load import load_gpt_model

    model, _ = load_gpt_model(ckpt, **overrides)
    # "hd-pissa-norms" also trains every RMSNorm data-parallel: under SP each TP rank sees only
    # its tokens, so the norms' gradients must be summed over TP
    norms = ["input_layernorm", "pre_mlp_layernorm", "final_layernorm"] if method == "hd-pissa-norms" else []
    cfg = HDPiSSAConfig(rank=R, alpha=ALPHA, update_factors=method == "hd-pissa-moving",
                        consistency_check_interval=1, trainable_modules=norms)
    if method.startswith("hd-pissa"):
        apply_hd_pissa(model, cfg, progress=False)
        return model, HDPiSSAOptimizer(model, lr=LR)
    apply_lowrank(model, LowRankConfig(method, rank=R, alpha=ALPHA, trainable_modules=norms), progress=False)
    return model, DataParallelAdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def _loss(model, tokens, labels):
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels).mean()


def train(ckpt: str, method: str, overrides: dict, steps: int = STEPS, seq: int = SEQ):
    """Runs in each rank: `steps` optimizer steps on this DP rank's data; returns the local
    weights before/after, every step's trainable gradients, the losses and the final logits."""
    from megatron.core import parallel_state as ps

    torch.manual_seed(0)
    model, opt = _adapted_model(ckpt, method, overrides)
    batches = _batches(model.vocab_size, ps.get_data_parallel_rank(), steps, seq)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    grads, losses = [], []
    for tokens, labels in batches:
        loss = _loss(model, tokens, labels)
        loss.backward()
        # a parameter autograd never reached (recompute dropping it) counts as a zero gradient
        grads.append({n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                      for n, p in trainable.items()})
        losses.append(float(loss.detach()))
        opt.step()
        opt.zero_grad()
    after = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    tokens = batches[0][0]
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = model(input_ids=tokens, position_ids=pos, attention_mask=None).detach()
    return {"before": before, "after": after, "grads": grads, "losses": losses, "logits": logits,
            "tp_rank": ps.get_tensor_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank()}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _replicated(name: str) -> bool:
    """Replicated over TP: norms, column-parallel A, row-parallel B."""
    if name.endswith("layernorm.weight"):
        return True
    row = ".linear_proj." in name or ".linear_fc2." in name
    return (".b." in name) if row else (".a." in name)


def compare(sp_runs, ref_runs, grad_tol=1e-6, later_tol=1e-5, update_tol=1e-5):
    """Rank by rank (same TP/DP layout): gradients at every step, the weight update and the
    logits of the SP run against the reference run. The first step sees identical weights, so
    its gradients differ only by fp32 summation order (`grad_tol`); later steps start from
    weights that already differ by that round-off (`later_tol`)."""
    worst = {"grad0": 0.0, "grad": 0.0, "update": 0.0}
    for sp, ref in zip(sp_runs, ref_runs):
        for step, (g_sp, g_ref) in enumerate(zip(sp["grads"], ref["grads"])):
            for name in g_ref:
                if step == len(ref["grads"]) - 1:  # (LoRA's A has none at step 0: B starts at 0)
                    assert g_ref[name].norm() > 0, f"{name}: zero gradient in the reference (step {step})"
                err = _rel(g_sp[name], g_ref[name])
                key = "grad0" if step == 0 else "grad"
                worst[key] = max(worst[key], err)
                assert err < (grad_tol if step == 0 else later_tol), (
                    f"{name} step {step}: gradient differs by {err:.2e}")
        moved = 0
        for name, w_ref in ref["after"].items():
            d_ref = w_ref.double() - ref["before"][name].double()
            if d_ref.norm() == 0:
                continue
            moved += 1
            d_sp = sp["after"][name].double() - sp["before"][name].double()
            worst["update"] = max(worst["update"], _rel(d_sp, d_ref))
            assert _rel(d_sp, d_ref) < update_tol, f"{name}: update differs by {_rel(d_sp, d_ref):.2e}"
        assert moved > 0, "nothing was trained"
        assert sp["losses"] == pytest.approx(ref["losses"], rel=1e-6)
        assert _rel(sp["logits"], ref["logits"]) < 1e-5
    print("worst relative differences:", {k: f"{v:.1e}" for k, v in worst.items()})
    return worst


def check_replicated_identical(runs):
    """Tensors replicated over TP (factors, their gradients) are bit-identical across TP ranks."""
    by_dp = {}
    for run in runs:
        by_dp.setdefault(run["dp_rank"], []).append(run)
    checked = 0
    for group in by_dp.values():
        first = group[0]
        for other in group[1:]:
            for name in first["after"]:
                if _replicated(name) and (".hd_pissa." in name or ".lora." in name or "layernorm" in name):
                    assert torch.equal(first["after"][name], other["after"][name]), name
                    checked += 1
            for g0, g1 in zip(first["grads"], other["grads"]):
                for name in g0:
                    if _replicated(name):
                        assert torch.equal(g0[name], g1[name]), f"{name}: gradient differs across TP"
    assert checked > 0


def train_all(ckpt: str, runs: list, steps: int = STEPS, seq: int = SEQ):
    """Several independent trainings in one set of processes (spawning is the slow part)."""
    return [train(ckpt, method, overrides, steps, seq) for method, overrides in runs]


def _by_run(per_rank: list, index: int) -> list:
    return [rank_results[index] for rank_results in per_rank]


METHODS = ["hd-pissa", "hd-pissa-moving", "hd-pissa-norms", "lora", "pissa"]
RECOMPUTE = {
    "full-uniform": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    # block, 1 of 2 layers: layer 0 checkpointed, layer 1 not, so the loss still requires grad
    # and only layer 0's adapters would silently get nothing (the silent-zero case)
    "full-block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]},
}


@pytest.fixture(scope="module")
def llama_tp2(tiny_llama_hf_dir, tmp_path_factory):
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    return str(convert_hf_to_megatron(tiny_llama_hf_dir, tmp_path_factory.mktemp("sp") / "tp2", 2,
                                      progress=False))


@pytest.fixture(scope="module")
def sp_runs(llama_tp2):
    """TP=2 x DP=2: every method with and without --sequence-parallel."""
    runs = [(m, o) for m in METHODS for o in ({"sequence_parallel": True}, {})]
    per_rank = run_distributed(train_all, 4, 2, args=(llama_tp2, runs))
    return {(m, bool(o)): _by_run(per_rank, i) for i, (m, o) in enumerate(runs)}


@pytest.fixture(scope="module")
def recompute_runs(llama_tp2):
    """TP=2 x DP=1 with SP: HD-PiSSA under each recompute setting and without recompute."""
    runs = [("hd-pissa", {"sequence_parallel": True, **rc}) for rc in RECOMPUTE.values()]
    runs.append(("hd-pissa", {"sequence_parallel": True}))
    per_rank = run_distributed(train_all, 2, 2, args=(llama_tp2, runs, 2))
    return {name: _by_run(per_rank, i) for i, name in enumerate([*RECOMPUTE, "none"])}


@pytest.mark.parametrize("method", METHODS)
def test_sequence_parallel_matches_tp_tp2_dp2(sp_runs, method):
    """TP=2 x DP=2 with --sequence-parallel equals the same run without it, and factors
    replicated over TP stay bit-identical across TP ranks."""
    compare(sp_runs[(method, True)], sp_runs[(method, False)])
    check_replicated_identical(sp_runs[(method, True)])


@pytest.mark.parametrize("name", list(RECOMPUTE))
def test_recompute_gradients_equal_no_recompute(recompute_runs, name):
    """Adapter gradients under recompute equal those without it, the first checkpointed block's
    input (a frozen embedding's output) not requiring grad."""
    compare(recompute_runs[name], recompute_runs["none"], grad_tol=1e-6)


def test_sequence_parallel_smollm2_tp3_dp2(smollm2_hf_dir, tmp_path):
    """The real (truncated) SmolLM2 at TP=3 x DP=2: tied embeddings, 9 heads / 3 KV groups."""
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    ckpt = str(convert_hf_to_megatron(smollm2_hf_dir, tmp_path / "tp3", 3, progress=False))
    runs = [("hd-pissa", {"sequence_parallel": True}), ("hd-pissa", {})]
    per_rank = run_distributed(train_all, 6, 3, args=(ckpt, runs, 2, 24))
    compare(_by_run(per_rank, 0), _by_run(per_rank, 1))
    check_replicated_identical(_by_run(per_rank, 0))


@pytest.mark.parametrize("kwargs,flag", [
    (dict(tp_size=1, sequence_parallel=True), "--sequence-parallel needs --tensor-model-parallel-size"),
    (dict(tp_size=2, seq_length=15, sequence_parallel=True), "--seq-length 15 is not divisible"),
    (dict(recompute_method="uniform"), "--recompute-granularity"),
    (dict(recompute_granularity="partial"), "--recompute-granularity 'partial'"),
    (dict(recompute_granularity="full"), "--recompute-method"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=5),
     "--recompute-num-layers 5"),
    (dict(recompute_granularity="selective", recompute_num_layers=1), "selective takes no"),
])
def test_bad_parallelism_flags_name_the_flag(kwargs, flag):
    from megatron_hdpissa.models.gpt import parallelism_overrides

    args = dict(tp_size=2, seq_length=16, num_layers=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=flag.replace("(", r"\(")):
        parallelism_overrides(args.pop("tp_size"), args.pop("seq_length"), args.pop("num_layers"), **args)


def test_overrides_reach_transformer_config():
    from megatron_hdpissa.models.gpt import parallelism_overrides

    out = parallelism_overrides(2, 16, 4, pp_size=2, sequence_parallel=True,
                                recompute_granularity="full", recompute_method="block",
                                recompute_num_layers=2)
    assert out == {"sequence_parallel": True, "recompute_granularity": "full",
                   "recompute_method": "block", "recompute_num_layers": 2}
    with pytest.raises(ValueError, match="between 1 and the 2 layers"):
        parallelism_overrides(2, 16, 4, pp_size=2, recompute_granularity="full",
                              recompute_method="block", recompute_num_layers=3)
