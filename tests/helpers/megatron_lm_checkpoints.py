"""Checkpoints laid out the way Megatron-LM's `save_checkpoint` lays them out, from a tiny random
megatron-core GPT (run inside an initialised megatron-core job): `args` as an argparse.Namespace
(with the enums, signal and dtype Megatron-LM puts there), `checkpoint_version` 3.0, the model
under "model" (torch_dist: `sharded_state_dict()` through megatron-core's `dist_checkpointing.save`;
legacy: `state_dict_for_save_checkpoint()` per `mp_rank_TT[_PPP]` with TransformerEngine's fused
norm names and `_extra_state` tensors, next to the NumPy / torch RNG state)."""
from __future__ import annotations

import argparse
import random
import signal
from pathlib import Path

import numpy as np
import torch

ITERATION = 5
TOKENS = [[1, 5, 9, 200, 3000, 48000, 17, 4], [7, 7, 1000, 2, 49000, 12, 33, 8]]


def tiny_config(**over):
    """A LLaMA-style ModelConfig (GQA, untied head) of SmolLM2's vocabulary, so the trainer can run it."""
    from megatron_hdpissa.models.config import ModelConfig

    fields = dict(model_type="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, kv_channels=16, vocab_size=49152, max_position_embeddings=256,
                  rope_theta=50000.0, norm_epsilon=1e-5, tie_word_embeddings=False)
    fields.update(over)
    return ModelConfig(**fields)


