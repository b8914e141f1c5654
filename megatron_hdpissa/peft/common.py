"""The PEFT core every method shares: targets, hook attach/detach, TP slicing of factors, part deltas."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from megatron_hdpissa.peft import layout

COLUMN = "column"
ROW = "row"
HD_PISSA, PISSA, LORA = "hd-pissa", "pissa", "lora"
PEFT_METHODS = (HD_PISSA, PISSA, LORA)
DEFAULT_TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
SVD_METHODS = ("exact", "randomized")


class ConfigError(ValueError):
    """A bad PEFT setting. `param` is the library parameter (`rank`, `alpha`, ...); the message is
    a template whose `{name}` is how the parameter is called: the parameter itself, or (through
    `renamed`) the flag of a front end that maps it."""

    def __init__(self, param: str, template: str, name: Optional[str] = None):
        self.param, self.template = param, template
        self.name = name or param
        super().__init__(template.replace("{name}", self.name))

    def renamed(self, names: Mapping[str, str]) -> "ConfigError":
        """The same error naming `names[param]` (unchanged when `param` is not in `names`)."""
        return ConfigError(self.param, self.template, names.get(self.param, self.name))


def split_patterns(value) -> tuple[str, ...]:
    """A pattern list from a comma-separated string or a sequence."""
    if isinstance(value, str):
        return tuple(t for t in value.split(",") if t)
    return tuple(value)


def lowrank_scale(rank: int, alpha: Optional[float]) -> float:
    """s = alpha / rank as a float; alpha None means alpha = rank (s = 1)."""
    return float(rank if alpha is None else alpha) / float(rank)


@dataclass(kw_only=True)
class AdapterSettings:
    """The settings every method's config shares (keyword-only; documented in HDPiSSAConfig and
    LowRankConfig), their checks, the scale `s = alpha / rank` and the dict form."""

    rank: int = 16
    alpha: Optional[float] = None
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES
    fused_decomposition: bool = False
    svd_method: str = "exact"
    svd_oversampling: Optional[int] = None
    svd_niter: int = 4
    trainable_modules: Sequence[str] = field(default_factory=tuple)
    seed: int = 1234

    def __post_init__(self) -> None:
        self.target_modules = split_patterns(self.target_modules)
        self.trainable_modules = split_patterns(self.trainable_modules)
        rank, alpha = self.rank, self.alpha
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ConfigError("rank", f"{{name}} must be a positive integer, got {rank!r}")
        if alpha is not None and not float(alpha) > 0:
            raise ConfigError("alpha", f"{{name}} must be > 0 (the scale is alpha / rank), got {alpha!r}")
        if self.svd_method not in SVD_METHODS:
            raise ConfigError("svd_method", f"{{name}} must be one of {SVD_METHODS}, got {self.svd_method!r}")
        for name in ("svd_oversampling", "svd_niter"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(name, f"{{name}} must be >= 0, got {getattr(self, name)}")
        if not self.target_modules:
            raise ConfigError("target_modules", "{name} is empty")

    @property
    def scale(self) -> float:
        return lowrank_scale(self.rank, self.alpha)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["trainable_modules"] = list(self.trainable_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**d)


# ---- which layers: matching and the logical parts of fused weights -------------------------------
def matches(name: str, patterns: Sequence[str]) -> bool:
    """PEFT-style matching: exact name, a `.`-suffix, or `re:<regex>` on the full name."""
    for pat in patterns:
        if pat.startswith("re:"):
            if re.fullmatch(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


def _parallel_linear_types():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear


def fused_parts(layer: str, model_config, tp_size: int, local_rows: int) -> list[layout.Part]:
    """The logical parts of a column-parallel layer's local weight, by its leaf name: q, k, v of a
    fused `linear_qkv`, gate, up of a gated `linear_fc1`, else the whole weight. `model_config`
    is megatron-core's TransformerConfig (or anything with its attention/GLU fields)."""
    cfg, leaf = model_config, layer.rsplit(".", 1)[-1]
    if leaf == "linear_qkv" and getattr(cfg, "num_attention_heads", None):
        heads = cfg.num_attention_heads
        groups = cfg.num_query_groups or heads
        head_dim = cfg.kv_channels or cfg.hidden_size // heads
        return layout.qkv_parts(heads, groups, head_dim, tp_size, layer)
    if leaf == "linear_fc1" and getattr(cfg, "gated_linear_unit", False):
        return layout.gate_up_parts(local_rows, layer)
    return layout.whole()


