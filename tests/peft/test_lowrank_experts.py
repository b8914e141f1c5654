"""LoRA, PiSSA and full fine-tuning on MoE experts do not change with the expert layout (issue 21):
a tiny random Qwen3-MoE GPT (4 experts, top-2, attention and experts adapted), 2 gloo processes,
DP = 2, the same data; 3 AdamW steps at EP = 2 and at expert-TP = 2 give the weights of EP = 1,
expert-TP = 1 (every expert weight, dense weight and adapter factor, experts keyed by global
expert, expert-TP shards joined), the first step's reduced gradients and every step's global
gradient norm. LoRA also at TP = 2 with sequence parallelism (expert-TP 2 and 1; DP = 1, so the
one DP rank trains on both data shards) against one process on the same rows (not DP = 2: the
router's load-balancing loss is a statistic of each DP rank's batch, which moves the gradients by
~5e-4 relative): its adapter factors, dense ones joined over TP.

The EP = 1 run is the independent computation: each rank holds every expert and averages its
gradients over DP, the dense rule. At EP = 2 a rank holds two experts and receives both ranks'
tokens for them (sum over expert-DP, divided by DP); at expert-TP = 2 each rank holds half of
every expert. Tolerance: fp32 round-off of the forward, amplified by AdamW's later steps (1e-4
of the largest update; the first step's gradients to 1e-4 relative, the norms to 1e-5).
"""
from __future__ import annotations

import re

import pytest
import torch

from tests.helpers.distributed import run_distributed

STEPS, R, LR = 3, 2, 1e-2
EXPERT = re.compile(r"(.*\.local_experts\.)(\d+)(\..+)$")
DATA_SHARDS = 2  # the reference's DP ranks: a run at DP = 1 trains on both shards' rows at once


