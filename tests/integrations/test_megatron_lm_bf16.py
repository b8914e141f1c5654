"""Megatron-LM plug-in with --bf16, on real SmolLM2 weights (2 layers) with 2 data-parallel gloo
ranks and megatron-core's DistributedDataParallel, in Megatron-LM's order: provider (bf16 GPTModel)
-> Float16Module -> DDP (--use-distributed-optimizer) -> optimizer hook -> checkpoint load ->
reload_model_params -> steps.

The targeted weights' updates accumulate in HD-PiSSA's DP-sharded fp32 masters. After STEPS steps
the masters' W_T - W_0 must equal that of the fp32 run (the same flow without --bf16, from the
same bf16-rounded weights) within

    TOL = STEPS * 2**-8                     (= 0.0156 for 4 steps)

relative (Frobenius norm). The model: bf16 keeps 8 significant bits; with fp32 masters the only
difference left is that each step's forward and backward run in bf16, which perturbs that step's
gradient, and so its contribution to W_T - W_0, by about one bf16 resolution 2**-8 of the total;
the STEPS contributions add at most linearly. Adam runs in its linear regime (ADAM_EPS well above
the gradients), where an update inherits its gradient's relative error: with a tiny eps, Adam's
normalisation turns gradient components below bf16's resolution into full +-lr steps of random
sign, which no resolution-based tolerance bounds (measured: 0.109 after 1 step, 0.040 after 4 at
eps 1e-8; 0.0118 and 0.0083 at eps 1e-2).

The learning rate keeps almost every update below half a bf16 ulp of its weight: rounded into bf16
weights (masters off, `--hd-pissa-master-weights none`) they vanish, and the same comparison gives
a relative error of about 1, far outside TOL (checked below)."""
from __future__ import annotations

import argparse
from functools import partial

import pytest
import torch

from megatron_hdpissa.integrations import megatron_lm
from tests.helpers.distributed import run_distributed

STEPS, LR, ADAM_EPS = 4, 1e-5, 1e-2
TOL = STEPS * 2.0 ** -8


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, smollm2_hf_dir):
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    return convert_hf_to_megatron(smollm2_hf_dir, tmp_path_factory.mktemp("mlm_bf16") / "base", tp_size=1,
                                  progress=False)


