"""LoRA and PiSSA baselines (peft/lowrank) against HF PEFT on a dense nn.Linear twin of the toy,
and on real megatron-core layers over a TP x DP grid against the single-process run."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import toy
from tests.helpers.distributed import run_distributed

R, ALPHA, LR, WD, STEPS, MICRO = 4, 8, 1e-2, 0.05, 4, 2
DP_MAX = 2  # the data has DP_MAX slices of MICRO micro-batches per step; DP=1 runs take all of them
GRID = ["tp1dp1", "tp2dp1", "tp1dp2", "tp2dp2"]
# logical matrix -> (PEFT module name on the twin, "megatron layer.part" inside the toy)
LOGICAL = {
    "q": ("q_proj", "linear_qkv.q"), "k": ("k_proj", "linear_qkv.k"), "v": ("v_proj", "linear_qkv.v"),
    "proj": ("o_proj", "linear_proj.w"), "gate": ("gate_proj", "linear_fc1.gate"),
    "up": ("up_proj", "linear_fc1.up"), "fc2": ("down_proj", "linear_fc2.w"),
}


def _data():
    return toy.make_data(STEPS, DP_MAX, MICRO)


def _probe():
    return torch.randn(5, 2, toy.H, generator=torch.Generator().manual_seed(7))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


class DenseTwin(nn.Module):
    """The toy block on separate nn.Linear layers named like LLaMA's, so PEFT targets them."""

    def __init__(self, w: dict):
        super().__init__()
        for logical, (peft_name, _) in LOGICAL.items():
            lin = nn.Linear(w[logical].shape[1], w[logical].shape[0], bias=False)
            with torch.no_grad():
                lin.weight.copy_(w[logical])
            self.add_module(peft_name, lin)

    def forward(self, x):
        # megatron's fused QKV order, on the output (last) dimension
        q, k, v = (t.movedim(-1, 0) for t in (self.q_proj(x), self.k_proj(x), self.v_proj(x)))
        h1 = x + self.o_proj(torch.tanh(toy.fuse_qkv(q, k, v).movedim(0, -1)))
        return h1 + self.down_proj(F.silu(self.gate_proj(h1)) * self.up_proj(h1))


