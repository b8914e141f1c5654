"""--moe-router-trainable (models/moe_router.py): the MoE router trained as an ordinary data-parallel
parameter with every --peft method, checked against HF transformers' Qwen3-MoE in float64.

Tiny random Qwen3-MoE (4 experts, top-2, 2 layers) with SmolLM2's tokenizer, real trainer runs on
gloo processes. The reference objective of one step is the trainer's: per micro-batch the mean
token cross-entropy plus, per MoE layer, megatron-core's load-balancing loss
`coeff * E / (k T^2) * sum_i count_i * sum_t p_ti` (softmax over all experts, top-k counts, T
the micro-batch's tokens; HF's `load_balancing_loss_func` is k times this per layer, pooled over
layers), averaged over micro-batches and data-parallel ranks. Its router gradient comes from
autograd through HF's own modules in float64 (HF's RMSNorm rounds to fp32), on the exact token
rows each rank consumed.
"""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import tiny_moe_trainer_material
from tests.helpers.trainer import finetune_main, flags, saved_tensors

COEFF, TOPK, EXPERTS, ITERS = 0.05, 2, 4, 3


@pytest.fixture(scope="module")
def m(tmp_path_factory, smollm2_hf_dir, gsm8k_path):
    return tiny_moe_trainer_material(tmp_path_factory.mktemp("moe_router"), smollm2_hf_dir, gsm8k_path, seed=11)


def _argv(m, run: str = "", **over) -> list[str]:
    args = {"--pretrained-checkpoint": m["base"], "--data-path": m["train"], "--micro-batch-size": 1,
            "--seq-length": 128, "--lr": 1e-2, "--hd-pissa-rank": 2, "--no-progress": None, "--seed": 3,
            "--train-iters": ITERS, "--moe-router-trainable": None, "--moe-aux-loss-coeff": COEFF,
            "--clip-grad": 0, "--ckpt-format": "torch_dist"}
    if run:
        args["--save"] = m["root"] / run
    args.update(over)
    return flags(args)


# ---- one step's router gradient against HF in float64 ----------------------------------------------
class _Recorded:
    """A batch iterator that keeps what it hands out."""

    def __init__(self, it, seen: list):
        self.it, self.seen = it, seen

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.seen.append({k: batch[k].clone() for k in ("tokens", "labels", "loss_mask", "position_ids")})
        return batch


def _router_grads(argv):
    """This rank's router gradients of the first step as the optimizer took them (megatron DDP:
    `main_grad`, averaged by `finalize_model_grads`; built-in: `grad`, averaged by the optimizer;
    both unclipped, --clip-grad 0), by global layer, and the micro-batches this rank consumed."""
    from megatron_hdpissa.models.moe_router import router_parameters
    from megatron_hdpissa.peft.common import global_layer_name
    from megatron_hdpissa.training.arguments import parse_args
    from megatron_hdpissa.training.finetune import FinetuneRecipe
    from megatron_hdpissa.training.step import forward_backward

    torch.set_num_threads(1)
    recipe = FinetuneRecipe(parse_args(argv))
    recipe.setup()
    seen: list = []
    recipe.iterators = [_Recorded(it, seen) for it in recipe.iterators]
    a, g = recipe.args, recipe.groups
    forward_backward(recipe.train_model, recipe.model, recipe.iterators, recipe.micro_per_slice, a.seq_length,
                     a.micro_batch_size, g, recipe.device, recipe.slices, recipe.ddp)
    routers = router_parameters(recipe.model)
    assert routers and all(p.requires_grad for p in routers.values()), sorted(routers)
    recipe.optimizer.step()  # built-in: averages the gradients over DP in place; virtual ranks: / V
    grads = {global_layer_name(recipe.model, n): (p.main_grad if recipe.ddp is not None else p.grad).detach().clone()
             for n, p in routers.items()}
    return {"grads": grads, "batches": seen, "dp_rank": g.dp_rank}


def _switch_aux(logits: torch.Tensor) -> torch.Tensor:
    """megatron-core's load-balancing loss of one layer and micro-batch, without the coefficient."""
    probs = torch.softmax(logits, dim=-1)
    counts = torch.zeros(EXPERTS, dtype=probs.dtype).scatter_add_(
        0, probs.topk(TOPK, dim=-1).indices.reshape(-1), torch.ones(logits.shape[0] * TOPK, dtype=probs.dtype))
    tokens = logits.shape[0]
    return EXPERTS / (TOPK * tokens * tokens) * (counts.detach() * probs.sum(dim=0)).sum()


