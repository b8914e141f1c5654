"""torch_dist checkpoints of a GPTModel (checkpoint/dist.py): saved by 2 gloo ranks at TP=2 with no
helper processes, resharded to TP=1 on load (checked against the TP shards concatenated by hand),
a training script whose setup runs at module level saves under torchrun (the cause of the
megatron-core default strategy's hang), crashes during a save keep the previous checkpoint
loadable, and the loaders refuse pickled code."""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import run_distributed

REPO = Path(__file__).resolve().parents[2]
LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, model_type="llama",
             architectures=["LlamaForCausalLM"], tie_word_embeddings=False)


def _model(seed: int):
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import build_gpt_model

    return build_gpt_model(ModelConfig.from_hf(dict(LLAMA)), seed=seed)


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


# ---- run inside spawned ranks -------------------------------------------------------------------
def _save_at_current_layout(save_dir: str, iteration: int, seed: int):
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_hdpissa.checkpoint.dist import save_model_checkpoint

    model = _model(seed)
    save_model_checkpoint(model, save_dir, iteration, common_state={"step": iteration})
    # the fix: no Manager server, no forked writers
    helpers = [p.name for p in multiprocessing.active_children()]
    return _tensors(model), helpers, filesystem_async._results_queue is None


def _load_at_current_layout(iter_dir: str):
    from megatron_hdpissa.checkpoint.dist import load_model_checkpoint

    model = _model(seed=999)  # different init: everything must come from the checkpoint
    rest = load_model_checkpoint(model, iter_dir)
    return _tensors(model), rest


def test_tp2_save_reshards_to_tp1_without_helper_processes(tmp_path):
    saved = run_distributed(_save_at_current_layout, world_size=2, tp=2, args=(str(tmp_path), 3, 7))
    for rank, (_, helpers, no_manager) in enumerate(saved):
        assert helpers == [] and no_manager, f"rank {rank} started helper processes: {helpers}"
    iter_dir = tmp_path / "iter_0000003"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert {"metadata.json", "common.pt", ".metadata"} <= set(os.listdir(iter_dir))
    assert not list(tmp_path.glob("*.tmp"))

    (loaded, rest), = run_distributed(_load_at_current_layout, world_size=1, tp=1, args=(str(iter_dir),))
    assert rest["step"] == 3 and rest["hdpissa_layout"]["tp"] == 2
    r0, r1 = saved[0][0], saved[1][0]
    # column-parallel: TP shards stacked on dim 0 (qkv: whole query groups per rank); row-parallel:
    # dim 1; fc1: [gate_0, up_0] | [gate_1, up_1] -> [gate_0, gate_1, up_0, up_1]; norms replicated
    for key, expected in loaded.items():
        if key.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
            want = torch.cat([r0[key], r1[key]], 0)
        elif key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            want = torch.cat([r0[key], r1[key]], 1)
        elif key.endswith("linear_fc1.weight"):
            (g0, u0), (g1, u1) = r0[key].chunk(2), r1[key].chunk(2)
            want = torch.cat([g0, g1, u0, u1], 0)
        else:
            assert torch.equal(r0[key], r1[key]), key
            want = r0[key]
        assert torch.equal(expected, want), key


UNGUARDED_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import torch
from megatron_hdpissa.distributed import groups as distributed
distributed.initialize(tensor_model_parallel_size=2)   # at module level, no __main__ guard
from megatron_hdpissa.models.config import ModelConfig
from megatron_hdpissa.models.gpt import build_gpt_model
from megatron_hdpissa.checkpoint.dist import save_model_checkpoint
model = build_gpt_model(ModelConfig.from_hf({llama!r}))
save_model_checkpoint(model, {out!r}, 1)
print("saved", flush=True)
distributed.shutdown()
"""


def test_module_level_script_under_torchrun_saves(tmp_path):
    """megatron-core 0.16.1's default strategy hangs here: its spawn-context Manager re-runs this
    script's module-level process-group setup in the Manager child, which blocks, and the rank
    waits for the Manager forever. The in-process writer starts no child."""
    script = tmp_path / "train.py"
    script.write_text(UNGUARDED_SCRIPT.format(repo=str(REPO), llama=LLAMA, out=str(tmp_path / "ckpt")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved") == 2
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


# ---- crashes during a save ----------------------------------------------------------------------
def _save_then_die_after_shards(save_dir: str):
    """Save iteration 1, then die (every rank) in iteration 2 once its shards are on disk but
    before megatron-core's metadata.json, the rename and the tracker."""
    from megatron_hdpissa.checkpoint import dist as dist_checkpoint

    model = _model(seed=11)
    dist_checkpoint.save_model_checkpoint(model, save_dir, 1)
    real = dist_checkpoint.sync_save_strategy

    def dying_strategy(thread_count=1):
        strategy = real(thread_count)
        save = strategy.save

        def save_and_die(sharded_state_dict, checkpoint_dir):
            save(sharded_state_dict, checkpoint_dir)
            torch.distributed.barrier()
            os._exit(17)

        strategy.save = save_and_die
        return strategy

    dist_checkpoint.sync_save_strategy = dying_strategy
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    dist_checkpoint.save_model_checkpoint(model, save_dir, 2)


def _save_then_die_before_tracker(save_dir: str):
    """Re-save iteration 2 (over the crashed save's remains) and die after the rename, before the
    tracker is rewritten."""
    from megatron_hdpissa.checkpoint import atomic
    from megatron_hdpissa.checkpoint import dist as dist_checkpoint

    model = _model(seed=12)

    def die(*args, **kwargs):
        os._exit(18)

    atomic.write_tracker = die
    dist_checkpoint.save_model_checkpoint(model, save_dir, 2)