def global_layer_name(model: nn.Module, name: str) -> str:
    """`name` with a pipeline stage's local `decoder.layers.<i>` index replaced by the global one
    (megatron-core's `layer_number`, 1-based)."""
    m = re.search(r"(^|\.)decoder\.layers\.(\d+)\.", name)
    if m is None:
        return name
    layers = model.get_submodule(name[:m.end() - 1].rsplit(".", 1)[0])
    number = getattr(layers[int(m.group(2))], "layer_number", int(m.group(2)) + 1)
    return f"{name[:m.start(2)]}{number - 1}{name[m.end(2):]}"


def part_named(parts: Sequence[layout.Part], name: str, layer: str = "") -> layout.Part:
    for p in parts:
        if p.name == name:
            return p
    raise ValueError(f"{layer}: no part {name!r} (the layer has {[p.name for p in parts]})")


@dataclass
class Target:
    """A targeted parallel linear and the logical matrices (parts) inside its weight."""

    name: str
    module: nn.Module
    kind: str  # COLUMN or ROW
    parts: list
    rows_local: list  # local output rows of each part
    in_local: int  # local input features
    shapes: list  # full logical (m, n) of each part


def layer_tp_size(module: nn.Module, tp_size: int) -> int:
    """The TP size a parallel linear is split over: megatron-core's expert linears (`is_expert`)
    are split over their own expert-tensor-parallel group, every other layer over TP."""
    if not getattr(module, "is_expert", False):
        return tp_size
    group = getattr(module, "tp_group", None)
    return group.size() if group is not None else 1


def find_targets(model: nn.Module, patterns: Sequence[str], tp_size: int, fused: bool) -> list[Target]:
    """Match `target_modules` against the model's megatron-core parallel linears; clear errors
    for nothing matched or unsupported layers."""
    column_t, row_t = _parallel_linear_types()
    targets, linear_names = [], []
    for name, module in model.named_modules():
        if isinstance(module, (column_t, row_t)):
            linear_names.append(name)
            if matches(name, patterns):
                kind = COLUMN if isinstance(module, column_t) else ROW
                targets.append(_target(name, module, kind, layer_tp_size(module, tp_size), fused))
        elif matches(name, patterns) and isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ConfigError("target_modules", (
                f"{name}: {{name}} matched a {type(module).__name__}, but only "
                "megatron-core ColumnParallelLinear/RowParallelLinear layers are supported"))
    if not targets:
        shown = ", ".join(linear_names[:8]) + (" ..." if len(linear_names) > 8 else "")
        raise ConfigError("target_modules", (
            f"{{name}} {list(patterns)} matched no parallel linear "
            f"layer; the model has: {shown or 'no megatron-core parallel linear layers'}"))
    return targets


