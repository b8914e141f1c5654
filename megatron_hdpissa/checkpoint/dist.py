"""megatron-core `torch_dist` checkpoints of a GPTModel plus caller state: saved atomically, loadable at any TP / PP.

Written through `megatron.core.dist_checkpointing` in Megatron-LM's layout.

Layout (what Megatron-LM's `--ckpt-format torch_dist` writes, plus our config files):

    DIR/latest_checkpointed_iteration.txt   the iteration; written last
    DIR/iter_XXXXXXX/metadata.json          megatron-core: {"sharded_backend": "torch_dist", ...}
    DIR/iter_XXXXXXX/common.pt              megatron-core: the non-sharded part (rank 0's)
    DIR/iter_XXXXXXX/.metadata              torch.distributed.checkpoint's index of the shards
    DIR/iter_XXXXXXX/__R_F.distcp           the tensor shards rank R wrote
    DIR/model_config.json, DIR/tokenizer/   as in the legacy layout (atomic.py)

The state dict saved is `{"model": model.sharded_state_dict(), **extra_sharded, **common}`
(Megatron-LM's convention: sharded values anywhere in the nesting are sharded, plain values go
into `common.pt`). Tensors are keyed globally (global layer numbers, whole-model shapes), so any
TP / PP layout that can build the model can load them; megatron-core reshards.

Saving is atomic (`atomic.atomic_iteration_dir`): every rank writes into `DIR/iter_XXXXXXX.tmp/`;
after all ranks finished, rank 0 renames it into place and then rewrites the tracker. A crash
before the rename leaves the previous iteration folder and tracker untouched.

Loading never unpickles arbitrary objects: `common.pt` and sharded objects are read with
`torch.load(weights_only=True)`, and the pickled `.metadata` index through an allow-list of
`torch.distributed.checkpoint` metadata classes (see `safe_load.py`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

import torch

from megatron_hdpissa.checkpoint.atomic import atomic_iteration_dir, iteration_dir_name, world_rank
from megatron_hdpissa.checkpoint.safe_load import safe_common_strategy, safe_sharded_strategy

TORCH_DIST = "torch_dist"
TORCH = "torch"
CKPT_FORMATS = (TORCH_DIST, TORCH)  # Megatron-LM's --ckpt-format names (default torch_dist)
CKPT_FORMAT_FLAG = "--ckpt-format"
DIST_METADATA_FILE = "metadata.json"   # megatron-core's CheckpointingConfig
# Keys of the common state this module writes itself (the caller's common state sits next to them).
COMMON_LAYOUT_KEY = "hdpissa_layout"
FORMAT_TAG = "megatron_hdpissa.torch_dist.v1"


# ---- format detection -------------------------------------------------------------------------
def is_dist_checkpoint_dir(iter_dir) -> bool:
    """True when `iter_dir` (an `iter_XXXXXXX` folder) holds a finished megatron-core
    dist_checkpointing save (its `metadata.json` is written after all shards)."""
    path = Path(iter_dir) / DIST_METADATA_FILE
    if not path.is_file():
        return False
    try:
        backend = json.loads(path.read_text()).get("sharded_backend")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a megatron-core checkpoint config: {e}") from None
    if backend != TORCH_DIST:
        raise ValueError(f"{path}: sharded_backend {backend!r} is not supported (only {TORCH_DIST!r})")
    return True


# ---- the save strategy ------------------------------------------------------------------------
def sync_save_strategy(thread_count: int = 1):
    """A torch_dist save strategy that writes in the calling process.

    Why not megatron-core's default (`TorchDistSaveShardedStrategy`, 0.16.1): even a synchronous
    save runs its async machinery. `FileSystemWriterAsync.prepare_write_data` gets a results
    queue from `filesystem_async._get_write_results_queue()`, which starts a
    `multiprocessing.get_context("spawn").Manager()` server process. A spawned child re-imports
    the parent's `__main__` (`multiprocessing.spawn._fixup_main_from_path`); in a training script
    whose distributed setup runs at module level (or under any launcher whose main module joins
    the process group on import) that child joins the process group / TCP store again and blocks
    there, and the rank blocks forever in `Manager.start()` waiting for the server's address.
    Measured here: 2 gloo ranks under torchrun, the Manager child stuck in `new_group` inside the
    re-executed main module. Even where the Manager starts (a guarded main), the strategy then
    calls `torch.cuda.synchronize()` unconditionally when staging tensors (fails on CPU-only
    torch) and forks one writer process per bucket after gloo's threads exist.

    This strategy keeps megatron-core's planning and format (same state-dict translation, same
    `MCoreSavePlanner`, backend "torch_dist" version 1, readable by the default load strategy) but
    writes with torch.distributed.checkpoint's synchronous `FileSystemWriter`: no processes, no
    Manager, `thread_count` writer threads (1: the calling thread). The async path stays
    available on the returned object (`async_save`, inherited) for `--async-save` on GPU.
    """
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    class SyncTorchDistSaveShardedStrategy(mcore_torch.TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            from torch.distributed import checkpoint as dcp

            flat, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(flat, False)
            writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True,
                                          sync_files=True, thread_count=self.thread_count)
            planner = mcore_torch.MCoreSavePlanner(
                dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False,
                can_run_decentralized_global_plan=False)
            dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)

    return SyncTorchDistSaveShardedStrategy(TORCH_DIST, 1, thread_count=thread_count)


# ---- save and load ----------------------------------------------------------------------------
def save_dist_checkpoint(
    save_dir, iteration: int | str, sharded_state_dict: dict, *,
    common_state: dict | None = None,
    write_rank0_files: Callable[[Path], None] | None = None,
    layout: dict | None = None,
    thread_count: int = 1,
    async_save: bool = False,
):
    """Save `sharded_state_dict` (ShardedTensors / ShardedObjects / factories, nested freely;
    e.g. `{"model": model.sharded_state_dict(), "hd_pissa": {...}}`) plus `common_state`
    (plain values, saved once from rank 0 into `common.pt`, must be `weights_only`-loadable:
    tensors, numbers, strings, lists, dicts) as `save_dir/iter_XXXXXXX/` in torch_dist format.

    Collective: every rank of the default process group calls it with its own shards.
    `write_rank0_files(tmp_iter_dir)` runs on rank 0 after the shards are written and before
    the rename (extra files inside the iteration folder). `layout` (e.g. {"tp": 2, "pp": 1,
    "dp": 2}) is recorded in the common state under `hdpissa_layout` for readers. The tracker is
    written last. Returns the final iteration folder.

    `async_save=True` is refused on CPU: megatron-core's async writer is the process-based one
    described in `sync_save_strategy`.
    """
    from megatron.core import dist_checkpointing

    if async_save:
        raise ValueError("--async-save is not supported by this trainer's torch_dist writer (megatron-core's "
                         "async writer starts a spawn-context Manager and forks writer processes; see "
                         "megatron_hdpissa.checkpoint.dist.sync_save_strategy); save synchronously")
    from megatron_hdpissa.checkpoint.verify import agreed_sharding_check

    state = dict(sharded_state_dict)
    common = dict(common_state or {})
    overlap = set(common) & set(state)
    if overlap:
        raise ValueError(f"keys {sorted(overlap)} are both sharded and common state")
    state.update(common)
    if layout is not None:
        state[COMMON_LAYOUT_KEY] = dict(layout)
    with atomic_iteration_dir(save_dir, iteration) as tmp:
        deferred: list = []
        with _rank0_writes_deferred(deferred), agreed_sharding_check():  # no rank left waiting
            dist_checkpointing.save(state, str(tmp), sharded_strategy=sync_save_strategy(thread_count))
        # dist_checkpointing.save ends with a barrier after metadata.json: every rank's shards exist
        if write_rank0_files is not None and world_rank() == 0 and not deferred:
            try:
                write_rank0_files(tmp)
            except OSError as e:
                deferred.append(e)
        if deferred:  # rank 0 only: atomic_iteration_dir makes every rank raise it
            raise deferred[0]
    return Path(save_dir).absolute() / iteration_dir_name(iteration)


@contextlib.contextmanager
def _rank0_writes_deferred(deferred: list):
    """megatron-core writes `common.pt` and `metadata.json` on rank 0 alone, between collectives:
    raising there would leave the other ranks waiting in the next collective forever. Inside this
    context those two writes record their OSError in `deferred` instead, for after the collectives
    (torch.distributed.checkpoint's own shard writes fail on every rank together)."""
    from megatron.core.dist_checkpointing import serialization

    def deferring(fn):
        def call(*args, **kwargs):
            if deferred:
                return None
            try:
                return fn(*args, **kwargs)
            except (OSError, RuntimeError) as e:  # torch.save on a full disk: RuntimeError "unexpected pos"
                deferred.append(e)
                return None
        return call

    default_common = serialization.get_default_save_common_strategy

    def common_strategy(*args, **kwargs):
        strategy = default_common(*args, **kwargs)
        strategy.save_common = deferring(strategy.save_common)
        return strategy

    old = serialization.get_default_save_common_strategy, serialization.save_config
    serialization.get_default_save_common_strategy = common_strategy
    serialization.save_config = deferring(serialization.save_config)
    try:
        yield
    finally:
        serialization.get_default_save_common_strategy, serialization.save_config = old


def load_dist_checkpoint(iter_dir, sharded_state_dict: dict, *, strict: str = "assume_ok_unexpected") -> dict:
    """Load a torch_dist iteration folder into `sharded_state_dict` (the same nesting as saved,
    built for the current layout: megatron-core reshards). Returns the loaded state dict: tensors
    in place of the ShardedTensors, plus the common state (`common.pt`). Collective."""
    from megatron.core import dist_checkpointing

    from megatron_hdpissa.checkpoint.safe_load import dcp_read_failure, dcp_where
    from megatron_hdpissa.checkpoint.verify import (CheckpointReadError, CheckpointShardingError, agree,
                                                    agreed_sharding_check, flat_tensors, nonfinite_key,
                                                    nonfinite_message)

    iter_dir = Path(iter_dir)
    if not is_dist_checkpoint_dir(iter_dir):
        raise FileNotFoundError(f"{iter_dir} is not a torch_dist checkpoint ({DIST_METADATA_FILE} is missing)")
    global_keys = {path: getattr(v, "key", None) for path, v in flat_tensors(sharded_state_dict)}
    try:
        with agreed_sharding_check():  # no rank left waiting
            loaded = dist_checkpointing.load(sharded_state_dict, str(iter_dir),
                                             sharded_strategy=safe_sharded_strategy(),
                                             common_strategy=safe_common_strategy(), strict=strict)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - torch.distributed.checkpoint raises BaseException
        if isinstance(e, (FileNotFoundError, CheckpointShardingError)):
            raise
        raise dcp_read_failure(iter_dir, e) from None
    # every tensor read, checked on every rank; all ranks raise the same line (collective)
    found = nonfinite_key(flat_tensors(loaded))
    message = None
    if found is not None:
        key = global_keys.get(found[0]) or found[0]
        message = nonfinite_message(dcp_where(iter_dir, key), key, found[1], found[2])
    message = agree(message)
    if message is not None:
        raise CheckpointReadError(message)
    return loaded


# ---- per-slice state (the trainer's HD-PiSSA factors, moments, masters) --------------------------
def slice_sharded_tensor(key: str, tensor: torch.Tensor, slice_index: int, num_slices: int, *,
                         tp_axis: int | None = None, tp_rank: int = 0, tp_size: int = 1,
                         swiglu: bool = False, replica_id=0):
    """A megatron-core ShardedTensor for slice `slice_index` of `num_slices` (HD-PiSSA's K = DP x
    virtual ranks: the slice is a real sharding axis, like the expert axis of MoE) of this TP
    rank's `tensor`: global shape `(num_slices, *whole_tensor_shape)`.

    `tp_axis`: the dimension of `tensor` split over TP (None: replicated over TP, then give a
    `replica_id` > 0 on every TP rank but one). `swiglu=True` for tensors whose `tp_axis` 0 is the
    fused [gate; up] of `linear_fc1` (each TP rank holds [gate_t; up_t]): megatron-core's swiglu
    factory stores gate and up separately so that another TP size reassembles them correctly.
    Key it with the global layer number (the layer's place in the whole model), so pipeline
    stages can change too."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    offsets = [(0, slice_index, num_slices)]
    tp = [] if tp_axis is None else [(tp_axis + 1, tp_rank, tp_size)]
    sharded = ShardedTensor.from_rank_offsets(key, tensor, *offsets, *tp, replica_id=replica_id,
                                              prepend_axis_num=1)
    if not swiglu:
        return sharded
    if tp_axis != 0:
        raise ValueError(f"{key}: swiglu tensors are split over TP along dimension 0")
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    return apply_swiglu_sharded_factory(sharded, tuple(offsets))


# ---- the model --------------------------------------------------------------------------------
MODEL_KEY = "model"


def model_sharded_state_dict(model) -> dict:
    """The GPTModel's sharded state dict, as Megatron-LM saves it under "model"."""
    return model.sharded_state_dict()


def save_model_checkpoint(model, save_dir, iteration: int | str, *, extra_sharded: dict | None = None,
                          common_state: dict | None = None, write_rank0_files=None,
                          layout: dict | None = None, thread_count: int = 1) -> Path:
    """Save `model` (this rank's shard) under "model", `extra_sharded` sharded values under their
    own keys, and `common_state`, atomically (see `save_dist_checkpoint`). Collective."""
    state = {MODEL_KEY: model_sharded_state_dict(model)}
    for key, value in (extra_sharded or {}).items():
        if key == MODEL_KEY:
            raise ValueError(f"extra sharded state may not use the key {MODEL_KEY!r}")
        state[key] = value
    if layout is None:
        layout = current_layout()
    return save_dist_checkpoint(save_dir, iteration, state, common_state=common_state,
                                write_rank0_files=write_rank0_files, layout=layout,
                                thread_count=thread_count)


def current_layout() -> dict:
    """{"tp", "pp", "dp", "world"} sizes of megatron-core's initialised groups."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"tp": 1, "pp": 1, "dp": 1, "world": 1}
    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(),
            "world": torch.distributed.get_world_size()}


def load_model_checkpoint(model, iter_dir, *, extra_sharded: dict | None = None) -> dict:
    """Load the "model" part of a torch_dist iteration folder into `model` (strict, at the
    model's own layout) and `extra_sharded` (sharded values built by the caller for the current
    layout) from theirs. Returns the loaded state dict (extra state and common state; "model"
    removed). Collective."""
    state = {MODEL_KEY: model_sharded_state_dict(model)}
    state.update(extra_sharded or {})
    loaded = load_dist_checkpoint(iter_dir, state)
    model_state = loaded.pop(MODEL_KEY)
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{iter_dir} does not fit the model: {e}") from e
    return loaded

