"""convert/training_adapters.py: the offline merge of a legacy LoRA / PiSSA training checkpoint's factors,
at TP = 2, against `W + s B A` added by hand at the fused rows written out here (q / k / v of each
query group, gate / up halves of fc1, the whole of a row-parallel weight)."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_hdpissa.checkpoint.legacy import CheckpointInfo
from megatron_hdpissa.convert.training_adapters import merge_lowrank_factors, merge_training_adapters
from megatron_hdpissa.models.config import ModelConfig

LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, model_type="llama",
             architectures=["LlamaForCausalLM"], tie_word_embeddings=False)
TP, R, ALPHA, ITERATION = 2, 3, 6.0, 3
QKV, FC1, PROJ = "decoder.layers.1.self_attention.linear_qkv", "decoder.layers.0.mlp.linear_fc1", \
    "decoder.layers.0.self_attention.linear_proj"


def _rows(part: str) -> list[int]:
    """Local rows of a part on each TP rank: 2 query groups per rank of [q0 q1 (16 rows), k (8), v (8)];
    fc1's local [gate (48); up (48)]."""
    if part in ("gate", "up"):
        return list(range(0, 48)) if part == "gate" else list(range(48, 96))
    start, stop = {"q": (0, 16), "k": (16, 24), "v": (24, 32)}[part]
    return [32 * g + i for g in range(2) for i in range(start, stop)]


def _checkpoint(root, peft: str):
    """A legacy training checkpoint folder holding only what the merge reads, and the TP shards."""
    g = torch.Generator().manual_seed(5)
    shards, adapters = [], []
    for _ in range(TP):
        shard = {f"{QKV}.weight": torch.randn(64, 64, generator=g, dtype=torch.float64),
                 f"{FC1}.weight": torch.randn(96, 64, generator=g, dtype=torch.float64),
                 f"{PROJ}.weight": torch.randn(64, 32, generator=g, dtype=torch.float64)}
        adapter = {}
        for layer, part, rows, cols in ((QKV, "q", 32, 64), (QKV, "v", 16, 64), (FC1, "up", 48, 64),
                                        (PROJ, "w", 64, 32)):
            adapter[f"{layer}.lora.a.{part}"] = torch.randn(R, cols, generator=g, dtype=torch.float64)
            adapter[f"{layer}.lora.b.{part}"] = torch.randn(rows, R, generator=g, dtype=torch.float64)
        shards.append(shard)
        adapters.append(adapter)
    iter_dir = root / f"iter_{ITERATION:07d}"
    (iter_dir / "hd_pissa").mkdir(parents=True)
    for t, adapter in enumerate(adapters):
        torch.save({"adapter": adapter}, iter_dir / "hd_pissa" / f"dp_000_tp_{t:02d}.pt")
    meta = {"peft": peft, "config": {"rank": R, "alpha": ALPHA}}
    (iter_dir / "hd_pissa" / "meta.json").write_text(json.dumps(meta))
    (root / "latest_checkpointed_iteration.txt").write_text(f"{ITERATION}\n")
    return shards, adapters, meta


def _expected(shards, adapters) -> list[dict]:
    out = []
    for shard, adapter in zip(shards, adapters):
        want = {k: v.clone() for k, v in shard.items()}
        for key_a, a in adapter.items():
            if ".lora.a." not in key_a:
                continue
            layer, part = key_a.split(".lora.a.")
            delta = (ALPHA / R) * adapter[f"{layer}.lora.b.{part}"] @ a
            if part == "w":
                want[f"{layer}.weight"] += delta
            else:
                for i, row in enumerate(_rows(part)):
                    want[f"{layer}.weight"][row] += delta[i]
        out.append(want)
    return out


def test_lowrank_factors_are_added_at_their_rows(tmp_path):
    shards, adapters, meta = _checkpoint(tmp_path, "lora")
    want = _expected(shards, adapters)
    config = ModelConfig.from_hf(dict(LLAMA))
    assert merge_lowrank_factors(shards, config, tmp_path, ITERATION, meta) == 2 * 4
    for t in range(TP):
        for key in want[t]:
            torch.testing.assert_close(shards[t][key], want[t][key], rtol=0, atol=1e-12, msg=f"rank {t} {key}")
    untouched = _rows("k")  # k rows carry no factor
    assert torch.equal(shards[0][f"{QKV}.weight"][untouched], want[0][f"{QKV}.weight"][untouched])


@pytest.mark.parametrize("peft, merged", [("pissa", 8), ("hd-pissa", 0)])
def test_only_lowrank_training_checkpoints_are_merged(tmp_path, peft, merged):
    shards, adapters, _ = _checkpoint(tmp_path, peft)
    before = [{k: v.clone() for k, v in s.items()} for s in shards]
    info = CheckpointInfo(tmp_path, ITERATION, TP, (), 1)
    assert merge_training_adapters(shards, ModelConfig.from_hf(dict(LLAMA)), info) == merged
    changed = any(not torch.equal(s[k], b[k]) for s, b in zip(shards, before) for k in s)
    assert changed == bool(merged)


def test_a_missing_adapter_file_is_named(tmp_path):
    shards, _, meta = _checkpoint(tmp_path, "lora")
    (tmp_path / f"iter_{ITERATION:07d}" / "hd_pissa" / "dp_000_tp_01.pt").unlink()
    with pytest.raises(FileNotFoundError, match="dp_000_tp_01.pt is missing.*TP rank 1"):
        merge_lowrank_factors(shards, ModelConfig.from_hf(dict(LLAMA)), tmp_path, ITERATION, meta)
