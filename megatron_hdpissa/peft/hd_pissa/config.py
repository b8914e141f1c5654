"""HDPiSSAConfig: every knob of the adapters, decomposition and aggregation in one dataclass."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

DEFAULT_TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
SVD_METHODS = ("exact", "randomized")
MASTER_WEIGHTS = ("auto", "fp32-base", "sharded-fp32", "compensated-bf16", "none")
AGGREGATION = ("auto", "factors", "dense")


@dataclass
class HDPiSSAConfig:
    """Configuration of HD-PiSSA.

    rank: per-slice adapter rank `r` (`--hd-pissa-rank`).
    alpha: scale numerator, `s = alpha / rank` as a float (`--hd-pissa-alpha`); None means
        `alpha = rank` (s = 1), which is what the published recipe (r = alpha = 16) uses.
    target_modules: which parallel linears get adapters. Each entry matches a module whose
        dotted name equals it or ends with `.entry`; an entry starting with `re:` is a regular
        expression matched against the whole name.
    fused_decomposition: decompose fused `linear_qkv` / `linear_fc1` as one matrix instead of
        per logical projection (q, k, v / gate, up), which is the published method's default.
    svd_method: "exact" (`torch.linalg.svd`) or "randomized" (`torch.svd_lowrank` with
        `q = K*r + svd_oversampling` and `svd_niter` power iterations). The default oversampling
        is K*r (q = 2Kr: a smaller sketch misses much of the top-Kr subspace, see
        benchmarks/RESULTS.md); matrices where q exceeds half the smaller side use the exact SVD.
    virtual_ranks: slices held by each process; the method sees `K = dp_size * virtual_ranks`
        slices. Each local slice must be fed its own micro-batches (see `active_slice`).
    update_factors: let the factors move (`A <- A - dA`) instead of resetting every step.
    trainable_modules: patterns (same syntax as target_modules) of other parameters to keep
        trainable (e.g. norms); they are trained data-parallel with averaged gradients.
    consistency_check_interval: every N optimizer steps verify that all data-parallel ranks
        hold identical weights (0 disables).
    master_weights: where the per-step update accumulates (`--hd-pissa-master-weights`):
        "fp32-base" (the weights themselves are fp32), "sharded-fp32" (DP rank k keeps an fp32
        master of its 1/K row block of each targeted weight, updates it, then the low-precision
        blocks are all-gathered: ZeRO-1 memory, no lost updates), "compensated-bf16" (Kahan
        summation with a bf16 compensation buffer), "none" (add to the weight in its own dtype:
        loses bf16 updates; for comparison only). "auto": fp32-base for fp32 weights, else
        sharded-fp32.
    aggregation: "factors" (all-gather the deltas dA, dB: K r (m + n) elements per layer),
        "dense" (all-reduce each rank's m x n update), or "auto": per layer, the smaller.
    bucket_size: elements per communication bucket (deltas and parameter all-gathers).
    """

    rank: int = 16
    alpha: Optional[float] = None
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES
    fused_decomposition: bool = False
    svd_method: str = "exact"
    svd_oversampling: Optional[int] = None
    svd_niter: int = 4
    virtual_ranks: int = 1
    update_factors: bool = False
    trainable_modules: Sequence[str] = field(default_factory=tuple)
    consistency_check_interval: int = 0
    seed: int = 1234
    master_weights: str = "auto"
    aggregation: str = "auto"
    bucket_size: int = 1 << 24

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(t for t in self.target_modules.split(",") if t)
        if isinstance(self.trainable_modules, str):
            self.trainable_modules = tuple(t for t in self.trainable_modules.split(",") if t)
        self.target_modules = tuple(self.target_modules)
        self.trainable_modules = tuple(self.trainable_modules)
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"--hd-pissa-rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not float(self.alpha) > 0:
            raise ValueError(
                f"--hd-pissa-alpha must be > 0 (the scale is alpha / rank), got {self.alpha!r}"
            )
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"--hd-pissa-svd must be one of {SVD_METHODS}, got {self.svd_method!r}")
        if self.virtual_ranks < 1:
            raise ValueError(f"--hd-pissa-virtual-ranks must be >= 1, got {self.virtual_ranks}")
        if self.master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"--hd-pissa-master-weights must be one of {MASTER_WEIGHTS}, got {self.master_weights!r}")
        if self.aggregation not in AGGREGATION:
            raise ValueError(f"--hd-pissa-aggregation must be one of {AGGREGATION}, got {self.aggregation!r}")
        if not self.target_modules:
            raise ValueError("--hd-pissa-target-modules is empty")
        if (self.svd_oversampling is not None and self.svd_oversampling < 0) or self.svd_niter < 0:
            raise ValueError("--hd-pissa-svd-oversampling and --hd-pissa-svd-niter must be >= 0")

    @property
    def scale(self) -> float:
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return alpha / float(self.rank)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["trainable_modules"] = list(self.trainable_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HDPiSSAConfig":
        return cls(**d)
