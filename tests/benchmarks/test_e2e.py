"""bench_e2e's pure parts (seconds per step from two run lengths, real tokens per step, the
trainer's log read back, ratios, the table), profile_step's operator groups, and (slow) a 2-layer
run of the whole benchmark whose methods must start from the same loss."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from benchmarks import e2e_report as report


def _run(steps, wall, cpu, tokens, losses=None, rss=100.0):
    return {"steps": steps, "wall_s": wall, "cpu_s": cpu, "real_tokens": tokens,
            "losses": losses or [2.0] * steps, "peak_rss_mib": rss}


def test_step_time_from_two_lengths_cancels_start_up():
    # 40 s start-up, 6 s per step (wall); 2 ranks with 30 s + 5 s per step of CPU each
    short, long = _run(1, 40 + 6, 2 * (30 + 5), [1000]), _run(4, 40 + 4 * 6, 2 * (30 + 4 * 5), [1000, 10, 20, 30])
    long["step_s"] = [9.0, 6.5, 5.0, 6.0]  # in-run times: the first step is not one of those timed
    assert report.step_seconds(short, long) == pytest.approx(6.0)
    assert report.cpu_seconds(short, long, nproc=2) == pytest.approx(5.0)
    row = report.summarise("hd-pissa", "hd-pissa", "variable", short, long, nproc=2)
    assert row["real_tokens_per_step"] == pytest.approx(20.0)  # steps 2-4 of the long run: those timed
    assert row["real_tokens_per_s"] == pytest.approx(20.0 / 6.0)
    assert row["step_in_run_s"] == pytest.approx(6.0)


def test_trainer_log_read_back_as_the_trainer_writes_it(tmp_path):
    from megatron_hdpissa.training.monitoring import Logger

    path = tmp_path / "log.jsonl"
    logger = Logger(SimpleNamespace(no_progress=True, log_json=str(path), tensorboard_dir=None), total=3, start=0)
    logger.scalars(0, valid_loss=3.0)  # a held-out line: not a step
    for it, (loss, tokens) in enumerate([(2.5, 1500.0), (2.25, 1700.0), (2.0, 1600.0)], start=1):
        logger.log_step(it, 3, loss, 1e-4, tokens / 2.0, real_tokens=tokens)
    logger.close()
    assert report.trainer_log(path) == ([1500.0, 1700.0, 1600.0], [2.5, 2.25, 2.0], [2.0, 2.0, 2.0])
    assert json.loads(path.read_text().splitlines()[1])["tokens_per_s"] == 750.0


def test_method_and_steps_parsing():
    assert report.parse_method("hd-pissa", pack=False) == ("hd-pissa", "variable")
    assert report.parse_method("hd-pissa", pack=True) == ("hd-pissa", "packed")
    assert report.parse_method("hf-lora:padded", pack=True) == ("hf-lora", "padded")
    assert report.parse_steps("1,4") == (1, 4)
    for bad, words in (("peft-lora", "unknown method 'peft-lora'"), ("lora:sorted", "unknown data mode 'sorted'")):
        with pytest.raises(ValueError, match=words):
            report.parse_method(bad, pack=False)
    for bad in ("4,1", "0,2", "3", "a,b"):
        with pytest.raises(ValueError, match="--steps"):
            report.parse_steps(bad)


def test_ratios_against_hf_lora_published_and_floor_of_the_same_mode():
    def row(name, mode, wall):
        return {"method": name, "name": name, "mode": mode, "step_wall_s": wall, "step_cpu_s": wall / 2,
                "real_tokens_per_step": 1600.0, "real_tokens_per_s": 1600.0 / wall, "peak_rss_mib": 900.0,
                "losses": [2.0, 1.9]}

    rows = [row("hd-pissa", "variable", 5.0), row("hd-pissa", "packed", 4.0), row("hf-lora", "variable", 6.0),
            row("hf-lora", "packed", 5.0), row("published", "variable", 12.0), row("floor", "variable", 4.0)]
    report.add_ratios(rows, "wall")
    hd, hd_packed = rows[0], rows[1]
    assert (hd["vs_hf_lora"], hd["vs_published"], hd["vs_floor"]) == pytest.approx((6 / 5, 12 / 5, 5 / 4))
    # the packed row against the packed HF run; published and floor only ran variable-length
    assert (hd_packed["vs_hf_lora"], hd_packed["vs_published"], hd_packed["vs_floor"]) == pytest.approx((5 / 4, 3, 1))
    text = report.render(rows, {"cpu": "X"}, "setup", "cmd", "wall")
    assert "| hd-pissa | variable | 5.00 | nan | 2.50 | 1600 | 320 | 900 | 1.20x | 2.40x | 1.25x | 1.9000 |" in text
    assert "variable 0.0e+00" in text  # every first-step loss is 2.0


def test_estimate_scales_with_steps_layers_and_tokens():
    one = report.estimate_s([("floor", "variable")], (1, 2), report.REFERENCE_TOKENS, None)
    assert one == pytest.approx(2 * report.START_S["floor"] + 3 * report.STEP_S["floor"])
    more = report.estimate_s([("floor", "variable")], (1, 2), 2 * report.REFERENCE_TOKENS, None)
    assert more - one == pytest.approx(3 * report.STEP_S["floor"])


def test_profile_operator_groups():
    from benchmarks.profile_step import op_group

    assert [op_group(n) for n in ("aten::mm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                                  "c10d::allreduce_", "_VocabParallelCrossEntropy", "aten::mul")] == \
        ["GEMM", "attention", "collectives", "loss", "other ops"]


def test_profile_summary_takes_the_slowest_ranks_split_per_step():
    from benchmarks.profile_step import render, summarise

    def step(total, data, adam):
        return {"step_s": total, "step_cpu_s": total / 2, "data": data, "optimizer: adam": adam,
                "schedule": total - data - adam}

    ranks = [{"steps": [step(4.0, 0.5, 1.0), step(3.0, 0.9, 0.2)], "profiled_step_s": 5.0, "groups_s": {"GEMM": 4.0}},
             {"steps": [step(3.5, 0.2, 0.3), step(5.0, 0.5, 2.0)], "profiled_step_s": 6.0, "groups_s": {"GEMM": 5.0}}]
    med = summarise(ranks)["median_s"]  # step 1: rank 0's split, step 2: rank 1's
    assert med == pytest.approx({"step_s": 4.5, "step_cpu_s": 2.25, "data": 0.5, "optimizer: adam": 1.5,
                                 "schedule": 2.5})
    assert "| schedule | 2.500 | 56% |" in render(summarise(ranks))


@pytest.mark.slow
def test_e2e_smoke_on_two_layers(tmp_path):
    """The whole benchmark on the first 2 layers of SmolLM2: every method runs as real torchrun
    processes, and all start from the same loss on the same rows (the trainer, HF PEFT on
    transformers, our model frozen)."""
    from benchmarks.bench_e2e import main

    rows = main(["--num-layers", "2", "--steps", "1,2", "--seq-length", "128", "--methods", "hd-pissa,hf-lora,floor",
                 "--out", str(tmp_path / "e2e")])
    assert [r["method"] for r in rows] == ["hd-pissa", "hf-lora", "floor"]
    first = [r["losses"][0] for r in rows]
    assert max(first) - min(first) < 1e-4 * abs(first[0])
    tokens = [r["runs"]["long"]["real_tokens"] for r in rows]
    assert tokens[0] == tokens[1] == tokens[2] and all(0 < t <= 8 * 128 for t in tokens[0])
    saved = json.loads((tmp_path / "e2e.json").read_text())["rows"]  # step times: too short to assert on
    assert [r["real_tokens_per_step"] for r in saved] == [sum(t[1:]) / (len(t) - 1) for t in tokens]
    assert "| hf-lora | variable |" in (tmp_path / "e2e.md").read_text()
