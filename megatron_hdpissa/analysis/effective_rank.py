"""Effective rank of a fine-tuning update: the singular spectrum of `W_T - W_0` per targeted
projection (q, k, v, o, gate, up, down), read from Hugging Face folders or Megatron checkpoints.

Definition used everywhere (JSON, tables, plots): the effective rank of `D = W_T - W_0` is the
number of singular values of `D` greater than `threshold * sigma_max(D)`; the default threshold
is 1e-3 of the largest singular value. Spectra are computed in float64.

Inputs, auto-detected per path:
  * a Hugging Face folder (`config.json` + `*.safetensors`), e.g. the trainer's `--export-hf`
    output, which is always merged;
  * a Megatron checkpoint folder (`latest_checkpointed_iteration.txt`, TP shards and pipeline
    stages merged on load, names mapped to HF names by `conversion.hf_tensors_from_megatron`).
    For a `--save` folder of a `--peft lora` / `pissa` run the shards hold `W_res` (LoRA: the
    frozen `W_0`), so the adapter factors of DP rank 0 (`iter_*/hd_pissa/`, one file per TP rank
    and pipeline stage as `checkpointing.rank_file` names it, key `adapter`, layers numbered
    per stage) are merged here as `W_res + s B A` with `s = alpha / r` from `meta.json`.
    HD-PiSSA and full fine-tuning checkpoints already hold the updated `W`.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

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
    """Number of singular values greater than `threshold * sigma[0]` (0 for a zero update)."""
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
    _hf: object = None
    _shards: Optional[list] = None
    _config: object = None
    notes: list = field(default_factory=list)

    def weight(self, name: str) -> torch.Tensor:
        if self.kind == "hf":
            return self._hf.full(name, _hf_shape_of(self._hf, name))
        from megatron_hdpissa.convert.hf_megatron import hf_tensors_from_megatron

        ((_, tensor),) = list(hf_tensors_from_megatron(self._shards, self._config, [name]))
        return tensor


def _hf_shape_of(folder, name: str):
    if name not in folder.file_of:
        raise ValueError(f"{folder.hf_dir}: tensor {name!r} is missing")
    return tuple(folder._handles[folder.file_of[name]].get_slice(name).get_shape())


def detect_format(path) -> str:
    """"hf" for a folder with config.json and safetensors, "megatron" for a folder with
    latest_checkpointed_iteration.txt; a clear error otherwise."""
    from megatron_hdpissa.convert.hf_megatron import TRACKER_FILE

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
    """Open an HF folder or a Megatron checkpoint folder (see the module docstring)."""
    path = Path(path)
    if detect_format(path) == "hf":
        from megatron_hdpissa.convert.hf_megatron import SafetensorsFolder

        config = json.loads((path / "config.json").read_text())
        folder = SafetensorsFolder(path)
        return Checkpoint(path, "hf", int(config["num_hidden_layers"]), "Hugging Face folder", _hf=folder,
                          dtype=_stored_dtype(folder))
    from megatron_hdpissa.convert.hf_megatron import load_megatron_state_dict, read_checkpoint_info
    from megatron_hdpissa.models.config import ModelConfig

    info = read_checkpoint_info(path)
    config = ModelConfig.load(path)
    # pp_size=1: each TP rank's stages merged into the whole model, layers numbered globally
    # (torch_dist: the whole model as one TP=1 shard)
    tp_shards = 1 if info.ckpt_format == "torch_dist" else info.tp_size
    shards = [dict(load_megatron_state_dict(path, r, tp_shards, pp_size=1)) for r in range(tp_shards)]
    parallel = f"TP={info.tp_size}" + (f", PP={info.pp_size}" if info.pp_size > 1 else "")
    ckpt = Checkpoint(path, "megatron", config.num_layers, f"Megatron checkpoint ({parallel}, "
                      f"iteration {info.iteration})", _shards=shards, _config=config,
                      dtype=shards[0]["embedding.word_embeddings.weight"].dtype)
    meta = _training_meta(path)
    if meta is not None:
        peft = meta.get("peft")
        ckpt.description += f", --peft {peft} training checkpoint"
        if peft in ("lora", "pissa"):
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
    code = folder._handles[folder.file_of[name]].get_slice(name).get_dtype()
    return _SAFETENSORS_DTYPES.get(code, torch.float32)


def _training_meta(path: Path) -> Optional[dict]:
    from megatron_hdpissa.checkpoint import training_state as checkpointing

    return checkpointing.read_meta(path) if checkpointing.is_training_checkpoint(path) else None


def _adapter_state(path: Path, iteration, config, tp_rank: int, tp_size: int, pp_size: int) -> tuple[dict, str]:
    """DP rank 0's adapter parameters of TP rank `tp_rank`, all pipeline stages merged (layers
    renumbered globally), and the file(s) they came from."""
    from megatron_hdpissa.checkpoint.training_state import rank_file
    from megatron_hdpissa.convert.hf_megatron import iteration_dir_name, merge_pipeline_stages
    from megatron_hdpissa.distributed.groups import ParallelGroups

    iter_dir = path / iteration_dir_name(iteration)
    from megatron_hdpissa.checkpoint.dist import is_dist_checkpoint_dir

    if is_dist_checkpoint_dir(iter_dir):  # torch_dist: whole factors, TP=1
        return _dist_adapter_state(iter_dir), str(iter_dir)
    stages, files = [], []
    for p in range(pp_size):
        groups = ParallelGroups(None, None, tp_rank=tp_rank, tp_size=tp_size, dp_rank=0, dp_size=1,
                                pp_rank=p, pp_size=pp_size)
        file = rank_file(iter_dir, groups)
        legacy = iter_dir / "hd_pissa" / f"dp_000_tp_{tp_rank:02d}.pt"  # saved before pipeline support
        if not file.is_file() and pp_size == 1 and legacy.is_file():
            file = legacy
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: cannot merge the adapter factors of TP rank "
                                    f"{tp_rank}" + (f", pipeline stage {p}" if pp_size > 1 else ""))
        if file in files:
            raise ValueError(f"{file}: checkpointing.rank_file names one adapter file for all "
                             f"{pp_size} pipeline stages")
        stages.append(torch.load(file, map_location="cpu", weights_only=True)["adapter"])
        files.append(file)
    return merge_pipeline_stages(stages, config), ", ".join(str(f) for f in files)


def _dist_adapter_state(iter_dir: Path) -> dict:
    """The LoRA / PiSSA factors of a torch_dist training checkpoint (`lora.<layer>.<a|b>.<part>`,
    one slice, whole shapes; see training_state_dist.py) keyed as the legacy adapter files key them."""
    from megatron_hdpissa.checkpoint.dist import read_dcp_metadata, read_global_tensors

    keys = [k for k in read_dcp_metadata(iter_dir).state_dict_metadata if k.startswith("lora.")]
    out = {}
    for key, value in read_global_tensors(iter_dir, keys).items():
        layer, which, part = key[len("lora."):].rsplit(".", 2)
        out[f"{layer}.lora.{which}.{part}"] = value[0]
    return out


def merge_lowrank_factors(shards: list, config, path: Path, iteration, meta: dict, pp_size: int = 1) -> int:
    """Add `s B A` of every LoRA/PiSSA adapter (DP rank 0's factors; the baselines keep them
    identical on all DP ranks) into the TP shards' base weights (whole-model state dicts,
    global layer numbering), in place. `pp_size`: pipeline stages the adapter files were saved
    in. Returns the number of factor pairs merged."""
    from megatron_hdpissa.peft import layout
    from megatron_hdpissa.peft.hd_pissa.config import HDPiSSAConfig

    scale = HDPiSSAConfig.from_dict(meta["config"]).scale
    tp = len(shards)
    merged = 0
    for t in range(tp):
        adapter, file = _adapter_state(path, iteration, config, t, tp, pp_size)
        for key_a in sorted(k for k in adapter if ".lora.a." in k):
            layer, part = key_a.split(".lora.a.")
            a, b = adapter[key_a].double(), adapter[f"{layer}.lora.b.{part}"].double()
            wkey = f"{layer}.weight"
            if wkey not in shards[t]:
                raise ValueError(f"{file}: adapter {key_a} has no base weight {wkey} in mp_rank_{t:02d}")
            w = shards[t][wkey].clone()
            delta = (scale * (b @ a)).to(w.dtype)
            if part == "w":
                w += delta
            else:
                leaf = layer.rsplit(".", 1)[-1]
                if part in ("q", "k", "v"):
                    parts = layout.qkv_parts(config.num_attention_heads, config.num_query_groups,
                                             config.kv_channels, tp, layer)
                elif part in ("gate", "up"):
                    parts = layout.gate_up_parts(w.shape[0], layer)
                else:
                    raise ValueError(f"{file}: unknown adapter part {part!r} of {leaf}")
                (p,) = [p for p in parts if p.name == part]
                w.index_add_(0, p.rows, delta)
            shards[t][wkey] = w
            merged += 1
    if not merged:
        raise ValueError(f"{path}: a --peft {meta.get('peft')} checkpoint without adapter factors")
    return merged


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
    """Spectrum and effective rank of `W_T - W_0` for every (layer, projection)."""
    if base.num_layers != finetuned.num_layers:
        raise ValueError(f"{finetuned.path} has {finetuned.num_layers} layers but the base {base.path} has "
                         f"{base.num_layers}: not a fine-tune of that base")
    out = []
    for i in _select_layers(base.num_layers, layers):
        for proj in projections:
            name = hf_weight_name(i, proj)
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


def plot_spectra(results: dict[str, list[MatrixResult]], threshold: float, path,
                 title: str = "") -> Path:
    """One panel per projection type: sigma_i / sigma_max of W_T - W_0 (log scale) for every
    layer (thin lines) of every checkpoint (one colour each), with the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    projs = list(dict.fromkeys(m.projection for mats in results.values() for m in mats))
    cols = min(4, len(projs))
    rows = math.ceil(len(projs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, proj in zip(axes.flat, projs):
        for c, (name, mats) in enumerate(results.items()):
            mine = [m for m in mats if m.projection == proj]
            for j, m in enumerate(mine):
                s = m.sigma
                if not s.numel() or float(s[0]) <= 0:
                    continue
                s = (s / s[0]).clamp_min(1e-12).numpy()
                ranks = statistics.fmean(x.effective_rank for x in mine)
                ax.semilogy(range(1, len(s) + 1), s, color=colours[c % len(colours)], lw=0.8, alpha=0.7,
                            label=f"{name} (mean {ranks:.0f})" if j == 0 else None)
        ax.axhline(threshold, color="k", ls="--", lw=0.7)
        ax.set_title(proj, fontsize=9)
        ax.set_ylim(1e-8, 2)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower left")
    for ax in list(axes.flat)[len(projs):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("sigma_i / sigma_max", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("index i", fontsize=8)
    fig.suptitle((title + "\n" if title else "") + f"spectra of W_T - W_0; dashed: threshold {threshold:g} "
                 "(effective rank = values above it)", fontsize=9)
    return _save_figure(fig, path)


def _save_figure(fig, path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_json(summary: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


# ---- learning curves -----------------------------------------------------------------------------
def read_log_json(path) -> dict:
    """The trainer's `--log-json` lines as {"train": [(iteration, loss)], "valid": [(iteration,
    held-out loss)], "tokens_per_s": [...]}; a later line for the same iteration wins (a resumed run
    appends to the same file)."""
    train, valid, tps = {}, {}, {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                it = int(rec["iteration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a --log-json line ({e})") from None
            if "loss" in rec:
                train[it] = float(rec["loss"])
            if "valid_loss" in rec:
                valid[it] = float(rec["valid_loss"])
            if "tokens_per_s" in rec:
                tps[it] = float(rec["tokens_per_s"])
    return {"train": sorted(train.items()), "valid": sorted(valid.items()), "tokens_per_s": sorted(tps.items())}


def plot_learning_curves(runs: dict[str, dict], path, title: str = "", smooth: int = 1) -> Path:
    """Two panels side by side: training loss vs iteration (optionally a trailing moving average
    over `smooth` iterations, raw values faint) and held-out loss vs iteration, one colour per run.
    `runs` maps a name to `read_log_json`'s dict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (name, log) in enumerate(runs.items()):
        colour = colours[c % len(colours)]
        if log["train"]:
            its, losses = zip(*log["train"])
            if smooth > 1:
                ax_t.plot(its, losses, color=colour, lw=0.6, alpha=0.3)
                avg = [statistics.fmean(losses[max(0, i - smooth + 1):i + 1]) for i in range(len(losses))]
                ax_t.plot(its, avg, color=colour, lw=1.4, label=name)
            else:
                ax_t.plot(its, losses, color=colour, lw=1.2, label=name)
        if log["valid"]:
            its, losses = zip(*log["valid"])
            ax_v.plot(its, losses, color=colour, lw=1.2, marker="o", ms=3, label=name)
    ax_t.set_title("training loss" + (f" (moving average over {smooth})" if smooth > 1 else ""), fontsize=9)
    ax_v.set_title("held-out loss", fontsize=9)
    for ax in (ax_t, ax_v):
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel("mean token loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save_figure(fig, path)