def _peft_run(init):
    """PEFT LoRA (init=True) or PiSSA (init="pissa") on the twin, trained on the concatenated data."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights=init,
                     target_modules=[p for p, _ in LOGICAL.values()])
    model = get_peft_model(DenseTwin(toy.logical_weights()), cfg)
    twin = model.base_model.model
    layers = {k: twin.get_submodule(p) for k, (p, _) in LOGICAL.items()}
    out = {
        "a": {k: l.lora_A["default"].weight.detach().clone() for k, l in layers.items()},
        "b": {k: l.lora_B["default"].weight.detach().clone() for k, l in layers.items()},
        "w_res": {k: l.base_layer.weight.detach().clone() for k, l in layers.items()},
        "scaling": {k: l.scaling["default"] for k, l in layers.items()},
    }
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WD)
    for step_data in _data():
        micro = [mb for sl in step_data for mb in sl]
        for xb, target in micro:
            (toy.loss_fn(model(xb), target) / len(micro)).backward()
        opt.step()
        opt.zero_grad()
    merged = model.merge_and_unload()
    out["merged"] = {k: merged.get_submodule(p).weight.detach().clone() for k, (p, _) in LOGICAL.items()}
    return out


class GatherScatterToy(nn.Module):
    """x + down(tanh(up(x))) on the two TP mappings the toy does not use: a column-parallel layer
    that gathers its output and a row-parallel layer that scatters its (full) input itself."""

    def __init__(self, weights: dict, tp_size: int):
        super().__init__()
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer import TransformerConfig

        cfg = TransformerConfig(num_layers=1, hidden_size=toy.H, num_attention_heads=toy.HEADS,
                                use_cpu_initialization=True, tensor_model_parallel_size=tp_size)
        kw = dict(config=cfg, init_method=lambda t: None, bias=False)
        self.up = ColumnParallelLinear(toy.H, toy.FFN, gather_output=True, **kw)
        self.down = RowParallelLinear(toy.FFN, toy.H, input_is_parallel=False, skip_bias_add=True, **kw)
        t = ps.get_tensor_model_parallel_rank()
        with torch.no_grad():
            self.up.weight.copy_(toy.shard_rows(weights["gate"], t, tp_size))
            self.down.weight.copy_(toy.shard_cols(weights["fc2"], t, tp_size))

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)[0]))[0]

    def logical_weights(self) -> dict:
        from megatron.core import parallel_state as ps

        def gather(w, dim):
            parts = [torch.empty_like(w) for _ in range(ps.get_tensor_model_parallel_world_size())]
            torch.distributed.all_gather(parts, w.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
            return torch.cat(parts, dim)

        return {"gate": gather(self.up.weight, 0), "fc2": gather(self.down.weight, 1)}


def _train(method, groups, lora_a=None, model_cls=toy.MegatronToy, targets=None):
    """One baseline run on the megatron toy at the current megatron-core TP size with the DP
    layout of `groups`: loss per rank = mean over its micro-batches, DataParallelAdamW."""
    from megatron_hdpissa.optimizer.data_parallel import DataParallelAdamW
    from megatron_hdpissa.peft.common import peft_method
    from megatron_hdpissa.peft.lowrank.config import LowRankConfig
    from megatron_hdpissa.peft.lowrank.model import apply_lowrank, iter_lowrank, merge_lowrank

    x = _probe()
    model = model_cls(toy.logical_weights(), groups.tp_size)
    base_out = model(x).detach().clone()
    cfg = LowRankConfig(method, rank=R, alpha=float(ALPHA), **({"target_modules": targets} if targets else {}))
    apply_lowrank(model, cfg, groups=groups, progress=False)
    adapters = {f"{name}.{part}": (ad.a[part], ad.b[part]) for name, _, ad in iter_lowrank(model) for part in ad.a}
    if lora_a is not None:  # PEFT's Kaiming draw (full A, TP=1 only)
        with torch.no_grad():
            for key, (a, _) in adapters.items():
                a.copy_(lora_a[key])
    res = {
        "base_out": base_out,
        "wrapped_out": model(x).detach().clone(),
        "w_res": model.logical_weights(),
        "factors": {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in adapters.items()},
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "method": peft_method(model),
    }
    opt = DataParallelAdamW([p for p in model.parameters() if p.requires_grad], groups=groups, lr=LR,
                            weight_decay=WD)
    per_rank = DP_MAX // groups.dp_size
    for step, step_data in enumerate(_data()):
        micro = [mb for sl in step_data[groups.dp_rank * per_rank:(groups.dp_rank + 1) * per_rank] for mb in sl]
        for xb, target in micro:
            (toy.loss_fn(model(xb), target) / len(micro)).backward()
        opt.step()
        if step == 1:  # the gradients Adam saw (DP-averaged in place; LoRA: B != 0 by now)
            res["grad1"] = {k: (a.grad.clone(), b.grad.clone()) for k, (a, b) in adapters.items()}
        opt.zero_grad()
    res["bytes"] = opt.last_step_bytes
    res["adapted_out"] = model(x).detach().clone()
    merge_lowrank(model)
    res["merged_out"] = model(x).detach().clone()
    res["merged"] = model.logical_weights()
    res["leftovers"] = [n or "<root>" for n, m in model.named_modules()
                        if "lora" in n or m._forward_hooks or hasattr(m, "_lora_hook")]
    return res


def _gather_scatter(method, groups):
    from unittest import mock

    # megatron-core's output gather allocates on torch.cuda.current_device(); send it to the CPU
    # here (compat.ensure_cpu_compat does the same for GPTModel runs)
    cpu = (mock.patch.object(torch.cuda, "current_device", lambda: torch.device("cpu"))
           if not torch.cuda.is_available() else contextlib.nullcontext())
    # every rank fails at the same point (before any unmatched collective), so report, not hang
    try:
        with cpu:
            return _train(method, groups, model_cls=GatherScatterToy, targets=["up", "down"])
    except Exception:  # noqa: BLE001 - the traceback is what the test shows
        import traceback

        return traceback.format_exc()


def grid_worker(lora_a):
    """All grid points in one 4-process job (each process pays ~10 s importing megatron-core):
    megatron TP=2 gives TP2xDP2 and, with the DP group dropped, two replicas of TP2xDP1; then
    megatron is re-initialised at TP=1 for TP1xDP2 (pairs of ranks) and replicas of TP1xDP1."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_hdpissa import ParallelGroups

    methods = ("lora", "pissa")
    out = {c: {} for c in GRID}
    g = ParallelGroups.from_megatron()
    alone = dataclasses.replace(g, dp_group=None, dp_rank=0, dp_size=1)
    for m in methods:
        out["tp2dp2"][m] = _train(m, g)
        out["tp2dp1"][m] = _train(m, alone)
        out["tp2dp1"][m + "_gather_scatter"] = _gather_scatter(m, alone)

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, create_gloo_process_groups=False)
    g = ParallelGroups.from_megatron()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    rank = dist.get_rank()
    pair = dataclasses.replace(g, dp_group=pairs[rank // 2], dp_rank=rank % 2, dp_size=2)
    alone = dataclasses.replace(g, dp_group=None, dp_rank=0, dp_size=1)
    for m in methods:
        out["tp1dp2"][m] = _train(m, pair)
        out["tp1dp1"][m] = _train(m, alone)
        out["tp1dp1"][m + "_gather_scatter"] = _gather_scatter(m, alone)
    out["tp1dp1"]["lora_peft_init"] = _train("lora", alone, lora_a=lora_a)
    return out


@pytest.fixture(scope="module")
def peft_runs():
    return {"lora": _peft_run(True), "pissa": _peft_run("pissa")}


@pytest.fixture(scope="module")
def grid(peft_runs):
    """grid[config][method] = list of the 4 ranks' results."""
    lora_a = {ours: peft_runs["lora"]["a"][k] for k, (_, ours) in LOGICAL.items()}
    ranks = run_distributed(grid_worker, 4, 2, args=(lora_a,))
    return {c: {m: [r[c][m] for r in ranks] for m in ranks[0][c]} for c in GRID}


def _logical(factors, key):
    return factors[LOGICAL[key][1]]


def test_twin_is_the_toy():
    w, x = toy.logical_weights(), _probe()
    assert _rel(DenseTwin(w)(x).detach(), toy.dense_forward(w, x)) < 1e-6


def test_scale_is_alpha_over_r_like_peft(peft_runs):
    from megatron_hdpissa import HDPiSSAConfig, LowRankConfig

    assert HDPiSSAConfig(rank=R, alpha=ALPHA).scale == ALPHA / R == 2.0
    assert LowRankConfig("lora", rank=R, alpha=ALPHA).scale == ALPHA / R
    for run in peft_runs.values():
        assert set(run["scaling"].values()) == {ALPHA / R}


def test_lora_init(grid):
    """B = 0 exactly; A Kaiming-uniform(a=sqrt(5)) over the full fan-in, i.e. U(-1/sqrt(n), 1/sqrt(n))
    as in PEFT (that every TP layout draws the same A shows in test_parallel_matches_single_process)."""
    w0 = toy.logical_weights()
    for res in grid["tp1dp1"]["lora"]:
        for key in LOGICAL:
            a, b = _logical(res["factors"], key)
            assert torch.count_nonzero(b) == 0, key
            bound = w0[key].shape[1] ** -0.5
            assert a.shape == (R, w0[key].shape[1]) and a.abs().max() <= bound, key
            assert a.abs().max() > 0.7 * bound and a.std() > 0.4 * bound, key


def test_lora_matches_peft(peft_runs, grid):
    peft = peft_runs["lora"]
    w0 = toy.logical_weights()
    for res in grid["tp1dp1"]["lora_peft_init"]:
        for key in LOGICAL:
            assert torch.equal(_logical(res["factors"], key)[0], peft["a"][key]), key
            delta, delta_peft = res["merged"][key] - w0[key], peft["merged"][key] - w0[key]
            assert delta_peft.norm() > 1e-3 * w0[key].norm(), f"{key}: PEFT barely moved"
            assert _rel(res["merged"][key], peft["merged"][key]) < 1e-5, key
            assert _rel(delta, delta_peft) < 1e-4, f"{key}: update differs from PEFT by {_rel(delta, delta_peft):.2e}"


def test_pissa_init_matches_peft_and_svd(peft_runs, grid):
    """Ours and PEFT: s B A is the top-r SVD part of W (float64 reference), W_res the rest, and
    the factors are the balanced split (A = sqrt(S/s) V^T, B = U sqrt(S/s)) up to per-component sign."""
    peft = peft_runs["pissa"]
    w0 = toy.logical_weights()
    s = ALPHA / R
    for res in grid["tp1dp1"]["pissa"]:
        for key in LOGICAL:
            u, sv, vh = torch.linalg.svd(w0[key].double(), full_matrices=False)
            top = (u[:, :R] * sv[:R]) @ vh[:R]
            a, b = _logical(res["factors"], key)
            pa, pb = peft["a"][key], peft["b"][key]
            assert _rel(s * b.double() @ a.double(), top) < 1e-5, key
            assert _rel(s * pb.double() @ pa.double(), top) < 1e-5, key
            assert _rel(res["w_res"][key], w0[key].double() - top) < 1e-5, key
            assert _rel(res["w_res"][key], peft["w_res"][key]) < 1e-5, key
            sign = torch.sign((a * pa).sum(1))
            assert _rel(a * sign[:, None], pa) < 1e-5 and _rel(b * sign, pb) < 1e-5, key


def test_pissa_trained_matches_peft(peft_runs, grid):
    peft = peft_runs["pissa"]
    w0 = toy.logical_weights()
    for res in grid["tp1dp1"]["pissa"]:
        for key in LOGICAL:
            delta, delta_peft = res["merged"][key] - w0[key], peft["merged"][key] - w0[key]
            assert delta_peft.norm() > 1e-3 * w0[key].norm(), f"{key}: PEFT barely moved"
            assert _rel(res["merged"][key], peft["merged"][key]) < 1e-5, key
            assert _rel(delta, delta_peft) < 1e-4, f"{key}: update differs from PEFT by {_rel(delta, delta_peft):.2e}"


@pytest.mark.parametrize("method", ["lora", "pissa"])
@pytest.mark.parametrize("config", GRID)
def test_forward_unchanged_by_wrapping(grid, config, method):
    for res in grid[config][method]:
        if method == "lora":  # B = 0: the adapter adds exact zeros
            assert torch.equal(res["wrapped_out"], res["base_out"])
        else:  # W_res + s B A reproduces W to fp32 rounding
            assert _rel(res["wrapped_out"], res["base_out"]) < 1e-5
        assert res["trainable"] and all(".lora." in n for n in res["trainable"]), res["trainable"]


@pytest.mark.parametrize("method", ["lora", "pissa"])
@pytest.mark.parametrize("config", ["tp2dp1", "tp1dp2", "tp2dp2"])
def test_parallel_matches_single_process(grid, config, method):
    """Same merged weights as TP=1 x DP=1 on the concatenated data; every rank holds the same W."""
    ref = grid["tp1dp1"][method][0]
    w0 = toy.logical_weights()
    ranks = grid[config][method]
    for res in ranks:
        for key in w0:
            assert torch.equal(res["merged"][key], ranks[0]["merged"][key]), f"{key}: ranks disagree"
            # PiSSA: the full W was decomposed, not a shard
            assert _rel(res["w_res"][key], ref["w_res"][key]) < 1e-6, f"{key}: W_res differs"
            delta, delta_ref = res["merged"][key] - w0[key], ref["merged"][key] - w0[key]
            assert delta_ref.norm() > 1e-3 * w0[key].norm(), f"{key}: reference barely moved"
            assert _rel(res["merged"][key], ref["merged"][key]) < 1e-5, key
            assert _rel(delta, delta_ref) < 1e-4, f"{key}: update differs by {_rel(delta, delta_ref):.2e}"
    if config.endswith("dp2"):  # Adam hides a gradient scale: check the DP mean itself
        for res, one in zip(ranks, grid[config.replace("dp2", "dp1")][method]):  # same TP rank
            for key, grads in res["grad1"].items():
                for g, g_ref in zip(grads, one["grad1"][key]):
                    assert g_ref.norm() > 0 and _rel(g, g_ref) < 1e-5, f"{key}: DP-averaged gradient"
    for res in ranks:
        if config.endswith("dp2"):  # one flat fp32 all-reduce of this rank's factor gradients
            assert res["bytes"] == 4 * sum(a.numel() + b.numel() for a, b in res["factors"].values())
        else:
            assert res["bytes"] == 0


def test_method_is_recorded(grid):
    for method in ("lora", "pissa"):
        assert {res["method"] for c in GRID for res in grid[c][method]} == {method}


@pytest.mark.parametrize("config", GRID)
def test_merge_removes_adapters_and_keeps_output(grid, config):
    for method in ("lora", "pissa"):
        for res in grid[config][method]:
            assert res["leftovers"] == [], res["leftovers"]
            assert _rel(res["adapted_out"], res["base_out"]) > 1e-4, "training did not change the output"
            assert _rel(res["merged_out"], res["adapted_out"]) < 1e-5


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_gathered_output_and_unscattered_input(grid, method):
    """ColumnParallelLinear(gather_output=True) and RowParallelLinear(input_is_parallel=False) at
    TP=2 behave as at TP=1 (HD-PiSSA supports both; see adapter.scatter_input)."""
    key = method + "_gather_scatter"
    ref, ranks = grid["tp1dp1"][key][0], grid["tp2dp1"][key]
    assert not isinstance(ref, str), ref
    for res in ranks:
        assert not isinstance(res, str), res
        assert _rel(res["wrapped_out"], res["base_out"]) < 1e-5
        assert _rel(res["merged_out"], res["adapted_out"]) < 1e-5 and res["leftovers"] == []
        for name, w in ref["merged"].items():
            w0 = toy.logical_weights()[name]
            assert (w - w0).norm() > 1e-3 * w0.norm(), f"{name}: reference barely moved"
            assert _rel(res["merged"][name], w) < 1e-5, name
