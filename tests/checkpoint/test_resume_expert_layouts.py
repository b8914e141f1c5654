"""HD-PiSSA on MoE experts in the trainer at the layouts test_resume_experts.py leaves out: a
torch_dist checkpoint saved at expert-TP = 2 resumes at expert-TP = 1, one saved at TP = 2 with
sequence parallelism (expert-TP = 2, DP = 1 x 2 virtual ranks) resumes at TP = 1 (DP = 2), one saved
at DP = 4 x EP = 2 (4 processes, expert-DP = 2) resumes at EP = 1, and PP = 2 x DP = 2 x EP = 2
(4 processes, one MoE layer per stage) gives the weights of PP = 1.

Tiny random Mixtral (2 layers, 4 experts, top-2) with SmolLM2's tokenizer, K = 2 everywhere,
the randomized SVD (its per-expert seed names the global layer, so a stage offset missed on the
experts decomposes stage 1's experts with stage 0's seed and changes their slices), padded
micro-batches (gloo's expert-TP all-gather needs equal sizes on every rank).

Tolerance of a resume at another layout: the resumed run did its first steps at the saved layout,
whose fp32 arithmetic differs from the target layout's in summation order only (the expert-TP /
TP partial sums of the forward, where K slices' deltas are summed); so every tensor must be within
1e-5 relative of the uninterrupted run at the target layout, plus 3x how far the two uninterrupted
layouts are apart. A slice, expert, shard or moment placed wrongly moves a tensor by >= 1e-2.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import tiny_moe_trainer_material
from tests.helpers.trainer import finetune_main, flags, rel_diff, saved_tensors

ITERS, TIMEOUT = 3, 600
TP1 = {"world": 2}
ETP2 = {"world": 2, "etp": 2}
TP2_SP = {"world": 2, "tp": 2, "virtual": 2, "--sequence-parallel": None}


@pytest.fixture(scope="module")
def m(tmp_path_factory, smollm2_hf_dir, gsm8k_path):
    # Mixtral: no per-head q / k norms (megatron-core's torch fallback for them refused SP when written)
    return tiny_moe_trainer_material(tmp_path_factory.mktemp("resume_expert_layouts"), smollm2_hf_dir,
                                     gsm8k_path, seed=7, family="mixtral")


def _run(m, run: str, layout: dict, **over):
    """The trainer at `layout` (world, tp, pp, ep, etp, virtual ranks, extra flags)."""
    sizes = {k: layout.get(k, 1) for k in ("tp", "pp", "ep")}
    etp = layout.get("etp")
    args = {"--pretrained-checkpoint": m["base"], "--data-path": m["train"], "--micro-batch-size": 1,
            "--global-batch-size": 4, "--seq-length": 128, "--pad-to-max-length": None, "--lr": 1e-2,
            "--hd-pissa-rank": 2, "--hd-pissa-svd": "randomized", "--hd-pissa-virtual-ranks": layout.get("virtual", 1),
            "--tensor-model-parallel-size": sizes["tp"], "--pipeline-model-parallel-size": sizes["pp"],
            "--expert-model-parallel-size": sizes["ep"], "--expert-tensor-parallel-size": etp or sizes["tp"],
            "--no-progress": None, "--seed": 3, "--train-iters": ITERS, "--save": m["root"] / run,
            "--ckpt-format": "torch_dist", **{k: v for k, v in layout.items() if k.startswith("--")}, **over}
    return run_distributed(finetune_main, layout["world"], etp=etp, args=(flags(args),), timeout=TIMEOUT,
                           **sizes)[0]


def _saved(m, run: str) -> dict[str, torch.Tensor]:
    return saved_tensors(m["root"] / run)



@pytest.fixture(scope="module")
def tp1(m):
    """The uninterrupted run at TP = 1, DP = 2, EP = 1, expert-TP = 1: the target of every resume."""
    _run(m, "ref_tp1", TP1)
    return _saved(m, "ref_tp1")


def _resumed(m, saved_at: dict, name: str, resume_at: dict) -> tuple[dict, dict]:
    """(the uninterrupted run at `saved_at`, the run saved there after 2 steps and resumed at `resume_at`)."""
    _run(m, f"ref_{name}", saved_at)
    r = _run(m, f"half_{name}", saved_at, **{"--exit-interval": ITERS - 1})
    assert r["exited_at"] == ITERS - 1
    shutil.copytree(m["root"] / f"half_{name}", m["root"] / f"resumed_{name}")
    r = _run(m, f"resumed_{name}", resume_at, **{"--load": m["root"] / f"resumed_{name}"})
    assert r["start"] == ITERS - 1
    return _saved(m, f"ref_{name}"), _saved(m, f"resumed_{name}")


def _compare(what: str, resumed: dict, want: dict, other: dict) -> None:
    assert set(resumed) == set(want) == set(other)
    experts = [k for k in want if ".local_experts." in k and k.startswith("hd_pissa.")]
    assert {k.split(".local_experts.")[1].split(".")[0] for k in experts} == {"0", "1", "2", "3"}
    assert {k.split("layers.")[1].split(".")[0] for k in experts} == {"0", "1"}, "both layers' experts"
    worst = {k: rel_diff(resumed[k], v) for k, v in want.items()}
    spread = {k: rel_diff(other[k], v) for k, v in want.items()}
    bad = {k: (d, spread[k]) for k, d in worst.items() if d > 1e-5 + 3 * spread[k]}
    assert not bad, f"{what}: (relative difference, layout spread) above the bound: {bad}"
    print(f"{what}: worst relative difference {max(worst.values()):.2e} over {len(worst)} tensors "
          f"(uninterrupted layouts apart by up to {max(spread.values()):.2e})")


@pytest.mark.slow
def test_expert_tp2_checkpoint_resumes_at_expert_tp1(m, tp1):
    other, resumed = _resumed(m, ETP2, "etp2", TP1)
    _compare("expert-TP=2 -> 1", resumed, tp1, other)


@pytest.mark.slow
def test_tp2_sequence_parallel_checkpoint_resumes_at_tp1(m, tp1):
    other, resumed = _resumed(m, TP2_SP, "tp2", TP1)
    _compare("TP=2+SP (DP=1 x 2 virtual ranks) -> TP=1 (DP=2)", resumed, tp1, other)


@pytest.mark.slow
def test_pp2_dp2_ep2_gives_the_weights_of_pp1(m, tp1):
    _run(m, "pp2_ep2", {"world": 4, "pp": 2, "ep": 2})
    got = _saved(m, "pp2_ep2")
    assert set(got) == set(tp1)
    base = _saved_base(m)
    moved = [k for k in base if "experts.linear_fc" in k and rel_diff(tp1[k], base[k]) > 1e-4]
    assert len(moved) == 2, f"the expert weights (fc1, fc2, stacked over layers and experts) moved: {moved}"
    worst = {k: rel_diff(got[k], v) for k, v in tp1.items()}
    print(f"PP=2 x DP=2 x EP=2 vs PP=1: worst relative difference {max(worst.values()):.2e} over {len(worst)} tensors")
    assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


def _saved_base(m) -> dict[str, torch.Tensor]:
    from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info
    from megatron_hdpissa.checkpoint.safe_load import read_global_tensors

    return read_global_tensors(read_checkpoint_info(m["base"]).iter_dir)


@pytest.mark.slow
def test_dp4_ep2_checkpoint_resumes_at_ep1(m):
    # 4 processes, K = 4: at EP = 2 each expert's two replicas (expert-DP = 2) hold 2 slices each,
    # at EP = 1 its four replicas 1 slice each
    dp4 = {"world": 4}
    _run(m, "ref_dp4_ep1", dp4)
    other, resumed = _resumed(m, {"world": 4, "ep": 2}, "dp4_ep2", dp4)
    _compare("DP=4: EP=2 -> EP=1", resumed, _saved(m, "ref_dp4_ep1"), other)