def _args(bf16: bool, master: str):
    """Megatron-LM's optimizer flags (its names and defaults) with the plug-in's flags."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    for flag, default in (("--lr", None), ("--weight-decay", 0.01), ("--adam-beta1", 0.9), ("--adam-beta2", 0.999),
                          ("--adam-eps", 1e-8), ("--clip-grad", 1.0)):
        parser.add_argument(flag, type=float, default=default)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    parser = megatron_lm.extra_args_provider(parser)
    argv = ["--lr", str(LR), "--adam-eps", str(ADAM_EPS), "--weight-decay", "0", "--hd-pissa-rank", "4", "--seed", "7", "--clip-grad", "0",
            "--hd-pissa-master-weights", master, "--hd-pissa-check-interval", "1"]
    return parser.parse_args(argv + (["--bf16", "--use-distributed-optimizer"] if bf16 else []))


def _batch(dp_rank: int, step: int, vocab: int):
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    tokens = torch.randint(0, vocab, (2, 24), generator=g)
    return {"tokens": tokens, "position_ids": torch.arange(24).expand(2, 24),
            "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(2, 24)}


def _run(base_dir: str, bf16: bool, master: str):
    import types

    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from megatron_hdpissa.convert.load import load_megatron_checkpoint
    from megatron_hdpissa.distributed.groups import ParallelGroups
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import build_gpt_model
    from megatron_hdpissa.peft.hd_pissa.model import iter_adapters
    from megatron_hdpissa.training.step import micro_batch_loss

    groups = ParallelGroups.from_megatron()
    args = _args(bf16, master)
    config = ModelConfig.load(base_dir)
    dtype = torch.bfloat16 if bf16 else torch.float32
    provider = megatron_lm.wrap_model_provider(partial(build_gpt_model, config, dtype=dtype, seed=99), args)
    model = provider(pre_process=True, post_process=True)
    chunk = Float16Module(model.config, model) if bf16 else model  # Megatron-LM's get_model
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=args.use_distributed_optimizer), chunk)
    training = types.SimpleNamespace(get_megatron_optimizer=get_megatron_optimizer)
    megatron_lm.use_hd_pissa_optimizer(training)
    opt_config = OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=args.weight_decay, bf16=args.bf16,
                                 params_dtype=dtype, clip_grad=args.clip_grad, adam_beta1=args.adam_beta1,
                                 adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                                 use_distributed_optimizer=args.use_distributed_optimizer)
    opt = training.get_megatron_optimizer(opt_config, [ddp])
    load_megatron_checkpoint(model, base_dir)  # Megatron-LM's load_checkpoint (the bf16 weights round)
    if bf16:
        opt.reload_model_params()  # what load_checkpoint calls with --bf16 when no optimizer state is loaded
    else:  # the fp32 reference starts from the same (bf16-rounded) weights, so it decomposes the same matrices
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    w0 = {n: m.weight.detach().float().clone() for n, m, _ in iter_adapters(model)}
    out = {"mode": opt.masters_mode,
           "factor_dtypes": sorted({str(p.dtype) for _, _, ad in iter_adapters(model) for p in ad.parameters()}),
           "weight_dtypes": sorted({str(m.weight.dtype) for _, m, _ in iter_adapters(model)})}
    for step in range(STEPS):
        ddp.zero_grad_buffer()  # what Megatron-LM's train_step does before optimizer.zero_grad()
        opt.zero_grad()
        loss_sum, count = micro_batch_loss(ddp, _batch(groups.dp_rank, step, config.vocab_size), torch.device("cpu"))
        (loss_sum / count).backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        assert ok
    opt.optimizer.finish_param_gather()
    full = {n: m.weight.detach().float().clone() for n, m, _ in iter_adapters(model)}
    if opt.masters_mode == "sharded-fp32":  # the full-precision value: every rank's fp32 row block
        by_weight = {id(m.weight): m for m in opt.optimizer.masters}
        for n, module, _ in iter_adapters(model):
            m = by_weight[id(module.weight)]
            out.setdefault("rounded", True)
            out["rounded"] &= torch.equal(module.weight[m.lo:m.hi], m.data.to(module.weight.dtype))
            blk = torch.zeros(m.block, module.weight.shape[1])
            blk[: m.hi - m.lo] = m.data
            parts = [torch.empty_like(blk) for _ in range(groups.dp_size)]
            dist.all_gather(parts, blk, group=groups.dp_group)
            full[n] = torch.cat(parts)[: module.weight.shape[0]]
    out["delta"] = {n: full[n] - w0[n] for n in w0}
    out["w0"] = w0
    return out


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in b)
    den = sum(float(b[k].double().norm() ** 2) for k in b)
    return (num / den) ** 0.5


def test_bf16_sharded_masters_equal_the_fp32_reference(base_checkpoint):
    fp32 = run_distributed(_run, 2, 1, args=(str(base_checkpoint), False, "auto"))
    bf16 = run_distributed(_run, 2, 1, args=(str(base_checkpoint), True, "auto"))
    naive = run_distributed(_run, 2, 1, args=(str(base_checkpoint), True, "none"))
    for r in fp32:
        assert r["mode"] == "fp32-base" and r["weight_dtypes"] == ["torch.float32"]
    for r in bf16:
        # --bf16: bf16 weights, fp32 factors (Float16Module's cast undone), sharded fp32 masters
        assert r["mode"] == "sharded-fp32" and r["weight_dtypes"] == ["torch.bfloat16"]
        assert r["factor_dtypes"] == ["torch.float32"] and r["rounded"]
    ref = fp32[0]["delta"]
    # the updates are far below half a bf16 ulp of the weights: bf16 alone cannot hold them
    ulp = {k: torch.finfo(torch.bfloat16).eps * fp32[0]["w0"][k].abs() for k in ref}
    below = sum(int((ref[k].abs() < ulp[k] / 2).sum()) for k in ref) / sum(v.numel() for v in ref.values())
    assert below > 0.9, below
    for r in bf16:
        err = _rel(r["delta"], ref)
        assert err < TOL, f"bf16 + sharded fp32 masters: relative error {err:.4f} of W_T - W_0, tolerance {TOL:.4f}"
    assert _rel(naive[0]["delta"], ref) > 0.9  # masters off: the updates round away in bf16
    assert _rel(bf16[0]["delta"], bf16[1]["delta"]) == 0.0  # every DP rank holds the same weights


# ---- other trainable parameters: Megatron-LM's own optimizer beside HD-PiSSA's -----------------
CLIP = 0.05


def _others_run(base_dir: str, plug_in: bool):
    """--hd-pissa-trainable-modules final_layernorm with clipping, fp32: through the plug-in (the
    hook builds megatron-core's get_megatron_optimizer over the norm; one global norm clips both),
    or through the library's own route (wrap_ddp + HDPiSSAOptimizer with megatron-core's optimizer)."""
    import types

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_hdpissa import HDPiSSAOptimizer, apply_hd_pissa
    from megatron_hdpissa.convert.load import load_megatron_checkpoint
    from megatron_hdpissa.distributed.ddp import wrap_ddp
    from megatron_hdpissa.distributed.groups import ParallelGroups
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import build_gpt_model
    from megatron_hdpissa.training.arguments import hd_pissa_config
    from megatron_hdpissa.training.step import micro_batch_loss

    groups = ParallelGroups.from_megatron()
    args = _args(False, "auto")
    args.clip_grad, args.lr = CLIP, 1e-3
    args.hd_pissa_trainable_modules = "final_layernorm"
    config = ModelConfig.load(base_dir)
    if plug_in:
        provider = megatron_lm.wrap_model_provider(partial(build_gpt_model, config, seed=99), args)
        model = provider(pre_process=True, post_process=True)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        in_ddp = sorted(n for n, p in model.named_parameters() if hasattr(p, "main_grad"))
        training = types.SimpleNamespace(get_megatron_optimizer=get_megatron_optimizer)
        megatron_lm.use_hd_pissa_optimizer(training)
        opt = training.get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=args.lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps), [ddp],
            config_overrides=None, use_gloo_process_groups=False)  # setup_model_and_optimizer's keywords (gloo: no extra groups)
        load_megatron_checkpoint(model, base_dir)
        others = type(opt.others).__name__
    else:
        model = build_gpt_model(config, seed=99)
        load_megatron_checkpoint(model, base_dir)
        apply_hd_pissa(model, hd_pissa_config(args), groups, progress=False)
        ddp = wrap_ddp(model)
        opt = HDPiSSAOptimizer(ddp, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                               weight_decay=args.weight_decay, clip_grad=args.clip_grad, others_optimizer="megatron")
        in_ddp, others = None, type(opt.others_optimizer).__name__
    norms = []
    for step in range(3):
        ddp.zero_grad_buffer()  # Megatron-LM's train_step zeroes DDP's buffers itself
        opt.zero_grad()
        loss_sum, count = micro_batch_loss(ddp, _batch(groups.dp_rank, step, config.vocab_size), torch.device("cpu"))
        (loss_sum / count).backward()
        ddp.finish_grad_sync()
        if plug_in:
            ok, norm, _ = opt.step()
            assert ok
        else:
            opt.step()
            norm = opt.last_grad_norm
        norms.append(norm)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor) and ("final_layernorm" in k or k.endswith("linear_qkv.weight"))}
    return {"norms": norms, "weights": weights, "in_ddp": in_ddp, "others": others}


def test_other_trainable_parameters_use_megatrons_optimizer_under_one_clip(base_checkpoint):
    from megatron_hdpissa.convert.load import load_megatron_state_dict

    base = load_megatron_state_dict(base_checkpoint, 0, 1)
    ours = run_distributed(_others_run, 2, 1, args=(str(base_checkpoint), True))
    ref = run_distributed(_others_run, 2, 1, args=(str(base_checkpoint), False))
    assert all(n > CLIP for n in ref[0]["norms"]), "clipping must bind for the comparison to mean anything"
    for r in ours:
        assert r["in_ddp"] == ["decoder.final_layernorm.weight"]  # in Megatron's DDP; the factors are not
        assert r["others"] == ref[0]["others"]  # megatron-core's optimizer steps the norm in both
        assert r["norms"] == pytest.approx(ref[0]["norms"], rel=1e-5)
        for k, w in ref[0]["weights"].items():  # W_T - W_0 to fp32 round-off, the norm's and the targets'
            update = w.double() - base[k].double()
            assert update.norm() > 0, k
            assert (r["weights"][k].double() - w.double()).norm() <= 1e-5 * update.norm(), k
    assert torch.equal(ours[0]["weights"]["decoder.final_layernorm.weight"],
                       ours[1]["weights"]["decoder.final_layernorm.weight"])
