"""The trainer's state as a `--ckpt-format torch_dist` checkpoint, resumable at any TP / PP with the same K.

Everything a resume needs, as megatron-core sharded tensors keyed by global coordinates, so a run
saved at one (TP, PP) layout resumes at any other with the same number of slices K = DP x virtual
ranks. `save(state, save_dir)` and `load(state, load_dir)` take a `trainer_state.TrainerState`.

    "model"                 GPTModel.sharded_state_dict() without the adapters (the merged W of
                            HD-PiSSA, W_res of PiSSA, the base of LoRA): the layout megatron-core
                            and Megatron-LM read.
    "hd_pissa.<layer>.<a|b>.<part>"  each slice's factor, global shape (K, r, n) / (K, m, r): the
                            slice is a sharding axis (as the expert axis of MoE), TP splits what
                            the layer splits (column: B's rows, row: A's columns), the other
                            factor is replicated over TP. Layers by global number, so PP may change.
                            Experts: by global expert, global slice ids, expert-TP (trainer_dist_experts).
    "optimizer.<exp_avg|exp_avg_sq>.<key>"   the Adam moments, sharded like their parameter.
    "hd_pissa_master.<weight key>"  sharded-fp32 masters: the fp32 value of each targeted
                            weight, sharded like the weight (the DP row blocks are gathered on
                            save and re-cut on load, so DP may change).
    "hd_pissa_compensation.<weight key>"  compensated-bf16: the Kahan terms, like the weight.
    "lora.<layer>.<a|b>.<part>"     LoRA / PiSSA factors (one slice, replicated over DP; experts
                            by global expert over expert-TP / expert-DP: trainer_dist_lowrank_experts).
    "others_optimizer"      megatron-core's optimizer for ordinary trainable parameters, through
                            its own `sharded_state_dict`.
    common state            iteration, step counters, loss scaler, every slice's data position,
                            every rank's RNG state (restored at the same layout, reseeded
                            deterministically at another), the run's meta.
    iter_X/hd_pissa/meta.json   the run's meta, as in the legacy layout.

The gathered-factor buffers (all K slices' factors on every rank) are not saved: they are
re-gathered from the loaded factors.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_hdpissa.checkpoint.atomic import iteration_dir_name, read_tracker, world_rank
from megatron_hdpissa.checkpoint.dist import (COMMON_LAYOUT_KEY, MODEL_KEY, load_dist_checkpoint,
                                              save_dist_checkpoint, slice_sharded_tensor)
from megatron_hdpissa.checkpoint.trainer_dist_experts import expert_placement, weight_stores
from megatron_hdpissa.checkpoint.trainer_dist_lowrank_experts import lowrank_placement
from megatron_hdpissa.checkpoint.trainer_state import (RESEED_ITERATION_STRIDE, Restored, TrainerState, check_trainable,
                                                       copy_base_files, is_adapter_key, rank_flag, reseed, rng_state,
                                                       set_rng_state, write_meta)
from megatron_hdpissa.optimizer.grad_scaler import load_scaler_state, scaler_state
from megatron_hdpissa.peft.common import COLUMN
from megatron_hdpissa.peft.lowrank.model import iter_lowrank

MOMENTS = ("exp_avg", "exp_avg_sq")


# ---- where each tensor lives -------------------------------------------------------------------
@dataclasses.dataclass
class FactorSpec:
    """One factor parameter (all its local slices) and how it is sharded."""

    key: str
    param: torch.nn.Parameter
    first_slice: int
    num_slices: int
    tp_axis: Optional[int]   # of one slice's tensor
    swiglu: bool
    sliced: bool             # HD-PiSSA (leading local-slice dim) or LoRA / PiSSA (none)
    slice_ids: Optional[list] = None  # experts: each local slice's global slice (trainer_dist_experts)
    groups: Optional[object] = None   # experts: their expert-TP / expert-DP groups; None: the run's


def _fused_fc1(name: str, module, part) -> bool:
    return (name.rsplit(".", 1)[-1] == "linear_fc1" and part.rows is None
            and bool(getattr(getattr(module, "config", None), "gated_linear_unit", False)))


def factor_specs(model) -> list[FactorSpec]:
    """Every adapter factor of this rank: HD-PiSSA's slices and LoRA / PiSSA's factors."""
    from megatron_hdpissa.peft.hd_pissa.model import iter_adapters

    out = []
    for prefix, adapters, sliced in (("hd_pissa", iter_adapters(model), True), ("lora", iter_lowrank(model), False)):
        for name, module, ad in adapters:
            # experts: global expert (HD-PiSSA also global slices; trainer_dist[_lowrank]_experts)
            layer, slice_ids, groups = (expert_placement if sliced else lowrank_placement)(model, name, ad)
            column = ad.kind == COLUMN
            for part in ad.parts:
                for which, param in (("a", ad.a[part.name]), ("b", ad.b[part.name])):
                    split = (which == "b") == column  # column: B's rows; row: A's columns
                    tp_axis = (0 if which == "b" else 1) if split else None
                    out.append(FactorSpec(
                        f"{prefix}.{layer}.{which}.{part.name}", param,
                        ad.first_slice if sliced else 0, ad.num_slices if sliced else 1, tp_axis,
                        swiglu=split and which == "b" and _fused_fc1(name, module, part), sliced=sliced,
                        slice_ids=slice_ids, groups=groups))
    return out


def _sharded(spec: FactorSpec, key: str, tensor: torch.Tensor, groups) -> list:
    """The ShardedTensors of `tensor` (the parameter or a moment of it) for spec's slices."""
    groups = spec.groups or groups
    tp_replica = groups.tp_rank if spec.tp_axis is None else 0
    replica = tp_replica if spec.sliced else (tp_replica, groups.dp_rank)  # LoRA: replicated over DP
    pieces = [tensor[v] for v in range(tensor.shape[0])] if spec.sliced else [tensor]
    ids = spec.slice_ids or range(spec.first_slice, spec.first_slice + len(pieces))
    return [slice_sharded_tensor(key, t, ids[v], spec.num_slices, tp_axis=spec.tp_axis,
                                 tp_rank=groups.tp_rank, tp_size=groups.tp_size, swiglu=spec.swiglu,
                                 replica_id=replica)
            for v, t in enumerate(pieces)]


