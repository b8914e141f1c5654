"""Effective rank of fine-tuning updates `W_T - W_0` per projection, from HF or Megatron checkpoints."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from megatron_hdpissa.analysis.experts import expert_matrix_names, hf_moe_config

DEFAULT_THRESHOLD = 1e-3
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PROJECTION_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                      "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
THRESHOLD_TEXT = "singular values of W_T - W_0 above {t:g} x the largest one"


def hf_weight_name(layer: int, projection: str) -> str:
    """`model.layers.{layer}.self_attn.q_proj.weight` and the like."""
    if projection not in _PROJECTION_MODULE:
        raise ValueError(f"unknown projection {projection!r}; choose from {', '.join(PROJECTIONS)}")
    return f"model.layers.{layer}.{_PROJECTION_MODULE[projection]}.{projection}.weight"


# ---- the mathematics ---------------------------------------------------------------------------
def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Singular values of `delta` in float64, descending."""
    d = delta.detach().to(torch.float64)
    if d.shape[0] < d.shape[1]:
        d = d.t()
    if d.shape[0] > d.shape[1]:
        # LAPACK's values-only SVD of a tall matrix is many times slower than a QR followed by
        # the SVD of the square R factor; the singular values are the same.
        d = torch.linalg.qr(d, mode="r").R
    return torch.linalg.svdvals(d)


