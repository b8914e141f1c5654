"""End to end on real SmolLM2 weights (truncated): fine-tune with 2 DP ranks, held-out loss goes
down, the merged HF export reproduces the trained model's logits, kill-and-resume reproduces the
uninterrupted run, a crash while saving keeps the previous checkpoint, bad input fails clearly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.trainer import expect_error, expect_errors, finetune_main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def material(tmp_path_factory, smollm2_hf_dir, gsm8k_path):
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
    from megatron_hdpissa.data.gsm8k import split_gsm8k
    from megatron_hdpissa.data.sft import write_jsonl

    root = tmp_path_factory.mktemp("ft")
    base = convert_hf_to_megatron(smollm2_hf_dir, root / "base", tp_size=1, progress=False)
    train, heldout = split_gsm8k(str(gsm8k_path), num_heldout=319, seed=0)
    write_jsonl(train[:96], str(root / "train.jsonl"))
    write_jsonl(heldout[:16], str(root / "heldout.jsonl"))
    return {"root": root, "base": base, "train": root / "train.jsonl", "heldout": root / "heldout.jsonl"}


def common_args(m, **over):
    args = {
        "--pretrained-checkpoint": m["base"], "--data-path": m["train"], "--valid-data-path": m["heldout"],
        "--micro-batch-size": 2, "--global-batch-size": 8, "--seq-length": 96, "--lr": 3e-4,
        "--lr-decay-style": "constant", "--hd-pissa-rank": 8, "--no-progress": None, "--seed": 7,
        "--ckpt-format": "torch",  # these tests read the legacy files (torch_dist: test_resume_dist.py)
    }
    args.update(over)
    out = []
    for k, v in args.items():
        if v is False:
            continue
        out.append(k)
        if v is not None:
            out.append(str(v))
    return out


def _logits(ckpt_dir, tokens):
    from megatron_hdpissa.convert.load import load_gpt_model

    model, _ = load_gpt_model(ckpt_dir, parallel_output=False)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1])[None], attention_mask=None)


def _weights(ckpt_dir, iteration, pp: int = 1):
    """TP rank 0's whole-model weights (pipeline stages joined)."""
    from megatron_hdpissa.models.pipeline_stages import merge_pipeline_stages
    from megatron_hdpissa.models.config import ModelConfig

    it = Path(ckpt_dir) / f"iter_{iteration:07d}"
    names = ["mp_rank_00"] if pp == 1 else [f"mp_rank_00_{p:03d}" for p in range(pp)]
    stages = [torch.load(it / n / "model_optim_rng.pt", weights_only=True)["model"] for n in names]
    return stages[0] if pp == 1 else merge_pipeline_stages(stages, ModelConfig.load(ckpt_dir))


