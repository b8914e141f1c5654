"""CPU compatibility for megatron-core: the few hard-coded CUDA calls on GPTModel's path, patched
only when CUDA is absent, so the real GPTModel runs forward and backward on CPU with gloo."""
from __future__ import annotations

import contextlib
import types

import torch

_applied = False


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    # Same geometry as megatron-core's version: True marks positions masked out.
    m = torch.ones(sq, skv, dtype=torch.bool)
    kept = torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])
    return ~kept


def _make_cpu_tracker_class(base: type) -> type:
    class CpuRNGStatesTracker(base):
        """megatron-core's RNG tracker with its named streams held as CPU generator states
        (dropout on CPU draws from the CPU default generator)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig = self.states_[orig_name]
                torch.set_rng_state(orig)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


class _NullStream:
    """What `torch.cuda.current_stream()` returns on CPU: megatron-core >= 0.19's DDP gradient
    sync orders its collectives against the current stream; on CPU there is only one stream."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _null_stream(device=None) -> _NullStream:
    return _NullStream()


def _on_cpu(device):
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        return torch.device("cpu")
    return device


def _cpu_factory(fn):
    def wrapped(*args, device=None, **kwargs):
        if device is not None:
            kwargs["device"] = _on_cpu(device)
        return fn(*args, **kwargs)

    wrapped.__name__ = fn.__name__
    return wrapped


class _CpuTorch(types.ModuleType):
    """Stands in for `torch` inside megatron-core's optimizer modules, which create their small
    bookkeeping tensors (found_inf, loss scale, norm buffers) with a literal `device='cuda'`:
    the tensor factories map that to the CPU, everything else is torch itself."""

    _factories = ("tensor", "zeros", "ones", "empty", "full")

    def __init__(self):
        super().__init__("torch")
        for name in self._factories:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


OPTIMIZER_MODULES = ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads",
                     "megatron.core.optimizer.grad_scaler", "megatron.core.utils")
PIPELINE_MODULES = ("megatron.core.pipeline_parallel.schedules", "megatron.core.pipeline_parallel.p2p_communication")


class MegatronCoreChanged(RuntimeError):
    """A megatron-core name the CPU shims replace is gone: the shim would silently stop working."""


def megatron_core_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:  # a source checkout on the path
        import megatron.core

        return str(getattr(megatron.core, "__version__", "unknown"))


def check_patch_targets(targets) -> None:
    """Raise `MegatronCoreChanged` naming the attribute, its module and the installed megatron-core
    version when any `(owner, attribute)` in `targets` no longer exists."""
    for owner, name in targets:
        if not hasattr(owner, name):
            where = owner.__name__ if isinstance(owner, types.ModuleType) else \
                f"{owner.__module__}.{owner.__qualname__}"
            raise MegatronCoreChanged(
                f"megatron_hdpissa's CPU shim replaces {where}.{name}, which megatron-core "
                f"{megatron_core_version()} does not have (renamed or removed): update "
                "megatron_hdpissa/models/compat.py for this release, or run on CUDA")


def _import_modules(names: tuple[str, ...]) -> list[types.ModuleType]:
    import importlib

    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:  # pragma: no cover - layout of another megatron-core release
            continue
    return modules


def _give_modules_torch(proxy: types.ModuleType, modules: list[types.ModuleType]) -> None:
    """Replace `torch` inside each megatron-core module (where it is torch itself)."""
    for module in modules:
        if module.torch is torch:
            module.torch = proxy


