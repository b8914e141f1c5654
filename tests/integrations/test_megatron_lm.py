"""Megatron-LM plug-in without Megatron-LM: flag composition under both API styles (stand-ins
with Megatron-LM's signatures), and on real SmolLM2 weights with 2 data-parallel ranks: the
wrapped provider, megatron-core DDP, a simulated checkpoint load, the post-load decomposition and
one optimizer step against apply_hd_pissa + HDPiSSAOptimizer on the loaded model, and a resume."""
from __future__ import annotations

import argparse
import copy
import inspect
import types
from functools import partial

import pytest
import torch

from megatron_hdpissa.integrations import megatron_lm
from megatron_hdpissa.integrations.megatron_lm_model import hd_pissa_after_load, is_hd_pissa_model
from megatron_hdpissa.peft.hd_pissa.model import iter_adapters
from megatron_hdpissa.training.arguments import hd_pissa_config
from tests.helpers.distributed import run_distributed


# ---- stand-ins with Megatron-LM's signatures (parameter names as in its sources) ---------------
def _megatron_parser(extra_args_provider=None):
    """What Megatron-LM's parse_args does with a provider: its parser, then the provider's flags."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--adam-beta1", type=float, default=0.9)
    parser.add_argument("--adam-beta2", type=float, default=0.999)
    parser.add_argument("--adam-eps", type=float, default=1e-08)
    parser.add_argument("--clip-grad", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


# Up to 0.17: pretrain() takes the provider and parses.
def pretrain_017(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
                 process_non_loss_data_func=None, extra_args_provider=None, args_defaults={},
                 get_embedding_ranks=None, get_position_embedding_ranks=None, non_loss_data_func=None,
                 store=None, inprocess_call_wrapper=None, argv=()):
    return _megatron_parser(extra_args_provider).parse_args(list(argv))


# 0.18 on: parse_and_validate_args takes it; pretrain takes a config container.
def parse_and_validate_args_018(extra_args_provider=None, ignore_unknown_args=False, args_defaults={}, argv=()):
    return _megatron_parser(extra_args_provider).parse_args(list(argv))


def pretrain_018(cfg_container, train_valid_test_dataset_provider, model_provider, model_type,
                 forward_step_func, process_non_loss_data_func=None, get_embedding_ranks=None,
                 get_position_embedding_ranks=None, non_loss_data_func=None, store=None,
                 inprocess_call_wrapper=None):
    raise AssertionError("not called")


def pretrain_019(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func,
                 model_provider=None, process_non_loss_data_func=None, get_embedding_ranks=None,
                 get_position_embedding_ranks=None, non_loss_data_func=None, store=None,
                 inprocess_call_wrapper=None, p2p_communicator=None, pg_collection=None,
                 skip_model_parallel_init=False):
    raise AssertionError("not called")


def _users_provider(parser):
    parser.add_argument("--my-flag", type=int, default=0)
    return parser


ARGV = ["--my-flag", "3", "--hd-pissa-rank", "4", "--hd-pissa-alpha", "2", "--lr", "1e-3"]


def test_flags_compose_with_an_existing_provider_in_both_api_styles():
    provider = megatron_lm.compose_args_providers(None, _users_provider, megatron_lm.extra_args_provider)

    assert megatron_lm.args_provider_api(pretrain_017, None) == "pretrain"
    old = pretrain_017(None, None, None, None, extra_args_provider=provider, argv=ARGV)
    for api in (pretrain_018, pretrain_019):
        assert megatron_lm.args_provider_api(api, parse_and_validate_args_018) == "parse_and_validate_args"
    new = parse_and_validate_args_018(extra_args_provider=provider, argv=ARGV)

    for args in (old, new):
        assert (args.my_flag, args.hd_pissa_rank, args.hd_pissa_alpha, args.peft) == (3, 4, 2.0, "hd-pissa")
        cfg = hd_pissa_config(args)
        assert (cfg.rank, cfg.scale, cfg.seed) == (4, 0.5, 1234)
    with pytest.raises(RuntimeError, match="extra_args_provider"):
        megatron_lm.args_provider_api(pretrain_018, lambda ignore_unknown_args=False: None)
    try:  # megatron-core wheels from 0.17 on ship `megatron.training`; 0.16.1's does not
        from megatron.training import training
    except ImportError:
        with pytest.raises(ImportError):
            megatron_lm.args_provider_api()
    else:  # the real Megatron-LM: 0.18 on takes the flags in parse_and_validate_args
        expected = "pretrain" if "extra_args_provider" in inspect.signature(training.pretrain).parameters \
            else "parse_and_validate_args"
        assert megatron_lm.args_provider_api() == expected


def test_optimizer_hook_falls_back_for_other_models():
    calls = []

    def get_megatron_optimizer(config, model, config_overrides=None, use_gloo_process_groups=True):
        calls.append((config, config_overrides))
        return "megatron's optimizer"

    training = types.SimpleNamespace(get_megatron_optimizer=get_megatron_optimizer)
    megatron_lm.use_hd_pissa_optimizer(training)
    installed = training.get_megatron_optimizer
    megatron_lm.use_hd_pissa_optimizer(training)  # idempotent
    assert training.get_megatron_optimizer is installed
    assert installed("cfg", [torch.nn.Linear(2, 2)], config_overrides={"x": 1}) == "megatron's optimizer"
    assert calls == [("cfg", {"x": 1})]


def test_wrapped_provider_keeps_signature_and_only_touches_hd_pissa_runs():
    def model_provider(model_builder, pre_process=True, post_process=True, vp_stage=None, config=None,
                       pg_collection=None):
        return torch.nn.Linear(2, 2)

    inner = partial(model_provider, None)
    wrapped = megatron_lm.wrap_model_provider(inner, argparse.Namespace(peft="full"))
    assert inspect.signature(wrapped) == inspect.signature(inner)  # for code that inspects providers
    model = wrapped(pre_process=True, post_process=True, vp_stage=None)
    assert isinstance(model, torch.nn.Linear) and not is_hd_pissa_model(model)
    with pytest.raises(NotImplementedError, match="megatron_hdpissa.finetune"):
        megatron_lm.wrap_model_provider(inner, argparse.Namespace(peft="lora"))()
    te = argparse.Namespace(peft="hd-pissa", transformer_impl="transformer_engine")
    with pytest.raises(ValueError, match="--transformer-impl local"):
        megatron_lm.wrap_model_provider(inner, te)()


# ---- real model, 2 data-parallel ranks -------------------------------------------------------
@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, smollm2_hf_dir):
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    return convert_hf_to_megatron(smollm2_hf_dir, tmp_path_factory.mktemp("mlm") / "base", tp_size=1, progress=False)


def _batch(dp_rank: int, vocab: int):
    g = torch.Generator().manual_seed(100 + dp_rank)
    tokens = torch.randint(0, vocab, (2, 24), generator=g)
    return {"tokens": tokens, "position_ids": torch.arange(24).expand(2, 24),
            "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(2, 24)}


def _loss(model, batch):
    from megatron_hdpissa.training.step import micro_batch_loss

    loss_sum, count = micro_batch_loss(model, batch, torch.device("cpu"))
    return loss_sum / count


def _targeted_weights(model):
    return {name: module.weight.detach().clone() for name, module, _ in iter_adapters(model)}


def _factors(model):
    out = {}
    for name, _, ad in iter_adapters(model):
        for part in ad.a.keys():
            a_all, b_all = ad.all_factors(part)
            out[f"{name}:{part}"] = [t.detach().clone() for t in (ad.a[part], ad.b[part], a_all, b_all)]
    return out


def _megatron_lm_flow(base_dir: str):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_hdpissa import apply_hd_pissa
    from megatron_hdpissa.convert.load import load_megatron_checkpoint, load_megatron_state_dict
    from megatron_hdpissa.distributed.groups import ParallelGroups
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import build_gpt_model
    from megatron_hdpissa.optimizer.hd_pissa import HDPiSSAOptimizer

    groups = ParallelGroups.from_megatron()
    args = _megatron_parser(megatron_lm.extra_args_provider).parse_args(
        ["--lr", "1e-3", "--weight-decay", "0", "--hd-pissa-rank", "4", "--seed", "7"])
    config = ModelConfig.load(base_dir)
    out = {}

    # Megatron-LM's order: provider (random weights) -> DDP -> optimizer -> load_checkpoint -> forward.
    provider = megatron_lm.wrap_model_provider(partial(build_gpt_model, config, seed=99), args)
    model = provider(pre_process=True, post_process=True)
    base_sd = load_megatron_state_dict(base_dir, 0, 1)
    out["state_dict_is_base"] = set(model.state_dict()) == set(base_sd)
    out["adapters"] = sum(1 for _ in iter_adapters(model))
    out["trainable_before_optimizer"] = [n for n, p in model.named_parameters() if p.requires_grad]
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    out["ddp_params"] = len(ddp.params_with_grad) if hasattr(ddp, "params_with_grad") else None
    # --bf16 and --use-distributed-optimizer are supported (test_megatron_lm_bf16); --fp16 is refused
    with pytest.raises(ValueError, match="--fp16"):
        megatron_lm.get_hd_pissa_optimizer([ddp], argparse.Namespace(**{**vars(args), "fp16": True}))
    ddp.train()
    with pytest.raises(RuntimeError, match="use_hd_pissa_optimizer"):  # optimizer hook forgotten
        ddp(input_ids=torch.zeros(1, 4, dtype=torch.long), position_ids=torch.arange(4)[None],
            attention_mask=None)
    opt = megatron_lm.get_hd_pissa_optimizer([ddp], args)
    load_megatron_checkpoint(model, base_dir)  # strict: the adapter keys must not be missing

    # Reference: the loaded model, apply_hd_pissa, HDPiSSAOptimizer (no Megatron-LM pieces).
    ref = build_gpt_model(config, seed=99)
    load_megatron_checkpoint(ref, base_dir)
    apply_hd_pissa(ref, hd_pissa_config(args), groups, progress=False)
    ref_opt = HDPiSSAOptimizer(ref, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, groups=groups,
                               clip_grad=args.clip_grad)

    batch = _batch(groups.dp_rank, config.vocab_size)
    opt.zero_grad()
    _loss(ddp, batch).backward()  # the first forward decomposes the loaded weights
    ddp.finish_grad_sync()  # what Megatron's finalize_model_grads runs
    out["decomposed_again"] = hd_pissa_after_load([ddp])
    ours, theirs = _factors(model), _factors(ref)
    out["factors_equal"] = ours.keys() == theirs.keys() and all(
        all(torch.equal(x, y) for x, y in zip(ours[k], theirs[k])) for k in ours)
    out["factors_nonzero"] = all(bool(v[0].abs().sum() > 0) for v in ours.values())
    _loss(ref, batch).backward()
    ref_grads = [p.grad.clone() for p in ref_opt.param_groups[0]["params"]]
    grads = [p.grad.clone() for p in opt.param_groups[0]["params"]]
    out["grads_equal"] = all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    out["grad_sample"] = grads[0].flatten()[:8].clone()
    out["no_main_grad"] = not any(hasattr(p, "main_grad") for p in opt.param_groups[0]["params"])

    ok, norm, zeros = opt.step()
    ref_opt.step()
    out["step"] = (ok, zeros)
    # the global norm (all DP ranks' factor gradients), which --clip-grad (1.0 here) clipped
    own = float(torch.cat([g.double().flatten() for g in ref_grads]).norm())
    all_sq = torch.tensor([own ** 2], dtype=torch.float64)
    torch.distributed.all_reduce(all_sq, group=groups.dp_group)
    out["norm_close"] = abs(norm - float(all_sq.sqrt())) < 1e-6 * norm
    out["clipped"] = norm > args.clip_grad > 0 and ref_opt.last_grad_norm == pytest.approx(norm)
    w, w_ref = _targeted_weights(model), _targeted_weights(ref)
    out["weights_equal"] = all(torch.equal(w[k], w_ref[k]) for k in w)
    out["weights_moved"] = all(not torch.equal(w[k], base_sd[k + ".weight"]) for k in w)
    out["weight_digest"] = float(sum(v.double().sum() for v in w.values()))

    # Checkpoints: legacy format (DP rank 0's state only) refuses to resume; the per-rank
    # (torch_dist) state resumes exactly, without decomposing again.
    legacy = opt.state_dict()
    out["legacy_complete"] = legacy["hd_pissa"]["complete"]
    sharded = opt.sharded_state_dict({})["hd_pissa"]
    out["sharded"] = (sharded.key, sharded.global_shape, sharded.global_offset, sharded.replica_id)
    resumed = provider(pre_process=True, post_process=True)
    ddp2 = DistributedDataParallel(resumed.config, DistributedDataParallelConfig(), resumed)
    opt2 = megatron_lm.get_hd_pissa_optimizer([ddp2], args)
    resumed.load_state_dict(model.state_dict())  # the updated W, as Megatron's checkpoint holds it
    with pytest.raises(RuntimeError, match="--no-load-optim"):
        opt2.load_state_dict(legacy)
    opt2.load_state_dict(copy.deepcopy({"hd_pissa": sharded.data}))  # as read back from disk
    batch2 = _batch(groups.dp_rank + 10, config.vocab_size)
    for m, o in ((ddp2, opt2), (model, opt)):
        o.zero_grad()
        _loss(m, batch2).backward()
        o.step()
    out["resume_decomposed"] = hd_pissa_after_load(resumed)
    w1, w2 = _targeted_weights(model), _targeted_weights(resumed)
    out["resume_equal"] = all(torch.equal(w1[k], w2[k]) for k in w1)
    return out


def test_megatron_lm_flow_matches_apply_hd_pissa_and_optimizer(base_checkpoint):
    r0, r1 = run_distributed(_megatron_lm_flow, 2, 1, args=(str(base_checkpoint),))
    for r in (r0, r1):
        assert r["state_dict_is_base"] and r["adapters"] == 8
        assert r["trainable_before_optimizer"] == []  # frozen base, factors hidden from DDP
        assert r["ddp_params"] in (0, None)
        assert r["decomposed_again"] is False
        assert r["factors_equal"] and r["factors_nonzero"]
        assert r["grads_equal"] and r["no_main_grad"]
        assert r["step"] == (True, None) and r["norm_close"] and r["clipped"]
        assert r["weights_equal"] and r["weights_moved"]
        assert r["legacy_complete"] is False
        assert r["resume_decomposed"] is False and r["resume_equal"]
    # each rank kept its own gradients (no data-parallel reduction), yet the weights agree
    assert not torch.equal(r0["grad_sample"], r1["grad_sample"])
    assert r0["weight_digest"] == r1["weight_digest"]
    assert r0["sharded"] == ("optimizer.hd_pissa_state", (1, 1, 2), (0, 0, 0), 0)
    assert r1["sharded"] == ("optimizer.hd_pissa_state", (1, 1, 2), (0, 0, 1), 0)


# ---- pipeline parallelism -------------------------------------------------------------------------
def _pp_flow(base_dir: str, steps: int = 2):
    """Megatron-LM's order at any PP: provider per stage -> DDP -> optimizer hook -> load ->
    steps through megatron-core's schedule with DDP's finalize_model_grads. Returns this stage's
    weights (the base state dict: adapters are not part of it)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_hdpissa.convert.load import load_megatron_checkpoint
    from megatron_hdpissa.distributed.groups import ParallelGroups
    from megatron_hdpissa.models.config import ModelConfig
    from megatron_hdpissa.models.gpt import build_gpt_model
    from megatron_hdpissa.training.step import make_forward_step

    groups = ParallelGroups.from_megatron()
    args = _megatron_parser(megatron_lm.extra_args_provider).parse_args(
        ["--lr", "1e-3", "--weight-decay", "0", "--hd-pissa-rank", "4", "--seed", "7"])
    config = ModelConfig.load(base_dir)
    pp = {"pipeline_model_parallel_size": groups.pp_size, "pipeline_dtype": torch.float32} if groups.pp_size > 1 else {}
    provider = megatron_lm.wrap_model_provider(partial(build_gpt_model, config, seed=99, **pp), args)
    model = provider(pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    opt = megatron_lm.get_hd_pissa_optimizer([ddp], args)
    load_megatron_checkpoint(model, base_dir)  # this stage's layers
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    norms = []
    for step in range(steps):
        opt.zero_grad()
        batches = [_batch(10 * step + i, config.vocab_size) for i in range(2)]
        get_forward_backward_func()(forward_step_func=make_forward_step(torch.device("cpu")),
                                    data_iterator=iter(batches), model=ddp, num_microbatches=2, seq_length=24,
                                    micro_batch_size=2)
        ok, norm, _ = opt.step()
        norms.append((ok, norm))
    return {"weights": {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
            "norms": norms}


def test_megatron_lm_flow_at_pp2_equals_pp1(base_checkpoint):
    from megatron_hdpissa.convert.load import load_megatron_state_dict
    from megatron_hdpissa.models.pipeline_stages import merge_pipeline_stages
    from megatron_hdpissa.models.config import ModelConfig

    (one,) = run_distributed(_pp_flow, 1, 1, args=(str(base_checkpoint),))
    stages = run_distributed(_pp_flow, 2, 1, pp=2, args=(str(base_checkpoint),))
    # one global gradient norm over both stages, the same as the whole model's
    for r in stages:
        assert [ok for ok, _ in r["norms"]] == [True, True]
        assert [n for _, n in r["norms"]] == pytest.approx([n for _, n in one["norms"]], rel=1e-5)
    merged = merge_pipeline_stages([r["weights"] for r in stages], ModelConfig.load(base_checkpoint))
    base = load_megatron_state_dict(base_checkpoint, 0, 1)
    assert set(merged) == set(one["weights"])
    moved = 0
    for k, w in one["weights"].items():
        update = (w.double() - base[k].double()).norm()
        assert (merged[k].double() - w.double()).norm() <= 1e-5 * max(update, 1e-12) + 1e-7, k
        moved += bool(update > 0)
    assert moved == 8  # every targeted layer (2 layers x qkv, proj, fc1, fc2)
