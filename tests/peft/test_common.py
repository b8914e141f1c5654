"""peft/common.py: target matching, the adapter hook, TP slicing of factors, adding a part's delta
into a (fused, TP-sharded) weight, method identity and ConfigError, against dense computations."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from megatron_hdpissa.peft import layout
from megatron_hdpissa.peft.common import (
    COLUMN, ROW, ConfigError, add_part_delta_, attach_adapter, detach_adapter, hook_input, iter_children,
    matches, peft_method, record_method, shard_factors,
)
from tests.helpers import toy
from tests.helpers.distributed import run_distributed


def test_matches_exact_suffix_and_regex():
    name = "decoder.layers.1.self_attention.linear_qkv"
    assert matches(name, ["linear_qkv"]) and matches(name, ["self_attention.linear_qkv"])
    assert matches(name, [name]) and matches(name, ["re:decoder\\.layers\\.1\\..*"])
    assert not matches(name, ["qkv"])  # a suffix only at a `.` boundary
    assert not matches(name, ["re:layers\\.1"])  # regexes match the whole name
    assert not matches(name, ["linear_proj", "re:.*\\.0\\..*"]) and not matches(name, [])
    assert matches("decoder.final_layernorm.weight", ["re:.*layernorm.*"])


def test_config_error_names_the_parameter_then_the_flag():
    e = ConfigError("rank", "x: {name} = 3 is too large")
    assert isinstance(e, ValueError) and e.param == "rank" and str(e) == "x: rank = 3 is too large"
    flagged = e.renamed({"rank": "--lora-rank", "alpha": "--lora-alpha"})
    assert str(flagged) == "x: --lora-rank = 3 is too large" and flagged.param == "rank"
    assert str(e.renamed({"alpha": "--lora-alpha"})) == str(e)  # an unmapped parameter keeps its name


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_factors_rebuild_the_dense_product(tp):
    """Column-parallel: the TP ranks' B A stacked along rows = the full B A; row-parallel: along
    columns. Also with HD-PiSSA's leading slice dimension (K, r, n) / (K, m, r)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    b = torch.randn(3, 12, 2, generator=g, dtype=torch.float64)
    full = b @ a
    col = [shard_factors(COLUMN, a, b, t, tp) for t in range(tp)]
    row = [shard_factors(ROW, a, b, t, tp) for t in range(tp)]
    assert all(a_t is a for a_t, _ in col) and all(b_t is b for _, b_t in row)  # replicated factors
    assert torch.equal(torch.cat([b_t @ a_t for a_t, b_t in col], 1), full)
    assert torch.equal(torch.cat([b_t @ a_t for a_t, b_t in row], 2), full)
    for t, (a_t, b_t) in enumerate(col):
        assert torch.equal(b_t, b[:, t * 12 // tp:(t + 1) * 12 // tp])
    a0 = a[0]
    a_t, b_t = shard_factors(COLUMN, a0, None, 0, tp)  # LoRA's A alone
    assert b_t is None and a_t is a0


def _dense_add(weight, row_index, delta):
    """weight with `delta`'s row i added to row `row_index[i]`, one row at a time in float64."""
    out = weight.double().clone()
    for i, r in enumerate(row_index):
        out[r] += delta[i].double()
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_add_part_delta_fused_qkv_against_refusing(tp):
    """Adding dq / dk / dv to each TP rank's fused QKV shard, part by part, equals re-fusing
    (Wq + dq, Wk + dk, Wv + dv) and sharding that (float64, exact)."""
    g = torch.Generator().manual_seed(1)
    w = {p: torch.randn(*toy.logical_weights()[p].shape, generator=g, dtype=torch.float64) for p in "qkv"}
    d = {p: torch.randn(*w[p].shape, generator=g, dtype=torch.float64) for p in "qkv"}
    fused, fused_new = toy.fuse_qkv(w["q"], w["k"], w["v"]), toy.fuse_qkv(*(w[p] + d[p] for p in "qkv"))
    for t in range(tp):
        local = toy.shard_rows(fused, t, tp).clone()
        parts = layout.qkv_parts(toy.HEADS, toy.GROUPS, toy.HD, tp, "linear_qkv")
        assert [p.name for p in parts] == ["q", "k", "v"]
        for part in parts:
            out = add_part_delta_(local, part, toy.shard_rows(d[part.name], t, tp))
            assert out is local  # in place
        assert torch.equal(local, toy.shard_rows(fused_new, t, tp))


def test_add_part_delta_gate_up_whole_and_row_order():
    g = torch.Generator().manual_seed(2)
    local = torch.randn(12, 5, generator=g, dtype=torch.float64)
    gate, up = layout.gate_up_parts(12, "linear_fc1")
    dg, du = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    ref = _dense_add(_dense_add(local, range(6), dg), range(6, 12), du)
    add_part_delta_(local, gate, dg)
    add_part_delta_(local, up, du)
    assert torch.equal(local, ref)
    # non-contiguous rows, in the part's order (not sorted)
    part = layout.Part("x", torch.tensor([7, 2, 9]), None)
    w0 = torch.randn(10, 4, generator=g, dtype=torch.float64)
    delta = torch.randn(3, 4, generator=g, dtype=torch.float64)
    assert torch.equal(add_part_delta_(w0.clone(), part, delta), _dense_add(w0, [7, 2, 9], delta))
    (whole,) = layout.whole()
    assert torch.equal(add_part_delta_(w0.clone(), whole, -w0), torch.zeros_like(w0))


def test_add_part_delta_keeps_the_weight_dtype():
    w = torch.ones(4, 3, dtype=torch.bfloat16)
    delta = torch.full((2, 3), 1e-3, dtype=torch.float64)  # below bf16's spacing at 1: lost, as in W's dtype
    add_part_delta_(w, layout.Part("p", torch.tensor([0, 1]), (0, 2)), delta)
    assert w.dtype == torch.bfloat16 and torch.equal(w, torch.ones(4, 3, dtype=torch.bfloat16))
    add_part_delta_(w, layout.Part("p", torch.tensor([3]), (3, 4)), torch.full((1, 3), 0.5, dtype=torch.float64))
    assert torch.equal(w[3], torch.full((3,), 1.5, dtype=torch.bfloat16))
    assert torch.equal(w[:3], torch.ones(3, 3, dtype=torch.bfloat16))


class _Shift(nn.Module):
    """An adapter adding a constant; records the inputs it saw."""

    def __init__(self, seen: list):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(2.0))
        self.seen = seen

    def add_to_output(self, out, x):
        self.seen.append(x)
        return out + self.c


class _Pair(nn.Module):
    """Returns (out, bias) like megatron-core's parallel linears."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, input_):
        return self.lin(input_), None


def test_attach_detach_keeps_base_keys_and_output():
    seen = []
    base = nn.Sequential(nn.Linear(3, 2))
    keys = set(base.state_dict())
    x = torch.randn(4, 3)
    y0 = base(x)
    attach_adapter(base[0], "shift", _Shift(seen))
    assert set(base.state_dict()) == keys | {"0.shift.c"}
    assert torch.equal(base(x), y0 + 2.0) and seen[-1] is x
    with pytest.raises(ValueError, match="already has a shift adapter"):
        attach_adapter(base[0], "shift", _Shift(seen))
    assert [(n, type(a)) for n, _, a in iter_children(base, "shift", _Shift)] == [("0", _Shift)]
    assert isinstance(detach_adapter(base[0], "shift"), _Shift) and detach_adapter(base[0], "shift") is None
    assert set(base.state_dict()) == keys and torch.equal(base(x), y0)
    assert not base[0]._forward_hooks and not hasattr(base[0], "_shift_hook")
    # (out, bias) outputs and the keyword input megatron-core's layers take
    pair = _Pair()
    attach_adapter(pair, "shift", _Shift(seen))
    out, bias = pair(input_=x)
    assert bias is None and torch.equal(out, pair.lin(x) + 2.0) and seen[-1] is x
    assert hook_input((), {"input_": x}) is x and hook_input((x,), {}) is x


def test_peft_method_is_recorded_not_guessed():
    model = nn.Linear(2, 2)
    assert peft_method(model) is None
    record_method(model, "pissa", config=None, groups=None)
    assert peft_method(model) == "pissa"

    class Wrapper(nn.Module):  # megatron DDP / Float16Module keep the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert peft_method(Wrapper(Wrapper(model))) == "pissa"
    with pytest.raises(ConfigError, match="method must be one of"):
        record_method(model, "dora", config=None, groups=None)


def _targets_worker():
    """TP=2: each targeted layer's parts and shapes, and every part's delta added into the real
    local shards equals the logical weights plus the logical deltas."""
    from megatron.core import parallel_state as ps

    from megatron_hdpissa.peft.common import DEFAULT_TARGET_MODULES, find_targets

    tp, t = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    w0 = toy.logical_weights()
    model = toy.MegatronToy(w0, tp)
    out = {}
    for fused in (False, True):
        out[fused] = [(x.name, x.kind, [p.name for p in x.parts], x.rows_local, x.in_local, x.shapes)
                      for x in find_targets(model, DEFAULT_TARGET_MODULES, tp, fused)]
    g = torch.Generator().manual_seed(3)
    deltas = {k: torch.randn(*w.shape, generator=g) for k, w in w0.items()}
    name_of = {"linear_qkv": "qkv", "linear_proj": "proj", "linear_fc1": "fc1", "linear_fc2": "fc2"}
    for x in find_targets(model, DEFAULT_TARGET_MODULES, tp, False):
        for part in x.parts:
            logical = part.name if part.name != "w" else name_of[x.name]
            local = (toy.shard_rows(deltas[logical], t, tp) if x.kind == COLUMN
                     else toy.shard_cols(deltas[logical], t, tp))
            add_part_delta_(x.module.weight.data, part, local)
    out["merged"] = model.logical_weights()
    out["expected"] = {k: w0[k] + deltas[k] for k in w0}
    return out


def test_find_targets_and_deltas_on_megatron_layers():
    res = run_distributed(_targets_worker, 2, 2)
    n, qkv = toy.H, toy.QKV_OUT
    for r in res:
        assert r[False] == [
            ("linear_qkv", COLUMN, ["q", "k", "v"], [toy.HEADS * toy.HD // 2, toy.GROUPS * toy.HD // 2,
                                                    toy.GROUPS * toy.HD // 2], n,
             [(toy.HEADS * toy.HD, n), (toy.GROUPS * toy.HD, n), (toy.GROUPS * toy.HD, n)]),
            ("linear_proj", ROW, ["w"], [n], qkv // 2, [(n, qkv)]),
            ("linear_fc1", COLUMN, ["gate", "up"], [toy.FFN // 2] * 2, n, [(toy.FFN, n)] * 2),
            ("linear_fc2", ROW, ["w"], [n], toy.FFN // 2, [(n, toy.FFN)]),
        ]
        assert [x[2] for x in r[True]] == [["w"]] * 4
        assert r[True][0][5] == [(qkv, n)] and r[True][2][5] == [(2 * toy.FFN, n)]
        for k, w in r["expected"].items():
            assert torch.equal(r["merged"][k], w), k