# ---- pipeline parallelism: megatron-core's schedules and p2p communication on CPU -------------
class _CpuCuda(types.ModuleType):
    """`torch.cuda` inside the pipeline modules: `synchronize()` (p2p guards batch_isend_irecv
    with it) does nothing on CPU, everything else is torch.cuda itself."""

    def __init__(self):
        super().__init__("torch.cuda")

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _patch_pipeline_modules(modules: list[types.ModuleType], language_module: type) -> None:
    """The schedules allocate their token counters with `device="cuda"` and p2p calls
    `torch.cuda.synchronize()`; a GPTModel stage that holds the tied output layer moves it with
    `weight.data.cuda()` before all-reducing it with the first stage (at PP > 1)."""
    proxy = _CpuTorch()
    proxy.cuda = _CpuCuda()
    _give_modules_torch(proxy, modules)
    setup = language_module.setup_embeddings_and_output_layer

    def setup_on_cpu(self):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *args, **kwargs: t
        try:
            return setup(self)
        finally:
            torch.Tensor.cuda = cuda

    language_module.setup_embeddings_and_output_layer = setup_on_cpu
# ---- end of the pipeline-parallel block -------------------------------------------------------


def ensure_cpu_compat() -> bool:
    """Patch megatron-core for CPU execution if CUDA is unavailable; idempotent.

    Returns True when the patches are (now) active, False when CUDA is present and nothing was
    touched. Patched: `torch.cuda.current_device` (resolves to the CPU device: it feeds
    `device=` in RoPE `get_emb`, the attention memory buffer, TP gather buffers), the default
    and sliding-window causal masks (hard-coded `device="cuda"`), and the RNG tracker, whose
    streams become CPU generator states so `model_parallel_cuda_manual_seed` and
    `get_cuda_rng_tracker().fork()` work. The tracker is re-created empty: seed it afterwards.
    megatron-core's optimizer modules (`get_megatron_optimizer`'s fp32 path, gradient
    clipping, the loss scalers) get a `torch` whose tensor factories map `device='cuda'` to the
    CPU; megatron-core's `DistributedDataParallel` needs `torch.cuda.current_device` and (from
    0.19) a `torch.cuda.current_stream` whose waits do nothing. Every megatron-core name replaced
    is checked first: one that no longer exists raises `MegatronCoreChanged` and nothing is patched.
    """
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available():
        return False

    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils as transformer_utils

    mask_modules = [transformer_utils]
    try:  # modules that imported the mask functions by name
        from megatron.core.fusions import fused_softmax

        mask_modules.append(fused_softmax)
    except ImportError:
        pass
    optimizer_modules, pipeline_modules = _import_modules(OPTIMIZER_MODULES), _import_modules(PIPELINE_MODULES)
    # Every target is checked before anything is patched: a rename fails loudly, and leaves
    # megatron-core untouched.
    check_patch_targets(
        [(m, name) for m in mask_modules for name in ("get_default_causal_mask", "get_sliding_window_causal_mask")]
        + [(mcore_random, name) for name in ("_get_cuda_rng_state", "_set_cuda_rng_state", "CudaRNGStatesTracker",
                                             "_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED")]
        + [(m, "torch") for m in optimizer_modules + pipeline_modules]
        + [(LanguageModule, "setup_embeddings_and_output_layer")])

    torch.cuda.current_device = _cpu_device
    torch.cuda.current_stream = _null_stream
    for module in mask_modules:
        module.get_default_causal_mask = _default_causal_mask
        module.get_sliding_window_causal_mask = _sliding_window_causal_mask

    # Used by the tracker's base class and by activation recomputation (CheckpointFunction).
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    tracker_class = _make_cpu_tracker_class(mcore_random.CudaRNGStatesTracker)
    # initialize_rng_tracker instantiates the module-level name, so later (force-)resets keep
    # producing CPU trackers; isinstance checks against the base class still hold.
    mcore_random.CudaRNGStatesTracker = tracker_class
    # Drop any tracker created before the patch; the next get_cuda_rng_tracker() builds ours.
    mcore_random._CUDA_RNG_STATE_TRACKER = None
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False

    _give_modules_torch(_CpuTorch(), optimizer_modules)
    _patch_pipeline_modules(pipeline_modules, LanguageModule)
    _applied = True
    return True
