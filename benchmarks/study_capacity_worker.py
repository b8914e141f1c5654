"""The capacity study's fine-tune: the trainer's recipe, plus teacher-forced recall of every
training fact every N steps, measured on the live model (no export, no generation).

    torchrun --nproc-per-node 2 -m benchmarks.study_capacity_worker --recall-every 10 \
        --recall-out run/recall.jsonl <the trainer's flags, --data-path facts.jsonl ...>

Each record of `--recall-out` (one JSON line, written by rank 0): the step, per fact whether every
supervised position's argmax is its label (greedy decoding would reproduce the answer and its EOS),
per fact the sum of its answer-token losses and their count, and the seconds spent so far in
optimizer steps (and in the first one) and in these evaluations. The facts are the training set itself, split over the
data-parallel ranks and summed back.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from megatron_hdpissa.training.finetune import FinetuneRecipe


@torch.no_grad()
def fact_scores(model, dataset, indices: list[int], device, batch_size: int = 32) -> dict[int, tuple]:
    """{fact index: (recalled, answer-token loss sum, answer-token count)} for `indices` of the SFT
    `dataset`, teacher-forced through a megatron-core GPTModel (`model(...)` without labels gives
    the logits `(b, s, vocab)`). Rows are right-padded; the causal mask keeps padding out of the
    earlier positions."""
    out = {}
    order = sorted(indices, key=lambda i: len(dataset.examples[i].ids))
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        width = max(len(dataset.examples[i].ids) - 1 for i in group)
        rows = [dataset.build_row([i], width) for i in group]
        tokens = torch.stack([r["tokens"] for r in rows]).to(device)
        position_ids = torch.stack([r["position_ids"] for r in rows]).to(device)
        labels = torch.stack([r["labels"] for r in rows]).to(device)
        mask = torch.stack([r["loss_mask"] for r in rows]).to(device).bool()
        logits = model(input_ids=tokens, position_ids=position_ids, attention_mask=None).float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        right = (logits.argmax(dim=-1) == labels) | ~mask
        for j, i in enumerate(group):
            out[i] = (bool(right[j].all()), float((losses[j] * mask[j]).sum()), float(mask[j].sum()))
    return out


class RecallRecipe(FinetuneRecipe):
    """The trainer's recipe; every `every` steps and after the last it scores every training fact
    and appends one record to `out` (rank 0). (Step 0 is the base model, evaluated once by the study.)"""

    def __init__(self, args, every: int, out: str):
        super().__init__(args)
        self.every, self.out = every, out
        self.step_s, self.recall_s, self.first_step_s = 0.0, 0.0, None

    def train_step(self) -> float:
        t = time.time()
        loss = super().train_step()
        self.step_s += time.time() - t
        if self.first_step_s is None:
            self.first_step_s = self.step_s  # one-off allocations; calibration leaves it out
        if self.iteration % self.every == 0 or self.iteration == self.train_iters:
            self.record()
        return loss

    def record(self) -> None:
        from megatron_hdpissa.distributed.collectives import all_reduce_
        from megatron_hdpissa.peft.common import HD_PISSA

        t, g, ds = time.time(), self.groups, self.train_ds
        if self.args.peft == HD_PISSA:
            self.optimizer.finish_param_gather()  # W holds every applied step
        was_training = self.model.training
        self.model.eval()
        mine = list(range(g.dp_rank, len(ds), g.dp_size))
        scores = fact_scores(self.model, ds, mine, self.device)
        self.model.train(was_training)
        table = torch.zeros(3, len(ds), dtype=torch.float64)
        for i, (ok, loss, count) in scores.items():
            table[:, i] = torch.tensor([float(ok), loss, count], dtype=torch.float64)
        all_reduce_(table, g.dp_group)
        self.recall_s += time.time() - t
        if self.rank0:
            rec = {"step": self.iteration, "flags": [bool(x) for x in table[0].tolist()],
                   "loss_sums": table[1].tolist(), "counts": table[2].tolist(),
                   "step_s": self.step_s, "first_step_s": self.first_step_s, "recall_s": self.recall_s}
            with open(self.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.log(f"recall at step {self.iteration}: {sum(rec['flags'])}/{len(ds)} facts "
                     f"({time.time() - t:.1f}s)")


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description="the trainer plus recall of its facts every N steps")
    p.add_argument("--recall-every", type=int, required=True, help="steps between recall evaluations")
    p.add_argument("--recall-out", required=True, help="JSON lines file the records are appended to")
    mine, rest = p.parse_known_args(argv)
    if mine.recall_every < 1:
        p.error(f"--recall-every must be >= 1, got {mine.recall_every}")
    return mine, rest


def main(argv=None) -> dict:
    from megatron_hdpissa.convert.export import export_merged_hf
    from megatron_hdpissa.training.arguments import parse_args

    mine, rest = parse(argv)
    recipe = RecallRecipe(parse_args(rest), mine.recall_every, mine.recall_out)
    recipe.setup()
    results = recipe.train()
    if recipe.args.export_hf:
        export_merged_hf(recipe.model, recipe.groups, recipe.base_dir, recipe.args.export_hf, recipe.args.peft,
                         recipe.log)
    return results


if __name__ == "__main__":
    from megatron_hdpissa.distributed.groups import shutdown
    from megatron_hdpissa.training.errors import run_cli
    from megatron_hdpissa.training.quiet import quiet_megatron_notices

    quiet_megatron_notices()
    run_cli(main, None, shutdown, parse=lambda argv: parse(argv))
