"""Evaluating one merged HF model: SFT and prose losses, fact recall, batched greedy decoding."""
from __future__ import annotations

import torch

from megatron_hdpissa.data.sft import SFTDataset


def load_model(hf_dir):
    """A float32 causal LM from a local folder, in eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def _token_losses(model, tokens: torch.Tensor, labels: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Cross-entropy per position (batch, length); right padding after `lengths` is masked out of
    attention (under a causal mask it could not change earlier positions anyway)."""
    mask = (torch.arange(tokens.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=mask).logits.float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none"), logits


def _batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start:start + size]


def _example_batches(dataset: SFTDataset, batch_size: int):
    """(indices, tokens, labels, loss mask, lengths) per batch of examples of similar length,
    each row built by the trainer's `SFTDataset.build_row` and padded to the batch's longest."""
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.examples[i].ids))
    for group in _batches(order, batch_size):
        lengths = [len(dataset.examples[i].ids) - 1 for i in group]
        rows = [dataset.build_row([i], max(lengths)) for i in group]
        yield (group, torch.stack([r["tokens"] for r in rows]), torch.stack([r["labels"] for r in rows]),
               torch.stack([r["loss_mask"] for r in rows]), lengths)


def sft_losses(model, dataset: SFTDataset, batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Per example: (sum of token losses over the loss mask, number of loss tokens), built with
    the trainer's `SFTDataset.build_row`, so the mean equals the trainer's held-out loss."""
    sums, counts = [0.0] * len(dataset), [0.0] * len(dataset)
    for group, tokens, labels, mask, lengths in _example_batches(dataset, batch_size):
        per_token, _ = _token_losses(model, tokens, labels, lengths)
        for j, i in enumerate(group):
            sums[i] = float((per_token[j] * mask[j]).sum())
            counts[i] = float(mask[j].sum())
    return sums, counts


def text_losses(model, chunks: list[list[int]], batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Per window of token ids: (sum of next-token losses, number of predicted tokens)."""
    sums, counts = [], []
    for group in _batches(list(range(len(chunks))), batch_size):
        ids = torch.tensor([chunks[i] for i in group])
        per_token, _ = _token_losses(model, ids[:, :-1], ids[:, 1:], [ids.shape[1] - 1] * len(group))
        sums += [float(x) for x in per_token.sum(dim=1)]
        counts += [float(ids.shape[1] - 1)] * len(group)
    return sums, counts


def recall_flags(model, dataset: SFTDataset, batch_size: int = 64) -> list[bool]:
    """Per example: whether greedy decoding from the prompt reproduces the response tokens and the
    EOS after them, checked teacher-forced (every supervised position's argmax is its label,
    which is the same as greedy decoding producing exactly those tokens)."""
    flags = [False] * len(dataset)
    for group, tokens, labels, mask, lengths in _example_batches(dataset, batch_size):
        mask = mask.bool()
        _, logits = _token_losses(model, tokens, labels, lengths)
        right = (logits.argmax(dim=-1) == labels) | ~mask
        for j, i in enumerate(group):
            flags[i] = bool(right[j].all())
    return flags


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                    batch_size: int = 32) -> list[list[int]]:
    """Greedy continuations (token ids, cut after the first EOS, which is dropped) of left-padded
    prompt batches; prompts are grouped by length so padding stays small."""
    outputs: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for group in _batches(order, batch_size):
        width = max(len(prompts[i]) for i in group)
        x = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in group])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in group])
        with torch.no_grad():
            y = model.generate(x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=eos_id, pad_token_id=pad_id)
        for j, i in enumerate(group):
            row = y[j, width:].tolist()
            outputs[i] = row[:row.index(eos_id)] if eos_id in row else row
    return outputs