def _train(base: str, method: str, clip: float, overrides: dict, eps: float):
    from megatron.core import parallel_state as ps

    from megatron_hdpissa import LowRankConfig, apply_lowrank
    from megatron_hdpissa.convert.load import load_gpt_model
    from megatron_hdpissa.optimizer.data_parallel import DataParallelAdamW
    from megatron_hdpissa.optimizer.expert_grads import tag_expert_params

    model, _ = load_gpt_model(base, **overrides)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        tag_expert_params(model)
    else:
        apply_lowrank(model, LowRankConfig(method, rank=R, alpha=2 * R), progress=False)
    opt = DataParallelAdamW([p for p in model.parameters() if p.requires_grad], lr=LR, clip_grad=clip,
                            weight_decay=0.01, eps=eps)
    opt.track_grad_norm = True
    first = ps.get_expert_model_parallel_rank() * (model.config.num_moe_experts
                                                   // ps.get_expert_model_parallel_world_size())
    ranks = ps.get_expert_tensor_parallel_rank(), ps.get_tensor_model_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    # this DP rank's share of the data shards (one at DP = 2; both at DP = 1: the loss's mean over
    # rows is then the mean of the two shards' losses, which is what the DP average gives)
    gens = [torch.Generator().manual_seed(100 + d)
            for d in range(dp_rank * DATA_SHARDS // dp, (dp_rank + 1) * DATA_SHARDS // dp)]
    before, norms, grads = _tensors(model, first, ranks, lambda p: p), [], None
    for step in range(STEPS):
        tokens = torch.cat([torch.randint(0, model.vocab_size, (2, 17), generator=g) for g in gens])
        pos = torch.arange(16).expand(len(tokens), 16)
        model(input_ids=tokens[:, :-1], position_ids=pos, attention_mask=None, labels=tokens[:, 1:]).mean().backward()
        opt.step()
        if step == 0:  # the optimizer reduced (and clipped) the gradients in place
            grads = _tensors(model, first, ranks, lambda p: p.grad, trainable=True)
        opt.zero_grad()
        norms.append(opt.last_grad_norm)
    disp = model.decoder.layers[0].mlp.token_dispatcher
    return {"layout": (disp.ep_size, disp.tp_size, ps.get_tensor_model_parallel_world_size()),
            "before": before, "after": _tensors(model, first, ranks, lambda p: p), "grads": grads, "norms": norms}


def _tensors(model, first_expert: int, ranks: tuple[int, int], get, trainable: bool = False) -> dict:
    """{name with the global expert: (tensor, split axis or None, shard rank)} of every parameter:
    an expert's split over expert-TP (`ranks[0]`), a dense one's over TP (`ranks[1]`)."""
    out = {}
    for name, p in model.named_parameters():
        if trainable and not p.requires_grad:
            continue
        m = EXPERT.match(name)
        if m:
            name = f"{m.group(1)}{first_expert + int(m.group(2))}{m.group(3)}"
        axis = None
        if getattr(p, "tensor_model_parallel", False):  # column: W and B by rows; row: W and A by columns
            axis = 1 if re.search(r"\.linear_(fc2|proj)\.", name) else 0
        t = get(p)
        if t is not None:
            out[name] = (t.detach().clone(), axis, ranks[0] if m else ranks[1])
    return out


def _whole(results, which: str) -> dict[str, torch.Tensor]:
    """Every tensor whole, from every rank (experts by global id): shards joined along their axis
    (expert ones over expert-TP, dense ones over TP; fc1's [gate; up] per shard); the copies of a
    shard, and of a replicated tensor, must be equal on every rank that holds them."""
    out, shards = {}, {}
    for res in results:
        for name, (t, axis, rank) in res[which].items():
            shards.setdefault(name, {}).setdefault(rank, []).append((t, axis))
    for name, by_t in shards.items():
        axis = by_t[0][0][1]
        groups = [c for t in sorted(by_t) for c in by_t[t]] if axis is None else [by_t[t] for t in sorted(by_t)]
        for copies in ([groups] if axis is None else groups):  # (expert-)DP (and replicated: TP) copies
            for t, _ in copies[1:]:
                torch.testing.assert_close(t, copies[0][0], rtol=0, atol=0, msg=f"{name}: replicas differ")
        if axis is None:
            out[name] = by_t[0][0][0]
            continue
        parts = [by_t[t][0][0] for t in sorted(by_t)]
        if name.endswith("linear_fc1.weight") and len(parts) > 1:
            half = parts[0].shape[0] // 2
            out[name] = torch.cat([p[:half] for p in parts] + [p[half:] for p in parts])
        else:
            out[name] = torch.cat(parts, axis)
    return out


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    from tests.helpers.hf_models import save_random_hf_model, tiny_moe_hf_config

    root = tmp_path_factory.mktemp("lowrank_experts")
    return save_random_hf_model(tiny_moe_hf_config("qwen3_moe", initializer_range=0.1), root / "hf", seed=0)


def _convert(hf, tp: int) -> str:
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    return str(convert_hf_to_megatron(hf, hf.parent / f"base_tp{tp}", tp, progress=False, ckpt_format="torch"))


@pytest.fixture(scope="module")
def base(hf_moe):
    return _convert(hf_moe, 1)


_RUNS: dict = {}  # (method, layout) -> the ranks' results, shared by this module's tests


def _runs(base: str, method: str, layout: tuple, clip: float = 0.5) -> list:
    """layout: (EP, expert-TP) on 2 processes at TP = 1, or (EP, expert-TP, TP) with TP's checkpoint
    `base` and --sequence-parallel (megatron-core's MoE layer trains at TP > 1 only with it); (1, 1, 1):
    one process."""
    if (method, layout) not in _RUNS:
        tp = layout[2] if len(layout) > 2 else 1
        overrides = {"sequence_parallel": True} if tp > 1 else {}
        # eps 1e-4 (full fine-tuning; the TP runs), so that AdamW's first steps (lr g / (|g| + eps))
        # do not turn fp32 round-off in near-zero gradients (rarely seen embedding rows; LoRA's A of
        # an expert that saw few tokens, in its first nonzero step) into O(lr) differences
        eps = 1e-4 if method == "full" or len(layout) > 2 else 1e-8
        _RUNS[method, layout] = run_distributed(_train, 1 if layout == (1, 1, 1) else 2, tp=tp, ep=layout[0],
                                                etp=layout[1], args=(base, method, clip, overrides, eps))
    return _RUNS[method, layout]


def _check_layouts(base: str, method: str, layouts, base_tp: str | None = None, ref_layout=(1, 1)) -> None:
    """Each layout's weights, first reduced gradients and norms against `ref_layout` (EP = 1,
    expert-TP = 1, TP = 1; at TP > 1 the trainable tensors only: the frozen ones are the checkpoint's)."""
    runs = {layout: _runs(base if layout[2:] in ((), (1,)) else base_tp, method, layout)
            for layout in (ref_layout, *layouts)}
    ref, w0 = _whole(runs[ref_layout], "after"), _whole(runs[ref_layout], "before")
    ref_grads = _whole(runs[ref_layout], "grads")
    assert any(".local_experts.3." in n for n in ref_grads), "the experts train"
    update = max(float((ref[n] - w0[n]).abs().max()) for n in ref)
    assert update > 1e-3
    for layout in layouts:
        results = runs[layout]
        assert results[0]["layout"] == (*layout, 1)[:3]  # the dispatcher runs at that EP and expert-TP; TP
        got, grads = _whole(results, "after"), _whole(results, "grads")
        want = ref
        if len(layout) > 2:
            want = {n: w for n, w in ref.items() if n in ref_grads}
            got = {n: w for n, w in got.items() if n in ref_grads}
        assert got.keys() == want.keys() and grads.keys() == ref_grads.keys()
        diff = {n: float((w - want[n]).abs().max()) for n, w in got.items()}
        worst = max(diff, key=diff.get)
        print(f"{method} (EP, ETP[, TP])={layout}: weights within {diff[worst] / update:.1e} of the update "
              f"({worst}); norms {results[0]['norms']}")
        # measured (of the largest update): LoRA 6.3e-6 / 1.3e-5, full 6.5e-6 / 2.3e-5, PiSSA 1.7e-5 /
        # 2.9e-5 at EP = 2 / expert-TP = 2: fp32 round-off of the forward (other GEMM shapes and
        # sums), amplified by AdamW where second moments are small; a misplaced expert, a wrong
        # reduction or a wrong A moves weights by O(update)
        assert diff[worst] <= 1e-4 * update, (layout, worst)
        for n, g in grads.items():  # the reduction: sum over expert-DP / DP, as the DP average at EP = 1
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5 * float(ref_grads[n].abs().max()),
                                       msg=lambda m, n=n: f"{method} {layout} {n}: {m}")
        assert results[0]["norms"] == pytest.approx(runs[ref_layout][0]["norms"], rel=1e-5), layout


def test_lora_on_experts_at_every_expert_layout(base):
    _check_layouts(base, "lora", ((2, 1), (1, 2)))


def test_full_finetuning_at_expert_parallel_size_2(base):
    """Before issue 21's fix DataParallelAdamW averaged expert gradients over DP: at EP = 2 that
    added expert e's gradient to expert e + 2's (the ranks hold different experts)."""
    _check_layouts(base, "full", ((2, 1),))


@pytest.mark.slow
def test_full_finetuning_at_expert_tp_2(base):
    _check_layouts(base, "full", ((1, 2),))


def test_lora_on_experts_at_tp_2_with_sequence_parallelism(base, hf_moe):
    """TP = 2 with --sequence-parallel, expert-TP 2 (= TP) and 1, against TP = 1: each TP rank holds
    half the sequence; the dispatcher gathers an expert's tokens over expert-TP (its linears do no
    communication of their own, so neither may their adapters), or at expert-TP 1 keeps a rank's
    tokens on its whole experts (the TP ranks are then the experts' expert-DP replicas)."""
    _check_layouts(base, "lora", ((1, 2, 2), (1, 1, 2)), base_tp=_convert(hf_moe, 2), ref_layout=(1, 1, 1))


@pytest.mark.slow
def test_pissa_on_experts_at_every_expert_layout(base):
    _check_layouts(base, "pissa", ((2, 1), (1, 2)))


def _lowrank_keys():
    from megatron_hdpissa import LowRankConfig, apply_lowrank
    from megatron_hdpissa.checkpoint.trainer_dist import factor_specs
    from tests.helpers import moe_layer as ml

    block = ml.MoEBlock(2, 1, ml.logical_weights(0))
    apply_lowrank(block, LowRankConfig("lora", rank=R, target_modules=("linear_fc1", "linear_fc2")), progress=False)
    return {s.key: (s.num_slices, s.groups.tp_size, s.groups.dp_size) for s in factor_specs(block)}


def test_lowrank_expert_factors_are_keyed_by_global_expert():
    """torch_dist keys (checkpoint/trainer_dist_lowrank_experts): EP rank p's local expert j is
    global expert 2p + j (4 experts over EP = 2), one slice, over its expert-TP / expert-DP groups
    (size 1 each here: 2 ranks, EP = 2)."""
    for p, keys in enumerate(run_distributed(_lowrank_keys, 2, ep=2)):
        want = {f"lora.mlp.experts.local_experts.{2 * p + j}.{layer}.{w}.{part}" for j in range(2)
                for layer, part in (("linear_fc1", "gate"), ("linear_fc1", "up"), ("linear_fc2", "w")) for w in "ab"}
        assert set(keys) == want, (p, sorted(keys))
        assert set(keys.values()) == {(1, 1, 1)}, keys
