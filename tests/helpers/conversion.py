"""Logits of converted checkpoints (megatron-core, inside spawned ranks) against transformers, and
bit-exact comparison of HF folders."""
from __future__ import annotations

from pathlib import Path

import torch


def megatron_logits(ckpt_dirs: list[str], token_ids: list[list[int]]) -> list[torch.Tensor]:
    """Full-vocabulary logits of each converted checkpoint on this rank."""
    from megatron_hdpissa.convert.load import load_gpt_model

    logits = []
    for ckpt_dir in ckpt_dirs:
        model, _ = load_gpt_model(ckpt_dir, parallel_output=False)
        model.eval()
        device = next(model.parameters()).device
        ids = torch.tensor(token_ids, device=device)
        positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
        with torch.no_grad():
            logits.append(model(ids, positions, None).cpu())
    return logits


def pipeline_logits(ckpt_dirs: list[str], token_ids: list[list[int]]) -> list:
    """Full-vocabulary logits of each checkpoint, through megatron-core's pipeline schedule
    (the stage's hidden states go from stage 0 to stage 1 by p2p); None on non-last stages.
    Also reports which top-level parts each stage's model holds."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_hdpissa.convert.load import load_gpt_model

    out = []
    for ckpt_dir in ckpt_dirs:
        model, _ = load_gpt_model(ckpt_dir, parallel_output=False)
        model.eval()
        ids = torch.tensor(token_ids)
        positions = torch.arange(ids.shape[1]).expand_as(ids)

        def forward_step(data_iterator, model):
            batch_ids, batch_positions = next(data_iterator)
            # non_loss_data=True: the schedule collects what this returns (the logits)
            return model(batch_ids, batch_positions, None), lambda logits, non_loss_data=False: logits.clone()

        with torch.no_grad():
            collected = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([(ids, positions)]), model=[model],
                num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
                forward_only=True, collect_non_loss_data=True)
        parts = sorted({k.split(".")[0] for k in model.state_dict()})
        out.append((collected[0] if ps.is_pipeline_last_stage() else None, parts,
                    len(model.decoder.layers)))
    return out


def hf_logits(hf_dir, token_ids, **config_overrides) -> torch.Tensor:
    """transformers' logits of the HF folder, in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **config_overrides).eval()
    with torch.no_grad():
        return model(torch.tensor(token_ids)).logits


def assert_logits_close(megatron: torch.Tensor, hf: torch.Tensor, what: str) -> None:
    """Equal shapes and max |diff| <= 1e-4 x the largest |logit|."""
    assert megatron.shape == hf.shape, what
    scale = hf.abs().max().item()
    err = (megatron - hf).abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: max |diff| {err:.3g} vs logit scale {scale:.3g}"


def safetensors_folder(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in `directory`."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def assert_bit_exact(a: Path, b: Path) -> None:
    """The two HF folders hold the same tensor names, dtypes and bits."""
    ta, tb = safetensors_folder(a), safetensors_folder(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def random_ids(vocab: int, shape=(2, 12), seed: int = 0) -> list[list[int]]:
    """Seeded token ids below `vocab`."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed)).tolist()
