"""Core attention on `torch.nn.functional.scaled_dot_product_attention`: a drop-in for megatron-core's
`DotProductAttention` in the local layer spec (same constructor, forward signature and state dict)."""
from __future__ import annotations

import contextlib
import itertools
import weakref

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def document_spans(mask: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the `[start, stop)` spans of the documents when `mask` (bool `[b, 1, s, s]`, True
    where masked) is exactly a per-document causal mask, else None. Documents are contiguous: a
    new one starts where a position may not see the one before it."""
    if mask.dim() != 4 or mask.size(1) != 1 or mask.size(2) != mask.size(3) or mask.dtype != torch.bool:
        return None
    b, s = mask.size(0), mask.size(3)
    starts = torch.diagonal(mask[:, 0], offset=-1, dim1=-2, dim2=-1).long()  # [b, s - 1]
    documents = torch.cat([starts.new_zeros(b, 1), starts.cumsum(-1)], dim=-1)
    same = documents[:, :, None] == documents[:, None, :]
    if not torch.equal(mask, ~(same & torch.ones(s, s, dtype=torch.bool, device=mask.device).tril())[:, None]):
        return None
    spans = []
    for row in documents:
        counts = torch.unique_consecutive(row, return_counts=True)[1].tolist()
        spans.append([(end - n, end) for n, end in zip(counts, itertools.accumulate(counts))])
    return spans


class _SpanCache:
    """`document_spans` of the last mask seen: every layer of a forward gets the same mask tensor,
    so it is analysed once per micro-batch (a weak reference and the tensor's version counter
    make sure it is the same, unmodified tensor)."""

    def __init__(self):
        self.ref, self.version, self.spans = None, None, None

    def __call__(self, mask: torch.Tensor):
        if self.ref is None or self.ref() is not mask or self.version != mask._version:
            self.ref, self.version, self.spans = weakref.ref(mask), mask._version, document_spans(mask)
        return self.spans


_spans_of = _SpanCache()


def sdpa_supports_gqa() -> bool:
    """torch >= 2.5: `enable_gqa=True` lets K / V keep their query-group heads (no expanded copy)."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


class SDPAttention(DotProductAttention):
    """`DotProductAttention` whose forward is one `scaled_dot_product_attention` call: the s x s
    scores are never materialised where a fused kernel applies (flash / memory-efficient on GPU,
    the flash kernel on CPU), and grouped-query K / V are not expanded (torch >= 2.5).

    Same inputs as megatron-core's: query `[sq, b, np, hn]`, key / value `[sk, b, ng, hn]`
    (this TP rank's heads; SP gathers the sequence before the QKV projection), `attention_mask`
    bool, True where a position is masked out, broadcastable to `[b, np, sq, sk]`; output
    `[sq, b, np * hn]`. The masks are megatron-core's: none given means causal (`is_causal`, no
    mask tensor); a given mask replaces the causal one (the trainer's per-document masks include
    causality, `data/batches.document_causal_mask`). A mask that is exactly per-document causal
    (packed rows) runs as one causal call per document (`document_spans`): the work is the sum of
    the documents' squared lengths, not the row's. A sliding window is intersected with a given
    mask (megatron-core's local path lets the window replace it). Softmax scale, query-key layer
    scaling and attention dropout (forked from the model-parallel RNG outside SP, as megatron-core
    does) follow the config. A query row with every key masked is not supported (causal and
    document masks always keep the diagonal). Off-by-one / learnable softmax offsets and
    attention biases go to megatron-core's own forward.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("SDPAttention takes no packed_seq_params (THD format): pack with per-document "
                             "attention masks (data/batches.document_causal_mask) instead")
        if self.softmax_offset is not None or attention_bias is not None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        sq, sk = query.size(0), key.size(0)
        heads, groups = query.size(2), key.size(2)
        # [s, b, heads, hn] -> [b, heads, s, hn]: views, the head dimension stays contiguous
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        extra = {}
        if heads != groups:
            if sdpa_supports_gqa():
                extra["enable_gqa"] = True
            else:
                k = k.repeat_interleave(heads // groups, dim=1)
                v = v.repeat_interleave(heads // groups, dim=1)
        spans = None
        if attention_mask is not None and self.scale_mask_softmax.window_size is None and sq == sk:
            spans = _spans_of(attention_mask)
            spans = spans if spans is not None and len(spans) == q.size(0) else None
        # megatron-core scales the scores by softmax_scale, then (query-key layer scaling) the
        # softmax input by the layer number it divided softmax_scale by: the product is the scale
        extra.update(scale=self.softmax_scale * (self.scale_mask_softmax.scale or 1.0),
                     dropout_p=self.attention_dropout.p if self.training else 0.0)
        if extra["dropout_p"] > 0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        else:
            rng = contextlib.nullcontext()
        with rng:
            if spans is not None:
                context = torch.cat([torch.cat([
                    F.scaled_dot_product_attention(q[i:i + 1, :, a:z], k[i:i + 1, :, a:z], v[i:i + 1, :, a:z],
                                                   is_causal=True, **extra) for a, z in row], dim=2)
                    for i, row in enumerate(spans)])
            else:
                keep, is_causal = self._keep_mask(attention_mask, attn_mask_type, sq, sk, q.device)
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=is_causal, **extra)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, context.size(0), heads * context.size(3))

    def _keep_mask(self, attention_mask, attn_mask_type, sq: int, sk: int, device):
        """(SDPA's boolean mask, True where attended, or None; is_causal) for megatron-core's
        mask conventions."""
        window = self.scale_mask_softmax.window_size
        keep = None if attention_mask is None else ~attention_mask.to(device=device, dtype=torch.bool)
        if window is not None:
            from megatron.core.transformer import utils

            in_window = ~utils.get_sliding_window_causal_mask(sq, sk, window).to(device)
            return (in_window if keep is None else keep & in_window), False
        if keep is not None:
            return keep, False
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError(f"causal attention needs as many queries as keys, got {sq} and {sk}")
            return None, True
        return None, False