def _hf_router_grads(hf_dir, batches_per_rank: list[list[dict]], coeff: float) -> dict[str, torch.Tensor]:
    """d(objective)/d(router) by autograd through HF's Qwen3-MoE in float64."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, experts_implementation="eager")
    gates = [layer.mlp.gate for layer in model.model.layers]
    logits: list = []
    for gate in gates:
        gate.register_forward_hook(lambda mod, inp, out: logits.append(out[0]))
    total = 0.0
    for batches in batches_per_rank:
        for b in batches:
            logits.clear()
            out = model(input_ids=b["tokens"], position_ids=b["position_ids"]).logits
            ce = F.cross_entropy(out.flatten(0, 1), b["labels"].flatten(), reduction="none")
            mask = b["loss_mask"].flatten().double()
            objective = (ce * mask).sum() / mask.sum() + coeff * sum(_switch_aux(x) for x in logits)
            total = total + objective / (len(batches) * len(batches_per_rank))
    total.backward()
    return {f"decoder.layers.{i}.mlp.router.weight": g.weight.grad for i, g in enumerate(gates)}


def _check_against_hf(m, results, coeff: float = COEFF) -> None:
    by_dp = {}
    for r in results:
        by_dp.setdefault(r["dp_rank"], r["batches"])
    want = _hf_router_grads(m["hf"], [by_dp[d] for d in sorted(by_dp)], coeff)
    without_aux = _hf_router_grads(m["hf"], [by_dp[d] for d in sorted(by_dp)], 0.0)
    for r in results:
        got = r["grads"]
        assert set(got) <= set(want) and got, sorted(got)
        for name, g in got.items():
            ref, scale = want[name], float(want[name].abs().max())
            # the aux term moves the gradient far beyond the tolerance: dropping it would fail
            assert float((ref - without_aux[name]).abs().max()) > 100 * 2e-5 * scale, name
            err = float((g.double() - ref).abs().max())
            assert err <= 2e-5 * scale, f"{name}: max |diff| {err:.3g} vs HF float64, scale {scale:.3g}"
            print(f"{name}: max |diff| {err:.3g} vs HF float64 (scale {scale:.3g}, aux term "
                  f"{float((ref - without_aux[name]).abs().max()):.3g})")
    assert set().union(*(r["grads"] for r in results)) == set(want)  # every layer's router, on some stage


# TP = 2: expert-TP = 2 too, whose all-gather over gloo takes equal token counts (--pad-to-max-length)
TP2 = {"--tensor-model-parallel-size": 2, "--sequence-parallel": None, "--pad-to-max-length": None}
LAYOUTS = {  # name: (processes, run_distributed keywords, trainer flags)
    "tp1": (1, {}, {}),
    "tp2-sp": (2, {"tp": 2}, TP2),
    "tp2-sp-builtin": (2, {"tp": 2}, {**TP2, "--hd-pissa-ddp": "builtin"}),
    "ep2-dp2": (2, {"ep": 2}, {"--expert-model-parallel-size": 2}),
    "ep2-dp2-builtin": (2, {"ep": 2}, {"--expert-model-parallel-size": 2, "--hd-pissa-ddp": "builtin"}),
    "ep2-dp2-lora": (2, {"ep": 2}, {"--expert-model-parallel-size": 2, "--peft": "lora",
                                    "--lora-target-modules": "linear_qkv,linear_proj"}),
    "recompute": (1, {}, {"--recompute-granularity": "full", "--recompute-method": "uniform",
                          "--recompute-num-layers": 1}),
    "pp2": (2, {"pp": 2}, {"--pipeline-model-parallel-size": 2}),
    "virtual2": (1, {}, {"--hd-pissa-virtual-ranks": 2}),  # K = 2 slices in one process: the mean of both
}
FAST = ("tp2-sp",)


@pytest.mark.parametrize("layout", [pytest.param(k, marks=() if k in FAST else pytest.mark.slow) for k in LAYOUTS])
def test_router_gradient_matches_hf_float64(m, layout):
    """Summed over TP under sequence parallelism, averaged over the whole DP group at EP = 2 (a
    dense parameter), the aux loss's gradient included, under recompute and on every stage."""
    world, sizes, over = LAYOUTS[layout]
    _check_against_hf(m, run_distributed(_router_grads, world, args=(_argv(m, **over),), **sizes))


# ---- errors --------------------------------------------------------------------------------------
def test_router_flag_errors(m, tmp_path, smollm2_hf_dir, gsm8k_path, capsys):
    from megatron_hdpissa.training.arguments import parse_args
    from tests.helpers.hf_models import tiny_trainer_material
    from tests.helpers.trainer import expect_error

    with pytest.raises(SystemExit):
        parse_args(_argv(m, **{"--export-hf-adapter": tmp_path / "adapter"}))
    assert "--moe-router-trainable changes the routers" in capsys.readouterr().err
    dense = tiny_trainer_material(tmp_path, smollm2_hf_dir, gsm8k_path, seed=1, num_train=8)
    argv = _argv(m, **{"--pretrained-checkpoint": dense["base"], "--data-path": dense["train"],
                       "--moe-aux-loss-coeff": False})
    msg = run_distributed(expect_error, 1, args=(argv,))[0]
    assert msg == "ValueError: --moe-router-trainable: this llama model is dense (no experts, so no router to train)"


# ---- three steps at other layouts, resume, merged export ------------------------------------------
def _saved(m, run: str) -> dict[str, torch.Tensor]:
    return saved_tensors(m["root"] / run)


