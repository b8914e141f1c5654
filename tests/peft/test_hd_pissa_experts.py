"""HD-PiSSA on one megatron-core MoE layer against a float64 reference of the equations with the
routing fixed (2 gloo processes, DP = 2, EP = 2: each rank holds two experts and, for each, the
slices of both data shards): the decomposition, each slice's factor gradients from its own data
shard's tokens only, and the merged update of one AdamW step."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import moe_layer as ml
from tests.helpers.distributed import run_distributed

R, ALPHA, LR, EPS = 2, 4.0, 1e-2, 1e-8
PARTS = (("linear_fc1", "gate"), ("linear_fc1", "up"), ("linear_fc2", "w"))


def _run_layer(ep: int):
    from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa
    from megatron_hdpissa.distributed.groups import ParallelGroups

    g = ParallelGroups.from_megatron()
    block = ml.MoEBlock(ep, 1, ml.logical_weights(0))
    apply_hd_pissa(block, HDPiSSAConfig(rank=R, alpha=ALPHA, target_modules=("linear_fc1", "linear_fc2")),
                   progress=False)
    x, r = ml.shard_input(g.dp_rank)
    (block(x) * r).sum().backward()
    out = {}
    for i, expert in enumerate(block.mlp.experts.local_experts):
        e = block.mlp.token_dispatcher.local_expert_indices[i]
        for layer, part in PARTS:
            ad = getattr(expert, layer).hd_pissa
            a_all, b_all = ad.all_factors(part)
            lo = ad.first_slice
            out[(e, layer, part)] = {
                "order": ad.layout.slice_order, "a_all": a_all.clone(), "b_all": b_all.clone(),
                "slices": ad.layout.slice_order[lo:lo + ad.local_slices],
                "g_a": ad.a[part].grad.clone(), "g_b": ad.b[part].grad.clone(),
            }
    before = block.local_weights()
    HDPiSSAOptimizer(block, lr=LR, weight_decay=0.0, betas=(0.9, 0.999), eps=EPS).step()
    after = block.local_weights()
    return {"grads": out, "delta": {e: {k: after[e][k] - before[e][k] for k in ("fc1", "fc2")} for e in after}}


def _logical(w, e, part):
    return {"gate": w["gate"][e], "up": w["up"][e], "w": w["down"][e]}[part]


@pytest.mark.parametrize("ep", [2])
def test_expert_slices_match_the_float64_reference(ep):
    w = ml.logical_weights(0)
    results = run_distributed(_run_layer, 2, ep=ep, args=(ep,))
    k_slices, s = 2, ALPHA / R
    seen = set()
    for res in results:
        for (e, layer, part), got in res["grads"].items():
            seen.add(e)
            a_all, b_all = got["a_all"].double(), got["b_all"].double()
            order = got["order"]
            assert sorted(order) == list(range(k_slices))
            # the decomposition: slice k's B_k A_k is the float64 SVD's components k r .. (k+1) r - 1
            u, sv, vh = torch.linalg.svd(_logical(w, e, part).double(), full_matrices=False)
            for pos, k in enumerate(order):
                ref = (u[:, k * R:(k + 1) * R] * sv[k * R:(k + 1) * R]) @ vh[k * R:(k + 1) * R]
                torch.testing.assert_close(b_all[pos] @ a_all[pos], ref, rtol=0, atol=1e-5 * float(sv[0]))
            # factor gradients of each local slice: g_A = s B_k^T G_k, g_B = s G_k A_k^T with G_k
            # the float64 dL/dW of the tokens of data shard k that the router sent to expert e
            delta_ref = torch.zeros_like(_logical(w, e, part), dtype=torch.float64)
            for pos, k in enumerate(order):
                x, r = ml.shard_input(k)
                grads, hits = ml.reference_expert_grads(w, x.reshape(-1, ml.H), r.reshape(-1, ml.H), e)
                assert hits > 0
                gk = grads["down" if part == "w" else part]
                a_k, b_k = a_all[pos], b_all[pos]
                g_a, g_b = s * b_k.t() @ gk, s * gk @ a_k.t()
                if k in got["slices"]:
                    local = got["slices"].index(k)
                    for mine, ref in ((got["g_a"][local], g_a), (got["g_b"][local], g_b)):
                        torch.testing.assert_close(mine.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
                # AdamW's first step is lr * g / (|g| + eps); W += (B - dB)(A - dA) - B A
                d_a, d_b = LR * g_a / (g_a.abs() + EPS), LR * g_b / (g_b.abs() + EPS)
                delta_ref += (b_k - d_b) @ (a_k - d_a) - b_k @ a_k
            d = res["delta"][e]["fc1" if layer == "linear_fc1" else "fc2"].double()
            d = {"gate": d[:ml.FFN], "up": d[ml.FFN:], "w": d}[part]
            w_max = float(_logical(w, e, part).abs().max())  # fp32 round-off of W, plus 1e-6 of the update
            atol = 4 * torch.finfo(torch.float32).eps * w_max + 1e-6 * float(delta_ref.abs().max())
            torch.testing.assert_close(d, delta_ref, rtol=0, atol=atol)
    assert seen == set(range(ml.EXPERTS))


def _refusals():
    from megatron_hdpissa import HDPiSSAConfig, apply_hd_pissa
    from megatron_hdpissa.peft.common import ConfigError

    out = []
    try:  # LoRA / PiSSA on experts at EP > 1 are supported (tests/peft/test_lowrank_experts.py)
        block = ml.MoEBlock(2, 1, ml.logical_weights(0), moe_token_dispatcher_type="allgather")
        apply_hd_pissa(block, HDPiSSAConfig(rank=R), progress=False)
        out.append(None)
    except ConfigError as err:
        out.append((err.param, str(err)))
    try:  # expert weights trained beside HD-PiSSA would be averaged over DP, mixing experts at EP > 1
        block = ml.MoEBlock(2, 1, ml.logical_weights(0))
        apply_hd_pissa(block, HDPiSSAConfig(rank=R, target_modules=("linear_fc1",),
                                            trainable_modules=("linear_fc2",)), progress=False)
        out.append(None)
    except ConfigError as err:
        out.append((err.param, str(err)))
    from megatron_hdpissa.checkpoint.trainer_dist import factor_specs

    block = ml.MoEBlock(2, 1, ml.logical_weights(0))
    apply_hd_pissa(block, HDPiSSAConfig(rank=R, target_modules=("linear_fc1", "linear_fc2")), progress=False)
    out.append({s.key: (s.slice_ids, s.num_slices, s.groups.tp_size) for s in factor_specs(block)})
    return out


def test_unsupported_expert_layouts_fail_naming_the_setting():
    (dispatcher, trainable, specs0), (_, _, specs1) = run_distributed(_refusals, 2, ep=2)
    assert dispatcher[0] == "target_modules" and "moe_token_dispatcher_type='alltoall'" in dispatcher[1]
    assert "MoEAllGatherTokenDispatcher" in dispatcher[1]
    assert trainable[0] == "trainable_modules" and "linear_fc2.weight is an expert weight" in trainable[1], trainable
    assert "expert-parallel size 2" in trainable[1]
    # torch_dist keys (checkpoint/trainer_dist_experts): EP rank p's local expert j is global expert
    # 2p + j (4 experts over EP = 2); at DP = 2 each replica serves both data shards: slices 0 and 1
    for p, specs in enumerate((specs0, specs1)):
        want = {f"hd_pissa.mlp.experts.local_experts.{2 * p + j}.{layer}.{w}.{part}"
                for j in range(2) for layer, part in PARTS for w in "ab"}
        assert set(specs) == want, (p, sorted(specs))
        assert all(v == ([0, 1], 2, 1) for v in specs.values()), specs
