"""The effective-rank tool on MoE experts: after one HD-PiSSA step of a tiny Qwen3-MoE at EP = 2
(2 processes, DP = 2 x 2 virtual ranks: K = 4, r = 2), every expert's gate, up and down update has
rank 2Kr = 16, counted by `analysis.effective_rank` from the HF names and by an independent numpy
SVD of the stacked expert tensors of the torch_dist checkpoints (every expert receives hundreds of
each data shard's tokens here, top-2 of 4 experts, so each slice's gradient has rank >= r)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import tiny_moe_trainer_material
from tests.helpers.trainer import finetune_main

K, R, EXPERTS, FFN, LAYERS = 4, 2, 4, 32, 2


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, smollm2_hf_dir, gsm8k_path):
    m = tiny_moe_trainer_material(tmp_path_factory.mktemp("rank_experts"), smollm2_hf_dir, gsm8k_path, seed=11)
    argv = ["--pretrained-checkpoint", m["base"], "--data-path", m["train"], "--micro-batch-size", 2,
            "--global-batch-size", 8, "--seq-length", 128, "--lr", 1e-2, "--hd-pissa-rank", R,
            "--hd-pissa-virtual-ranks", 2, "--expert-model-parallel-size", 2, "--no-progress", None,
            "--train-iters", 1, "--save", m["root"] / "run", "--ckpt-format", "torch_dist"]
    run_distributed(finetune_main, 2, ep=2, args=([str(a) for a in argv if a is not None],))
    return m


def _stacked_expert_deltas(m) -> dict[tuple[int, int, str], np.ndarray]:
    """(layer, expert, gate | up | down) -> W_T - W_0, from megatron-core's stacked expert tensors."""
    from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info
    from megatron_hdpissa.checkpoint.safe_load import read_global_tensors

    base, run = (read_global_tensors(read_checkpoint_info(d).iter_dir) for d in (m["base"], m["root"] / "run"))
    out = {}
    for key in base:
        if "experts.experts.linear_fc" not in key:
            continue
        delta = (run[key].double() - base[key].double()).numpy()
        assert delta.shape[:2] == (LAYERS, EXPERTS), (key, delta.shape)
        for i in range(LAYERS):
            for e in range(EXPERTS):
                if "linear_fc1" in key:  # [gate; up] rows
                    out[(i, e, "gate")], out[(i, e, "up")] = delta[i, e, :FFN], delta[i, e, FFN:]
                else:
                    out[(i, e, "down")] = delta[i, e]
    return out


def test_each_expert_update_reaches_2kr(one_step):
    from megatron_hdpissa.analysis.effective_rank import DEFAULT_THRESHOLD, analyse_pair, open_checkpoint

    m = one_step
    results = analyse_pair(open_checkpoint(m["base"]), open_checkpoint(m["root"] / "run"),
                           projections=("gate_proj", "up_proj", "down_proj"))
    ranks = {r.name: r.effective_rank for r in results}
    assert len(ranks) == LAYERS * EXPERTS * 3, sorted(ranks)
    assert set(ranks.values()) == {2 * K * R}, ranks
    independent = _stacked_expert_deltas(m)
    assert len(independent) == LAYERS * EXPERTS * 3, sorted(independent)
    gap = []
    for (i, e, part), delta in independent.items():
        s = np.linalg.svd(delta, compute_uv=False)
        name = f"model.layers.{i}.mlp.experts.{e}.{part}_proj.weight"
        assert int((s > DEFAULT_THRESHOLD * s[0]).sum()) == ranks[name] == 2 * K * R, (name, s / s[0])
        assert s[2 * K * R] < 1e-5 * s[0] < s[2 * K * R - 1], (name, s / s[0])  # a clear gap at 2Kr
        gap.append((s[2 * K * R - 1] / s[0], s[2 * K * R] / s[0]))
    print(f"sigma_2Kr / sigma_1 >= {min(g[0] for g in gap):.2e}, sigma_2Kr+1 / sigma_1 <= {max(g[1] for g in gap):.2e}")