def megatron_lm_args(config, tp: int, pp: int, ckpt_format: str, tokenizer_model=None) -> argparse.Namespace:
    """The model part of the Namespace Megatron-LM's `parse_args` + `validate_args` produce for a
    LLaMA-style run, plus a few of the non-plain values it holds."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, group_query_attention=True,
        num_query_groups=config.num_query_groups, kv_channels=config.kv_channels,
        max_position_embeddings=config.max_position_embeddings, seq_length=128,
        position_embedding_type="rope", rotary_base=int(config.rope_theta), rotary_percent=1.0,
        rotary_interleaved=False, use_rope_scaling=False, rope_scaling_factor=8.0,
        normalization="RMSNorm", norm_epsilon=config.norm_epsilon, apply_layernorm_1p=False,
        swiglu=True, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        padded_vocab_size=config.vocab_size, make_vocab_size_divisible_by=128,
        num_experts=None, multi_latent_attention=False, mtp_num_layers=None, window_size=None,
        apply_residual_connection_post_layernorm=False, init_method_std=0.02,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None, ckpt_format=ckpt_format, transformer_impl="transformer_engine",
        params_dtype=torch.float32, bf16=False, fp16=False, attention_backend=AttnBackend.auto,
        exit_signal=signal.SIGTERM, tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_model,
        data_path=["/data/train_text_document"], save=None, load=None, lr=3e-4, seed=1234,
    )


def random_model(config, seed: int = 1234):
    """A random GPTModel for this rank's (TP, PP) position, norms perturbed (the same on every TP rank)."""
    from megatron.core import parallel_state as ps

    from megatron_hdpissa.models.gpt import build_gpt_model

    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    extra = dict(pipeline_model_parallel_size=pp_size, pipeline_dtype=torch.float32) if pp_size > 1 else {}
    model = build_gpt_model(config, seed=seed + pp_rank, parallel_output=False, pre_process=pp_rank == 0,
                            post_process=pp_rank == pp_size - 1, **extra)
    gen = torch.Generator().manual_seed(seed + 100 + pp_rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()


def logits(model, tokens=TOKENS) -> torch.Tensor:
    ids = torch.tensor(tokens)
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_torch_dist(model, save_dir, args, iteration: int = ITERATION) -> Path:
    """Megatron-LM's `--ckpt-format torch_dist` save: the common part (args, version, iteration,
    scheduler) into common.pt, the model's sharded state dict into the shards. Collective."""
    from megatron.core import dist_checkpointing

    from megatron_hdpissa.checkpoint.dist import sync_save_strategy

    iter_dir = Path(save_dir) / f"iter_{iteration:07d}"
    if torch.distributed.get_rank() == 0:
        iter_dir.mkdir(parents=True)
    _barrier()
    state = {"checkpoint_version": 3.0, "iteration": iteration, "model": model.sharded_state_dict(),
             "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": iteration * 8, "decay_style": "cosine"},
             "num_floating_point_operations_so_far": 1.5e12}
    if args is not None:  # Megatron-Bridge keeps its config in run_config.yaml instead
        state["args"] = args
    # megatron-core's torch_dist format and planner; written synchronously (its default async writer
    # starts a spawn-context Manager, see checkpoint/dist.py)
    dist_checkpointing.save(state, str(iter_dir), sharded_strategy=sync_save_strategy())
    if torch.distributed.get_rank() == 0:
        (Path(save_dir) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    _barrier()
    return iter_dir


def te_names(state_dict: dict) -> dict:
    """The local spec's state dict with TransformerEngine's names (Megatron-LM's default
    `--transformer-impl transformer_engine`): the norms fused into linear_qkv / linear_fc1, and
    `_extra_state` as a uint8 tensor."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace(".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight")
        key = key.replace(".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight")
        out[key] = torch.zeros(4, dtype=torch.uint8) if key.endswith("_extra_state") else value
    return out


def save_legacy(model, save_dir, args, iteration: int = ITERATION) -> Path:
    """Megatron-LM's `--ckpt-format torch` save: one `model_optim_rng.pt` per (TP, PP) rank.
    Collective."""
    from megatron.core import parallel_state as ps

    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp:02d}" if ps.get_pipeline_model_parallel_world_size() == 1 else f"mp_rank_{tp:02d}_{pp:03d}"
    path = Path(save_dir) / f"iter_{iteration:07d}" / name / "model_optim_rng.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration,
                "model": te_names(model.state_dict_for_save_checkpoint()), "rng_state": [rng],
                "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": iteration * 8},
                "num_floating_point_operations_so_far": 1.5e12}, path)
    _barrier()
    if torch.distributed.get_rank() == 0:
        (Path(save_dir) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    _barrier()
    return path


def save_bridge(model, save_dir, config, tokenizer_model=None, iteration: int = ITERATION) -> Path:
    """Megatron-Bridge's save: torch_dist without `args`, the ConfigContainer's `model:` section
    (a GPTModelProvider's TransformerConfig fields, the activation as a Hydra target) and
    `tokenizer:` section in `iter_XXXXXXX/run_config.yaml`. Collective."""
    import yaml

    iter_dir = save_torch_dist(model, save_dir, None, iteration)
    if torch.distributed.get_rank() == 0:
        run_config = {"model": {
            "_target_": "megatron.bridge.models.llama.llama_provider.LlamaModelProvider",
            "num_layers": config.num_layers, "hidden_size": config.hidden_size, "ffn_hidden_size": config.ffn_hidden_size,
            "num_attention_heads": config.num_attention_heads, "num_query_groups": config.num_query_groups,
            "kv_channels": config.kv_channels, "seq_length": config.max_position_embeddings,
            "vocab_size": config.vocab_size, "make_vocab_size_divisible_by": 128, "normalization": "RMSNorm",
            "layernorm_epsilon": config.norm_epsilon, "gated_linear_unit": True,
            "activation_func": {"_call_": False, "_target_": "torch.nn.functional.silu"},
            "position_embedding_type": "rope", "rotary_base": int(config.rope_theta), "rotary_percent": 1.0,
            "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": False,
            "share_embeddings_and_output_weights": config.tie_word_embeddings, "init_method_std": 0.02,
            "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1},
            "tokenizer": {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tokenizer_model}}
        (iter_dir / "run_config.yaml").write_text(yaml.safe_dump(run_config))
    _barrier()
    return iter_dir
