"""A converter's output folder: built next to the target and renamed into place; an HF folder's other files copied."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


# ---- atomic output ----------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_output_dir(target: Path, force: bool, sources: tuple[Path, ...] = ()):
    """Yield a temp dir next to `target`; on success it replaces `target` by rename."""
    target = Path(target).absolute()
    for source in sources:
        source = source.resolve()
        if source == target.resolve() or target.resolve() in source.parents:
            raise ValueError(f"output {target} would overwrite the input {source}")
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass --force to overwrite it")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / target.name)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for path in sorted(src.iterdir()):
        if (path.is_file() and not path.name.startswith(".") and path.name not in _NOT_COPIED
                and not path.name.endswith(_WEIGHT_SUFFIXES)):
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
