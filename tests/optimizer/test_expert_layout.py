"""HD-PiSSA on MoE experts does not change with the expert layout: the same processes, K and data
give the same weights after 3 steps at EP = 1 and EP = 2, and at expert-TP = 2 as at expert-TP = 1
(real gloo runs: one megatron-core MoE layer with the all-to-all dispatcher at DP = 2, and at DP = 4
with EP = 2 x expert-TP = 2; a tiny Qwen3-MoE GPT at DP = 2)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import moe_layer as ml
from tests.helpers.distributed import run_distributed

STEPS, R, LR = 3, 2, 1e-2


def _train(ep: int, etp: int, virtual: int, clip: float, master_weights: str, dtype=torch.float32, ddp=False,
           experts: int = ml.EXPERTS):
    from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa
    from megatron_hdpissa.distributed.groups import ParallelGroups
    from megatron_hdpissa.peft.hd_pissa.model import active_slice

    g = ParallelGroups.from_megatron()
    topk = ml.TOPK if experts > ml.TOPK else 1  # two experts: top-1, so the sources' counts differ
    block = ml.MoEBlock(ep, etp, ml.logical_weights(0), dtype, num_moe_experts=experts, moe_router_topk=topk,
                        moe_router_pre_softmax=topk == 1)
    apply_hd_pissa(block, HDPiSSAConfig(rank=R, target_modules=("linear_fc1", "linear_fc2"), virtual_ranks=virtual,
                                        consistency_check_interval=1, master_weights=master_weights), progress=False)
    model = block
    if ddp:  # megatron-core DDP: the factors' gradients come from its (one-rank expert-DP) buffers
        from megatron_hdpissa.distributed.ddp import wrap_ddp

        model = wrap_ddp(block)
    opt = HDPiSSAOptimizer(model, lr=LR, weight_decay=0.01, clip_grad=clip)
    opt.track_grad_norm = True
    norms = []
    for step in range(STEPS):
        for v in range(virtual):
            with active_slice(block, v):
                x, r = ml.shard_input(g.dp_rank * virtual + v, micro=step)
                if experts == 2:
                    x = _forced_routing(x, FIRST_EXPERT_TOKENS[g.dp_rank])
                (model(x.to(dtype)) * r.to(dtype)).sum().backward()
        if ddp:
            model.finish_grad_sync()
        opt.step()
        opt.zero_grad()
        norms.append(opt.last_grad_norm)
    opt.finish_param_gather()
    disp = block.mlp.token_dispatcher
    return {"etp_rank": disp.tp_rank, "etp": disp.tp_size, "weights": block.local_weights(), "norms": norms}


# two experts, top-1: tokens of data shard d sent to expert 0. gloo's all-gather needs equal sizes,
# so each expert-TP rank must receive as many rows as its peer (shards 0 + 2 = 1 + 3, the sources
# of the two expert-TP ranks), while every source's count differs
FIRST_EXPERT_TOKENS = (4, 10, 8, 2)


def _forced_routing(x: torch.Tensor, first: int) -> torch.Tensor:
    """`x` with its component along router[0] - router[1] replaced, so that exactly its first
    `first` tokens (in megatron-core's flattened order) prefer expert 0."""
    w = ml.logical_weights(0)["router"]
    d = w[0] - w[1]
    flat = x.reshape(-1, x.shape[-1])
    sign = torch.where(torch.arange(flat.shape[0]) < first, 1.0, -1.0)
    flat = flat - (flat @ d / d.dot(d))[:, None] * d + (sign * 0.5 / d.norm())[:, None] * d
    return flat.reshape(x.shape)


def _full(results) -> dict[int, dict[str, torch.Tensor]]:
    """Every expert's full fc1 ([gate; up]) and fc2, assembled from the ranks' expert-TP shards."""
    shards: dict = {}
    for res in results:
        for e, w in res["weights"].items():
            shards.setdefault(e, {})[res["etp_rank"]] = w
    full = {}
    for e, by_t in shards.items():
        parts = [by_t[t] for t in sorted(by_t)]
        f = ml.FFN // len(parts)
        gate = torch.cat([p["fc1"][:f] for p in parts])
        up = torch.cat([p["fc1"][f:] for p in parts])
        full[e] = {"fc1": torch.cat([gate, up]), "fc2": torch.cat([p["fc2"] for p in parts], 1)}
    return full


def _base(experts: int = ml.EXPERTS):
    w = ml.logical_weights(0)
    return {e: {"fc1": torch.cat([w["gate"][e], w["up"][e]]), "fc2": w["down"][e]} for e in range(experts)}


def _compare(a, b) -> tuple[float, float]:
    """max |W_a - W_b| over every expert weight, relative to the largest entry of the update
    W_a - W_0, and in units of fp32 round-off of the largest weight (eps_32 max |W|)."""
    base = _base(len(a))
    keys = [(e, k) for e in base for k in ("fc1", "fc2")]
    diff = max(float((a[e][k] - b[e][k]).abs().max()) for e, k in keys)
    update = max(float((a[e][k] - base[e][k]).abs().max()) for e, k in keys)
    w_max = max(float(a[e][k].abs().max()) for e, k in keys)
    assert update > 1e-3  # the experts did train
    return diff / update, diff / (torch.finfo(torch.float32).eps * w_max)


def _run(ep, etp, virtual=1, clip=0.0, master_weights="auto", dtype=torch.float32, ddp=False, world=2,
         experts=ml.EXPERTS):
    results = run_distributed(_train, world, ep=ep, etp=etp,
                              args=(ep, etp, virtual, clip, master_weights, dtype, ddp, experts))
    return _full(results), results[0]["norms"]


@pytest.mark.parametrize("clip, virtual, master_weights, ddp", [(0.0, 1, "auto", False),
                                                                (0.05, 2, "sharded-fp32", True)])
def test_expert_parallel_size_does_not_change_the_method(clip, virtual, master_weights, ddp):
    # EP = 1: each rank holds every expert and slice k = its shard; EP = 2: each rank holds two
    # experts with both shards' slices (K = 2 x virtual); sharded masters split over expert-DP
    ref, ref_norms = _run(1, 1, virtual, clip, master_weights)
    ep2, ep2_norms = _run(2, 1, virtual, clip, master_weights, ddp=ddp)
    rel, ulps = _compare(ep2, ref)
    assert rel < 1e-6 and ulps < 4
    # expert and dense parameters counted once each: the global norm is the same at both layouts
    assert ep2_norms == pytest.approx(ref_norms, rel=1e-6)


def test_expert_tensor_parallel_size_does_not_change_the_method():
    # expert-TP = 2: both ranks hold a half of every expert and both shards' slices; what is left
    # is fp32 round-off of W itself (measured: 1.6 eps_32 max|W| = 2.4e-6 of the largest update)
    ref, ref_norms = _run(1, 1, clip=0.05)
    etp2, etp2_norms = _run(1, 2, clip=0.05)
    rel, ulps = _compare(etp2, ref)
    assert rel < 1e-5 and ulps < 4
    assert etp2_norms == pytest.approx(ref_norms, rel=1e-6)


def test_one_local_expert_under_expert_and_expert_tensor_parallelism():
    # 4 processes, DP = 4, two experts (top-1) at EP = 2 x expert-TP = 2: one replica of each expert-TP
    # shard serves all four data shards; megatron-core keeps only this rank's row of the source
    # counts there, so they are gathered (experts.source_counts). float64 weights (the factors stay
    # fp32): in fp32 the two layouts differ by 2.6e-4 of the update, AdamW dividing fp32 round-off
    # of near-zero gradient entries by their own square roots; in float64 by 8.9e-7
    ref, ref_norms = _run(1, 1, clip=0.05, world=4, experts=2, dtype=torch.float64)
    both, both_norms = _run(2, 2, clip=0.05, world=4, experts=2, dtype=torch.float64)
    assert _compare(both, ref)[0] < 1e-5
    assert both_norms == pytest.approx(ref_norms, rel=1e-6)


# ---- a tiny Qwen3-MoE GPT (attention and experts adapted) -------------------------------------
EXPERT_KEY = r"(.*\.local_experts\.)(\d+)(\.linear_fc[12]\.weight)$"


def _train_gpt(base: str, steps: int, overrides: dict = {}):
    import re

    from megatron.core import parallel_state as ps

    from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa
    from megatron_hdpissa.convert.load import load_gpt_model

    model, _ = load_gpt_model(base, **overrides)
    apply_hd_pissa(model, HDPiSSAConfig(rank=R, alpha=2 * R, consistency_check_interval=1), progress=False)
    opt = HDPiSSAOptimizer(model, lr=LR, clip_grad=1.0)
    dp, ep = ps.get_data_parallel_rank(), ps.get_expert_model_parallel_rank()
    local = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
    before = _global_weights(model, ep * local)
    gen = torch.Generator().manual_seed(100 + dp)
    norms = []
    for _ in range(steps):
        tokens = torch.randint(0, model.vocab_size, (2, 17), generator=gen)
        pos = torch.arange(16).expand(2, 16)
        model(input_ids=tokens[:, :-1], position_ids=pos, attention_mask=None, labels=tokens[:, 1:]).mean().backward()
        opt.step()
        opt.zero_grad()
        norms.append(opt.last_grad_norm)
    disp = model.decoder.layers[0].mlp.token_dispatcher
    return {"etp_rank": ps.get_expert_tensor_parallel_rank(), "weights": _global_weights(model, ep * local),
            "norms": norms, "before": before, "layout": (disp.ep_size, disp.tp_size)}


def _global_weights(model, first_expert: int) -> dict[str, torch.Tensor]:
    import re

    weights = {}
    for name, p in model.named_parameters():
        if ".hd_pissa." in name:  # the factors live where the layout puts them; W is what counts
            continue
        m = re.match(EXPERT_KEY, name)
        if m:  # key by the global expert
            name = f"{m.group(1)}{first_expert + int(m.group(2))}{m.group(3)}"
        weights[name] = p.detach().clone()
    return weights


def _gpt_full(results) -> dict[str, torch.Tensor]:
    """Every weight whole: dense ones from rank 0, expert ones assembled from their ETP shards."""
    import re

    return _assemble(results, "weights")


def _assemble(results, which: str) -> dict[str, torch.Tensor]:
    import re

    out, shards = dict(results[0][which]), {}
    for res in results:
        for name, w in res[which].items():
            if re.match(EXPERT_KEY, name):
                shards.setdefault(name, {})[res["etp_rank"]] = w
    for name, by_t in shards.items():
        parts = [by_t[t] for t in sorted(by_t)]
        if name.endswith("linear_fc1.weight"):
            half = parts[0].shape[0] // 2
            out[name] = torch.cat([p[:half] for p in parts] + [p[half:] for p in parts])
        else:
            out[name] = torch.cat(parts, 1)
    return out


def test_moe_gpt_same_weights_at_every_expert_layout(tmp_path):
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
    from tests.helpers.hf_models import save_random_hf_model, tiny_moe_hf_config

    hf = save_random_hf_model(tiny_moe_hf_config("qwen3_moe", initializer_range=0.1), tmp_path / "hf", seed=0)
    base = str(convert_hf_to_megatron(hf, tmp_path / "base", 1, progress=False, ckpt_format="torch"))
    runs = {(ep, etp): run_distributed(_train_gpt, 2, ep=ep, etp=etp, args=(base, STEPS))
            for ep, etp in ((1, 1), (2, 1), (1, 2))}
    ref, w0 = _gpt_full(runs[(1, 1)]), _assemble(runs[(1, 1)], "before")
    update = max(float((ref[n] - w0[n]).abs().max()) for n in ref)
    assert update > 1e-3
    for layout, results in runs.items():
        assert results[0]["layout"] == layout  # the dispatcher runs at that EP and expert-TP
        full = _gpt_full(results)
        assert full.keys() == ref.keys()
        diff = max(float((w - ref[n]).abs().max()) for n, w in full.items())
        # measured: EP = 2 1.5e-6, expert-TP = 2 2.1e-5 of the update (5 eps_32 max|W|): expert-TP
        # changes the forward's sums (partial fc2 outputs reduce-scattered) at fp32 round-off, and
        # AdamW's later steps divide by small second moments
        assert diff <= (1e-5 if layout[1] == 1 else 1e-4) * update, layout
        assert results[0]["norms"] == pytest.approx(runs[(1, 1)][0]["norms"], rel=1e-6)
