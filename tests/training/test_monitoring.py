"""The trainer's log line and JSON lines carry exactly the optimizer numbers the recipe passes in."""
import json
from types import SimpleNamespace

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