def test_crash_during_save_keeps_previous_checkpoint_loadable(tmp_path):
    from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info
    from megatron_hdpissa.convert.dist import dist_whole_state_dict
    from megatron_hdpissa.models.config import ModelConfig

    config = ModelConfig.from_hf(dict(LLAMA))
    with pytest.raises(Exception, match="exit code 17|exitcode|17"):
        run_distributed(_save_then_die_after_shards, world_size=2, tp=2, args=(str(tmp_path),))
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    assert tracker.read_text().strip() == "1"
    assert (tmp_path / "iter_0000002.tmp").is_dir() and not (tmp_path / "iter_0000002").exists()
    first = dist_whole_state_dict(tmp_path / "iter_0000001", config)

    with pytest.raises(Exception, match="exit code 18|exitcode|18"):
        run_distributed(_save_then_die_before_tracker, world_size=1, tp=1, args=(str(tmp_path),))
    assert tracker.read_text().strip() == "1"
    assert not (tmp_path / "iter_0000002.tmp").exists()  # the stale remains were cleared first
    ModelConfig.from_hf(dict(LLAMA)).save(tmp_path)
    info = read_checkpoint_info(tmp_path)
    assert (info.iteration, info.ckpt_format) == (1, "torch_dist")
    again = dist_whole_state_dict(info.iter_dir, config)
    assert sorted(first) == sorted(again) and all(torch.equal(first[k], again[k]) for k in first)


# ---- no arbitrary unpickling ----------------------------------------------------------------------
class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_crafted_index_and_common_state_are_refused(tmp_path):
    from megatron_hdpissa.checkpoint.safe_load import load_common_state, read_dcp_metadata

    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ValueError, match="posix.system|os.system|refusing"):
        read_dcp_metadata(tmp_path)
    buf = io.BytesIO()
    torch.save({"x": _Boom()}, buf)
    (tmp_path / "common.pt").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="weights_only"):
        load_common_state(tmp_path)


def test_async_save_is_refused_with_the_reason(tmp_path):
    from megatron_hdpissa.checkpoint.dist import save_dist_checkpoint

    with pytest.raises(ValueError, match="--async-save"):
        save_dist_checkpoint(tmp_path, 1, {}, async_save=True)



# ---- per-slice state (what the trainer's HD-PiSSA factors will use) -------------------------------
FFN, HIDDEN, R, K = 8, 6, 3, 2


def _factor(kind: str, k: int) -> torch.Tensor:
    """Slice k's whole (TP=1) factor: fc1 [gate; up] x r, or r x hidden (row-parallel input)."""
    g = torch.Generator().manual_seed(100 * k + (1 if kind == "fc1" else 2))
    shape = (2 * FFN, R) if kind == "fc1" else (R, HIDDEN)
    return torch.randn(shape, generator=g)


def _tp_part(kind: str, full: torch.Tensor, t: int, tp: int) -> torch.Tensor:
    if kind == "fc1":  # this TP rank's [gate_t; up_t], as megatron-core's linear_fc1 holds it
        gate, up = full.chunk(2)
        n = FFN // tp
        return torch.cat([gate[t * n:(t + 1) * n], up[t * n:(t + 1) * n]])
    n = HIDDEN // tp
    return full[:, t * n:(t + 1) * n]


def _slice_state(slices, t: int, tp: int, fill):
    from megatron_hdpissa.checkpoint.dist import slice_sharded_tensor

    state = {}
    for k in slices:
        for kind, axis in (("fc1", 0), ("proj", 1)):
            tensor = fill(kind, k)
            state[f"{kind}_{k}"] = slice_sharded_tensor(
                f"hd_pissa.decoder.layers.0.{kind}.A", tensor, k, K, tp_axis=axis, tp_rank=t,
                tp_size=tp, swiglu=kind == "fc1")
    return state


def _save_slices_dp2(save_dir: str):
    """TP=1 x DP=2: rank d owns slice d."""
    from megatron_hdpissa.checkpoint.dist import save_dist_checkpoint

    d = torch.distributed.get_rank()
    state = _slice_state([d], 0, 1, lambda kind, k: _factor(kind, k))
    save_dist_checkpoint(save_dir, 1, {"hd_pissa": state}, common_state={"K": K})


def _load_slices_tp2(iter_dir: str):
    """TP=2 x DP=1 with 2 virtual ranks: every rank holds both slices, its TP part of each."""
    from megatron.core import parallel_state as ps

    from megatron_hdpissa.checkpoint.dist import load_dist_checkpoint

    t = ps.get_tensor_model_parallel_rank()
    shapes = {"fc1": (2 * FFN // 2, R), "proj": (R, HIDDEN // 2)}
    state = _slice_state(range(K), t, 2, lambda kind, k: torch.zeros(shapes[kind]))
    loaded = load_dist_checkpoint(iter_dir, {"hd_pissa": state})
    return t, loaded["K"], {name: value for name, value in loaded["hd_pissa"].items()}


def test_per_slice_state_reshards_from_dp2_to_tp2_with_virtual_ranks(tmp_path):
    run_distributed(_save_slices_dp2, world_size=2, tp=1, args=(str(tmp_path),))
    results = run_distributed(_load_slices_tp2, world_size=2, tp=2, args=(str(tmp_path / "iter_0000001"),))
    for t, k_saved, tensors in results:
        assert k_saved == K
        for k in range(K):
            for kind in ("fc1", "proj"):
                want = _tp_part(kind, _factor(kind, k), t, 2)
                assert torch.equal(tensors[f"{kind}_{k}"], want), (t, k, kind)
