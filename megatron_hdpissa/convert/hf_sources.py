"""An HF folder read lazily by tensor name (or tensors in memory) for the HF -> megatron slicing, and its other files copied."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_hdpissa.checkpoint.verify import check_finite, read_failure


# ---- reading a Hugging Face folder lazily -----------------------------------------------------
class SafetensorsFolder:
    """Tensor access by name over an HF folder's safetensors files, reading only what is asked."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors weights in {hf_dir} (PyTorch .bin checkpoints are not read: "
                "re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        self._handles = {}
        self.file_of = {}
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {index.name} but missing")
            try:
                self._handles[name] = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors' errors name neither file nor cause
                raise read_failure(path, e) from None
            keys = self._handles[name].keys()
            self.file_of.update({k: name for k in keys if weight_map is None or weight_map.get(k) == name})

    def keys(self) -> set[str]:
        return set(self.file_of)

    def _slice(self, key: str, shape: tuple[int, ...]):
        if key not in self.file_of:
            raise ValueError(f"{self.hf_dir}: tensor {key!r} is missing from the safetensors files")
        sl = self._handles[self.file_of[key]].get_slice(key)
        if tuple(sl.get_shape()) != tuple(shape):
            raise ValueError(
                f"{self.hf_dir / self.file_of[key]}: tensor {key!r} has shape {tuple(sl.get_shape())}, "
                f"the config implies {tuple(shape)}"
            )
        return sl

    def _checked(self, key: str, read) -> torch.Tensor:
        """`read()` of tensor `key`, its file named when the read fails or the values are not finite."""
        path = self.hf_dir / self.file_of.get(key, "?")
        try:
            tensor = read()
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated file: safetensors names neither file nor key
            raise read_failure(f"{path} (tensor {key!r})", e) from None
        check_finite({key: tensor}, path)
        return tensor

    def full(self, key: str, shape) -> torch.Tensor:
        return self._checked(key, lambda: self._slice(key, shape)[:])

    def rows(self, key: str, shape, start: int, stop: int) -> torch.Tensor:
        return self._checked(key, lambda: self._slice(key, shape)[start:stop])

    def cols(self, key: str, shape, start: int, stop: int) -> torch.Tensor:
        return self._checked(key, lambda: self._slice(key, shape)[:, start:stop].contiguous())

    def part(self, key: str, shape, index: tuple) -> torch.Tensor:
        """`tensor[index]` (ints and slices), e.g. one expert's rows of a fused 3-D expert tensor."""
        return self._checked(key, lambda: self._slice(key, shape)[index].contiguous())


# ---- whole HF tensors already in memory -------------------------------------------------------
class TensorSource:
    """`SafetensorsFolder`'s slicing interface over in-memory whole HF tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: Path):
        self.tensors, self.where = tensors, where

    def keys(self) -> set[str]:
        return set(self.tensors)

    def full(self, key: str, shape) -> torch.Tensor:
        if key not in self.tensors:
            raise ValueError(f"{self.where}: tensor {key!r} is missing")
        t = self.tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.where}: tensor {key!r} has shape {tuple(t.shape)}, the config "
                             f"implies {tuple(shape)}")
        return t

    def rows(self, key: str, shape, start: int, stop: int) -> torch.Tensor:
        return self.full(key, shape)[start:stop]

    def cols(self, key: str, shape, start: int, stop: int) -> torch.Tensor:
        return self.full(key, shape)[:, start:stop].contiguous()

    def part(self, key: str, shape, index: tuple) -> torch.Tensor:
        return self.full(key, shape)[index].contiguous()



# ---- an HF folder's other files ----------------------------------------------------------------
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    """Copy `src`'s files that are neither weights nor the model config / weight index (the
    tokenizer and the like) into `dst`; returns their names."""
    copied = []
    for path in sorted(src.iterdir()):
        if (path.is_file() and not path.name.startswith(".") and path.name not in _NOT_COPIED
                and not path.name.endswith(_WEIGHT_SUFFIXES)):
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
