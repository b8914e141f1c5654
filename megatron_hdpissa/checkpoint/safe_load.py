"""Loading torch_dist checkpoints without unpickling code: an allow-list unpickler, weights_only reads."""
from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path

import torch

COMMON_FILE = "common.pt"              # megatron-core's COMMON_STATE_FNAME
DCP_METADATA_FILE = ".metadata"        # torch.distributed.checkpoint's index


# Modules whose classes (dataclasses / enums describing tensors, chunks and files) make up a
# torch.distributed.checkpoint `.metadata` index; any class defined there may be rebuilt.
_ALLOWED_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint._extension",
)
# Single globals such an index also refers to (torch 2.13: dtype, Size, the layout by name,
# the checkpoint id as a path).
_ALLOWED_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _SafeMetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's `.metadata` index (a `Metadata` dataclass of
    tensor / chunk / byte descriptors) and refuses every other global, so a crafted checkpoint
    cannot run code on load."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _ALLOWED_METADATA_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        raise pickle.UnpicklingError(
            f"checkpoint index refers to {module}.{name}, which a torch_dist checkpoint's "
            f"{DCP_METADATA_FILE} never holds; refusing to unpickle it")


def read_dcp_metadata(iter_dir):
    """torch.distributed.checkpoint's `Metadata` of a torch_dist folder, read with the allow-list
    unpickler."""
    path = Path(iter_dir) / DCP_METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {iter_dir} is not a finished torch_dist checkpoint")
    with open(path, "rb") as f:
        try:
            return _SafeMetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: {e}") from None


def dcp_shard_files(iter_dir) -> dict[str, list[str]]:
    """Tensor key -> the torch_dist shard files (`__R_F.distcp`) holding its chunks."""
    out: dict[str, list[str]] = {}
    for index, info in read_dcp_metadata(iter_dir).storage_data.items():
        files = out.setdefault(index.fqn, [])
        if info.relative_path not in files:
            files.append(info.relative_path)
    return out


def dcp_truncated_files(iter_dir) -> list[str]:
    """The shard files of a torch_dist folder shorter than its `.metadata` index says, as
    "path (N of M bytes)"."""
    need: dict[str, int] = {}
    try:
        for info in read_dcp_metadata(iter_dir).storage_data.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    except (OSError, ValueError):
        return []
    out = []
    for name, size in sorted(need.items()):
        path = Path(iter_dir) / name
        have = path.stat().st_size if path.is_file() else 0
        if have < size:
            out.append(f"{path} ({have} of {size} bytes)")
    return out


def dcp_read_failure(iter_dir, exc: BaseException):
    """`verify.read_failure` naming the truncated shard files when there are any, else the folder."""
    from megatron_hdpissa.checkpoint.verify import CheckpointReadError, read_failure

    truncated = dcp_truncated_files(iter_dir)
    if truncated:
        return CheckpointReadError(f"cannot read checkpoint file {', '.join(truncated)}: truncated")
    return read_failure(iter_dir, exc)


def dcp_where(iter_dir, key: str) -> str:
    """`iter_dir/__R_F.distcp` holding `key` (the folder when unknown)."""
    try:
        files = dcp_shard_files(iter_dir).get(key) or []
    except (OSError, ValueError):
        files = []
    return ", ".join(str(Path(iter_dir) / f) for f in files) or str(iter_dir)


# What Megatron-LM / Megatron-Bridge put into a checkpoint's pickled state besides tensors and
# plain values: `args` (an argparse.Namespace whose values include paths, a signal, megatron-core
# enums and, with --use-dist-ckpt optimizers, an OptimizerConfig dataclass), the NumPy RNG state
# (legacy files) and TransformerEngine's `_extra_state` (BytesIO in older TE). The same set
# megatron-core 0.16.1 registers (megatron/core/safe_globals.py), named here so the allow-list does
# not depend on whether or which megatron-core was imported. Every one is rebuilt from plain data
# (a constructor call with plain arguments, an enum lookup, or `__dict__` filled in); nothing here
# runs code. Globals of torch, collections, builtins and _codecs are left to torch's own
# weights_only rules; anything else is refused before unpickling.
MEGATRON_LM_GLOBALS = (
    "argparse.Namespace", "types.SimpleNamespace", "pathlib.PosixPath", "signal.Signals", "_io.BytesIO",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
    "numpy.dtype", "numpy.dtypes.UInt32DType",
    "megatron.core.enums.ModelType", "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.CudaGraphScope", "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.core.rerun_state_machine.RerunDiagnostic", "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
)
_TORCH_JUDGED_MODULES = ("torch", "collections", "builtins", "__builtin__", "_codecs")