def effective_rank(sigma: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> int:
    """Number of singular values greater than `threshold * sigma[0]` (0 for a zero update).

    The definition used everywhere (JSON, tables, plots): the effective rank of `D = W_T - W_0`
    is the number of singular values of `D` (float64, `singular_values`) above `threshold *
    sigma_max(D)`; the default threshold is 1e-3."""
    if not 0 < threshold < 1:
        raise ValueError(f"--threshold must be in (0, 1), got {threshold}")
    if sigma.numel() == 0 or float(sigma[0]) <= 0:
        return 0
    return int((sigma > threshold * sigma[0]).sum())


def rounding_floor(weight: torch.Tensor, dtype: torch.dtype) -> float:
    """A rough spectral norm of the rounding noise of storing `weight` in `dtype`: iid errors of
    about eps * rms(W) per entry give a noise matrix of spectral norm ~ that times sqrt(m)+sqrt(n).
    Counting singular values below this counts storage noise, not training."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    m, n = weight.shape
    rms = float(weight.double().pow(2).mean().sqrt())
    return eps * rms * (math.sqrt(m) + math.sqrt(n))


# ---- reading checkpoints -----------------------------------------------------------------------
@dataclass
class Checkpoint:
    """Named weights of one model in HF naming, from whichever format `path` holds."""

    path: Path
    kind: str  # "hf" | "megatron"
    num_layers: int
    description: str
    dtype: torch.dtype = torch.float32
    hf_folder: object = None  # "hf": a convert.hf_sources.SafetensorsFolder
    shards: Optional[list] = None  # "megatron": whole-model state dicts, one per TP shard
    model_config: object = None  # "megatron": its models.config.ModelConfig
    notes: list = field(default_factory=list)

    def weight(self, name: str) -> torch.Tensor:
        if self.kind == "hf":
            return _read_safetensor(self.hf_folder, name, lambda f: f.get_tensor(name))
        from megatron_hdpissa.convert.hf_mapping import hf_tensors_from_megatron

        ((_, tensor),) = list(hf_tensors_from_megatron(self.shards, self.model_config, [name]))
        return tensor


def _read_safetensor(folder, name: str, read):
    """`read(handle)` on the safetensors file of `folder` that holds `name`."""
    from safetensors import safe_open

    if name not in folder.file_of:
        raise ValueError(f"{folder.hf_dir}: tensor {name!r} is missing")
    with safe_open(str(Path(folder.hf_dir) / folder.file_of[name]), framework="pt") as handle:
        return read(handle)


def detect_format(path) -> str:
    """"hf" for a folder with config.json and safetensors, "megatron" for a folder with
    latest_checkpointed_iteration.txt; a clear error otherwise."""
    from megatron_hdpissa.checkpoint.atomic import TRACKER_FILE

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a folder)")
    if (path / TRACKER_FILE).is_file():
        return "megatron"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    raise ValueError(
        f"{path} is neither a Hugging Face folder (config.json + *.safetensors) nor a Megatron "
        f"checkpoint folder ({TRACKER_FILE})"
    )


def open_checkpoint(path, merge_adapters: bool = True) -> Checkpoint:
    """Open a checkpoint, its format auto-detected:
      * a Hugging Face folder (`config.json` + `*.safetensors`), e.g. the trainer's `--export-hf`
        output, which is always merged;
      * a Megatron checkpoint folder (`latest_checkpointed_iteration.txt`, either format, TP
        shards and pipeline stages merged on load, names mapped to HF names by
        `convert.hf_mapping.hf_tensors_from_megatron`). The `--save` folder of a `--peft lora` /
        `pissa` run holds `W_res` (LoRA: the frozen `W_0`); with `merge_adapters` the factors of
        DP rank 0 are added as `W_res + s B A` (`merge_lowrank_factors`). HD-PiSSA and full
        fine-tuning checkpoints already hold the updated `W`."""
    path = Path(path)
    if detect_format(path) == "hf":
        from megatron_hdpissa.convert.hf_sources import SafetensorsFolder

        config = json.loads((path / "config.json").read_text())
        folder = SafetensorsFolder(path)
        return Checkpoint(path, "hf", int(config["num_hidden_layers"]), "Hugging Face folder", hf_folder=folder,
                          dtype=_stored_dtype(folder), model_config=hf_moe_config(config))
    from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info
    from megatron_hdpissa.checkpoint.trainer_state import is_training_checkpoint, read_meta
    from megatron_hdpissa.convert.load import load_megatron_state_dict
    from megatron_hdpissa.convert.training_adapters import merge_lowrank_factors
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.peft.common import LORA, PISSA

    info = read_checkpoint_info(path)
    config = ModelConfig.load(path)
    # pp_size=1: each TP rank's stages merged into the whole model, layers numbered globally
    # (torch_dist: the whole model as one TP=1 shard)
    tp_shards = 1 if info.ckpt_format == "torch_dist" else info.tp_size
    shards = [dict(load_megatron_state_dict(path, r, tp_shards, pp_size=1)) for r in range(tp_shards)]
    parallel = f"TP={info.tp_size}" + (f", PP={info.pp_size}" if info.pp_size > 1 else "")
    ckpt = Checkpoint(path, "megatron", config.num_layers, f"Megatron checkpoint ({parallel}, "
                      f"iteration {info.iteration})", shards=shards, model_config=config,
                      dtype=shards[0]["embedding.word_embeddings.weight"].dtype)
    if not is_training_checkpoint(path):
        return ckpt
    meta = read_meta(path)
    peft = meta.get("peft")
    ckpt.description += f", --peft {peft} training checkpoint"
    if peft in (LORA, PISSA):
        if merge_adapters:
            n = merge_lowrank_factors(shards, config, path, info.iteration, meta, pp_size=info.pp_size)
            ckpt.description += f" (W_res + s B A merged from {n} adapter factor pairs)"
        else:
            ckpt.notes.append(f"{path} holds W_res of a --peft {peft} run and its factors were NOT "
                              "merged: the delta is not the fine-tuning update")
    return ckpt


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _stored_dtype(folder) -> torch.dtype:
    name = next(n for n in sorted(folder.file_of) if n.endswith("_proj.weight"))
    code = _read_safetensor(folder, name, lambda f: f.get_slice(name).get_dtype())
    return _SAFETENSORS_DTYPES.get(code, torch.float32)


# ---- the analysis --------------------------------------------------------------------------------
@dataclass
class MatrixResult:
    name: str
    layer: int
    projection: str
    shape: tuple
    effective_rank: int
    sigma: torch.Tensor  # float64, descending
    relative_change: float  # ||W_T - W_0||_F / ||W_0||_F
    noise_limited: bool  # threshold * sigma_max is within 10x of the storage rounding floor

    def to_dict(self) -> dict:
        s, k = self.sigma, self.effective_rank
        top = float(s[0]) if s.numel() else 0.0
        return {"name": self.name, "layer": self.layer, "projection": self.projection,
                "shape": list(self.shape), "effective_rank": k,
                "max_rank": min(self.shape), "sigma_max": top,
                # how far the count is from the threshold: the last value counted and the first
                # value not counted, relative to sigma_max
                "smallest_counted": float(s[k - 1]) / top if k else None,
                "largest_not_counted": float(s[k]) / top if top and k < s.numel() else None,
                "frobenius": float(s.pow(2).sum().sqrt()), "relative_change": self.relative_change,
                "noise_limited": self.noise_limited}


def _select_layers(num_layers: int, layers: Optional[Sequence[int]]) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"--layers {bad} outside the model's {num_layers} layers")
    return list(layers)


def analyse_pair(base: Checkpoint, finetuned: Checkpoint, threshold: float = DEFAULT_THRESHOLD,
                 projections: Sequence[str] = PROJECTIONS,
                 layers: Optional[Sequence[int]] = None) -> list[MatrixResult]:
    """Spectrum and effective rank of `W_T - W_0` for every (layer, projection); on an MoE model
    for every expert's matrix of the MLP projections (`experts.expert_matrix_names`)."""
    if base.num_layers != finetuned.num_layers:
        raise ValueError(f"{finetuned.path} has {finetuned.num_layers} layers but the base {base.path} has "
                         f"{base.num_layers}: not a fine-tune of that base")
    out = []
    for i in _select_layers(base.num_layers, layers):
        for proj, name in [(p, n) for p in projections
                           for n in expert_matrix_names(base.model_config, i, p) or [hf_weight_name(i, p)]]:
            w0, wt = base.weight(name), finetuned.weight(name)
            if w0.shape != wt.shape:
                raise ValueError(f"{name}: shape {tuple(wt.shape)} in {finetuned.path} but "
                                 f"{tuple(w0.shape)} in the base {base.path}")
            delta = wt.double() - w0.double()
            sigma = singular_values(delta)
            floor = max(rounding_floor(w0, base.dtype), rounding_floor(wt, finetuned.dtype))
            out.append(MatrixResult(
                name, i, proj, tuple(delta.shape), effective_rank(sigma, threshold), sigma,
                float(delta.norm() / w0.double().norm().clamp_min(1e-30)),
                bool(sigma.numel() and float(sigma[0]) > 0 and threshold * float(sigma[0]) < 10 * floor)))
    return out


def _stats(values: Iterable[float]) -> dict:
    values = list(values)
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "min": min(values),
            "max": max(values), "count": len(values)}


