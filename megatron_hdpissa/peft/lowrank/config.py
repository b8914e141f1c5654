"""LowRankConfig: the LoRA / PiSSA baselines' settings (method, rank, scale, targets, SVD)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from megatron_hdpissa.peft.common import LORA, PISSA, AdapterSettings, ConfigError

LOWRANK_METHODS = (LORA, PISSA)


@dataclass
class LowRankConfig(AdapterSettings):
    """Configuration of the LoRA / PiSSA baselines (identical adapters on every data-parallel rank).

    Errors are `ConfigError`s naming these parameters; the trainer maps them to its flags
    (`--lora-rank`, `--lora-alpha`, `--lora-target-modules`, `--peft`, see training/arguments.py).

    method: "lora" (Kaiming-uniform A, zero B) or "pissa" (A, B from the top-r singular
        components, W_res = W - s B A).
    rank, alpha: adapter rank `r` and scale numerator, `s = alpha / rank` (alpha None: s = 1).
    target_modules, trainable_modules: patterns as in HDPiSSAConfig.
    fused_decomposition: one adapter per fused linear_qkv / linear_fc1 instead of one per part.
    svd_method, svd_oversampling, svd_niter: PiSSA's decomposition (as in HDPiSSAConfig, K = 1).
    seed: LoRA's initialisation stream and the randomized SVD's.
    """

    method: str = LORA

    def __post_init__(self):
        if self.method not in LOWRANK_METHODS:
            raise ConfigError("method", f"{{name}} must be one of {LOWRANK_METHODS}, got {self.method!r}")
        super().__post_init__()

    @classmethod
    def from_dict(cls, d: dict, method: Optional[str] = None) -> "LowRankConfig":
        """From `to_dict`'s output, or from an HDPiSSAConfig dict (the baselines' checkpoints
        before LowRankConfig; give `method`): keys of no LowRankConfig field are ignored."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if method is not None:
            kw["method"] = method
        return cls(**kw)
