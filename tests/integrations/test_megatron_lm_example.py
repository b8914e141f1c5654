"""examples/megatron_lm/pretrain_gpt_hdpissa.py without Megatron-LM (megatron-core 0.16.1 has no
`megatron.training`): `main()` against stand-ins with Megatron-LM's signatures (up to 0.17:
`pretrain` parses; 0.19: `parse_and_validate_args` parses, `pretrain` takes the container and the
provider by keyword), and on one gloo rank the script's own model provider, wrapped by the
plug-in, through the optimizer hook and the script's forward step and loss function."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from megatron_hdpissa.integrations import megatron_lm
from tests.helpers.distributed import run_distributed

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "megatron_lm" / "pretrain_gpt_hdpissa.py"
ARGV = ["--lr", "1e-3", "--hd-pissa-rank", "2", "--transformer-impl", "local"]


def _example():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_hdpissa", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parser(extra_args_provider):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--transformer-impl", default="transformer_engine")
    return extra_args_provider(parser)


def _stand_ins(new_api: bool, calls: list):
    """Megatron-LM's `training`, `arguments` and `argument_utils` modules, recording the calls."""
    def get_megatron_optimizer(config, model_chunks, config_overrides=None, use_gloo_process_groups=True,
                               pg_collection=None, dump_param_to_param_group_map=None):
        return "megatron's optimizer"

    if new_api:  # 0.19's signatures
        def pretrain(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func,
                     model_provider=None, process_non_loss_data_func=None, get_embedding_ranks=None,
                     get_position_embedding_ranks=None, non_loss_data_func=None, store=None,
                     inprocess_call_wrapper=None, p2p_communicator=None, pg_collection=None,
                     skip_model_parallel_init=False):
            calls.append(("pretrain", cfg_container, train_valid_test_dataset_provider, model_type,
                          forward_step_func, model_provider))

        def parse_and_validate_args(extra_args_provider=None, ignore_unknown_args=False, args_defaults={}):
            args = _parser(extra_args_provider).parse_args(ARGV)
            calls.append(("parse", args, args_defaults))
            return args

        def pretrain_cfg_container_from_args(args, model_cfg=None):
            calls.append(("container", args, model_cfg))
            return "container"

        arguments = types.SimpleNamespace(parse_and_validate_args=parse_and_validate_args)
        argument_utils = types.SimpleNamespace(pretrain_cfg_container_from_args=pretrain_cfg_container_from_args)
    else:  # up to 0.17
        def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
                     process_non_loss_data_func=None, extra_args_provider=None, args_defaults={},
                     get_embedding_ranks=None, get_position_embedding_ranks=None, non_loss_data_func=None,
                     store=None, inprocess_call_wrapper=None):
            args = _parser(extra_args_provider).parse_args(ARGV)
            calls.append(("pretrain", args, train_valid_test_dataset_provider, model_type, forward_step_func,
                          model_provider))

        arguments, argument_utils = types.SimpleNamespace(), None
    training = types.SimpleNamespace(pretrain=pretrain, get_megatron_optimizer=get_megatron_optimizer)
    return training, arguments, argument_utils


@pytest.mark.parametrize("new_api", [False, True])
def test_main_takes_the_route_of_the_installed_megatron_lm(new_api):
    example = _example()
    calls = []
    training, arguments, argument_utils = _stand_ins(new_api, calls)
    model_type = types.SimpleNamespace(encoder_or_decoder="encoder_or_decoder")
    example.main(training, arguments, argument_utils, model_type)
    # the optimizer hook is installed, and falls back to Megatron's optimizer for other models
    assert training.get_megatron_optimizer._hd_pissa_original is not None
    assert training.get_megatron_optimizer("cfg", [torch.nn.Linear(2, 2)]) == "megatron's optimizer"
    if new_api:
        (_, args, defaults), (_, container_args, model_cfg), pretrain = calls
        assert defaults == {"tokenizer_type": "GPT2BPETokenizer"}
        assert container_args is args and model_cfg is None  # the provider builds the model
        assert pretrain[1] == "container"
        _, _, datasets, model_type_used, forward_step, provider = pretrain
    else:
        (_, args, datasets, model_type_used, forward_step, provider), = calls
    assert (args.hd_pissa_rank, args.peft, args.transformer_impl) == (2, "hd-pissa", "local")
    assert datasets is example.train_valid_test_datasets_provider and datasets.is_distributed
    assert forward_step is example.forward_step and model_type_used == "encoder_or_decoder"
    assert provider.__wrapped__ is example.model_provider  # wrapped by the plug-in


