"""HD-PiSSA experts at 4 processes, where an expert's replicas split the data shards (expert-DP =
2): DP = 4 at EP = 2 gives the weights of EP = 1, also with megatron-core's groups ordered so that
EP runs across DP (order "tp-cp-dp-ep-pp": EP groups {0, 2}, {1, 3}), where the expert-DP gather
order of the slices is [0, 2, 1, 3] (megatron-core's default order, the trainer's, always gives the
identity: EP groups are blocks of consecutive DP ranks); each local slice's factors and Adam
moments sit at the global slice id the checkpoint keys it by; and a replica that finds its expert
weights diverged makes every rank raise, not only its expert-DP group (the other EP ranks would
wait in the next all-to-all).

One megatron-core MoE layer (4 experts, top-2, all-to-all dispatcher), 4 gloo processes, K = 4.
Tolerance: the layouts route and sum in another order (the dispatcher's rows, the gather order of
the K slices' deltas), so W agrees to fp32 round-off: measured 7.6e-7 of the largest update at
both orders, bound 2e-6; a slice trained on another shard's tokens (the gather order ignored)
moves W by 1.1x the update, a slice keyed at another slice id holds another slice's factors."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import moe_layer as ml
from tests.helpers.distributed import run_distributed

STEPS, R, LR, WORLD = 3, 2, 1e-2, 4
EP_ACROSS_DP = "tp-cp-dp-ep-pp"  # megatron-core's rank order with EP outside DP


def _train(ep: int, order, perturb_rank=None):
    from megatron.core import parallel_state as ps

    from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa
    from megatron_hdpissa.checkpoint.trainer_dist import factor_specs
    from megatron_hdpissa.distributed.groups import ParallelGroups

    if order is not None:  # megatron-core's groups again, in another rank order
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(expert_model_parallel_size=ep, order=order, create_gloo_process_groups=False)
    g = ParallelGroups.from_megatron()
    block = ml.MoEBlock(ep, 1, ml.logical_weights(0))
    apply_hd_pissa(block, HDPiSSAConfig(rank=R, target_modules=("linear_fc1", "linear_fc2"),
                                        consistency_check_interval=1), progress=False)
    opt = HDPiSSAOptimizer(block, lr=LR, weight_decay=0.01, clip_grad=0.05)
    opt.track_grad_norm = True
    norms, error = [], None
    try:
        for step in range(STEPS):
            x, r = ml.shard_input(g.dp_rank, micro=step)
            (block(x) * r).sum().backward()
            opt.step()
            opt.zero_grad()
            norms.append(opt.last_grad_norm)
            if step == 0 and perturb_rank == torch.distributed.get_rank():
                with torch.no_grad():
                    block.mlp.experts.local_experts[0].linear_fc1.weight[0, 0] += 1e-3
    except RuntimeError as e:
        error = str(e)
    layout = block.mlp.experts.local_experts[0].linear_fc1.hd_pissa.layout
    slices = {}  # (checkpoint key, global slice id) -> (factor, exp_avg) of that slice
    for spec in factor_specs(block):
        moment = opt.state[spec.param]["exp_avg"] if error is None else torch.zeros_like(spec.param)
        for v, slice_id in enumerate(spec.slice_ids):
            slices[(spec.key, slice_id)] = (spec.param[v].detach().clone(), moment[v].clone())
    return {"error": error, "weights": block.local_weights(), "norms": norms, "slices": slices,
            "slice_order": layout.slice_order, "shards": layout.shards, "dp_rank": g.dp_rank}


def _run(ep: int, order=None, perturb_rank=None):
    return run_distributed(_train, WORLD, ep=ep, args=(ep, order, perturb_rank), timeout=300)


def _weights(results) -> dict[int, dict[str, torch.Tensor]]:
    """{global expert: {"fc1", "fc2"}}, checking that every replica of an expert holds the same."""
    out: dict = {}
    for res in results:
        for e, w in res["weights"].items():
            if e in out:
                assert all(torch.equal(out[e][k], w[k]) for k in w), f"replicas of expert {e} differ"
            out[e] = w
    return out


def _slices(results) -> dict:
    out = {}
    for res in results:
        assert not out.keys() & res["slices"].keys(), "a slice held by two ranks"
        out.update(res["slices"])
    return out


@pytest.fixture(scope="module")
def ep1():
    return _run(1)


@pytest.mark.parametrize("order, want_order", [(None, [0, 1, 2, 3]), (EP_ACROSS_DP, [0, 2, 1, 3])])
def test_dp4_ep2_gives_the_weights_of_ep1(ep1, order, want_order):
    results = _run(2, order)
    # the layout under test: each replica serves two data shards, its expert-DP peer the other two
    for res in results:
        assert res["slice_order"] == want_order and len(res["shards"]) == 2 and res["error"] is None
    ref, got = _weights(ep1), _weights(results)
    w0 = ml.logical_weights(0)
    update = max(float((ref[e]["fc1"] - torch.cat([w0["gate"][e], w0["up"][e]])).abs().max()) for e in ref)
    diff = max(float((got[e][k] - ref[e][k]).abs().max()) for e in ref for k in ("fc1", "fc2"))
    print(f"DP=4 EP=2 order {order}: max |W - W_EP1| = {diff / update:.2e} of the largest update")
    assert update > 1e-3 and diff < 2e-6 * update, (diff, update)
    assert results[0]["norms"] == pytest.approx(ep1[0]["norms"], rel=1e-6)
    # slice d (data shard d) of every expert: the same factors and moments, under the same
    # checkpoint key and global slice id, as on DP rank d at EP = 1
    want, have = _slices(ep1), _slices(results)
    assert have.keys() == want.keys() and {k[1] for k in want} == {0, 1, 2, 3}
    for k, (factor, moment) in want.items():
        assert torch.allclose(have[k][0], factor, rtol=0, atol=1e-6 * float(factor.abs().max())), k
        assert float(moment.abs().max()) > 0, k
        assert torch.allclose(have[k][1], moment, rtol=1e-4, atol=1e-4 * float(moment.abs().max())), k


def test_diverged_expert_replica_fails_every_rank():
    # rank 0's copy of expert 0 moves after step 1: its expert-DP group {0, 2} finds it; ranks 1
    # and 3 (the other experts) must raise too instead of waiting in step 3's all-to-all
    results = _run(2, perturb_rank=0)
    for res in results:
        assert res["error"] is not None, "a rank went on"
        assert "divergence after optimizer step 2" in res["error"], res["error"]
        assert "local_experts.0.linear_fc1" in res["error"], res["error"]
