"""The study's own code (benchmarks/study_*.py): answers, intervals, tests, recall, the LR sweep
rule, the material, the evaluators and the report, against independent computations. Fast; the
study itself (`make study`) is the slow part and is not run here."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from benchmarks import study_budget, study_data
from benchmarks import study_metrics as sm


# ---- GSM8K answers -------------------------------------------------------------------------------
def _gsm8k_records():
    from megatron_hdpissa.data.material import gsm8k_test_path

    try:
        path = gsm8k_test_path()
    except FileNotFoundError:
        pytest.skip("the packaged GSM8K file is not installed")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_strict_answer_on_every_real_gsm8k_answer():
    records = _gsm8k_records()
    assert len(records) == 1319
    for r in records:
        tail = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        expected = str(int(tail)) if tail.lstrip("-").isdigit() else tail  # an independent parse
        assert sm.strict_answer(r["answer"]) == expected, r["answer"][-40:]
    assert sm.strict_answer(records[0]["answer"]) == "18"  # Janet's ducks


def test_flexible_answer_and_scoring():
    assert sm.flexible_answer("so she pays $1,200.50 in total.") == "1200.5"
    assert sm.flexible_answer("3 apples and then -4") == "-4"
    assert sm.flexible_answer("no digits here") is None
    assert sm.flexible_answer("18.0") == "18"
    refs = ["... #### 18", "... #### 1,000", "... #### 3"]
    gen = ["16 - 3 - 4 = 9 so 9 * 2 = 18 #### 18", "the answer is 1000", "#### 4 but really 3"]
    s = sm.score_answers(gen, refs)
    assert s["strict"] == [True, False, False]
    assert s["flexible"] == [True, True, True]
    assert s["formatted"] == [True, False, True]
    with pytest.raises(ValueError, match="reference without"):
        sm.score_answers(["1"], ["no answer"])


# ---- intervals and tests -------------------------------------------------------------------------
@pytest.mark.parametrize("k,n,lo,hi", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    got = sm.wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=6e-5) and got[1] == pytest.approx(hi, abs=6e-5)


def test_wilson_interval_is_the_score_test_inversion():
    # the interval is {p : |k/n - p| <= z sqrt(p (1-p) / n)}; find its ends by bisection
    k, n, z = 8, 200, sm.Z95

    def inside(p):
        return abs(k / n - p) <= z * math.sqrt(p * (1 - p) / n)

    def edge(a, b):  # a inside, b outside
        for _ in range(100):
            m = (a + b) / 2
            a, b = (m, b) if inside(m) else (a, m)
        return a

    lo, hi = sm.wilson_interval(k, n)
    assert lo == pytest.approx(edge(k / n, 0.0), abs=1e-9)
    assert hi == pytest.approx(edge(k / n, 1.0), abs=1e-9)
    p = sm.proportion([True] * 8 + [False] * 192)
    assert (p["k"], p["n"], p["rate"]) == (8, 200, 0.04) and p["ci95"] == pytest.approx([lo, hi])


def test_mcnemar_exact_by_hand():
    a = [True] * 6 + [False] * 1 + [True] * 5 + [False] * 10
    b = [False] * 6 + [True] * 1 + [True] * 5 + [False] * 10
    r = sm.mcnemar_exact(a, b)
    # 7 discordant pairs split 6 / 1: p = 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * 8 / 128
    assert (r["only_a"], r["only_b"]) == (6, 1) and r["p_value"] == pytest.approx(0.125)
    assert sm.mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    assert sm.mcnemar_exact([True] * 3, [False] * 3)["p_value"] == pytest.approx(0.25)


def test_paired_bootstrap():
    a, b, counts = [2.0, 4.0, 6.0, 1.0], [1.0, 4.0, 5.0, 1.5], [2.0, 2.0, 3.0, 1.0]
    r = sm.paired_bootstrap(a, b, counts, reps=500, seed=1)
    assert r["diff"] == pytest.approx((13.0 - 11.5) / 8.0)  # token-weighted: sums over tokens
    assert r["ci95"][0] <= r["diff"] <= r["ci95"][1]
    same = sm.paired_bootstrap(a, a, counts, reps=50)
    assert same["diff"] == 0 and same["ci95"] == [0, 0]
    assert sm.token_mean([1.0, 3.0], [1.0, 3.0]) == 1.0


# ---- the learning-rate sweep rule ----------------------------------------------------------------
def test_lr_grid_is_half_decades():
    assert sm.lr_grid(1e-4, 3) == [3e-5, 1e-4, 3e-4]
    assert sm.lr_grid(3e-4, 3) == [1e-4, 3e-4, 1e-3]
    assert sm.lr_grid(2.9e-4, 4) == [1e-4, 3e-4, 1e-3, 3e-3]
    for i in range(-14, 2):
        assert sm.lr_index(sm.lr_value(i)) == i
    ratios = [y / x for x, y in zip(sm.lr_grid(1e-5, 5), sm.lr_grid(1e-5, 5)[1:])]
    assert all(3 <= r <= 10 / 3 + 1e-9 for r in ratios)  # geometric up to rounding to 1 and 3


def test_next_lr_widens_at_the_edges_only():
    assert sm.next_lr({1e-4: 1.0, 3e-4: 1.2, 1e-3: 1.5}, 5) == 3e-5  # best lowest: one below
    assert sm.next_lr({1e-4: 1.5, 3e-4: 1.2, 1e-3: 1.0}, 5) == 3e-3  # best highest: one above
    assert sm.next_lr({1e-4: 1.5, 3e-4: 1.0, 1e-3: 1.2}, 5) is None  # inside: done
    assert sm.next_lr({1e-4: 1.0, 3e-4: 1.2, 1e-3: 1.5}, 3) is None  # the limit
    assert sm.next_lr({1e-4: None, 3e-4: float("nan")}, 5) is None  # all diverged
    # a diverged largest LR is the worst, so a best in the middle stays inside
    assert sm.next_lr({1e-4: 1.2, 3e-4: 1.1, 1e-3: None}, 5) is None
    assert sm.best_lr({1e-4: 1.0, 3e-4: 1.0}) == (1e-4, True)  # a tie goes to the smaller LR


def test_sweep_loop_finds_an_optimum_outside_the_first_grid():
    # a convex validation loss with its minimum at 3e-6, the sweep starting around 1e-4
    def loss(lr):
        return (math.log10(lr) - math.log10(3e-6)) ** 2

    scores = {lr: loss(lr) for lr in sm.lr_grid(1e-4, 3)}
    tried = []
    while (nxt := sm.next_lr(scores, 8)) is not None:
        tried.append(nxt)
        scores[nxt] = loss(nxt)
    assert tried == [1e-5, 3e-6, 1e-6]
    assert sm.best_lr(scores) == (3e-6, False)
    assert sm.sweep_flags(scores) == []
    capped = {lr: loss(lr) for lr in sm.lr_grid(1e-4, 3)}
    assert "lowest value tried" in sm.sweep_flags(capped)[0]


# ---- material ------------------------------------------------------------------------------------
def test_facts_are_seeded_distinct_and_well_formed():
    a, b, c = study_data.make_facts(300, 0), study_data.make_facts(300, 0), study_data.make_facts(300, 1)
    assert a == b and a != c
    assert len({f["name"] for f in a}) == 300
    for f in a:
        assert 100 <= f["number"] <= 999 and f["answer"] == f" {f['number']}"
        assert f["question"] == f"The locker number of {f['name']} is"


def test_gsm8k_splits_are_disjoint(tmp_path):
    from megatron_hdpissa.data.material import gsm8k_test_path

    try:
        path = str(gsm8k_test_path())
    except FileNotFoundError:
        pytest.skip("the packaged GSM8K file is not installed")
    parts = study_data.gsm8k_splits(path, 200, 64)
    assert [len(parts[k]) for k in ("train", "test", "val")] == [1000, 200, 64]
    q = {k: {r["question"] for r in v} for k, v in parts.items()}
    assert not (q["train"] & q["test"]) and not (q["train"] & q["val"]) and not (q["test"] & q["val"])
    with pytest.raises(ValueError, match="exceed"):
        study_data.gsm8k_splits(path, 300, 64)


def test_text_windows_and_gutenberg_body():
    ids = list(range(1000))
    w = study_data.text_chunks(ids, 100, 3)
    assert w == [ids[0:100], ids[300:400], ids[600:700]]
    with pytest.raises(ValueError):
        study_data.text_chunks(ids, 100, 11)
    text = "licence\n*** START OF THE BOOK ***\nChapter I\nbody\n*** END OF THE BOOK ***\nmore licence"
    assert study_data.gutenberg_body(text) == "Chapter I\nbody"


# ---- evaluators, against unbatched reference computations -----------------------------------------
class _CharTokenizer:
    """A tokenizer over a fixed alphabet, one id per character (id 0 pad, 1 EOS)."""

    alphabet = "abcdefghijklmnopqrstuvwxyz .#0123456789"
    eos_id, bos_id, pad_id, add_bos, path = 1, None, 0, False, "<chars>"
    vocab_size = len(alphabet) + 2

    def encode(self, text):
        return [self.alphabet.index(c) + 2 for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i - 2] for i in ids if i >= 2)


def _tiny_llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _dataset(pairs, seq_length=64, template="{prompt}"):
    from megatron_hdpissa.data.sft import SFTDataset, SFTExample

    return SFTDataset([SFTExample(p, r) for p, r in pairs], _CharTokenizer(), seq_length, template)


def test_sft_and_text_losses_match_unbatched_computation():
    from benchmarks import study_eval

    model = _tiny_llama(_CharTokenizer.vocab_size)
    ds = _dataset([("what is two", " 2"), ("a much longer question here", " 41 #### 41"), ("q", " 7")])
    sums, counts = study_eval.sft_losses(model, ds, batch_size=2)
    for i, ex in enumerate(ds.examples):
        ids = torch.tensor([ex.ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].double(), dim=-1)
        targets = ids[0, 1:]
        picked = -logp[torch.arange(len(targets)), targets][ex.num_prompt - 1:]  # response + EOS
        assert counts[i] == len(ex.ids) - ex.num_prompt
        assert sums[i] == pytest.approx(float(picked.sum()), rel=1e-4)
    windows = [list(range(2, 12)), list(range(5, 15))]
    t_sums, t_counts = study_eval.text_losses(model, windows, batch_size=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([windows[1][:-1]])).logits[0].double(), -1)
    assert t_counts == [9.0, 9.0]
    assert t_sums[1] == pytest.approx(float(-logp[torch.arange(9), torch.tensor(windows[1][1:])].sum()), rel=1e-4)


class _SuccessorModel(torch.nn.Module):
    """Predicts token x + 1 after token x, except EOS after "c": greedy recall is known by hand."""

    def forward(self, input_ids, attention_mask=None):
        tok = _CharTokenizer()
        nxt = (input_ids + 1) % tok.vocab_size
        nxt[input_ids == tok.encode("c")[0]] = tok.eos_id
        logits = torch.nn.functional.one_hot(nxt, tok.vocab_size).float()
        return type("Out", (), {"logits": logits})()


def test_recall_flags_is_exact_greedy_recall():
    from benchmarks import study_eval

    ds = _dataset([("ab", "c"), ("ab", "d"), ("b", "c"), ("xa", "bc"), ("xa", "bcd")])
    # greedy from "ab" gives "c" then EOS; "d" is never produced after "b"; "bcd" would need "d"
    # after "c", where the model stops. The prompt's own tokens are not scored.
    assert study_eval.recall_flags(_SuccessorModel(), ds, batch_size=2) == [True, False, True, True, False]


def test_greedy_generate_matches_unbatched_argmax_loop():
    from benchmarks import study_eval

    vocab = 40
    model = _tiny_llama(vocab)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [3]]
    got = study_eval.greedy_generate(model, prompts, max_new_tokens=5, eos_id=1, pad_id=0, batch_size=3)
    for p, g in zip(prompts, got):
        seq, want = list(p), []
        for _ in range(5):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == 1:
                break
            want.append(nxt)
            seq.append(nxt)
        assert g == want


# ---- budget and report ---------------------------------------------------------------------------
def test_default_study_fits_the_budget():
    from benchmarks import study

    args = study.parse_args([])
    est = study_budget.estimate(args)
    assert est["total_s"] <= 75 * 60, study_budget.format_estimate(est)
    more = study_budget.estimate(study.parse_args(["--steps", "20"]))
    assert more["total_s"] > est["total_s"]
    assert args.methods == ["hd-pissa", "pissa", "lora", "full"] and args.k == 8 and args.nproc == 2
    assert args.num_test >= 200 and args.num_em >= 200 and args.lrs >= 3


def test_trainer_commands_parse_and_match_across_methods(tmp_path):
    from benchmarks import study
    from benchmarks.study_run import Study, finetune_command
    from megatron_hdpissa.training.arguments import parse_args as trainer_args

    st = Study(study.parse_args(["--out", str(tmp_path)]))
    st.base = tmp_path / "base"
    st.files = {k: tmp_path / f"{k}.jsonl" for k in ("train", "val", "test", "facts")}
    parsed = {}
    for m in study.METHODS:
        cmd = finetune_command(st, "gsm8k", m, 3e-4, 1, tmp_path / m, curves=(m == "lora"))
        parsed[m] = trainer_args(cmd)  # every flag exists in the trainer's CLI
    for m, a in parsed.items():
        assert (a.peft, a.hd_pissa_rank, a.global_batch_size, a.micro_batch_size, a.lr) == (m, 8, 8, 1, 3e-4)
        assert a.train_iters == 10 and a.seq_length == 256 and a.seed == 1
        # K = 8 for every method: 2 processes x 4 virtual ranks, or 2 data-parallel processes on 8 rows
        assert a.hd_pissa_virtual_ranks == (4 if m == "hd-pissa" else 1)
    assert parsed["lora"].valid_data_path and parsed["lora"].eval_iters == 8
    assert parsed["pissa"].valid_data_path is None
    facts = trainer_args(finetune_command(st, "facts", "hd-pissa", 1e-3, 1, tmp_path / "f", False))
    assert (facts.global_batch_size, facts.micro_batch_size, facts.prompt_template) == (128, 16, "{prompt}")


def _fake_study(tmp_path=None):
    """A minimal study record of two methods (the shape benchmarks/study.py writes)."""
    n = 4

    def ev(val, test, bot, em_flags, facts_flags=None):
        e = {"val": {"mean": val}, "botchan": {"mean": bot},
             "test": {"mean": test, "sums": [test * 10] * n, "counts": [10.0] * n},
             "em": {k: {**sm.proportion(em_flags), "flags": em_flags} for k in ("strict", "flexible", "formatted")}}
        e["em"]["hit_cap"] = 0
        if facts_flags is not None:
            e["facts"] = {**sm.proportion(facts_flags), "flags": facts_flags}
        return e

    def rec(val, wall=10.0):
        return {"eval": {"val": {"mean": val}, "botchan": {"mean": 3.1}}, "train": [[1, 1.5], [2, 1.2]],
                "wall_s": wall, "diverged": False}

    study = {"args": {"seeds": [1, 2], "rank": 8, "alpha": None, "k": 8, "nproc": 2, "global_batch": 8,
                      "num_em": n, "steps": 2, "seq_length": 256, "template": "alpaca", "warmup": 1, "lrs": 3,
                      "lr_centres": {"hd-pissa": 1e-4, "lora": 1e-3}, "max_lrs": 3, "gen_batch": 4,
                      "max_new_tokens": 8, "num_facts": n, "facts_seed": 0, "facts_steps": 2,
                      "facts_global_batch": 8, "botchan_windows": 2, "botchan_length": 256},
             "machine": {"cores": 2}, "estimate": {"total_s": 60.0, "stages": {"x": 60.0}},
             "stage_s": {"training": 50.0}, "total_s": 70.0, "num_train": 1000, "num_val": n, "num_test": n,
             "test_truncated": 0, "facts_tokens": 40, "layers": 2, "load_before": [1.0, 1, 1],
             "load_after": [1.0, 1, 1], "command": "study.py",
             "base": {"val": {"mean": 2.0}, "test": {"mean": 2.1}, "botchan": {"mean": 3.0},
                      "facts": sm.proportion([False] * n), "em": {k: sm.proportion([False] * n)
                                                                for k in ("strict", "flexible", "formatted")}},
             "effective_rank": {"definition": "d", "checkpoints": {
                 m: {"aggregate": {"mean": r, "min": r, "max": r}, "by_projection": {"q_proj": {"mean": r}},
                     "relative_change": {"mean": 1e-3}} for m, r in (("hd-pissa", 128), ("lora", 8))},
                 "ratio_to_reference": {"hd-pissa": {"ratio_of_means": 16.0}, "lora": {"ratio_of_means": 1.0}}}}
    study["sweeps"] = {
        "hd-pissa": {"best": 1e-4, "at_edge": False, "flags": [],
                     "runs": {3e-5: rec(1.6), 1e-4: rec(1.4), 3e-4: rec(1.5)}},
        "lora": {"best": 3e-3, "at_edge": True, "flags": sm.sweep_flags({3e-4: 1.9, 1e-3: 1.8, 3e-3: 1.7}),
                 "runs": {3e-4: rec(1.9), 1e-3: rec(1.8), 3e-3: rec(1.7)}}}
    study["best"] = {"hd-pissa": {**rec(1.4), "trainable_M": 9.8, "command": "cmd-hd",
                                  "eval": ev(1.4, 1.30, 3.2, [True, True, False, False])},
                     "lora": {**rec(1.7), "trainable_M": 2.4, "command": "cmd-lora",
                              "eval": ev(1.7, 1.35, 3.1, [True, False, False, False])}}
    study["seconds"] = {m: {**rec(1.5), "valid": [[0, 2.0], [2, 1.45]],
                            "eval": {"val": {"mean": 1.45}, "test": {"mean": t}, "botchan": {"mean": 3.2}}}
                        for m, t in (("hd-pissa", 1.32), ("lora", 1.36))}
    study["facts"] = {m: {"diverged": False, "eval": {"facts": {**sm.proportion(f), "flags": f},
                                                      "botchan": {"mean": 3.3}}}
                      for m, f in (("hd-pissa", [True, True, True, False]), ("lora", [False] * 4))}
    return study


def test_report_analysis_and_markdown(tmp_path):
    from benchmarks import study_report
    from benchmarks.study_markdown import markdown
    from benchmarks.study_plots import plot_forgetting, plot_sweep

    study = _fake_study()
    a = study_report.analyse(study)
    study["analysis"] = a
    hd, lora = a["per_method"]["hd-pissa"], a["per_method"]["lora"]
    assert hd["test"] == [1.30, 1.32] and hd["test_half_range"] == pytest.approx(0.01)
    assert lora["best_lr"] == 3e-3 and lora["at_edge"]
    c = a["comparisons"]["lora"]
    assert c["test_loss"]["diff"] == pytest.approx(-0.05)  # per-problem sums are constant: CI is a point
    assert c["em_strict"]["only_a"] == 1 and c["facts"]["only_a"] == 3
    flags = "\n".join(a["flags"])
    assert "lora: best LR 0.003 is the highest value tried" in flags
    assert "zero is outside it" in flags and "not distinguishable at 5%" in flags
    assert "all methods' exact-match 95% intervals overlap" in flags
    md = markdown(study)
    for needle in ("## Honest reading", "## Setup", "| hd-pissa | 0.0001 |", "0.003 (edge)", "## Commands",
                   "cmd-hd", "forgetting.png", "x LoRA"):
        assert needle in md, needle
    plot_forgetting(a, tmp_path / "f.png")
    plot_sweep(a, tmp_path / "s.png")
    assert (tmp_path / "f.png").stat().st_size > 1000 and (tmp_path / "s.png").stat().st_size > 1000
    study_report.write_results(study, tmp_path / "r.json")
    assert "flags" in json.loads((tmp_path / "r.json").read_text())["analysis"]


@pytest.mark.slow
def test_study_dry_run(tmp_path):
    """The whole study end to end on 2 layers, 2 steps and tiny evaluation sets (minutes)."""
    from benchmarks import study

    out = study.main(["--out", str(tmp_path), "--layers", "2", "--steps", "2", "--lrs", "2", "--max-lrs", "3",
                      "--methods", "hd-pissa,lora", "--num-val", "4", "--num-test", "4", "--num-em", "4",
                      "--max-new-tokens", "8", "--gen-batch", "4", "--botchan-windows", "2", "--num-facts", "16",
                      "--facts-micro-batch", "2", "--facts-steps", "2"])
    for name in ("study.md", "results.json", "curves.png", "spectra.png", "forgetting.png", "lr_sweep.png"):
        assert (tmp_path / name).is_file(), name
    assert out["effective_rank"]["checkpoints"]["hd-pissa"]["aggregate"]["max"] <= 2 * 8 * 8
    assert os.path.isdir(out["best"]["hd-pissa"]["hf"])