def _train(m, run: str, world: int, sizes: dict, **over) -> dict[str, torch.Tensor]:
    run_distributed(finetune_main, world, args=(_argv(m, run, **over),), **sizes)
    return _saved(m, run)


def _model_tensors(saved: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in saved.items() if not k.startswith(("optimizer.", "others_optimizer.", "rng"))
            and v.is_floating_point()}


def _compare_runs(what: str, got: dict, want: dict, base: dict) -> None:
    """Every router within 1e-6 of its largest update over the 3 steps (plus 4 fp32 ulps of the
    weight: the layouts sum in another order), every other weight within 3e-5 (at TP = 2 the
    experts are split over expert-TP = 2 too: 2.1e-5 seen there, tests/peft/test_hd_pissa_experts.py,
    from fp32 round-off of the forward amplified by AdamW), every adapter factor
    within 1e-4 of its largest entry (a factor is its own update, and AdamW's per-entry
    normalisation lifts the fp32 round-off of near-zero gradient entries: 3.4e-5 seen for a LoRA B
    at TP = 2); the routers moved."""
    assert set(got) == set(want)
    routers = [k for k in want if "mlp.router" in k]
    assert routers and all(float((want[k] - base[k]).abs().max()) > 1e-3 for k in routers), routers
    worst = {}
    for k, w in want.items():
        if k in base:
            update = float((w.double() - base[k].double()).abs().max())
            ulps = 4 * torch.finfo(torch.float32).eps * float(w.abs().max())
            bound = (1e-6 if k in routers else 3e-5) * update + ulps
        else:
            bound = 1e-4 * float(w.abs().max())
        worst[k] = float((got[k].double() - w.double()).abs().max()) / max(bound, 1e-30)
    bad = {k: v for k, v in worst.items() if v > 1}
    assert not bad, f"{what}: tensors beyond the bound (x bound): {bad}"
    print(f"{what}: worst {max(worst.values()):.2f} of the bound over {len(worst)} tensors, routers "
          f"{max(worst[k] for k in routers):.2f}")


def _base(m) -> dict[str, torch.Tensor]:
    from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info
    from megatron_hdpissa.checkpoint.safe_load import read_global_tensors

    return read_global_tensors(read_checkpoint_info(m["base"]).iter_dir)


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["hd-pissa", "lora"])
def test_three_steps_do_not_depend_on_the_layout(m, peft):
    """EP = 2 equals EP = 1 (2 processes, DP = 2), TP = 2 + SP (DP = 1) equals TP = 1 (1 process)."""
    over = {"--peft": peft} if peft == "hd-pissa" else {"--peft": peft, "--lora-target-modules": "linear_qkv,linear_proj"}
    base = _base(m)
    ep1 = _model_tensors(_train(m, f"{peft}_ep1", 2, {}, **over))
    ep2 = _model_tensors(_train(m, f"{peft}_ep2", 2, {"ep": 2}, **over, **{"--expert-model-parallel-size": 2}))
    _compare_runs(f"{peft} EP=2 vs EP=1", ep2, ep1, base)
    tp1 = _model_tensors(_train(m, f"{peft}_tp1", 1, {}, **over, **{"--pad-to-max-length": None}))
    tp2 = _model_tensors(_train(m, f"{peft}_tp2", 2, {"tp": 2}, **over, **TP2))
    _compare_runs(f"{peft} TP=2+SP vs TP=1", tp2, tp1, base)


@pytest.mark.slow
def test_resume_carries_the_trained_router(m):
    """Saved after 2 steps at EP = 2, resumed at EP = 1: the third step gives the uninterrupted
    EP = 1 run's weights, routers included (bound as above)."""
    ep2 = {"--expert-model-parallel-size": 2}
    _train(m, "resume_half", 2, {"ep": 2}, **ep2, **{"--exit-interval": ITERS - 1})
    shutil.copytree(m["root"] / "resume_half", m["root"] / "resume_ep1")
    resumed = _train(m, "resume_ep1", 2, {}, **{"--load": m["root"] / "resume_ep1"})
    ep1 = _train(m, "resume_ref_ep1", 2, {})
    _compare_runs("resume EP=2 -> EP=1", _model_tensors(resumed), _model_tensors(ep1), _base(m))


@pytest.mark.slow
def test_merged_export_writes_the_trained_router(m):
    """The merged HF export of a run at EP = 2 holds its trained routers exactly (`mlp.gate.weight`)."""
    from safetensors.torch import load_file

    export = m["root"] / "exported"
    saved = _train(m, "export_ep2", 2, {"ep": 2}, **{"--expert-model-parallel-size": 2, "--export-hf": export})
    hf = {}
    for f in sorted(export.glob("*.safetensors")):
        hf.update(load_file(f))
    routers = saved["decoder.layers.mlp.router.weight"]  # layers stacked
    assert not torch.equal(routers, _base(m)["decoder.layers.mlp.router.weight"])
    for i in range(routers.shape[0]):
        assert torch.equal(hf[f"model.layers.{i}.mlp.gate.weight"], routers[i]), i