def _margin(mats: list[dict]) -> dict:
    """The smallest counted and the largest uncounted sigma_i / sigma_max over all matrices: the
    counts do not change for any threshold between the two."""
    counted = [m["smallest_counted"] for m in mats if m["smallest_counted"] is not None]
    rest = [m["largest_not_counted"] for m in mats if m["largest_not_counted"] is not None]
    return {"min_smallest_counted": min(counted) if counted else None,
            "max_largest_not_counted": max(rest) if rest else None}


def summarise(results: dict[str, list[MatrixResult]], threshold: float, base_path: str,
              sources: dict[str, str], reference: Optional[str] = None) -> dict:
    """The JSON summary: per matrix, per projection type and aggregate effective ranks per
    checkpoint, and ratios to `reference` (per matrix, then summarised)."""
    summary = {
        "threshold": threshold,
        "definition": THRESHOLD_TEXT.format(t=threshold),
        "base": str(base_path),
        "checkpoints": {},
    }
    for name, mats in results.items():
        by_proj = {p: _stats(m.effective_rank for m in mats if m.projection == p)
                   for p in dict.fromkeys(m.projection for m in mats)}
        summary["checkpoints"][name] = {
            "source": sources.get(name, ""),
            "aggregate": _stats(m.effective_rank for m in mats),
            "relative_change": _stats(m.relative_change for m in mats),
            "threshold_margin": _margin([m.to_dict() for m in mats]),
            "by_projection": by_proj,
            "noise_limited_matrices": [m.name for m in mats if m.noise_limited],
            "matrices": [m.to_dict() for m in mats],
        }
    if reference is not None:
        if reference not in results:
            raise ValueError(f"--reference {reference!r} is not one of the --finetuned names {sorted(results)}")
        ref = {m.name: m.effective_rank for m in results[reference]}
        ratios = {}
        for name, mats in results.items():
            per = [m.effective_rank / ref[m.name] for m in mats if ref.get(m.name)]
            mean_ref = statistics.fmean(ref.values()) if ref else 0.0
            mean = statistics.fmean(m.effective_rank for m in mats) if mats else 0.0
            ratios[name] = {"ratio_of_means": mean / mean_ref if mean_ref else None,
                            "per_matrix": _stats(per)}
        summary["reference"] = reference
        summary["ratio_to_reference"] = ratios
    return summary


def analyse(base_path, finetuned: dict[str, str], threshold: float = DEFAULT_THRESHOLD,
            projections: Sequence[str] = PROJECTIONS, layers: Optional[Sequence[int]] = None,
            reference: Optional[str] = None, merge_adapters: bool = True,
            log=lambda msg: None) -> tuple[dict, dict[str, list[MatrixResult]]]:
    """Open the base once and every fine-tuned checkpoint in turn; returns (JSON summary,
    per-checkpoint matrix results with spectra)."""
    base = open_checkpoint(base_path, merge_adapters=False)
    log(f"base: {base.path} ({base.description}, {base.num_layers} layers)")
    results, sources = {}, {}
    for name, path in finetuned.items():
        ckpt = open_checkpoint(path, merge_adapters=merge_adapters)
        for note in ckpt.notes:
            log(f"warning: {note}")
        log(f"{name}: {ckpt.path} ({ckpt.description})")
        results[name] = analyse_pair(base, ckpt, threshold, projections, layers)
        sources[name] = f"{ckpt.path} ({ckpt.description})"
        del ckpt
    return summarise(results, threshold, str(base_path), sources, reference), results


def format_table(summary: dict) -> str:
    """A markdown table: mean effective rank per projection type and overall, per checkpoint."""
    names = list(summary["checkpoints"])
    projs = list(dict.fromkeys(p for n in names for p in summary["checkpoints"][n]["by_projection"]))
    head = ["checkpoint", *projs, "mean", "min", "max"]
    ratio = "ratio_to_reference" in summary
    if ratio:
        head.append(f"x {summary['reference']}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        c = summary["checkpoints"][n]
        row = [n] + [f"{c['by_projection'][p]['mean']:.1f}" if p in c["by_projection"] else "" for p in projs]
        agg = c["aggregate"]
        row += [f"{agg['mean']:.1f}", str(agg["min"]), str(agg["max"])]
        if ratio:
            r = summary["ratio_to_reference"][n]["ratio_of_means"]
            row.append("" if r is None else f"{r:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_json(summary: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
