"""A training checkpoint as a Hugging Face PEFT LoRA adapter for the original base W_0
(`adapter_config.json` + `adapter_model.safetensors`, what `peft.PeftModel.from_pretrained(base,
DIR)` and multi-LoRA servers load).

Per targeted HF module (q/k/v/o/gate/up/down of a layer the run adapted), with `s = alpha / r`:
- LoRA: the trained factors `B, A` at rank r and scale s (the checkpoint's base must be W_0).
- PiSSA: PEFT's PiSSA -> LoRA conversion: `W_res + s B A = W_0 + s [B | -B_0] [A; A_0]`, rank 2r,
  scale s, with `s B_0 A_0 = W_0 - W_res` (the rank-r truncated SVD of that difference, which is
  the PiSSA initialisation; its remainder is reported and is rounding-level).
- HD-PiSSA: the rank-R truncated SVD of `dW = W_T - W_0` (default R = 2 K r), `B = U sqrt(S)`,
  `A = sqrt(S) V^T`, scale 1; modules whose rank differs (R above min(m, n)) go into
  `rank_pattern` / `alpha_pattern`. The relative remainder `||dW - B A||_F / ||dW||_F` of the
  stored factors is reported per matrix and overall (log and the folder's README.md).
W_0 is cast to the checkpoint's dtype before differencing (a bf16 run's dW holds its updates, not
the cast). Every tensor outside the adapted modules must equal W_0's (else the adapter could not
reproduce the model). One matrix at a time in float64; factors are written in float32.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_hdpissa.checkpoint.atomic import atomic_output_dir
from megatron_hdpissa.checkpoint.trainer_state import is_training_checkpoint, read_meta
from megatron_hdpissa.convert.adapter_sources import base_tensors, lowrank_factors, targeted_modules, whole_shards
from megatron_hdpissa.convert.hf_mapping import hf_names, hf_tensors_from_megatron
from megatron_hdpissa.peft.common import HD_PISSA, LORA, PISSA, ConfigError, lowrank_scale

CONFIG_FILE, WEIGHTS_FILE, README_FILE = "adapter_config.json", "adapter_model.safetensors", "README.md"
PEFT_PREFIX = "base_model.model."  # PEFT's saved key: base_model.model.<module>.lora_{A,B}.weight


@dataclass
class AdapterReport:
    """What was written: method, the ranks, per-matrix `(module, rank, ||dW||_F, ||dW - B A||_F)`."""

    method: str
    rank: int
    scale: float
    matrices: list = field(default_factory=list)

    @property
    def remainder(self) -> float:
        """Overall relative remainder `sqrt(sum ||dW - B A||^2) / sqrt(sum ||dW||^2)`."""
        total = math.sqrt(sum(n * n for _, _, n, _ in self.matrices))
        return math.sqrt(sum(e * e for _, _, _, e in self.matrices)) / total if total else 0.0

    def relative(self) -> dict:
        return {m: (e / n if n else 0.0) for m, _, n, e in self.matrices}


def truncated_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, A)` with `B A` the best rank-`rank` approximation of `delta` (float64 SVD):
    `B = U_R sqrt(S_R)`, `A = sqrt(S_R) V_R^T`; the rank is capped at min(m, n)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def export_hf_adapter(checkpoint, out_dir, *, base=None, rank: Optional[int] = None, force: bool = False,
                      log: Callable[[str], None] = print) -> AdapterReport:
    """Write the adapter of training checkpoint `checkpoint` (either format) for the original
    base `base` (a Megatron checkpoint or HF folder; default: the run's --pretrained-checkpoint
    from its meta) into `out_dir`. `rank`: HD-PiSSA's R (default 2 K r). Errors naming a library
    parameter are `ConfigError`s (`rank`, `base`, `target_modules`)."""
    if not is_training_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is not a training checkpoint of this trainer (no hd_pissa/meta.json): "
                         "the adapter export needs the method and its factors")
    meta = read_meta(checkpoint)
    method, cfg = meta.get("peft"), meta["config"]
    if method not in (HD_PISSA, LORA, PISSA):
        raise ConfigError("method", f"a --peft {method} checkpoint has no adapter: every tensor may have changed; "
                                    "export the merged model instead")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError("rank", f"{{name}} must be a positive integer, got {rank!r}")
    if rank is not None and method != HD_PISSA:
        raise ConfigError("rank", f"{{name}} applies to HD-PiSSA checkpoints; a --peft {method} adapter is "
                                  f"exported at its own rank ({cfg['rank']})")
    base = base or meta.get("args", {}).get("pretrained_checkpoint")
    if not base:
        raise ConfigError("base", "{name} is needed: the checkpoint does not record its original base W_0")
    if not Path(base).is_dir():
        raise ConfigError("base", f"{{name}} {base} (the original base W_0) does not exist")
    k = int(meta.get("dp_size", 1)) * int(meta.get("virtual_ranks", 1))
    scale = 1.0 if method == HD_PISSA else lowrank_scale(cfg["rank"], cfg.get("alpha"))
    target_rank = (rank or 2 * k * cfg["rank"]) if method == HD_PISSA else cfg["rank"] * (2 if method == PISSA else 1)
    report = AdapterReport(method, target_rank, scale)

    info, config, shards = whole_shards(checkpoint)
    if getattr(config, "num_experts", None):
        raise ValueError(f"{checkpoint}: a mixture-of-experts model ({config.model_type}): the adapter export "
                         "covers dense models only; export the merged model instead")
    modules = targeted_modules(config, cfg["target_modules"])
    factors = lowrank_factors(info, config, shards) if method != HD_PISSA else {}
    names = hf_names(config)
    tensors, changed = {}, []
    for (name, w), (_, w0) in zip(hf_tensors_from_megatron(shards, config, names), base_tensors(base, config, names)):
        module = name[:-len(".weight")]
        w0 = w0.to(w.dtype)
        if module not in modules:
            if not torch.equal(w, w0):
                changed.append(name)
            continue
        delta = w.double() - w0.double()  # HD-PiSSA: W_T - W_0; LoRA: 0; PiSSA: W_res - W_0 = -s B_0 A_0
        if method == HD_PISSA:
            b, a = truncated_factors(delta, target_rank)
        elif method == LORA:
            if delta.abs().max() > 0:
                raise ConfigError("base", f"{{name}} {base}: {name} of the LoRA checkpoint differs from it (max "
                                          f"|diff| {delta.abs().max():.3g}): not the base this run was trained on")
            b, a = factors[module]
        else:
            b0, a0 = truncated_factors(-delta / scale, cfg["rank"])
            _record(report, f"{module} (PiSSA W_0 - W_res)", b0.shape[1], -delta / scale, b0, a0)
            b, a = torch.cat([factors[module][0], -b0], 1), torch.cat([factors[module][1], a0], 0)
        b32, a32 = b.float().contiguous(), a.float().contiguous()
        if method == HD_PISSA:
            _record(report, module, b32.shape[1], delta, b32, a32)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = a32, b32
    if changed:
        raise ValueError(f"{checkpoint}: {len(changed)} tensors outside the adapted modules differ from the base "
                         f"{base} ({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}): an adapter cannot "
                         "carry them (trained norms?); export the merged model instead")
    _write(out_dir, tensors, report, config, cfg, modules, checkpoint, info, base, k, force,
           sources=(Path(checkpoint),))
    _log(report, log, out_dir)
    return report


def _record(report: AdapterReport, module: str, rank: int, delta: torch.Tensor, b, a) -> None:
    err = torch.linalg.matrix_norm(delta - b.double() @ a.double()).item()
    report.matrices.append((module, rank, torch.linalg.matrix_norm(delta).item(), err))


def adapter_config(tensors: dict, report: AdapterReport, num_layers: int, base_name) -> dict:
    """PEFT's LoraConfig fields: the most common rank as `r`, the others in `rank_pattern`, the
    alphas keeping every module's scale `alpha / r` at the method's scale; `target_modules` as
    short names (`q_proj`) when every layer has the same adapted kinds, else full module names."""
    ranks = {k[len(PEFT_PREFIX):-len(".lora_A.weight")]: v.shape[0] for k, v in tensors.items() if "lora_A" in k}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else report.rank
    kinds = sorted({m.split(".", 3)[3] for m in ranks})  # e.g. self_attn.q_proj
    every_layer = set(ranks) == {f"model.layers.{i}.{kind}" for i in range(num_layers) for kind in kinds}
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": r, "lora_alpha": report.scale * r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "target_modules": [k.rsplit(".", 1)[-1] for k in kinds] if every_layer else sorted(ranks),
            "rank_pattern": pattern, "alpha_pattern": {m: report.scale * k for m, k in pattern.items()},
            "modules_to_save": None, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "inference_mode": True}


def _write(out_dir, tensors, report, config, cfg, modules, checkpoint, info, base, k, force, sources) -> None:
    from safetensors.torch import save_file

    base_name = (config.hf_config or {}).get("_name_or_path") or str(base)
    rel = report.relative()
    with atomic_output_dir(Path(out_dir), force, sources=sources) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config(tensors, report, config.num_layers, base_name), indent=2) + "\n")
        lines = [f"# HF PEFT adapter of a --peft {report.method} run (megatron_hdpissa)", "",
                 f"- source: `{checkpoint}`, iteration {info.iteration}; base W_0: `{base}`",
                 f"- per-slice rank r = {cfg['rank']}, K = {k} slices, scale alpha / r = {report.scale:g}",
                 f"- adapter rank {report.rank} on {len(modules)} modules; "
                 + ("the truncated SVD of W_T - W_0" if report.method == HD_PISSA else
                    "the trained factors" + (" with PiSSA's initial factors [B | -B_0] [A; A_0]"
                                             if report.method == PISSA else ""))]
        if report.matrices:
            lines += ["", f"Relative remainder ||dW - B A||_F / ||dW||_F: overall {report.remainder:.3e}", "",
                      "| matrix | rank | ||dW||_F | relative remainder |", "|---|---|---|---|"]
            lines += [f"| {m} | {r} | {n:.4e} | {rel[m]:.4e} |" for m, r, n, _ in report.matrices]
        (tmp / README_FILE).write_text("\n".join(lines) + "\n")


def _log(report: AdapterReport, log, out_dir) -> None:
    rel = report.relative()
    by_layer: dict = {}
    for m, _, _, _ in report.matrices:
        by_layer.setdefault(m.split(".")[2], []).append(f"{m.split(' ')[0].rsplit('.', 1)[-1]} {rel[m]:.2e}")
    for layer, items in by_layer.items():
        log(f"adapter remainder, layer {layer}: " + ", ".join(items))
    what = (" (exact)" if not report.matrices else f", relative remainder {report.remainder:.3e} overall"
            + (" (of W_0 - W_res at rank r: PiSSA's initial factors)" if report.method == PISSA else ""))
    log(f"exported the --peft {report.method} adapter (rank {report.rank}) to {out_dir}{what}")
