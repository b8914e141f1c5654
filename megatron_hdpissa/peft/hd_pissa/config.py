"""HDPiSSAConfig: every knob of the adapters, decomposition and aggregation in one dataclass."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_hdpissa.peft.common import AdapterSettings, ConfigError

MASTER_WEIGHT_MODES = ("fp32-base", "sharded-fp32", "compensated-bf16", "none")
MASTER_WEIGHTS = ("auto", *MASTER_WEIGHT_MODES)
AGGREGATION_PATHS = ("factors", "dense")
AGGREGATION = ("auto", *AGGREGATION_PATHS)
BUCKET_SIZE = 1 << 24  # elements per communication bucket
CONSISTENCY_CHECK_INTERVAL = 50  # optimizer steps between checks that all DP ranks agree


@dataclass(kw_only=True)
class HDPiSSAConfig(AdapterSettings):
    """Configuration of HD-PiSSA.

    Errors are `ConfigError`s naming these parameters; the trainer maps them to its flags
    (`--hd-pissa-<name>`, see training/arguments.py).

    rank: per-slice adapter rank `r`.
    alpha: scale numerator, `s = alpha / rank` as a float; None means
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
        hold identical weights (0 disables; default CONSISTENCY_CHECK_INTERVAL).
    master_weights: where the per-step update accumulates:
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

    virtual_ranks: int = 1
    update_factors: bool = False
    consistency_check_interval: int = CONSISTENCY_CHECK_INTERVAL
    master_weights: str = "auto"
    aggregation: str = "auto"
    bucket_size: int = BUCKET_SIZE

    def __post_init__(self):
        super().__post_init__()
        if self.virtual_ranks < 1:
            raise ConfigError("virtual_ranks", f"{{name}} must be >= 1, got {self.virtual_ranks}")
        if self.master_weights not in MASTER_WEIGHTS:
            raise ConfigError("master_weights",
                              f"{{name}} must be one of {MASTER_WEIGHTS}, got {self.master_weights!r}")
        if self.aggregation not in AGGREGATION:
            raise ConfigError("aggregation", f"{{name}} must be one of {AGGREGATION}, got {self.aggregation!r}")
        if self.consistency_check_interval < 0:
            raise ConfigError("consistency_check_interval",
                              f"{{name}} must be >= 0 (0 disables), got {self.consistency_check_interval}")
        if self.bucket_size < 1:
            raise ConfigError("bucket_size", f"{{name}} must be >= 1, got {self.bucket_size}")
