"""torch_dist saves and loads whose shards do not fit together fail on every rank with one line naming
the key (checkpoint/verify.agreed_sharding_check): megatron-core checks the sharding on global rank 0
alone, and before the fix rank 0 raised while the others waited in torch.distributed.checkpoint's
collectives (how a wrong expert key made the trainer's resume test hang). A key only some ranks ask
for that the checkpoint lacks fails every rank too (torch.distributed.checkpoint's plan). The run has
a timeout, so a hang fails the test instead of stalling the suite."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed


def _message(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what is tested
        return f"{type(e).__name__}: {e}"
    return "no error"


def _bad_shardings(root: str) -> dict[str, str]:
    """Each rank's failure in three collective saves / loads whose shards do not fit."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_hdpissa.checkpoint.dist import load_dist_checkpoint, save_dist_checkpoint

    rank = dist.get_rank()
    # both ranks save row 0 of a 2-row tensor as its main copy (as two EP ranks keying their local
    # expert 0 alike would); row 1 has no writer
    both_row_0 = {"w": ShardedTensor.from_rank_offsets("hd_pissa.w", torch.ones(1, 3), (0, 0, 2))}
    out = {"save": _message(lambda: save_dist_checkpoint(f"{root}/bad", 1, both_row_0))}
    mine = ShardedTensor.from_rank_offsets("w", torch.full((1, 3), float(rank)), (0, rank, 2))
    iter_dir = save_dist_checkpoint(f"{root}/good", 1, {"w": mine})
    wrong = ShardedTensor.from_rank_offsets("w", torch.empty(1, 3), (0, 0, 2))  # both read row 0
    out["load"] = _message(lambda: load_dist_checkpoint(iter_dir, {"w": wrong}))
    key = "w" if rank == 0 else "missing"  # rank 1 asks for a (whole) tensor the checkpoint lacks
    asked = ShardedTensor.from_rank_offsets(key, torch.empty(2, 3))
    out["missing"] = _message(lambda: load_dist_checkpoint(iter_dir, {"w": asked}))
    return out


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    return root, run_distributed(_bad_shardings, 2, args=(str(root),), timeout=120)


def test_overlapping_shards_fail_the_save_on_every_rank(failures):
    root, (r0, r1) = failures
    assert r0["save"] == r1["save"], (r0["save"], r1["save"])
    assert r0["save"].startswith(f"CheckpointIOError: cannot save checkpoint {root / 'bad' / 'iter_0000001'}: "
                                 "CheckpointShardingError: the checkpoint shards of tensor 'hd_pissa.w' do not "
                                 "fit together"), r0["save"]
    assert list((root / "bad").iterdir()) == []  # the partial folder removed, no tracker


def test_overlapping_shards_fail_the_load_on_every_rank(failures):
    _, (r0, r1) = failures
    assert r0["load"] == r1["load"], (r0["load"], r1["load"])
    assert r0["load"].startswith("CheckpointShardingError: the checkpoint shards of tensor 'w' do not fit"), r0


def test_a_key_missing_on_one_rank_fails_every_rank(failures):
    root, (r0, r1) = failures
    assert r0["missing"] == r1["missing"], (r0["missing"], r1["missing"])
    assert r0["missing"] == (f"CheckpointReadError: cannot read checkpoint {root / 'good' / 'iter_0000001'}: this run "
                             "asks for tensor 'missing', which it does not hold (1 tensors held: another model, method "
                             "or targets?)"), r0["missing"]