def pickled_globals(path) -> list[str]:
    """`module.name` of every class / function a `torch.save` archive's pickle refers to, read
    statically (pickletools; nothing is unpickled)."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                raise ValueError(f"{path} holds no data.pkl: not a torch.save archive")
            data = archive.read(name)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a torch.save zip archive") from None
    found = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.append(".".join(arg.split(" ", 1)))
            elif op.name == "STACK_GLOBAL":  # torch.save writes protocol 2: never this opcode
                found.append("<a STACK_GLOBAL reference>")
    except Exception as e:  # noqa: BLE001 - a corrupt pickle: named with the file
        raise ValueError(f"{path}: unreadable pickle: {e}") from None
    return found


def _allowed_global(name: str):
    """The object `name` (one of MEGATRON_LM_GLOBALS) refers to, imported; None when its module
    or attribute does not exist in this environment."""
    import importlib

    import warnings

    module, _, attr = name.rpartition(".")
    try:
        with warnings.catch_warnings():  # numpy 2: numpy.core is numpy._core's deprecated alias
            warnings.simplefilter("ignore", DeprecationWarning)
            return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _load_weights_only(path, what: str, *, mmap: bool = False):
    """`torch.load(weights_only=True)` of `path` with MEGATRON_LM_GLOBALS allowed, after refusing
    (one line naming the file and the global) any other non-torch global its pickle refers to."""
    try:
        refs = pickled_globals(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {what} {path} with torch.load(weights_only=True): {e}") from None
    refused = sorted({r for r in refs if r not in MEGATRON_LM_GLOBALS
                      and r.split(".", 1)[0] not in _TORCH_JUDGED_MODULES})
    if refused:
        raise ValueError(
            f"cannot read {what} {path} with torch.load(weights_only=True): it refers to "
            f"{', '.join(refused[:3])}, which a Megatron checkpoint never holds (allowed besides "
            "tensors and plain values: argparse.Namespace and the plain types in Megatron-LM's "
            "args); refusing to unpickle it")
    # the classes BUILD fills in need not appear as globals (numpy's dtype classes do not): every
    # allowed name is resolved, megatron-core's only when referenced (importing it is slow)
    names = [n for n in MEGATRON_LM_GLOBALS if not n.startswith("megatron.") or n in refs]
    allowed = [(obj, name) for name in names if (obj := _allowed_global(name)) is not None]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot read {what} {path} with torch.load(weights_only=True): {e}") from e


def load_megatron_lm_file(path, what: str = "checkpoint file") -> dict:
    """A Megatron-LM / Megatron-Bridge `torch.save` file (a legacy `model_optim_rng.pt`, memory-mapped)
    read with the allow-list: tensors, plain values, `args` as an argparse.Namespace."""
    state = _load_weights_only(path, what, mmap=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds {type(state).__name__}, not a dict")
    return state


def load_common_state(iter_dir) -> dict:
    """The common state (`common.pt`) of a torch_dist iteration folder, `weights_only`."""
    state = _load_weights_only(Path(iter_dir) / COMMON_FILE, "common state")
    if not isinstance(state, dict):
        raise ValueError(f"{Path(iter_dir) / COMMON_FILE} holds {type(state).__name__}, not a dict")
    return state


def safe_common_strategy():
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class WeightsOnlyCommonLoadStrategy(TorchCommonLoadStrategy):
        """megatron-core's common-state loader with `weights_only=True` spelled out (megatron-core
        0.16.1 calls plain `torch.load`, whose default depends on the torch version and on
        TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""

        def load_common(self, checkpoint_dir):
            from megatron.core.dist_checkpointing.core import CheckpointingException

            try:
                return _load_weights_only(Path(checkpoint_dir) / COMMON_FILE, "common state")
            except FileNotFoundError as e:
                raise CheckpointingException(f"{Path(checkpoint_dir) / COMMON_FILE} does not exist") from e

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            raise NotImplementedError("sharded objects are stored inside the torch_dist shards")

    return WeightsOnlyCommonLoadStrategy()