def _target(name: str, module: nn.Module, kind: str, tp: int, fused: bool) -> Target:
    if module.weight is None:
        raise ValueError(f"{name}: layer has no weight (skip_weight_param_allocation)")
    m_full, n_full = module.output_size, module.input_size
    if kind == COLUMN and m_full % tp or kind == ROW and n_full % tp:
        raise ValueError(f"{name}: --tensor-model-parallel-size {tp} does not divide the layer ({m_full}x{n_full})")
    w_local = module.weight
    if kind == ROW or fused:
        parts = layout.whole()
    else:
        cfg = getattr(module, "config", None)
        parts = fused_parts(name, cfg, tp, module.output_size_per_partition)
        if len(parts) == 3:  # q, k, v: the layer must be the fused QKV the config describes
            heads = cfg.num_attention_heads
            expected = (heads + 2 * (cfg.num_query_groups or heads)) * (cfg.kv_channels or cfg.hidden_size // heads)
            if module.output_size != expected:
                raise ValueError(f"{name}: output size {module.output_size} is not the fused QKV size {expected}")
    if kind == COLUMN:
        rows_local = [p.num_rows if p.rows is not None else w_local.shape[0] for p in parts]
        shapes = [(r_loc * tp, n_full) for r_loc in rows_local]
    else:
        rows_local, shapes = [w_local.shape[0]], [(m_full, n_full)]
    return Target(name, module, kind, parts, rows_local, w_local.shape[1], shapes)


def freeze_base(model: nn.Module, trainable_modules: Sequence[str]) -> None:
    """Freeze every parameter except those matching `trainable_modules` (by module or full name)."""
    for pname, param in model.named_parameters():
        param.requires_grad_(matches(pname.rsplit(".", 1)[0], trainable_modules)
                             or matches(pname, trainable_modules))


def freeze_target(t: Target, trainable_modules: Sequence[str]) -> None:
    """The targeted weight is frozen; its bias trains only when `trainable_modules` names it."""
    t.module.weight.requires_grad_(False)
    bias = getattr(t.module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.requires_grad_(matches(t.name + ".bias", trainable_modules))


def check_components(t: Target, need: int, what: str) -> None:
    """Every part of `t` has at least `need` singular components; `what` says where `need` comes
    from, with `{name}` standing for the rank parameter."""
    for part, (m, n) in zip(t.parts, t.shapes):
        if need > min(m, n):
            raise ConfigError("rank", (
                f"{t.name}" + (f" (part {part.name})" if part.name != "w" else "") +
                f": {what} = {need} singular components, but the {m}x{n} matrix has only {min(m, n)}"))


# ---- the adapter child and its forward hook -------------------------------------------------------
def hook_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input a megatron-core parallel linear was called with (positional or `input_`)."""
    return args[0] if args else kwargs.get("input_", kwargs.get("input"))


def _hook(child: str):
    def hook(module, args, kwargs, output):
        out, bias = output if isinstance(output, tuple) else (output, None)
        out = module._modules[child].add_to_output(out, hook_input(args, kwargs))
        return (out, bias) if isinstance(output, tuple) else out

    return hook


def attach_adapter(module: nn.Module, child: str, adapter: nn.Module) -> None:
    """Register `adapter` as the `child` submodule of the base layer (its own state-dict keys stay
    as they are, the adapter's live under `<layer>.<child>.`) and a forward hook that replaces the
    layer's output `out` (of `(out, bias)`) by `adapter.add_to_output(out, x)`."""
    if child in module._modules:
        raise ValueError(f"{getattr(adapter, 'layer_name', type(module).__name__)}: already has a {child} adapter")
    module.add_module(child, adapter)
    setattr(module, f"_{child}_hook", module.register_forward_hook(_hook(child), with_kwargs=True))


def detach_adapter(module: nn.Module, child: str) -> Optional[nn.Module]:
    """Remove the `child` adapter and its hook; returns it (None when there is none)."""
    adapter = module._modules.get(child)
    if adapter is None:
        return None
    getattr(module, f"_{child}_hook").remove()
    delattr(module, f"_{child}_hook")
    del module._modules[child]
    return adapter


def iter_children(model: nn.Module, child: str, cls: type) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(layer name, base layer, adapter) for every layer with a `child` adapter of type `cls`."""
    for name, module in model.named_modules():
        adapter = module._modules.get(child) if hasattr(module, "_modules") else None
        if isinstance(adapter, cls):
            yield name, module, adapter


# ---- factors: TP slicing and adding a part's delta into a weight ---------------------------------
def shard_factors(kind: str, a: torch.Tensor, b: Optional[torch.Tensor], tp_rank: int, tp_size: int):
    """This TP rank's shards of full factors `a` (..., r, n) and `b` (..., m, r): a column-parallel
    layer shards B's rows (A replicated), a row-parallel one A's columns (B replicated)."""
    if kind == COLUMN:
        if b is not None:
            m_t = b.shape[-2] // tp_size
            b = b[..., tp_rank * m_t:(tp_rank + 1) * m_t, :]
        return a, b
    n_t = a.shape[-1] // tp_size
    return a[..., tp_rank * n_t:(tp_rank + 1) * n_t], b


def add_part_delta_(weight: torch.Tensor, part: layout.Part, delta: torch.Tensor) -> torch.Tensor:
    """`weight[part rows] += delta` in place (the whole weight for a whole-weight part), in the
    weight's dtype; `delta` has the part's rows (in the part's order) and all columns. Used for
    PiSSA's W_res (with -delta), merging adapters and the offline merge of checkpoints."""
    delta = delta.to(device=weight.device, dtype=weight.dtype)
    if part.rows is None:
        return weight.add_(delta)
    rows = part.rows.to(weight.device)
    return weight.index_copy_(0, rows, weight.index_select(0, rows) + delta)


# ---- which method a model carries -----------------------------------------------------------------
def record_method(model: nn.Module, method: str, config, groups) -> None:
    """Mark `model` as carrying `method`'s adapters, with the config and groups they were built with."""
    if method not in PEFT_METHODS:
        raise ConfigError("method", f"{{name}} must be one of {PEFT_METHODS}, got {method!r}")
    model.peft_method, model.peft_config, model.peft_groups = method, config, groups


def peft_method(model: nn.Module) -> Optional[str]:
    """"hd-pissa", "lora", "pissa" (what `apply_hd_pissa` / `apply_lowrank` recorded), or None;
    looks through wrappers that keep the model as `.module` (DDP)."""
    while model is not None:
        method = getattr(model, "peft_method", None)
        if isinstance(method, str):
            return method
        model = getattr(model, "module", None)
    return None
