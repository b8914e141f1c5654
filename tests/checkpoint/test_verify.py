"""Loads verify what they read; saves that fail say why in one line and leave no litter.

Corrupt inputs are made here the way a user meets them: random bytes written into a torch_dist
shard, a truncated shard, an all-NaN checkpoint, a model_config.json of another architecture; and
saves onto a real small tmpfs (ENOSPC) or with the writer refused (EACCES)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import run_distributed

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_llama_hf_dir):
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("verify")
    return {fmt: convert_hf_to_megatron(tiny_llama_hf_dir, root / fmt, ckpt_format=fmt, progress=False)
            for fmt in ("torch_dist", "torch")}


def _copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def _to_hf(ckpt, out) -> tuple[int, str]:
    """tools/convert_megatron_to_hf.py as a user runs it: (exit code, its `error:` lines; import-time
    warnings of megatron-core are not counted: they are not this tool's). No traceback."""
    p = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--megatron-dir", str(ckpt), "--save",
                        str(out), "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, "\n".join(line for line in p.stderr.splitlines() if line.startswith("error:"))


def _shard(ckpt) -> Path:
    return sorted((Path(ckpt) / "iter_0000000").glob("*.distcp"))[0]


def _nan_dist(ckpt, tmp_path) -> Path:
    """The torch_dist base with every weight NaN, written by the converter's own writer."""
    from megatron_hdpissa.convert.dist import dist_whole_state_dict, save_whole_as_dist
    from megatron_hdpissa.models.config import ModelConfig

    config = ModelConfig.load(ckpt)
    whole = dist_whole_state_dict(ckpt / "iter_0000000", config)
    out = _copy(ckpt, tmp_path / "nan")
    shutil.rmtree(out / "iter_0000000")
    save_whole_as_dist({k: torch.full_like(v, float("nan")) for k, v in whole.items()}, config, out, 0)
    return out


# ---- loads ------------------------------------------------------------------------------------
def test_random_bytes_in_a_torch_dist_shard_fail_naming_the_shard(bases, tmp_path):
    ckpt = _copy(bases["torch_dist"], tmp_path / "ckpt")
    shard = _shard(ckpt)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # 2 MB (or the shard's middle half) of random bytes
        f.seek(size // 4)
        f.write(torch.randint(0, 256, (min(2 << 20, size // 2),), generator=torch.Generator().manual_seed(0),
                              dtype=torch.uint8).numpy().tobytes())
    code, err = _to_hf(ckpt, tmp_path / "hf")
    assert code == 1 and err.count("error:") == 1, err
    # the bytes land in a tensor's data (non-finite values: the shard and key are named) or in a
    # pickled header (unreadable: the folder is named)
    assert str(shard) in err or err.startswith(f"error: cannot read checkpoint file {ckpt / 'iter_0000000'}"), err
    assert not (tmp_path / "hf").exists()


def test_a_truncated_torch_dist_shard_fails_naming_the_folder(bases, tmp_path):
    ckpt = _copy(bases["torch_dist"], tmp_path / "ckpt")
    shard = _shard(ckpt)
    os.truncate(shard, shard.stat().st_size // 3)
    code, err = _to_hf(ckpt, tmp_path / "hf")
    assert code == 1 and err.count("error:") == 1, err
    assert err.startswith(f"error: cannot read checkpoint file {shard} ({shard.stat().st_size} of "), err
    assert err.endswith("bytes): truncated"), err


def test_an_all_nan_checkpoint_is_not_exported(bases, tmp_path):
    ckpt = _nan_dist(bases["torch_dist"], tmp_path)
    code, err = _to_hf(ckpt, tmp_path / "hf")
    assert code == 1 and "non-finite values" in err and ".distcp" in err and err.count("error:") == 1, err
    assert not (tmp_path / "hf").exists()


def test_a_non_finite_legacy_shard_fails_naming_file_and_key(bases, tmp_path):
    from megatron_hdpissa.checkpoint.verify import CheckpointReadError
    from megatron_hdpissa.convert.load import load_megatron_state_dict

    ckpt = _copy(bases["torch"], tmp_path / "ckpt")
    path = ckpt / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=True)
    key = "decoder.layers.1.mlp.linear_fc2.weight"
    state["model"][key][3, 5] = float("inf")
    torch.save(state, path)
    with pytest.raises(CheckpointReadError) as e:
        load_megatron_state_dict(ckpt, 0, 1)
    assert str(e.value).startswith(f"{path}: tensor 'model.{key}' holds 1 non-finite values"), e.value
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CheckpointReadError, match=f"cannot read checkpoint file {path} .truncated or corrupt."):
        load_megatron_state_dict(ckpt, 0, 1)


def test_hf_to_megatron_refuses_nan_and_truncated_safetensors(tiny_llama_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    hf = _copy(tiny_llama_hf_dir, tmp_path / "hf")
    file = hf / "model.safetensors"
    tensors = load_file(str(file))
    tensors["model.layers.0.self_attn.k_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})
    for fmt in ("torch", "torch_dist"):
        with pytest.raises(ValueError, match=f"{file}: tensor 'model.layers.0.self_attn.k_proj.weight' holds 1 "):
            convert_hf_to_megatron(hf, tmp_path / f"out_{fmt}", ckpt_format=fmt, progress=False)
        assert not (tmp_path / f"out_{fmt}").exists()
    os.truncate(file, file.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"cannot read checkpoint file {file}"):
        convert_hf_to_megatron(hf, tmp_path / "out", progress=False)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_megatron_to_hf_refuses_a_model_config_of_another_architecture(bases, tmp_path, fmt):
    ckpt = _copy(bases[fmt], tmp_path / "ckpt")
    config = json.loads((ckpt / "model_config.json").read_text())
    for field, value in (("num_layers", 1), ("num_attention_heads", 4), ("ffn_hidden_size", 64)):
        (ckpt / "model_config.json").write_text(json.dumps({**config, field: value}))
        code, err = _to_hf(ckpt, tmp_path / "hf")
        assert code == 1 and err.count("error:") == 1, (field, err)
        assert "model_config.json" in err or ("layers" in err and field == "num_layers"), (field, err)
        assert not (tmp_path / "hf").exists()


def _load_base(ckpt):
    """Every rank loads the base as the trainer does; the error each rank raises."""
    from megatron_hdpissa.convert.load import load_gpt_model

    try:
        load_gpt_model(ckpt)
    except Exception as e:  # noqa: BLE001 - the message is what is tested
        return f"{type(e).__name__}: {e}"
    return "loaded"


def test_the_trainer_load_of_a_nan_base_fails_alike_on_every_rank(bases, tmp_path):
    ckpt = _nan_dist(bases["torch_dist"], tmp_path)
    msgs = run_distributed(_load_base, 2, 2, args=(str(ckpt),))
    assert msgs[0] == msgs[1] and msgs[0].startswith("CheckpointReadError: ") and ".distcp: tensor" in msgs[0], msgs
    assert run_distributed(_load_base, 2, 2, args=(str(bases["torch_dist"]),)) == ["loaded", "loaded"]
    truncated = _copy(bases["torch_dist"], tmp_path / "truncated")
    os.truncate(_shard(truncated), _shard(truncated).stat().st_size // 3)
    msgs = run_distributed(_load_base, 2, 2, args=(str(truncated),))
    assert msgs[0] == msgs[1] and msgs[0].startswith(
        f"CheckpointReadError: cannot read checkpoint file {_shard(truncated)} ("), msgs


# ---- saves ------------------------------------------------------------------------------------
def _save_iter(save_dir, iteration, fill: int):
    from megatron_hdpissa.checkpoint.atomic import atomic_iteration_dir

    with atomic_iteration_dir(save_dir, iteration) as tmp:
        torch.save(torch.zeros(fill // 4), tmp / "weights.pt")


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (root may mount one); skipped where mount is refused."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_disk_names_the_folder_and_enospc_removes_the_tmp_and_keeps_the_tracker(small_fs):
    from megatron_hdpissa.checkpoint.atomic import read_tracker
    from megatron_hdpissa.checkpoint.verify import CheckpointIOError

    save = small_fs / "run"
    _save_iter(save, 1, 600_000)
    with pytest.raises(CheckpointIOError) as e:  # torch.save says "unexpected pos": the cause is dug out
        _save_iter(save, 2, 600_000)
    msg = str(e.value)
    assert msg.startswith(f"cannot save checkpoint {save / 'iter_0000002'}: No space left on device"), msg
    assert "\n" not in msg
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert read_tracker(save) == 1


def test_a_refused_write_names_the_folder_and_the_permission(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_hdpissa.checkpoint.atomic import atomic_iteration_dir, read_tracker
    from megatron_hdpissa.checkpoint.verify import CheckpointIOError

    _save_iter(tmp_path, 1, 64)
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "iter_0000002.tmp" / "__0_0.distcp"))
    with pytest.raises(CheckpointIOError) as e:  # as torch.distributed.checkpoint wraps a rank's error
        with atomic_iteration_dir(tmp_path, 2):
            raise CheckpointException("save", {0: (denied, None)})
    assert str(e.value).startswith(f"cannot save checkpoint {tmp_path / 'iter_0000002'}: Permission denied "
                                   f"({denied.filename})"), e.value
    assert not (tmp_path / "iter_0000002.tmp").exists() and read_tracker(tmp_path) == 1


def _save_failing_on_rank(save_dir, failing_rank: int):
    import torch.distributed as dist

    from megatron_hdpissa.checkpoint.atomic import atomic_iteration_dir

    try:
        with atomic_iteration_dir(save_dir, 3) as tmp:
            if dist.get_rank() == failing_rank:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp / f"rank{failing_rank}.pt"))
            (tmp / f"rank{dist.get_rank()}.pt").write_text("ok")
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return "saved"


def test_a_save_failing_on_one_rank_fails_on_every_rank_with_one_line(tmp_path):
    from megatron_hdpissa.checkpoint.atomic import read_tracker

    msgs = run_distributed(_save_failing_on_rank, 2, 1, args=(str(tmp_path), 1))
    assert msgs[0] == msgs[1], msgs
    assert msgs[0].startswith(f"CheckpointIOError: cannot save checkpoint {tmp_path / 'iter_0000003'}: No space "
                              f"left on device ({tmp_path / 'iter_0000003.tmp' / 'rank1.pt'})"), msgs
    assert list(tmp_path.iterdir()) == [] and read_tracker(tmp_path) is None


def test_torch_dist_save_onto_a_full_disk(bases, small_fs):
    """The converter's torch_dist writer (megatron-core dist_checkpointing) onto a full tmpfs."""
    from megatron_hdpissa.checkpoint.atomic import read_tracker
    from megatron_hdpissa.checkpoint.verify import CheckpointIOError
    from megatron_hdpissa.convert.dist import dist_whole_state_dict, save_whole_as_dist
    from megatron_hdpissa.models.config import ModelConfig

    src = bases["torch_dist"]
    config = ModelConfig.load(src)
    whole = dist_whole_state_dict(src / "iter_0000000", config)
    save_whole_as_dist(whole, config, small_fs, 1)
    with pytest.raises((CheckpointIOError, ValueError)) as e:
        for it in range(2, 12):  # until the disk is full
            save_whole_as_dist(whole, config, small_fs, it)
    msg = str(e.value)
    assert isinstance(e.value, CheckpointIOError) and "No space left on device" in msg and "\n" not in msg, msg
    assert not list(small_fs.glob("*.tmp")) and read_tracker(small_fs) == it - 1


def test_save_retain_keeps_the_newest_and_the_resumed_one(tmp_path):
    from megatron_hdpissa.checkpoint.atomic import prune_iterations

    for it in (2, 4, 6, 8):
        _save_iter(tmp_path, it, 64)
    assert prune_iterations(tmp_path, 2, keep=tmp_path / "iter_0000002") == ["iter_0000004"]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002", "iter_0000006", "iter_0000008"]
    assert prune_iterations(tmp_path, 1) == ["iter_0000002", "iter_0000006"]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000008"]


def _save_with_common_failing_on_rank0(save_dir):
    """A torch_dist save whose rank-0-only write (megatron-core's common.pt) hits ENOSPC."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_hdpissa.checkpoint.dist import save_dist_checkpoint

    rank, real = dist.get_rank(), torch.save

    def save(obj, f, *args, **kwargs):
        if rank == 0 and str(f).endswith("common.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *args, **kwargs)

    torch.save = save
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.full((2, 3), float(rank)), (0, rank, 2))}
    try:
        save_dist_checkpoint(save_dir, 1, state, common_state={"note": 1})
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        torch.save = real
    return "saved"


def test_a_rank0_only_write_failing_fails_every_rank_without_a_hang(tmp_path):
    msgs = run_distributed(_save_with_common_failing_on_rank0, 2, 1, args=(str(tmp_path),))
    assert msgs[0] == msgs[1] and msgs[0].startswith(
        f"CheckpointIOError: cannot save checkpoint {tmp_path / 'iter_0000001'}: No space left on device "
        f"({tmp_path / 'iter_0000001.tmp' / 'common.pt'})"), msgs
    assert list(tmp_path.iterdir()) == []


def test_save_retain_must_not_be_negative(capsys):
    from megatron_hdpissa.training.arguments import parse_args

    base = ["--pretrained-checkpoint", "x", "--data-path", "y", "--train-iters", "1"]
    assert parse_args(base + ["--save-retain", "2"]).save_retain == 2
    with pytest.raises(SystemExit):
        parse_args(base + ["--save-retain", "-1"])
    assert "--save-retain must be >= 0 (0 keeps every checkpoint), got -1" in capsys.readouterr().err
