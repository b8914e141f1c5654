"""Micro-batches of SFT rows: per-epoch shuffle, optional packing, shard slicing, length padding, resumable position.

A batch is a dict of torch tensors, each (micro_batch_size, length); `length` is the micro-batch's
longest row rounded up to a multiple of `pad_multiple` and capped at seq_length, or seq_length
itself with `pad_to_max_length`:
  tokens        int64   input ids
  labels        int64   labels[i] = tokens[i + 1] of the same example (Megatron GPT convention)
  loss_mask     float32 1 where the label is a response token or the closing EOS (chat data: a
                        token of an assistant turn or its end-of-turn token), else 0
  position_ids  int64   0, 1, ... restarting at each packed example
  document_ids  int64   0, 1, ... which example in the row a position belongs to; padding is
                        one more segment after the last example
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_hdpissa.data.sft import DataError, SFTDataset
from megatron_hdpissa.models.gpt import DEFAULT_SEED

DEFAULT_PAD_MULTIPLE = 8  # --pad-multiple: micro-batch lengths a multiple of 8 suit kernels and TP splits


def padded_length(longest: int, seq_length: int, pad_multiple: int) -> int:
    """`longest` rounded up to a multiple of `pad_multiple`, at least one multiple, at most
    `seq_length`."""
    return min(seq_length, max(1, -(-longest // pad_multiple)) * pad_multiple)


def pad_batch(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """`batch` extended with padding to `length` positions, as `SFTDataset.build_row` pads: for a
    caller that needs one shape across micro-batches (a pipeline schedule without
    `variable_seq_lengths`, a comparison across shards)."""
    have = batch["tokens"].shape[1]
    if length < have:
        raise ValueError(f"cannot pad a batch of {have} positions to {length}")
    extra = length - have
    if extra == 0:
        return dict(batch)
    rows = batch["tokens"].shape[0]
    last_pos = batch["position_ids"][:, -1:]
    # A row already ending in padding keeps its padding segment; a full row (its last label is
    # always supervised) gets a new one.
    last_doc = batch["document_ids"][:, -1:] + (batch["loss_mask"][:, -1:] > 0).long()
    tail = dict(
        tokens=torch.full((rows, extra), pad_id, dtype=batch["tokens"].dtype),
        labels=torch.full((rows, extra), pad_id, dtype=batch["labels"].dtype),
        loss_mask=torch.zeros((rows, extra), dtype=batch["loss_mask"].dtype),
        position_ids=last_pos + torch.arange(1, extra + 1),
        document_ids=last_doc.expand(rows, extra),
    )
    return {key: torch.cat([value, tail[key]], dim=1) for key, value in batch.items()}


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Per-document causal mask of rows of `document_ids` `(b, s)`: bool `(b, 1, s, s)`, True
    where query i must not attend to key j (megatron-core's convention), i.e. j > i or j belongs
    to another example of the row (padding is a segment of its own)."""
    s = document_ids.shape[-1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return ~(same & causal)[:, None]


def attention_mask(batch: dict[str, torch.Tensor], device=None) -> torch.Tensor | None:
    """The attention mask a micro-batch needs: None (plain causal, the fused kernels' fast path)
    when every row holds at most one example, else `document_causal_mask` so packed examples
    attend only within themselves. Each example's positions start at 0 and padding continues the
    last example's, so a row holds several examples exactly when position 0 occurs twice. Built
    on `device`."""
    if int((batch["position_ids"] == 0).sum(dim=1).max()) <= 1:
        return None
    return document_causal_mask(batch["document_ids"].to(device))


def pack_greedy(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Fill rows of `capacity` positions with examples in `order`, starting a new row when the next
    example does not fit."""
    rows, row, used = [], [], 0
    for index in order:
        if row and used + lengths[index] > capacity:
            rows.append(row)
            row, used = [], 0
        row.append(int(index))
        used += lengths[index]
    if row:
        rows.append(row)
    return rows


class SFTBatchIterator:
    """Micro-batches for one shard (a data-parallel rank, or a virtual rank inside one).

    Each epoch shuffles the examples with seed `seed + epoch` (the same on every shard), groups them
    into rows (one example per row, or packed), and walks the rows in steps of
    `num_shards * micro_batch_size`: shard k takes rows [k*mbs, (k+1)*mbs) of each step, so shards
    are disjoint and all shards yield the same number of micro-batches. With `drop_last` a final
    incomplete step is skipped; without it the step is filled with empty rows (loss mask 0), which
    suits one evaluation pass (`shuffle=False, drop_last=False, num_epochs=1`).

    With `pack=True` a row holds several examples; `attention_mask(batch)` is the per-document
    causal mask that keeps each one attending only within itself (the trainer passes it).

    Each micro-batch is as long as its longest row, rounded up to a multiple of `pad_multiple`
    (so TP / sequence-parallel splits and kernels get friendly shapes) and capped at the dataset's
    seq_length; `pad_to_max_length=True` pads every micro-batch to seq_length. Padding comes
    after every real position and carries loss mask 0, so under a causal mask it changes no loss
    or gradient. Packed rows are trimmed the same way (greedy packing leaves most rows nearly
    full, the last ones of an epoch less so). The padding never changes which examples a batch
    holds, so it is not part of the resumable position.

    With `balance_window=W > 1` the rows of W consecutive steps (W micro-batches per shard) are
    dealt out together: longest first, each to the shard with the fewest positions so far that
    still has room, then each shard's rows, longest first, make its W micro-batches. Every shard
    then computes about the same number of positions and similar lengths share a micro-batch, so
    with variable lengths no rank waits for a slower one. Give W = the micro-batches per shard of
    one optimizer step: the step's examples stay the same, only which shard computes which one
    changes. W = 1 keeps the rows in order.

    The position is (epoch, consumed rows over all shards); `state_dict` after a batch, loaded into
    a fresh iterator, yields exactly the batches that would have followed, also with another
    number of shards (with `balance_window` 1; balancing depends on the shard count).
    """

    def __init__(
        self,
        dataset: SFTDataset,
        micro_batch_size: int,
        num_shards: int = 1,
        shard_index: int = 0,
        seed: int = DEFAULT_SEED,
        shuffle: bool = True,
        pack: bool = False,
        drop_last: bool = True,
        num_epochs: int | None = None,
        pad_to_max_length: bool = False,
        pad_multiple: int = DEFAULT_PAD_MULTIPLE,
        balance_window: int = 1,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be positive, got {micro_batch_size}")
        if pad_multiple < 1:
            raise ValueError(f"--pad-multiple must be positive, got {pad_multiple}")
        if balance_window < 1:
            raise ValueError(f"balance_window must be positive, got {balance_window}")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} outside [0, num_shards={num_shards})")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.num_shards = num_shards
        self.shard_index = shard_index
        self.seed = seed
        self.shuffle = shuffle
        self.pack = pack
        self.drop_last = drop_last
        self.num_epochs = num_epochs
        self.pad_to_max_length = pad_to_max_length
        self.pad_multiple = pad_multiple
        self.balance_window = balance_window
        self._window_key, self._window = None, None
        self.epoch = 0
        self.consumed = 0
        self._lengths = [len(e.ids) - 1 for e in dataset.examples]
        self._rows_epoch, self._rows = None, None

    @property
    def rows_per_step(self) -> int:
        return self.num_shards * self.micro_batch_size

    def rows(self, epoch: int) -> list[list[int]]:
        """The epoch's rows, each a list of example indices (the same on every shard)."""
        if self._rows_epoch != epoch:
            n = len(self.dataset)
            order = np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n)
            if self.pack:
                self._rows = pack_greedy(self._lengths, order, self.dataset.seq_length)
            else:
                self._rows = [[int(i)] for i in order]
            self._rows_epoch = epoch
        return self._rows

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches each shard yields in `epoch` (packing makes it vary between epochs)."""
        num_rows = len(self.rows(epoch))
        if self.drop_last:
            return num_rows // self.rows_per_step
        return -(-num_rows // self.rows_per_step)

    def __iter__(self) -> "SFTBatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            rows = self.rows(self.epoch)
            left = len(rows) - self.consumed
            if left >= self.rows_per_step or (left > 0 and not self.drop_last):
                break
            if self.consumed == 0:
                raise DataError(
                    f"{self.dataset.source}: epoch {self.epoch} has {len(rows)} rows, fewer than one step "
                    f"of {self.num_shards} shards x micro-batch {self.micro_batch_size}"
                )
            self.epoch, self.consumed = self.epoch + 1, 0
        if self.balance_window > 1:
            mine = self._balanced_rows(rows)
        else:
            start = self.consumed + self.shard_index * self.micro_batch_size
            mine = rows[start : min(start + self.micro_batch_size, len(rows))]
            mine = mine + [[]] * (self.micro_batch_size - len(mine))
        self.consumed += self.rows_per_step
        length = self.dataset.seq_length
        if not self.pad_to_max_length:
            longest = max(sum(self._lengths[i] for i in row) for row in mine)
            length = padded_length(longest, length, self.pad_multiple)
        built = [self.dataset.build_row(row, length) for row in mine]
        return {key: torch.stack([row[key] for row in built]) for key in built[0]}

    def _balanced_rows(self, rows: list[list[int]]) -> list[list[int]]:
        """This shard's rows for the current micro-batch under `balance_window` (see the class)."""
        step = self.consumed // self.rows_per_step
        window, within = divmod(step, self.balance_window)
        if self._window_key != (self.epoch, window):
            first = window * self.balance_window
            steps = min(self.balance_window, self.batches_in_epoch(self.epoch) - first)
            start = first * self.rows_per_step
            group = rows[start : min(start + steps * self.rows_per_step, len(rows))]
            group = group + [[]] * (steps * self.rows_per_step - len(group))
            sizes = [sum(self._lengths[i] for i in row) for row in group]
            room = steps * self.micro_batch_size
            shards: list[list[int]] = [[] for _ in range(self.num_shards)]
            totals = [0] * self.num_shards
            for r in sorted(range(len(group)), key=lambda r: (-sizes[r], r)):
                k = min((k for k in range(self.num_shards) if len(shards[k]) < room), key=lambda k: (totals[k], k))
                shards[k].append(r)
                totals[k] += sizes[r]
            self._window = [group[r] for r in shards[self.shard_index]]  # dealt longest first
            self._window_key = (self.epoch, window)
        m = self.micro_batch_size
        return self._window[within * m : (within + 1) * m]

    def state_dict(self) -> dict:
        return dict(
            epoch=self.epoch, consumed=self.consumed, seed=self.seed, pack=self.pack,
            num_examples=len(self.dataset),
        )

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("pack", self.pack), ("num_examples", len(self.dataset))):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"data position saved with {key}={state[key]} cannot resume with {key}={mine} "
                    f"({self.dataset.source}): the batch order would differ"
                )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