def test_finetune_lowers_heldout_loss_and_export_matches(material):
    from transformers import AutoModelForCausalLM

    save, export = material["root"] / "run", material["root"] / "hf"
    argv = common_args(material, **{"--train-iters": 8, "--save": save, "--export-hf": export})
    results = run_distributed(finetune_main, 2, 1, args=(argv,))
    r = results[0]
    assert r["valid_loss_after"] < r["valid_loss_before"] - 0.05, r
    # weights moved, and the export is the trained model
    tokens = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    ours = run_distributed(_logits, 1, 1, args=(save, tokens))[0]
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max(), (ours - theirs).abs().max()
    base = _weights(material["base"], 0)
    trained = _weights(save, 8)
    moved = [k for k in base if isinstance(base[k], torch.Tensor) and not torch.equal(base[k], trained[k])]
    assert any("linear_qkv" in k for k in moved) and all(
        any(t in k for t in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")) for k in moved), moved


NORMS = {"--hd-pissa-trainable-modules": "re:.*layernorm.*"}  # stepped by megatron-core's optimizer


# DP=2; and PP=2 x DP=1 with two virtual ranks (K = 2 either way), one layer per stage; both
# checkpoint formats (torch_dist: the norms' moments through megatron-core's optimizer's own
# sharded_state_dict)
LAYOUTS = {"dp2": ({"--ckpt-format": "torch"}, 1),
           "pp2": ({"--pipeline-model-parallel-size": 2, "--hd-pissa-virtual-ranks": 2,
                    "--global-batch-size": 4, "--ckpt-format": "torch"}, 2),
           "dp2-torch_dist": ({"--ckpt-format": "torch_dist"}, 1)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kill_and_resume_reproduces_uninterrupted_run(material, layout):
    root = material["root"]
    flags, pp = LAYOUTS[layout]
    full = root / f"uninterrupted_{layout}"
    r_full = run_distributed(finetune_main, 2, 1, pp=pp, args=(common_args(material, **{
        "--train-iters": 6, "--save": full, **NORMS, **flags}),))[0]
    assert r_full["others_optimizer"] == "ChainedOptimizer", "norms go through get_megatron_optimizer"

    killed = root / f"killed_{layout}"
    from megatron_hdpissa.distributed.groups import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megatron_hdpissa.finetune",
           *common_args(material, **{"--train-iters": 6, "--save": killed, "--save-interval": 2, **NORMS, **flags})]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    tracker = killed / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while not tracker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # the whole job (torchrun and its workers)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved_at = int(tracker.read_text())
    assert 2 <= saved_at < 6

    r = run_distributed(finetune_main, 2, 1, pp=pp, args=(common_args(material, **{
        "--train-iters": 6, "--save": killed, "--load": killed, **NORMS, **flags}),))[0]
    assert r["start"] == saved_at
    if flags["--ckpt-format"] == "torch_dist":  # every saved tensor: weights, factors, moments
        from megatron_hdpissa.checkpoint.safe_load import read_global_tensors

        sa, sb = read_global_tensors(full / "iter_0000006"), read_global_tensors(killed / "iter_0000006")
        assert set(sa) == set(sb) and any(k.startswith("optimizer.state.exp_avg_sq.") for k in sa), sorted(sa)[:5]
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
        return
    a, b, a0 = _weights(full, 6, pp), _weights(killed, 6, pp), _weights(material["base"], 0)
    norms = [k for k in a if "layernorm" in k or "layer_norm" in k]
    assert norms and any(not torch.equal(a[k], a0[k]) for k in norms), "the norms were trained"
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
    for rank_file in (full / "iter_0000006" / "hd_pissa").glob("dp_*.pt"):
        sa = torch.load(rank_file, weights_only=True)
        sb = torch.load(killed / "iter_0000006" / "hd_pissa" / rank_file.name, weights_only=True)
        for key, st in sa["optimizer"]["state"].items():
            assert torch.equal(st["exp_avg_sq"], sb["optimizer"]["state"][key]["exp_avg_sq"])
        assert sa["data"] == sb["data"]
    if pp > 1:  # the factors and moments belong to one stage: another PP is refused, naming the flag
        msg = run_distributed(expect_error, 1, 1, args=(common_args(material, **{
            "--train-iters": 8, "--load": killed, **NORMS, "--hd-pissa-virtual-ranks": 2,
            "--global-batch-size": 4}),))[0]
        assert "--pipeline-model-parallel-size = 2, this run has 1" in msg, msg


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively, from /proc (torchrun puts workers in new sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_resume_refuses_another_layout(material):
    save = material["root"] / "run"  # written by the 2-rank test above (or written here)
    if not (save / "latest_checkpointed_iteration.txt").exists():
        run_distributed(finetune_main, 2, 1, args=(common_args(material, **{"--train-iters": 1, "--save": save}),))
    msg = run_distributed(expect_error, 1, 1, args=(common_args(material, **{"--train-iters": 9, "--load": save}),))[0]
    assert "data-parallel size" in msg and "= 2, this run has 1" in msg, msg


def test_bad_input_errors(material, tmp_path, tiny_llama_hf_dir):
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    garbled = tmp_path / "garbled.jsonl"
    lines = [json.dumps({"question": "q", "answer": "a"})] * 2 + ["{not json"]
    garbled.write_text("\n".join(lines) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    tiny = convert_hf_to_megatron(tiny_llama_hf_dir, tmp_path / "tiny", tp_size=1, progress=False)
    cases = [
        common_args(material, **{"--train-iters": 1, "--data-path": garbled}),
        common_args(material, **{"--train-iters": 1, "--data-path": empty}),
        common_args(material, **{"--train-iters": 1, "--pretrained-checkpoint": tmp_path / "missing"}),
        # SmolLM2's 49152-token tokenizer on a model with a 256-entry vocabulary
        common_args(material, **{"--train-iters": 1, "--pretrained-checkpoint": tiny,
                                 "--tokenizer-model": material["base"] / "tokenizer"}),
        common_args(material, **{"--train-iters": 1, "--hd-pissa-rank": 400}),
        common_args(material, **{"--train-iters": 1, "--hd-pissa-alpha": 0}),
    ]
    msgs = run_distributed(expect_errors, 1, 1, args=(cases,))[0]
    assert f"{garbled}:3" in msgs[0], msgs[0]
    assert str(empty) in msgs[1] and "no examples" in msgs[1], msgs[1]
    assert "missing" in msgs[2] and "does not exist" in msgs[2], msgs[2]
    assert "--tokenizer-model" in msgs[3] and "256" in msgs[3], msgs[3]
    assert "decoder.layers.0.self_attention.linear_qkv" in msgs[4] and "--hd-pissa-rank 400" in msgs[4], msgs[4]
    assert "--hd-pissa-alpha" in msgs[5], msgs[5]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from megatron_hdpissa.checkpoint import trainer_legacy as checkpointing
    from megatron_hdpissa.checkpoint.atomic import read_tracker
    from megatron_hdpissa.distributed.groups import ParallelGroups

    groups = ParallelGroups(None, None, 0, 1, 0, 1)
    model = torch.nn.Linear(4, 3)
    checkpointing.save_checkpoint(tmp_path, 1, model, {"iteration": 1}, {"peft": "x"}, groups)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    real_save = torch.save
    calls = []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpointing.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointing.save_checkpoint(tmp_path, 2, model, {"iteration": 2}, {"peft": "x"}, groups)
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    assert read_tracker(tmp_path) == 1
    assert not (tmp_path / "iter_0000002").exists()
    loaded = torch.load(tmp_path / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["model"]
    for k in first:
        assert torch.equal(loaded[k], first[k])
    assert checkpointing.load_rank_state(tmp_path, groups)["iteration"] == 1