def like(entry, key: str, data: torch.Tensor):
    """A copy of the model's sharded entry for a parameter (ShardedTensor or the swiglu factory),
    for another tensor of the same local shape: a moment or a master, sharded the same way."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(entry, ShardedTensor):
        return dataclasses.replace(entry, key=key, data=data, dtype=data.dtype)
    return dataclasses.replace(entry, key=key, data=data)


def model_sharded_state_dict(model) -> tuple[dict, dict]:
    """(the model's sharded state dict without adapter keys, id(parameter) -> (its local key,
    its entry)). Local keys are unique; the entries' global keys are not (megatron-core stacks
    the layers of a stage on one key with a layer axis)."""
    ssd = {k: v for k, v in model.sharded_state_dict().items() if not is_adapter_key(k)}
    return ssd, {id(v.data): (k, v) for k, v in ssd.items() if hasattr(v, "data")}


# ---- the sharded part ----------------------------------------------------------------------------
def _param_state(optimizer, param) -> dict:
    st = optimizer.state.get(param) or {}
    return {m: st.get(m, torch.zeros_like(param)) for m in MOMENTS}


def _others_optimizer(state: TrainerState):
    """megatron-core's optimizer for HD-PiSSA's ordinary trainable parameters (None: built in)."""
    return state.optimizer.others_optimizer if state.is_hd_pissa else None


def _own_optimizer_params(state: TrainerState) -> list:
    """The parameters our own AdamW steps (HD-PiSSA's factors and built-in others; the
    baselines' DataParallelAdamW)."""
    opt = state.optimizer
    if _others_optimizer(state) is not None:
        return list(opt.param_groups[0]["params"])
    return [p for g in opt.param_groups for p in g["params"]]


def sharded_state(state: TrainerState, loading: bool = False) -> tuple[dict, dict, list]:
    """(the sharded training state beyond "model", the model's sharded state dict, restore
    steps). With `loading`, fresh tensors of the current layout to load into, and `restore`
    lists `(key, assign)`: `assign(loaded[key])` puts a loaded value in place."""
    g, opt, model = state.groups, state.optimizer, state.model
    model_ssd, by_param = model_sharded_state_dict(model)
    out: dict = {}
    restore: list = []
    own = state.is_hd_pissa  # HDPiSSAOptimizer: int step counts, master weights
    specs = {id(s.param): s for s in factor_specs(model)}
    for p in _own_optimizer_params(state):
        spec = specs.get(id(p))
        moments = {m: torch.zeros_like(p) for m in MOMENTS} if loading else _param_state(opt, p)
        for m in MOMENTS:
            if spec is not None:
                key = f"optimizer.{m}.{spec.key}"
                out[key] = _sharded(spec, key, moments[m], g)
            elif id(p) in by_param:
                local, entry = by_param[id(p)]
                key = f"optimizer.{m}.{local}"
                out[key] = like(entry, f"optimizer.{m}.{entry.key}", moments[m])
            else:
                raise ValueError(f"a trainable parameter of shape {tuple(p.shape)} is neither an adapter factor "
                                 "nor in the model's sharded state dict: --ckpt-format torch_dist cannot place it")
            restore.append((key, _assign_moment(opt, p, m, spec, own)))
    for spec in specs.values():
        out[spec.key] = _sharded(spec, spec.key, torch.empty_like(spec.param) if loading else spec.param.detach(), g)
        restore.append((spec.key, _assign_param(spec)))
    for store, store_groups in weight_stores(state):  # dense over DP, experts over expert-DP
        for m in store.masters:
            local, entry = by_param[id(m.weight)]
            full = torch.empty(m.weight.shape, dtype=torch.float32) if loading else gather_master(m, store_groups)
            key = f"hd_pissa_master.{local}"
            out[key] = like(entry, f"hd_pissa_master.{entry.key}", full)
            restore.append((key, lambda v, m=m: m.data.copy_(v[m.lo:m.hi])))
        for w, c in zip(store.weights, store.compensation):
            local, entry = by_param[id(w)]
            key = f"hd_pissa_compensation.{local}"
            out[key] = like(entry, f"hd_pissa_compensation.{entry.key}", torch.empty_like(c) if loading else c)
            restore.append((key, lambda v, c=c: c.copy_(v)))
    others = _others_optimizer(state)
    if others is not None:
        out["others_optimizer"] = others.sharded_state_dict(model_ssd, is_loading=loading)
        restore.append(("others_optimizer", others.load_state_dict))
    return out, model_ssd, restore


def _local(value, spec: Optional[FactorSpec]) -> torch.Tensor:
    """A loaded value back in the parameter's local shape (HD-PiSSA: its slices stacked)."""
    if isinstance(value, list):
        return torch.stack(value) if spec is not None and spec.sliced else value[0]
    return value


def _assign_param(spec: FactorSpec):
    def assign(value):
        with torch.no_grad():
            spec.param.copy_(_local(value, spec))
    return assign


def _assign_moment(opt, p, moment: str, spec, own: bool):
    def assign(value):
        st = opt.state[p]
        st[moment] = _local(value, spec).to(p.dtype).clone()
        st.setdefault("step", 0 if own else torch.tensor(0.0))
    return assign


def gather_master(m, groups) -> torch.Tensor:
    """The whole fp32 master of `m.weight` (every DP rank's row block, padding dropped)."""
    from megatron_hdpissa.distributed.collectives import all_gather_over_dp

    rows, n = m.weight.shape[0], m.weight[0].numel()
    block = torch.zeros((m.block,) + tuple(m.weight.shape[1:]), dtype=torch.float32, device=m.data.device)
    block[:m.hi - m.lo] = m.data
    gathered, _ = all_gather_over_dp(block.flatten(), groups)
    return gathered.view(-1, n)[:rows].view(m.weight.shape).clone()


# ---- the common part -------------------------------------------------------------------------------
def _gather_objects(obj) -> list:
    from megatron_hdpissa.distributed.collectives import all_gather_object

    return all_gather_object(obj)


def common_state(state: TrainerState) -> dict:
    """Plain values (weights_only-loadable), identical on every rank, saved once."""
    g, opt, slices = state.groups, state.optimizer, len(state.data)
    mine = {"coords": [g.dp_rank, g.tp_rank, g.pp_rank],
            "slices": {str(g.dp_rank * slices + v): it.state_dict() for v, it in enumerate(state.data)},
            "rng": rng_state()}
    everyone = _gather_objects(mine)
    data = {}
    for r in everyone:
        data.update(r["slices"])
    steps = sorted({int(opt.state[p]["step"]) for p in _own_optimizer_params(state) if p in opt.state})
    if len(steps) > 1:
        raise ValueError(f"the optimizer's parameters have taken different numbers of steps {steps}; "
                         "--ckpt-format torch_dist stores one count")
    common = {"iteration": state.iteration, "adam_step": steps[0] if steps else 0, "meta": state.meta,
              "data": data, "rng": {",".join(map(str, r["coords"])): r["rng"] for r in everyone},
              "num_slices": g.dp_size * slices}
    if state.is_hd_pissa:
        common.update(num_steps=opt.num_steps, skipped_steps=opt.skipped_steps, master_mode=opt.master_mode)
        if opt.grad_scaler is not None:
            common["grad_scaler"] = scaler_state(opt.grad_scaler)
    return {"training": common}


# ---- save and load ---------------------------------------------------------------------------------
def save(state: TrainerState, save_dir) -> Path:
    """Collective: the whole training state as one torch_dist checkpoint of iteration
    `state.iteration` (atomic; see `dist.save_dist_checkpoint`), with hd_pissa/meta.json in the
    iteration folder and the base's model_config.json and tokenizer/ next to it."""
    if state.is_hd_pissa:
        state.optimizer.finish_param_gather()
    extra, model_ssd, _ = sharded_state(state)
    g = state.groups
    layout = {"tp": g.tp_size, "pp": g.pp_size, "dp": g.dp_size, "world": dist.get_world_size()}
    return save_dist_checkpoint(save_dir, state.iteration, {MODEL_KEY: model_ssd, **extra},
                                common_state=common_state(state), layout=layout,
                                write_rank0_files=lambda tmp_iter_dir: (write_meta(tmp_iter_dir, state.meta),
                                                                        copy_base_files(save_dir, state.base_dir)))


def check_compatible(saved: dict, expected: dict, load_dir) -> None:
    """A torch_dist checkpoint resumes at any TP / PP; what it may not change is the method, the
    rank and the number of slices K = DP x virtual ranks (each slice is one block of singular
    components with its own data shard: another K is another method and another batch order)."""
    check_trainable(saved, expected, load_dir)
    for key, flag in (("peft", "--peft"), ("rank", rank_flag(expected))):
        if saved.get(key) != expected.get(key):
            raise ValueError(f"cannot resume from {load_dir}: it was saved with {flag} {saved.get(key)}, this "
                             f"run has {expected.get(key)}")
    k_saved = saved["dp_size"] * saved.get("virtual_ranks", 1)
    k_now = expected["dp_size"] * expected.get("virtual_ranks", 1)
    if k_saved != k_now and saved.get("peft") != "hd-pissa":
        raise ValueError(
            f"cannot resume from {load_dir}: it was saved with data-parallel size {saved['dp_size']}, this run "
            f"has {expected['dp_size']}. Each data-parallel rank reads its own shard of every epoch, so another "
            f"size would change the batch order: resume with {saved['dp_size']} data-parallel ranks (world size / "
            "(TP x PP); TP and PP may change), or start a new run from this checkpoint's merged weights")
    if k_saved != k_now:
        raise ValueError(
            f"cannot resume from {load_dir}: it holds K = {k_saved} slices (data-parallel size "
            f"{saved['dp_size']} x --hd-pissa-virtual-ranks {saved.get('virtual_ranks', 1)}), this run has K = "
            f"{k_now} (data-parallel size {expected['dp_size']} x --hd-pissa-virtual-ranks "
            f"{expected.get('virtual_ranks', 1)}). K is part of the method (each slice is its own block of "
            f"singular components and its own data shard), so a resumed run must keep it: choose "
            f"--hd-pissa-virtual-ranks so that data-parallel size x virtual ranks = {k_saved} (TP and PP may "
            "change freely), or start a new run from this checkpoint's merged weights "
            "(tools/convert_megatron_to_hf.py, then tools/convert_hf_to_megatron.py)")


def load(state: TrainerState, load_dir) -> Restored:
    """Collective: restore the training state of `load_dir`'s tracked iteration into an already
    set-up `state` (the model's weights were loaded with the model), at any TP / PP. The RNG
    states are restored at the saved layout, else reseeded (`trainer_state.reseed`)."""
    iter_dir = Path(load_dir) / iteration_dir_name(read_tracker(load_dir))
    g, opt, own = state.groups, state.optimizer, state.is_hd_pissa
    extra, _, restore = sharded_state(state, loading=True)
    loaded = load_dist_checkpoint(iter_dir, extra)
    common = loaded["training"]
    if own and common.get("master_mode") != opt.master_mode:
        raise ValueError(f"{iter_dir} was written with --hd-pissa-master-weights {common.get('master_mode')}, "
                         f"this run uses {opt.master_mode}")
    for key, assign in restore:
        assign(loaded[key])
    step = int(common["adam_step"])
    for p in _own_optimizer_params(state):
        if p in opt.state:
            opt.state[p]["step"] = step if own else torch.tensor(float(step))
    if own:
        opt.num_steps, opt.skipped_steps = int(common["num_steps"]), int(common["skipped_steps"])
        if opt.grad_scaler is not None and "grad_scaler" in common:
            load_scaler_state(opt.grad_scaler, common["grad_scaler"])
        opt.refresh_gathered_factors()
    slices = len(state.data)
    for v, it in enumerate(state.data):
        it.load_state_dict(common["data"][str(g.dp_rank * slices + v)])
    iteration = int(common["iteration"])
    rng = common["rng"].get(f"{g.dp_rank},{g.tp_rank},{g.pp_rank}")
    saved = loaded.get(COMMON_LAYOUT_KEY, {})
    if rng is not None and (saved.get("tp"), saved.get("pp"), saved.get("dp")) == (g.tp_size, g.pp_size, g.dp_size):
        set_rng_state(rng)
        return Restored(iteration, "RNG states restored")
    reseed(state.seed, iteration, dist.get_rank())
    return Restored(iteration, f"saved at TP={saved.get('tp')} PP={saved.get('pp')} DP={saved.get('dp')}: RNG "
                               f"reseeded (--seed + {RESEED_ITERATION_STRIDE} x iteration + global rank)")
