"""The collectives helpers on two data-parallel ranks (gloo) against sums written out here, and the
bucketing rule."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed

DP = 2


def _rank_tensor(rank: int, n: int = 6) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) * (rank + 1) + 10 * rank


def _collectives_worker():
    from megatron_hdpissa.distributed.collectives import (
        all_gather_into, all_gather_over_dp, any_rank, average_over_dp_, collective_device, reduce_scatter_over_dp,
        squared_norms, sum_over_dp_,
    )
    from megatron_hdpissa.distributed.groups import ParallelGroups

    g = ParallelGroups.from_megatron()
    me = g.dp_rank
    out = {"dp": (g.dp_rank, g.dp_size), "device": str(collective_device())}
    grads = [_rank_tensor(me, 4).view(2, 2).clone(), _rank_tensor(me, 3).bfloat16()]
    out["avg_bytes"] = average_over_dp_(grads, g)
    out["avg"] = [x.float() for x in grads]
    t = _rank_tensor(me)
    sum_over_dp_(t, g)
    out["sum"] = t
    gathered, handle = all_gather_over_dp(_rank_tensor(me), g, async_op=True)
    handle.wait()
    out["gathered"] = gathered.clone()
    into = torch.empty(DP * 2, 3)
    all_gather_into(into, _rank_tensor(me).view(2, 3), g)
    out["into"] = into
    out["scattered"] = reduce_scatter_over_dp(_rank_tensor(me, 8), g)
    out["any_none"] = any_rank(False, g, value=7)
    out["any_one"] = any_rank(me == 1, g, value=7)
    out["any_max"] = any_rank(True, g, value=me + 3)
    pairs = [(True, torch.tensor([3.0, 4.0])), (False, torch.tensor([1.0, 2.0]).bfloat16())]
    out["sq"] = squared_norms([pairs, []], g)  # no TP / PP peers: the local sums of squares
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_collectives_worker, DP)


def test_dp_collectives_match_sums_written_out(results):
    ranks = [_rank_tensor(r) for r in range(DP)]
    for res in results:
        me = res["dp"][0]
        assert res["dp"][1] == DP and res["device"] == "cpu"
        assert res["avg_bytes"] == (4 + 3) * 4  # one flat fp32 all-reduce
        torch.testing.assert_close(res["avg"][0], sum(_rank_tensor(r, 4) for r in range(DP)).view(2, 2) / DP)
        torch.testing.assert_close(res["avg"][1], (sum(_rank_tensor(r, 3) for r in range(DP)) / DP).bfloat16().float())
        torch.testing.assert_close(res["sum"], sum(ranks))
        torch.testing.assert_close(res["gathered"], torch.stack(ranks))
        torch.testing.assert_close(res["into"], torch.cat([r.view(2, 3) for r in ranks]))
        full = sum(_rank_tensor(r, 8) for r in range(DP)).view(DP, -1)
        torch.testing.assert_close(res["scattered"], full[me])
        assert (res["any_none"], res["any_one"], res["any_max"]) == (0, 7, DP - 1 + 3)
        assert res["sq"].tolist() == pytest.approx([3.0 ** 2 + 4 ** 2 + 1 + 2 ** 2, 0.0], rel=1e-6)


def test_buckets_fill_up_to_the_limit():
    from megatron_hdpissa.distributed.collectives import buckets

    sizes = [3, 4, 2, 9, 1, 1]
    assert list(buckets(sizes, lambda n: n, 7)) == [[3, 4], [2], [9], [1, 1]]
    assert list(buckets([], lambda n: n, 7)) == []
