"""Random Hugging Face model folders for conversion and trainer tests (torch and transformers are
imported on first use: conftest.py loads this module for every test, the source-only ones too)."""
from __future__ import annotations

import shutil
from pathlib import Path


def save_random_hf_model(config, path, seed: int):
    """Random HF model with non-trivial norms and biases (HF initialises those to 1 and 0, which
    would hide a swapped or dropped tensor in a conversion)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


def tiny_llama_with_smollm2_tokenizer(path, smollm2_hf_dir, seed: int, **config):
    """A random LLaMA HF folder of SmolLM2's vocabulary (49152) with SmolLM2's tokenizer files, so
    the trainer runs it on real text. `config`: LlamaConfig fields (hidden_size, heads, ...)."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, max_position_embeddings=256, architectures=["LlamaForCausalLM"], **config)
    return with_smollm2_tokenizer(save_random_hf_model(config, path, seed=seed), smollm2_hf_dir)


def with_smollm2_tokenizer(hf_dir, smollm2_hf_dir) -> Path:
    """`hf_dir` (a model of SmolLM2's vocabulary, 49152) with SmolLM2's tokenizer files copied in."""
    for f in Path(smollm2_hf_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy2(f, Path(hf_dir) / f.name)
    return Path(hf_dir)


def tiny_trainer_material(root, smollm2_hf_dir, gsm8k_path, seed: int, *, num_train: int = 64,
                          num_heldout: int = 0, ckpt_format: str | None = None, **config) -> dict:
    """What a trainer test runs on: a tiny random LLaMA with SmolLM2's tokenizer (`config`: hidden
    size, heads, ...; 2 layers, hidden 64, FFN 128 unless given) converted to a TP=1 Megatron
    checkpoint in `root / "base"`, and the first GSM8K training (and held-out) rows as JSONL.
    Returns {"root", "hf", "base", "train"[, "heldout"]}."""
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
    from megatron_hdpissa.data.gsm8k import split_gsm8k
    from megatron_hdpissa.data.sft import write_jsonl

    root = Path(root)
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, **config}
    hf = tiny_llama_with_smollm2_tokenizer(root / "hf", smollm2_hf_dir, seed=seed, **config)
    fmt = {} if ckpt_format is None else {"ckpt_format": ckpt_format}
    base = convert_hf_to_megatron(hf, root / "base", progress=False, **fmt)
    train, heldout = split_gsm8k(str(gsm8k_path), num_heldout=319, seed=0)
    write_jsonl(train[:num_train], str(root / "train.jsonl"))
    out = {"root": root, "hf": hf, "base": base, "train": root / "train.jsonl"}
    if num_heldout:
        write_jsonl(heldout[:num_heldout], str(root / "heldout.jsonl"))
        out["heldout"] = root / "heldout.jsonl"
    return out


def tiny_moe_trainer_material(root, smollm2_hf_dir, gsm8k_path, seed: int, *, num_train: int = 32,
                              family: str = "qwen3_moe", **config) -> dict:
    """`tiny_trainer_material` for a tiny random MoE (`tiny_moe_hf_config` of `family`, Qwen3-MoE unless
    given; `config`: its overrides) of SmolLM2's vocabulary and tokenizer, converted to a torch_dist
    base in `root / "base"`. Returns {"root", "hf", "base", "train"}."""
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
    from megatron_hdpissa.data.gsm8k import split_gsm8k
    from megatron_hdpissa.data.sft import write_jsonl

    root = Path(root)
    config = tiny_moe_hf_config(family, **{"vocab_size": 49152, "initializer_range": 0.1, **config})
    hf = with_smollm2_tokenizer(save_random_hf_model(config, root / "hf", seed=seed), smollm2_hf_dir)
    base = convert_hf_to_megatron(hf, root / "base", progress=False, ckpt_format="torch_dist")
    train, _ = split_gsm8k(str(gsm8k_path), num_heldout=319, seed=0)
    write_jsonl(train[:num_train], str(root / "train.jsonl"))
    return {"root": root, "hf": hf, "base": base, "train": root / "train.jsonl"}


def tiny_moe_hf_config(family: str, **overrides):
    """A tiny transformers MoE config: `family` "qwen3_moe" (Qwen3MoeConfig), "mixtral"
    (MixtralConfig) or "qwen2_moe" (Qwen2MoeConfig, shared expert FFN 48); 4 experts, top-2, hidden 64, 2 layers, 4 heads / 2 KV heads of 16, vocab 128,
    expert FFN 32. Save it with `save_random_hf_model(config, path, seed)`."""
    import transformers

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, vocab_size=128, max_position_embeddings=256, num_experts_per_tok=2)
    if family == "qwen3_moe":
        fields = dict(common, num_experts=4, moe_intermediate_size=32, intermediate_size=48,
                      architectures=["Qwen3MoeForCausalLM"])
        fields.update(overrides)
        return transformers.Qwen3MoeConfig(**fields)
    if family == "mixtral":
        fields = dict(common, num_local_experts=4, intermediate_size=32, architectures=["MixtralForCausalLM"])
        fields.update(overrides)
        return transformers.MixtralConfig(**fields)
    if family == "qwen2_moe":  # a gated shared expert and q/k/v biases
        fields = dict(common, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      intermediate_size=48, architectures=["Qwen2MoeForCausalLM"])
        fields.update(overrides)
        return transformers.Qwen2MoeConfig(**fields)
    raise ValueError(f"unknown MoE family {family!r}")
