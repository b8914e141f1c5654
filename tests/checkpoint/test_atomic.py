"""checkpoint/atomic.py: the tracker (one parser, Megatron-LM's "release" rule, read the same by every
reader), atomic iteration folders (a crash at any point leaves the previous iteration tracked and
complete; two ranks' files land in one folder) and converters' atomic output folders."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from megatron_hdpissa.checkpoint import atomic
from megatron_hdpissa.checkpoint.atomic import (atomic_iteration_dir, atomic_output_dir, iteration_dir_name,
                                                parse_tracker, read_tracker, write_tracker)

TRACKER = "latest_checkpointed_iteration.txt"


# ---- the tracker ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("release", "release"), ("release\n", "release"), ("0\n", 0),
                                         (" 1200 \n", 1200)])
def test_tracker_values(tmp_path, text, value):
    (tmp_path / TRACKER).write_text(text)
    assert parse_tracker(text) == value
    assert read_tracker(tmp_path) == value


@pytest.mark.parametrize("text", ["", "latest", "-1", "1.5", "Release"])
def test_bad_tracker_values_are_refused_naming_the_file(tmp_path, text):
    (tmp_path / TRACKER).write_text(text)
    with pytest.raises(ValueError, match=f"{TRACKER}.*'release'"):
        read_tracker(tmp_path)


def test_no_tracker_is_none(tmp_path):
    assert read_tracker(tmp_path) is None


def test_iteration_dir_names():
    assert [iteration_dir_name(i) for i in (0, 7, 1234567, "release")] == [
        "iter_0000000", "iter_0000007", "iter_1234567", "release"]


def test_write_tracker_round_trips_and_leaves_no_temp_file(tmp_path):
    for value in (3, "release"):
        write_tracker(tmp_path, value)
        assert (tmp_path / TRACKER).read_text() == f"{value}\n"
        assert read_tracker(tmp_path) == value
    assert sorted(p.name for p in tmp_path.iterdir()) == [TRACKER]


def test_release_is_read_alike_by_both_checkpoint_readers(tmp_path):
    """A released legacy checkpoint (tracker "release", folder release/) and a training
    checkpoint's meta in it: `read_checkpoint_info` and `is_training_checkpoint` / `read_meta`
    (which used to refuse "release") agree on the folder."""
    from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info, save_rank_file
    from megatron_hdpissa.checkpoint.trainer_state import is_training_checkpoint, read_meta, write_meta

    save_rank_file(tmp_path / "release" / "mp_rank_00" / "model_optim_rng.pt", {"w": torch.ones(2)},
                   iteration="release", tp_size=1, tp_rank=0, pp_size=1, pp_rank=0)
    (tmp_path / TRACKER).write_text("release\n")
    info = read_checkpoint_info(tmp_path)
    assert (info.iteration, info.iter_dir.name, info.tp_size, info.ckpt_format) == ("release", "release", 1, "torch")
    assert not is_training_checkpoint(tmp_path)
    write_meta(tmp_path / "release", {"peft": "lora"})
    assert is_training_checkpoint(tmp_path) and read_meta(tmp_path) == {"peft": "lora"}


# ---- atomic iteration folders ----------------------------------------------------------------------
def _save(save_dir, iteration, content: str):
    with atomic_iteration_dir(save_dir, iteration) as tmp:
        assert tmp.name == f"{iteration_dir_name(iteration)}.tmp" and not any(tmp.iterdir())
        (tmp / "state.json").write_text(json.dumps(content))
    return save_dir / iteration_dir_name(iteration)


def _content(save_dir, iteration) -> str:
    return json.loads((save_dir / iteration_dir_name(iteration) / "state.json").read_text())


def test_saves_rename_then_track(tmp_path):
    assert _save(tmp_path, 1, "one") == tmp_path / "iter_0000001"
    assert read_tracker(tmp_path) == 1 and _content(tmp_path, 1) == "one"
    _save(tmp_path, 2, "two")
    _save(tmp_path, 2, "two again")  # re-saving an iteration replaces it
    assert read_tracker(tmp_path) == 2 and _content(tmp_path, 2) == "two again"
    assert _content(tmp_path, 1) == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002", TRACKER]


def test_a_crash_while_writing_keeps_the_previous_checkpoint_tracked(tmp_path):
    _save(tmp_path, 1, "one")
    with pytest.raises(OSError, match="disk full"):
        with atomic_iteration_dir(tmp_path, 2) as tmp:
            (tmp / "half").write_text("x")
            raise OSError("disk full (simulated)")
    assert read_tracker(tmp_path) == 1 and _content(tmp_path, 1) == "one"
    # issue 23: a failed save removes its partial .tmp folder (a killed one leaves it: see below)
    assert not (tmp_path / "iter_0000002").exists() and not (tmp_path / "iter_0000002.tmp").exists()
    (tmp_path / "iter_0000002.tmp").mkdir()
    (tmp_path / "iter_0000002.tmp" / "half").write_text("x")  # what a killed save leaves
    _save(tmp_path, 2, "two")  # the next save clears the remains first
    assert read_tracker(tmp_path) == 2 and sorted(p.name for p in (tmp_path / "iter_0000002").iterdir()) == [
        "state.json"]
    assert not (tmp_path / "iter_0000002.tmp").exists()


@pytest.mark.parametrize("step", ["_swap_into_place", "write_tracker"])
def test_a_crash_while_renaming_or_before_the_tracker_keeps_the_previous_checkpoint_tracked(
        tmp_path, monkeypatch, step):
    _save(tmp_path, 1, "one")

    def die(*args, **kwargs):
        raise OSError(f"killed in {step}")

    monkeypatch.setattr(atomic, step, die)
    with pytest.raises(OSError, match="killed"):
        _save(tmp_path, 2, "two")
    assert read_tracker(tmp_path) == 1 and _content(tmp_path, 1) == "one"


def _save_one_file_per_rank(rank: int, save_dir: str, store_path: str):
    """One of 2 gloo ranks (no megatron-core: only the default group matters here)."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(store_path, 2), rank=rank,
                                         world_size=2)
    try:
        with atomic_iteration_dir(save_dir, 5) as tmp:
            time.sleep(1.0 * rank)  # the last rank writes late: rank 0 must wait for it before the rename
            (tmp / f"rank_{rank}").write_text(str(rank))
        listing = sorted(p.name for p in (Path(save_dir) / "iter_0000005").iterdir())
        (Path(save_dir) / f"listing_{rank}.json").write_text(json.dumps(listing))
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_writes_into_one_folder_before_the_rename(tmp_path):
    save = tmp_path / "save"
    torch.multiprocessing.start_processes(_save_one_file_per_rank, args=(str(save), str(tmp_path / "store")),
                                          nprocs=2, start_method="spawn")
    for rank in range(2):  # after the context, on every rank
        assert json.loads((save / f"listing_{rank}.json").read_text()) == ["rank_0", "rank_1"]
    assert read_tracker(save) == 5


# ---- converters' output folders ----------------------------------------------------------------------
def test_output_folder_replaces_only_on_success_and_with_force(tmp_path):
    target, source = tmp_path / "out", tmp_path / "src"
    source.mkdir()
    with atomic_output_dir(target, force=False, sources=(source,)) as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with pytest.raises(FileExistsError, match="--force"):
        with atomic_output_dir(target, force=False):
            pass
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_output_dir(target, force=True) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("half-way")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_output_dir(target, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp folders left
    for bad in (source, tmp_path):  # the input itself, or a folder holding it
        with pytest.raises(ValueError, match="would overwrite the input"):
            with atomic_output_dir(bad, force=True, sources=(source,)):
                pass
