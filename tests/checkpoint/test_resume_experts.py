"""--ckpt-format torch_dist with HD-PiSSA on MoE experts (checkpoint/trainer_dist_experts.py): a run
saved at expert-parallel size 2 resumes at EP = 1 and continues as the uninterrupted run does; at
the same EP the resume is bit-exact; another K is refused.

Tiny random Qwen3-MoE (4 experts, top-2) with SmolLM2's tokenizer, 2 processes, DP = 2,
--hd-pissa-virtual-ranks 2, so K = 4: at EP = 2 each rank holds 2 experts and, for each, the 4
slices of both data shards; at EP = 1 each rank holds all 4 experts and the 2 slices of its own
shard. So the resume moves every expert slice, its moments and the experts' W to other ranks.

Tolerance: the EP = 2 and EP = 1 runs do the same arithmetic except for where the K slices'
deltas are summed (locally at EP = 2, gathered over expert-DP at EP = 1), so fp32 round-off
differs at ~1e-7 relative per operation; after 3 Adam steps at lr 1e-2 that stays below 1e-5
relative per tensor (the printed worst case), while a slice, an expert or a moment in the wrong
place moves a tensor by >= 1e-2.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import tiny_moe_trainer_material
from tests.helpers.trainer import expect_error, finetune_main, flags, rel_diff, saved_tensors

ITERS = 3


@pytest.fixture(scope="module")
def m(tmp_path_factory, smollm2_hf_dir, gsm8k_path):
    return tiny_moe_trainer_material(tmp_path_factory.mktemp("resume_experts"), smollm2_hf_dir, gsm8k_path, seed=7)


def _argv(m, run: str, ep: int, **over):
    args = {"--pretrained-checkpoint": m["base"], "--data-path": m["train"], "--micro-batch-size": 1,
            "--global-batch-size": 4, "--seq-length": 128, "--lr": 1e-2, "--hd-pissa-rank": 2,
            "--hd-pissa-virtual-ranks": 2, "--expert-model-parallel-size": ep, "--no-progress": None,
            "--seed": 3, "--train-iters": ITERS, "--save": m["root"] / run, "--ckpt-format": "torch_dist"}
    args.update(over)
    return flags(args)


def _run(m, run: str, ep: int, world: int = 2, **over):
    return run_distributed(finetune_main, world, ep=ep, args=(_argv(m, run, ep, **over),))[0]


def _saved(m, run: str) -> dict[str, torch.Tensor]:
    return saved_tensors(m["root"] / run)



@pytest.fixture(scope="module")
def runs(m):
    """The uninterrupted runs at EP = 1 and EP = 2, and the EP = 2 run saved after 2 steps."""
    _run(m, "ref_ep1", 1)
    _run(m, "ref_ep2", 2)
    r = _run(m, "half_ep2", 2, **{"--exit-interval": ITERS - 1})
    assert r["exited_at"] == ITERS - 1
    return {"ep1": _saved(m, "ref_ep1"), "ep2": _saved(m, "ref_ep2")}


def _resume(m, run: str, ep: int):
    shutil.copytree(m["root"] / "half_ep2", m["root"] / run)
    r = _run(m, run, ep, **{"--load": m["root"] / run})
    assert r["start"] == ITERS - 1
    return _saved(m, run)


def test_ep2_checkpoint_resumes_at_ep1(m, runs):
    from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info
    from megatron_hdpissa.checkpoint.safe_load import read_global_tensors

    want, resumed = runs["ep1"], _resume(m, "from_ep2_to_ep1", 1)
    assert set(resumed) == set(want)
    experts = [k for k in want if ".local_experts." in k and k.startswith(("hd_pissa.", "optimizer.exp_avg"))]
    # every global expert 0..3 of both layers, factors and both moments
    assert {k.split(".local_experts.")[1].split(".")[0] for k in experts} == {"0", "1", "2", "3"}, experts[:4]
    assert all(want[k].shape[0] == 4 for k in experts if k.startswith("hd_pissa.")), "K = 4 slices"
    base = read_global_tensors(read_checkpoint_info(m["base"]).iter_dir)
    moved = [k for k in base if "experts.linear_fc" in k and rel_diff(want[k], base[k]) > 1e-4]
    assert len(moved) == 2, f"the expert weights (fc1, fc2, stacked over layers and experts) moved: {moved}"
    _compare("EP=2 -> EP=1", resumed, want, runs["ep2"])


def _compare(what: str, resumed: dict, want: dict, other_ep: dict) -> None:
    """Every tensor of the resumed run within 1e-5 relative of the uninterrupted one, plus 3x how
    far the uninterrupted runs at EP = 1 and EP = 2 are apart (the first steps ran at EP = 2)."""
    assert set(resumed) == set(want)
    worst = {k: rel_diff(resumed[k], v) for k, v in want.items()}
    spread = {k: rel_diff(other_ep[k], v) for k, v in want.items()}
    bad = {k: (d, spread[k]) for k, d in worst.items() if d > 1e-5 + 3 * spread[k]}
    assert not bad, f"{what}: (relative difference, EP spread) above the bound: {bad}"
    print(f"{what}: worst relative difference {max(worst.values()):.2e} over {len(worst)} tensors "
          f"(uninterrupted EP=1 and EP=2 apart by up to {max(spread.values()):.2e})")


def test_same_ep_resume_is_bit_exact(m, runs):
    resumed = _resume(m, "from_ep2_to_ep2", 2)
    assert set(resumed) == set(runs["ep2"])
    for k, v in runs["ep2"].items():
        assert torch.equal(resumed[k], v), k


def test_another_k_is_refused(m, runs):
    argv = _argv(m, "k_refused", 1, **{"--load": m["root"] / "half_ep2", "--save": False})
    msg = run_distributed(expect_error, 1, args=(argv,))[0]  # DP = 1 x 2 virtual ranks: K = 2
    assert "K = 4 slices" in msg and "this run has K = 2" in msg and "--hd-pissa-virtual-ranks" in msg, msg


@pytest.mark.slow
def test_bf16_expert_masters_reshard_over_expert_dp(m):
    """--bf16: the experts' sharded fp32 masters are split over expert-DP (size 1 at EP = 2, 2 at
    EP = 1): gathered on save at EP = 2, cut again on load at EP = 1; the run continues as the
    uninterrupted EP = 1 one (bound as above, with the bf16 runs' own EP spread)."""
    flags = {"--bf16": None}
    _run(m, "bf16_ref_ep1", 1, **flags)
    _run(m, "bf16_ref_ep2", 2, **flags)
    _run(m, "bf16_half", 2, **flags, **{"--exit-interval": ITERS - 1})
    _run(m, "bf16_half", 1, **flags, **{"--load": m["root"] / "bf16_half"})
    want, other, resumed = (_saved(m, r) for r in ("bf16_ref_ep1", "bf16_ref_ep2", "bf16_half"))
    masters = [k for k in want if k.startswith("hd_pissa_master.") and "experts" in k]
    assert masters and all(want[k].dtype == torch.float32 for k in masters), sorted(want)[:5]
    _compare("bf16 EP=2 -> EP=1", resumed, want, other)