def safe_filesystem_reader(iter_dir):
    """torch.distributed.checkpoint `FileSystemReader` (megatron-core's caching subclass) whose
    `.metadata` index is read through the allow-list unpickler."""
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )

    class SafeReader(CachedMetadataFileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if self._cached_metadata is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata = read_dcp_metadata(self.path)
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                self._cached_metadata = metadata
            return self._cached_metadata

    return SafeReader(str(iter_dir))


def read_global_tensors(iter_dir, keys=None) -> dict[str, torch.Tensor]:
    """The whole (unsharded) tensors of a torch_dist folder keyed as megatron-core saved them
    (global shapes; layers stacked on a leading layer axis under `decoder.layers.*`), read in
    this process without a process group. `keys`: only these (default: every tensor)."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = safe_filesystem_reader(iter_dir)
    metadata = reader.read_metadata()
    tensors = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata) and (keys is None or key in keys):
            tensors[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    missing = set(keys or ()) - set(tensors)
    if missing:
        raise ValueError(f"{iter_dir}: tensors {sorted(missing)[:5]} are not in the checkpoint")
    from megatron_hdpissa.checkpoint.verify import check_finite

    try:
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - torch.distributed.checkpoint raises BaseException
        raise dcp_read_failure(iter_dir, e) from None
    check_finite(tensors, iter_dir, shard_of=lambda key: dcp_where(iter_dir, key))
    return tensors


def safe_sharded_strategy():
    """megatron-core's torch_dist load strategy reading the `.metadata` index through the
    allow-list and sharded objects (`_extra_state` and the like) with `weights_only=True`.
    torch's `DefaultLoadPlanner.load_bytes` calls `torch.load(..., weights_only=False)` and
    `FileSystemReader.read_metadata` plain `pickle.load`; megatron-core 0.16.1 builds both inside
    `TorchDistLoadShardedStrategy.load`, so the two hooks are swapped for the duration of the
    call."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    class SafeLoadPlanner(mcore_torch.MCoreLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            # Deserialise with weights_only (raises on anything but tensors and plain data), then
            # hand torch's planner a re-serialised copy of that already-checked object.
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - re-raised naming the entry
                raise ValueError(f"sharded object {read_item.dest_index.fqn!r} is not loadable with "
                                 f"torch.load(weights_only=True): {e}") from e
            checked = io.BytesIO()
            torch.save(obj, checked)
            checked.seek(0)
            super().load_bytes(read_item, checked)

    class SafeTorchDistLoadShardedStrategy(mcore_torch.TorchDistLoadShardedStrategy):
        def load(self, sharded_state_dict, checkpoint_dir):
            with _swapped(mcore_torch, MCoreLoadPlanner=SafeLoadPlanner,
                          _get_filesystem_reader=lambda d, cache_metadata=False: safe_filesystem_reader(d)):
                return super().load(sharded_state_dict, checkpoint_dir)

        def load_tensors_metadata(self, checkpoint_dir, metadata=None):
            return super().load_tensors_metadata(checkpoint_dir, metadata or read_dcp_metadata(checkpoint_dir))

        def load_sharded_metadata(self, checkpoint_dir):
            with _swapped(mcore_torch, _get_filesystem_reader=lambda d, cache_metadata=False: safe_filesystem_reader(d)):
                return super().load_sharded_metadata(checkpoint_dir)

    return SafeTorchDistLoadShardedStrategy()


@contextlib.contextmanager
def _swapped(module, **attrs):
    old = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)