def _provider_flow(hf_dir: str):
    """The script's provider, forward step and loss function on a small GPT with the plug-in,
    megatron.training replaced by stand-ins for `get_args`, `get_timers`, `print_rank_0` and
    `core_transformer_config_from_args`."""
    from megatron_hdpissa.models.compat import ensure_cpu_compat
    from megatron_hdpissa.models.config import as_model_config
    from megatron_hdpissa.models.gpt import transformer_config
    from megatron_hdpissa.peft.hd_pissa.model import iter_adapters

    ensure_cpu_compat()
    torch.manual_seed(0)
    from megatron.core import tensor_parallel
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    cfg = as_model_config(hf_dir)
    parser = _parser(megatron_lm.extra_args_provider)
    for flag, default in (("--weight-decay", 0.0), ("--adam-beta1", 0.9), ("--adam-beta2", 0.999),
                          ("--adam-eps", 1e-8), ("--clip-grad", 1.0)):
        parser.add_argument(flag, type=float, default=default)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(ARGV)
    args.__dict__.update(num_experts=None, moe_grouped_gemm=False, qk_layernorm=False, normalization="RMSNorm",
                         padded_vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
                         fp16_lm_cross_entropy=False, untie_embeddings_and_output_weights=True,
                         position_embedding_type="rope", rotary_percent=1.0, rotary_base=10000)

    class Timer:
        def start(self, barrier=False):
            return None

        def stop(self, barrier=False):
            return None

    stub = types.ModuleType("megatron.training")
    stub.get_args, stub.print_rank_0 = (lambda: args), (lambda *a: None)
    stub.get_timers = lambda: (lambda name, log_level=0: Timer())
    stub_args = types.ModuleType("megatron.training.arguments")
    stub_args.core_transformer_config_from_args = lambda a: transformer_config(cfg)
    sys.modules["megatron.training"], sys.modules["megatron.training.arguments"] = stub, stub_args
    example = _example()

    provider = megatron_lm.wrap_model_provider(example.model_provider)
    model = provider(pre_process=True, post_process=True, config=None, pg_collection=None)  # 0.19's call
    out = {"adapters": sorted(n for n, _, _ in iter_adapters(model)),
           "trainable_before_hook": [n for n, p in model.named_parameters() if p.requires_grad]}
    opt = megatron_lm.get_hd_pissa_optimizer([model], args)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "position_ids": torch.arange(12).expand(2, 12),
             "loss_mask": torch.ones(2, 12)}
    model.train()
    output, loss_fn = example.forward_step(iter([batch]), model)
    loss, num_tokens, report = loss_fn(output)
    (loss / num_tokens).backward()
    out["loss"] = (float(loss), int(num_tokens), report["lm loss"].tolist())
    # the same loss from the per-token output, computed here
    out["ref_loss"] = float(output.float().sum())
    w0 = {n: m.weight.detach().clone() for n, m, _ in iter_adapters(model)}
    ok, norm, _ = opt.step()
    out["step"] = (ok, norm is not None and norm > 0)
    out["moved"] = all(not torch.equal(m.weight, w0[n]) for n, m, _ in iter_adapters(model))
    return out


def test_example_provider_forward_step_and_loss_with_the_plug_in(tiny_llama_hf_dir):
    (r,) = run_distributed(_provider_flow, 1, 1, args=(str(tiny_llama_hf_dir),))
    layers = [f"decoder.layers.{i}.{m}" for i in range(2) for m in ("mlp.linear_fc1", "mlp.linear_fc2",
                                                                      "self_attention.linear_proj",
                                                                      "self_attention.linear_qkv")]
    assert r["adapters"] == sorted(layers)
    assert r["trainable_before_hook"] == []  # the base is frozen, the factors hidden until the hook
    loss, count, report = r["loss"]
    assert count == 24 and report == [pytest.approx(loss), 24.0]
    assert loss == pytest.approx(r["ref_loss"], rel=1e-6)  # masked sum of the per-token losses
    assert r["step"] == (True, True) and r["moved"]
