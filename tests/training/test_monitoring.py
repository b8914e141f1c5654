"""The trainer's log line and JSON lines carry exactly the optimizer numbers the recipe passes in."""
import json
from types import SimpleNamespace

import torch

from megatron_hdpissa.training.monitoring import Logger


def test_log_step_writes_what_it_is_given(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    logger = Logger(SimpleNamespace(no_progress=True, log_json=str(path), tensorboard_dir=None), total=10, start=0)
    logger.log_step(1, 10, 2.5, 1e-4, 1000.0)  # a baseline without clipping: nothing else to report
    logger.log_step(2, 10, 2.25, 1e-4, 1000.0, grad_norm=0.75, comm_bytes=3 * 2 ** 20, loss_scale=1024.0,
                    skipped_steps=2)
    logger.close()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first == {"iteration": 1, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 1000.0}
    assert second == {"iteration": 2, "loss": 2.25, "lr": 1e-4, "tokens_per_s": 1000.0, "grad_norm": 0.75,
                      "comm_bytes": 3 * 2 ** 20, "loss_scale": 1024.0, "skipped_steps": 2}
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "iteration      1/10 | loss 2.5000 | lr 1.000e-04 | 1,000 tokens/s"
    assert out[1].endswith("| grad norm 0.750 | sent 3.00 MiB | loss scale 1024 | skipped 2")


def test_real_tokens_counts_each_rows_examples_not_padding():
    """Packed and single-example rows padded to one length: the count is the examples' own
    positions (len(ids) - 1 each), summed independently from the dataset."""
    from megatron_hdpissa.data.sft import SFTDataset, read_jsonl_examples
    from megatron_hdpissa.data.tokenizer import build_tokenizer
    from megatron_hdpissa.training.monitoring import real_tokens
    from tests.helpers.sft_data import GSM8K, SP_MODEL

    dataset = SFTDataset(read_jsonl_examples(GSM8K)[:6], build_tokenizer("SentencePieceTokenizer", SP_MODEL),
                         seq_length=512, template="{prompt}")
    rows = [[0, 1, 2], [3], [4, 5], []]  # packed, one example, two, an empty (all padding) row
    built = [dataset.build_row(r) for r in rows]
    batch = {k: torch.stack([b[k] for b in built]) for k in built[0]}
    expected = sum(len(dataset.examples[i].ids) - 1 for r in rows for i in r)
    assert expected < batch["tokens"].numel()  # there is padding to leave out
    assert real_tokens(batch) == expected


def _trainer_run(argv):
    from tests.helpers.trainer import finetune_main

    finetune_main(argv)


def test_trainer_logs_real_tokens_summed_over_data_parallel_ranks(tmp_path, smollm2_hf_dir, gsm8k_path):
    """2 DP ranks (HD-PiSSA, K = 2), one epoch of 16 examples in 2 steps of 8:
    the logged real tokens add up to every example's positions, and tokens_per_s = real_tokens
    over a positive time."""
    from megatron_hdpissa.data.sft import SFTDataset
    from megatron_hdpissa.data.tokenizer import build_tokenizer
    from tests.helpers.distributed import run_distributed
    from tests.helpers.hf_models import tiny_trainer_material

    m = tiny_trainer_material(tmp_path, smollm2_hf_dir, gsm8k_path, seed=3, num_train=16)
    log = tmp_path / "log.jsonl"
    argv = ["--pretrained-checkpoint", str(m["base"]), "--data-path", str(m["train"]), "--micro-batch-size", "2",
            "--global-batch-size", "8", "--seq-length", "256", "--prompt-template", "{prompt}",
            "--train-iters", "2", "--hd-pissa-rank", "4",
            "--no-progress", "--log-json", str(log), "--ckpt-format", "torch"]
    run_distributed(_trainer_run, 2, args=(argv,), pp=1)
    lines = [json.loads(line) for line in log.read_text().splitlines() if "real_tokens" in line]
    assert [line["iteration"] for line in lines] == [1, 2]
    train = SFTDataset.from_jsonl(str(m["train"]), build_tokenizer("HuggingFaceTokenizer", str(m["hf"])), 256,
                                  template="{prompt}")
    assert len(train) == 16
    assert sum(line["real_tokens"] for line in lines) == sum(len(e.ids) - 1 for e in train.examples)
    for line in lines:
        assert 0 < line["real_tokens"] < 8 * 256  # rows shorter than --seq-length
        assert line["tokens_per_s"] > 0
