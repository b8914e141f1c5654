"""The capacity study's code (benchmarks/study_capacity*.py): the statistics it reports, the live
recall of the worker, the selection slice and calibration rules, the plan and its estimate, the
trainer commands and the report, against independent computations. The study itself is `make
study-capacity` (slow, not run here); a 2-layer end-to-end smoke is marked slow."""
from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch

from benchmarks import study_capacity_plan as plan
from benchmarks import study_metrics as sm


# ---- Wilson and McNemar, against formulas computed here ---------------------------------------------
@pytest.mark.parametrize("n", [6, 25, 192])
def test_wilson_interval_closed_forms_at_zero_and_n(n):
    z2 = sm.Z95 ** 2
    assert sm.wilson_interval(0, n) == pytest.approx((0.0, z2 / (n + z2)), abs=1e-12)  # k = 0: [0, z^2/(n+z^2)]
    assert sm.wilson_interval(n, n) == pytest.approx((n / (n + z2), 1.0), abs=1e-12)
    lo, hi = sm.wilson_interval(n // 3, n)  # the quadratic's two roots: (p-k/n)^2 = z^2 p (1-p) / n
    for root in (lo, hi):
        assert (root - (n // 3) / n) ** 2 == pytest.approx(z2 * root * (1 - root) / n, abs=1e-12)


def _mcnemar_by_enumeration(b: int, c: int) -> float:
    """Two-sided exact binomial test of b successes in b + c at p = 1/2: the probability of every
    outcome no more likely than the observed one (exact fractions)."""
    n = b + c
    pmf = [Fraction(math.comb(n, i), 2 ** n) for i in range(n + 1)]
    return float(sum(p for p in pmf if p <= pmf[b])) if n else 1.0


@pytest.mark.parametrize("b,c", [(0, 0), (6, 1), (1, 6), (0, 5), (10, 10), (12, 3), (40, 25), (0, 1)])
def test_mcnemar_exact_is_the_exact_binomial_test(b, c):
    a_flags = [True] * b + [False] * c + [True] * 7 + [False] * 4  # 7 both right, 4 both wrong
    b_flags = [False] * b + [True] * c + [True] * 7 + [False] * 4
    r = sm.mcnemar_exact(a_flags, b_flags)
    assert (r["only_a"], r["only_b"]) == (b, c)
    assert r["p_value"] == pytest.approx(_mcnemar_by_enumeration(b, c), rel=1e-12)


# ---- the worker's recall, against a direct teacher-forced loop ---------------------------------------
class _Chars:
    alphabet = "abcdefghijklmnopqrstuvwxyz 0123456789"
    eos_id, bos_id, pad_id, add_bos, path = 1, None, 0, False, "<chars>"
    vocab_size = len(alphabet) + 2

    def encode(self, text):
        return [self.alphabet.index(ch) + 2 for ch in text]

    def decode(self, ids):
        return "".join(self.alphabet[i - 2] for i in ids if i >= 2)


def _facts(pairs):
    from megatron_hdpissa.data.sft import SFTDataset, SFTExample

    return SFTDataset([SFTExample(p, r) for p, r in pairs], _Chars(), 32, "{prompt}")


class _MegatronLike(torch.nn.Module):
    """A tiny HF Llama behind megatron-core GPTModel's call: model(input_ids, position_ids,
    attention_mask) -> logits (b, s, vocab)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, position_ids, attention_mask=None):
        assert attention_mask is None  # rows hold one fact each: megatron's plain causal mask
        return self.hf(input_ids=input_ids, position_ids=position_ids).logits


class _Successor(torch.nn.Module):
    """Predicts token x + 1 after token x, and EOS after "c": its greedy recall is known by hand."""

    def forward(self, input_ids, position_ids, attention_mask=None):
        nxt = (input_ids + 1) % _Chars.vocab_size
        nxt[input_ids == _Chars().encode("c")[0]] = _Chars.eos_id
        return 4.0 * torch.nn.functional.one_hot(nxt, _Chars.vocab_size).float()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=_Chars.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def _direct(model, ex):
    """(recalled, answer loss) of one fact, unbatched: greedy from the prompt, token by token."""
    ids = torch.tensor([ex.ids])
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1], position_ids=torch.arange(len(ex.ids) - 1)[None])[0].double()
    answer, ok = ex.ids[ex.num_prompt:], True
    for j, token in enumerate(answer):
        ok &= int(logits[ex.num_prompt - 1 + j].argmax()) == token
    loss = -torch.log_softmax(logits, -1)[torch.arange(ex.num_prompt - 1, len(ex.ids) - 1), torch.tensor(answer)]
    return ok, float(loss.sum()), len(answer)


@pytest.mark.parametrize("which", ["successor", "tiny-llama"])
def test_fact_scores_match_an_unbatched_teacher_forced_loop(which):
    from benchmarks.study_capacity_worker import fact_scores

    if which == "successor":
        # "ab" -> "c" + EOS is what greedy decoding gives; "d" never follows "b"; "bcd" would need "d" after "c"
        ds = _facts([("ab", "c"), ("ab", "d"), ("xa", "bc"), ("the long prompt ab", "c"), ("xa", "bcd"), ("b", "c")])
        model = _Successor()
        assert [_direct(model, ex)[0] for ex in ds.examples] == [True, False, True, True, False, True]
    else:
        ds = _facts([(f"locker of {n} is", f" {v}") for n, v in (("ab", 12), ("bobby cd", 456), ("q", 7),
                                                                  ("dana efg hij", 1010), ("zed", 2))])
        model = _MegatronLike(_tiny_llama())
    got = fact_scores(model, ds, list(range(len(ds))), "cpu", batch_size=4)  # rows of unequal length
    for i, ex in enumerate(ds.examples):
        ok, loss, count = _direct(model, ex)
        assert got[i][0] == ok, i
        assert got[i][1] == pytest.approx(loss, rel=1e-4) and got[i][2] == count
    assert sorted(fact_scores(model, ds, [4, 1], "cpu")) == [1, 4]  # a shard: only its facts


# ---- selection slice, score and calibration rules --------------------------------------------------
def test_selection_slice_is_disjoint_from_the_reported_facts():
    sel, rep = plan.slices(10, 4)
    assert sel == [0, 4, 8] and rep == [1, 2, 3, 5, 6, 7, 9]
    with pytest.raises(ValueError, match="--selection-every"):
        plan.slices(10, 1)


def test_selection_score_ranks_by_recall_then_loss():
    idx = [0, 1, 2, 3]

    def rec(flags, loss):
        return {"flags": flags, "loss_sums": [loss] * 4, "counts": [2.0] * 4}

    one_right_huge_loss = plan.selection_score(rec([True, False, False, False], 1e9), idx)
    none_right_tiny_loss = plan.selection_score(rec([False] * 4, 0.0), idx)
    assert one_right_huge_loss < none_right_tiny_loss  # one more fact always wins
    assert plan.selection_score(rec([False] * 4, 2.0), idx) < plan.selection_score(rec([False] * 4, 3.0), idx)
    assert plan.selection_score(rec([True] * 4, 0.0), idx) == 0.0
    assert plan.selection_score(rec([True] * 4, float("nan")), idx) == math.inf
    # only the selection facts count: a reported fact's flag and loss change nothing
    other = {"flags": [True, False, True, True, True], "loss_sums": [1.0] * 4 + [99.0], "counts": [1.0] * 5}
    same = {"flags": [True, False, True, True, False], "loss_sums": [1.0] * 5, "counts": [1.0] * 5}
    assert plan.selection_score(other, idx) == plan.selection_score(same, idx)


def test_calibration_search_and_choice():
    target = 0.9
    cands = [64, 128, 256, 512]

    def search(recall_of):
        tried = {}
        while (f := plan.next_facts(tried, cands, target)) is not None:
            tried[f] = recall_of(f)
        return list(tried), plan.choose_facts(tried, target)

    order, (num, why) = search(lambda f: 1.0 if f <= 256 else 0.5)  # capacity between 256 and 512
    assert order == [128, 256, 512] and num == 256 and "largest" in why
    order, (num, _) = search(lambda f: 0.95 if f <= 64 else 0.2)
    assert order == [128, 64] and num == 64
    order, (num, why) = search(lambda f: 0.1 * 64 / f)  # never reaches the target
    assert order == [128, 64] and num == 64 and "NO fact count" in why
    order, (num, _) = search(lambda f: 1.0)
    assert order == [128, 256, 512] and num == 512
    cands = [32, 64, 128, 256, 512]  # downwards one step at a time, not to the smallest
    order, (num, _) = search(lambda f: 0.95 if f <= 32 else 0.5)
    assert order == [128, 64, 32] and num == 32



def test_calibration_steps_separate_the_methods():
    """The steps: the most (within the budget's fit) at which full fine-tuning reached the target
    and LoRA did not saturate; the curves are the calibration's 80-step runs, recall every 8."""
    full = [[s, r] for s, r in zip(range(8, 81, 8), [0, .14, .88, .97, .98, 1, 1, 1, 1, 1])]
    lora = [[s, r] for s, r in zip(range(8, 81, 8), [0, .02, .05, .11, .39, .92, 1, 1, 1, 1])]
    assert plan.choose_steps(full, lora, 80, 8, 0.9, 0.9)[0] == 40  # 48: LoRA at 92% saturates
    assert plan.choose_steps(full, lora, 39, 8, 0.9, 0.9)[0] == 32  # the budget caps it
    steps, why = plan.choose_steps(full, lora, 30, 8, 0.9, 0.9)  # full has not reached 90% by 24
    assert steps == 24 and "NO step count" in why
    assert plan.choose_steps(full, lora, 80, 8, 0.9, 0.95)[0] == 48  # a looser saturation threshold
    assert plan.choose_steps([], [], 5, 8, 0.9, 0.9)[0] == 8  # never below one recall interval


def test_calibration_fits_the_budget_at_the_chosen_fact_count(tmp_path, monkeypatch):
    """The budget's fit is taken with the chosen fact count (its recall evaluations cost with it), not
    the largest candidate; fake fine-tunes, real calibration logic."""
    import benchmarks.study_run as study_run
    from benchmarks import study_capacity, study_capacity_calibrate

    def prepare(st):
        (st.out / "material").mkdir(parents=True)
        facts = st.out / "material" / "facts.jsonl"
        facts.write_text("".join('{"question": "q%d", "answer": " %d"}\n' % (i, i) for i in range(512)))
        st.files = {"facts": facts}

    def train(st, method, lr, seed, facts, steps, every, export, tag):
        n = len(facts.read_text().splitlines())
        good = method == "full" and n <= 64
        recs = [{"step": s, "flags": [good and s >= 16] * n, "step_s": 2.0 * s, "first_step_s": 2.0}
                for s in range(every, steps + 1, every)]
        return {"diverged": False, "recall": recs, "steps": steps}

    fits = []
    real_fit = study_capacity_calibrate.plan.max_steps
    monkeypatch.setattr(study_run, "prepare", prepare)
    monkeypatch.setattr(study_capacity_calibrate.plan, "max_steps",
                        lambda a, budget, measured=None: fits.append((a.num_facts, measured)) or real_fit(a, budget,
                                                                                                          measured))
    a = study_capacity.parse_args(["--out", str(tmp_path), "--steps", "80"])
    cal = study_capacity_calibrate.calibrate(a, [], train, lambda *x: None)
    assert cal["num_facts"] == 64 and fits[-1][0] == 64 and fits[-1][1]
    assert cal["budget_fit_steps"] == real_fit(a, 60 * a.budget_min, fits[-1][1])
    assert cal["steps"] == min(80, cal["budget_fit_steps"]) // 8 * 8 and not cal["lora_saturates"]


def test_sweep_chooses_on_the_selection_facts_only(monkeypatch):
    """A fake fine-tune whose selection facts prefer LR 1e-4 and whose reported facts prefer 3e-4:
    the sweep must choose 1e-4, widen below it (it is the lowest tried) and stop there."""
    from types import SimpleNamespace

    from benchmarks import study_capacity

    a = study_capacity.parse_args(["--num-facts", "8", "--steps", "10", "--methods", "hd-pissa"])
    sel, rep = plan.slices(8, a.selection_every)
    good = {1e-4: set(sel), 3e-4: set(rep), 3e-5: set()}  # the facts each LR recalls
    trained = []

    def fake_train(st, method, lr, seed, **kw):
        trained.append(lr)
        flags = [i in good[lr] for i in range(8)]
        return {"diverged": False, "hf": "x", "recall": [{"step": 10, "flags": flags, "loss_sums": [1.0] * 8,
                                                          "counts": [1.0] * 8}]}

    monkeypatch.setattr(study_capacity, "train", fake_train)
    monkeypatch.setattr(study_capacity, "drop_export", lambda st, rec: None)
    good[1e-3] = set()
    out = study_capacity.sweep(SimpleNamespace(args=a, log=lambda msg: None), "hd-pissa", sel)
    assert trained == [1e-4, 3e-4, 1e-3, 3e-5] and out["best"] == 1e-4 and not out["at_edge"]


def test_measured_step_seconds_leave_out_the_first_step():
    from benchmarks.study_capacity_calibrate import step_seconds

    assert step_seconds({"step_s": 10.0, "first_step_s": 4.0}, 4) == 2.0  # (10 - 4) / 3
    assert step_seconds({"step_s": 10.0}, 4) == 2.5 and step_seconds({"step_s": 3.0, "first_step_s": 3.0}, 1) == 3.0


def test_curve_and_recall():
    recs = [{"step": 5, "flags": [True, False, True]}, {"step": 10, "flags": [True, True, True]}]
    assert plan.curve(recs, [1, 2], base=0.0) == [[0, 0.0], [5, 0.5], [10, 1.0]]
    assert plan.recall([True, False, True], [0, 1]) == 0.5


# ---- the plan, its estimate, the commands -----------------------------------------------------------
def test_default_plan_fits_the_budget_and_max_steps_is_tight():
    from benchmarks import study_capacity

    a = study_capacity.parse_args(["--num-facts", "128", "--steps", "80"])
    est = plan.estimate(a)
    assert est["total_s"] <= 75 * 60, plan.format_estimate(est)
    assert est["runs"] == 21  # 4 methods x (3 LRs + 0.5 widening + a second seed) + K = 1, 2, 4
    assert (a.k, a.nproc, a.rank, a.k_sweep, a.facts_per_step) == (8, 2, 8, [1, 2, 4, 8], 16)
    fit = plan.max_steps(a, 75 * 60)
    a.steps = fit
    assert plan.estimate(a)["total_s"] <= 75 * 60
    a.steps = fit + 10
    assert plan.estimate(a)["total_s"] > 75 * 60
    # measured costs replace the assumed ones; a costlier step buys fewer steps
    slower = {m: 2 * s for m, s in est["step_s"].items()}
    assert plan.max_steps(a, 75 * 60, slower) < fit
    assert "measured" in plan.estimate(a, slower)["costs"]
    # by hand: one full fine-tuning step of 16 facts x 16 positions
    assert plan.step_cost("full", 16) == pytest.approx(0.5 + 14.0 * 256 / 1750)


def test_worker_commands_parse_and_keep_the_global_batch(tmp_path):
    from benchmarks import study_capacity
    from benchmarks.study_capacity_worker import parse
    from benchmarks.study_run import Study
    from megatron_hdpissa.training.arguments import parse_args as trainer_args

    a = study_capacity.parse_args(["--out", str(tmp_path), "--num-facts", "64", "--steps", "40"])
    study_capacity.fill_from_calibration(a, required=True)
    st = Study(a, {"total_s": 1.0})
    st.base = tmp_path / "base"
    for method in study_capacity.METHODS:
        for k in (1, 2, 4, 8):
            cmd = study_capacity.capacity_command(st, method, 1e-3, 2, tmp_path / "r", k, tmp_path / "f.jsonl", 40, 8)
            mine, rest = parse(cmd)
            t = trainer_args(rest)
            assert mine.recall_every == 8 and mine.recall_out == str(tmp_path / "r" / "recall.jsonl")
            assert (t.global_batch_size, t.micro_batch_size, t.train_iters, t.peft, t.lr) == (16, 2, 40, method, 1e-3)
            assert t.lr_warmup_iters == 2 and t.hd_pissa_rank == 8 and t.export_hf
            assert t.hd_pissa_virtual_ranks == (k // min(2, k) if method == "hd-pissa" else 1)
    with pytest.raises(SystemExit):
        parse(["--recall-every", "0", "--recall-out", "x"])


def test_bad_arguments_are_refused(tmp_path, capsys):
    from benchmarks import study_capacity

    for bad, needle in ((["--methods", "dora"], "--methods"), (["--k-sweep", "3"], "--k-sweep 3"),
                        (["--seeds", "1"], "--seeds"), (["--lr-centres", "x=1"], "--lr-centres")):
        with pytest.raises(SystemExit):
            study_capacity.parse_args(bad)
        assert needle in capsys.readouterr().err
    a = study_capacity.parse_args(["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--calibrate first"):
        study_capacity.fill_from_calibration(a, required=True)
    (tmp_path / "calibration.json").write_text(json.dumps({"num_facts": 96, "steps": 70, "layers": None,
                                                           "facts_per_step": 16}))
    study_capacity.fill_from_calibration(a, required=True)
    assert (a.num_facts, a.steps, a.warmup) == (96, 70, 3)
    b = study_capacity.parse_args(["--out", str(tmp_path), "--micro-batch", "4"])  # 32 facts per step
    with pytest.raises(SystemExit, match="calibrated with .* run --calibrate again"):
        study_capacity.fill_from_calibration(b, required=True)
    c = study_capacity.parse_args(["--out", str(tmp_path), "--micro-batch", "4", "--num-facts", "50", "--steps", "9"])
    study_capacity.fill_from_calibration(c, required=True)
    assert (c.num_facts, c.steps) == (50, 9)


# ---- the report, on a synthetic record -------------------------------------------------------------
def _rec(method, lr, seed, right, k=8, botchan=3.2, export_right=None, export_loss=1.0):
    flags = [i in right for i in range(8)]
    recall = [{"step": 5, "flags": [False] * 8, "loss_sums": [4.0] * 8, "counts": [2.0] * 8},
              {"step": 10, "flags": flags, "loss_sums": [1.0] * 8, "counts": [2.0] * 8}]
    hf = flags if export_right is None else [i in export_right for i in range(8)]
    return {"name": f"{method}-{lr}-{seed}-{k}", "lr": lr, "seed": seed, "k": k, "diverged": False, "wall_s": 12.0,
            "command": f"cmd-{method}", "recall": recall, "hf": "gone",
            "eval": {"facts": {"flags": hf}, "facts_loss": {"sums": [export_loss] * 8}, "botchan": {"mean": botchan}}}


def _fake_capacity_study():
    from benchmarks import study_capacity

    args = vars(study_capacity.parse_args(["--num-facts", "8", "--steps", "10", "--methods", "hd-pissa,lora",
                                           "--k-sweep", "1,2"]))
    args.update(warmup=1)
    hd1, hd2 = _rec("hd-pissa", 3e-4, 1, {1, 2, 3, 5}), _rec("hd-pissa", 3e-4, 2, {1, 2, 3, 5, 6})
    lo1 = _rec("lora", 3e-3, 1, {1, 0}, export_right={0, 1, 2})  # the export disagrees on fact 2
    lo2 = _rec("lora", 3e-3, 2, {1, 2}, export_loss=1.01)  # and its losses by 1%
    sweeps = {"hd-pissa": {"best": 3e-4, "at_edge": False, "flags": [], "scores": {1e-4: 0.6, 3e-4: 0.5, 1e-3: 0.9},
                           "runs": {1e-4: _rec("hd-pissa", 1e-4, 1, {0}), 3e-4: hd1,
                                    1e-3: _rec("hd-pissa", 1e-3, 1, set())}},
              "lora": {"best": 3e-3, "at_edge": True, "flags": ["best LR 0.003 is the highest value tried"],
                       "scores": {1e-3: 0.9, 3e-3: 0.5}, "runs": {1e-3: _rec("lora", 1e-3, 1, set()), 3e-3: lo1}}}
    return {"args": args, "machine": {"cores": 2}, "calibration": None, "estimate": {
                "total_s": 600.0, "stages": {"sweeps": 600.0}, "costs": "assumed"},
            "stage_s": {"sweeps": 700.0}, "work_s": {}, "runs": 9, "runs_reused": 0, "total_s": 720.0, "layers": 2,
            "selection": [0, 4], "report": [1, 2, 3, 5, 6, 7], "load_before": [1.0] * 3, "load_after": [1.0] * 3,
            "command": "study_capacity.py --num-facts 8", "base": {"facts": {"flags": [False] * 8},
                                                                    "botchan": {"mean": 3.0}},
            "sweeps": sweeps, "seconds": {"hd-pissa": hd2, "lora": lo2},
            "k_runs": {1: _rec("hd-pissa", 3e-4, 1, {1, 2, 3}, k=1), 2: _rec("hd-pissa", 3e-4, 1, {1}, k=2), 8: hd1},
            "effective_rank": {"checkpoints": {"hd-pissa": {"aggregate": {"mean": 120.0}},
                                               "hd-pissa K=1": {"aggregate": {"mean": 16.0}}}}}


def test_report_on_a_synthetic_record(tmp_path):
    from benchmarks import study_capacity_report as rep

    study = _fake_capacity_study()
    rep.write_all(study, tmp_path)
    a = study["analysis"]
    hd, lora = a["per_method"]["hd-pissa"], a["per_method"]["lora"]
    # reported facts 1, 2, 3, 5, 6, 7 only (0 and 4 chose the LR)
    assert [r["recall"]["k"] for r in hd["runs"]] == [4, 5] and [r["recall"]["k"] for r in lora["runs"]] == [1, 2]
    assert hd["recall_mean"] == pytest.approx(9 / 12) and hd["runs"][0]["recall"]["n"] == 6
    assert hd["runs"][0]["curve"] == [[0, 0.0], [5, 0.0], [10, 4 / 6]]
    assert [r["selection_recall"] for r in hd["sweep"]] == [0.5, 0.0, 0.0] and hd["sweep"][1]["chosen"]
    c = a["comparisons"]["lora"]
    assert [(x["only_a"], x["only_b"]) for x in c["per_seed"]] == [(3, 0), (3, 0)]
    assert c["pooled"]["p_value"] == pytest.approx(_mcnemar_by_enumeration(6, 0))  # 2 / 64
    assert [a["k_sweep"][k]["recall"]["k"] for k in ("1", "2", "8")] == [3, 1, 4]
    assert a["k_sweep"]["1"]["rank"] == {"mean": 16.0} and a["k_sweep"]["8"]["rank"] == {"mean": 120.0}
    flags = "\n".join(a["flags"])
    assert "lora seed 1: live-model and export recall agree on only 87.5% of the facts" in flags
    assert "lora seed 2: live-model and export fact losses differ by up to" in flags
    assert "hd-pissa seed" not in flags  # its live and export numbers agree
    assert "6 facts only hd-pissa, 0 only lora, McNemar p = 0.0312" in flags
    assert "K=1 50.0%, K=2 16.7%, K=8 66.7% (NOT monotonic in K)" in flags
    md = (tmp_path / "capacity.md").read_text()
    lo, hi = sm.wilson_interval(4, 6)
    for needle in (f"4/6 = 66.7% [{100 * lo:.1f}, {100 * hi:.1f}]", "| lora | 0.003 (edge) |", "3 / 0, p = 0.25",
                   "6 / 0, p = 0.0312", "| 1 | 3/6 = 50.0%", "(128) |", "cmd-hd-pissa", "## Honest reading",
                   "capacity_k.png", "Facts and steps given on the command line"):
        assert needle in md, needle
    for name in ("capacity_curves.png", "capacity_k.png", "capacity_forgetting.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    small = json.loads((tmp_path / "capacity_results.json").read_text())
    assert small["analysis"]["per_method"]["lora"]["runs"][1]["recall"]["k"] == 2
    assert json.loads((tmp_path / "capacity.json").read_text())["sweeps"]["lora"]["best"] == 3e-3
    # --report-only: the same report from capacity.json alone
    from benchmarks import study_capacity

    (tmp_path / "capacity.md").unlink()
    study_capacity.main(["--report-only", "--out", str(tmp_path), "--publish", str(tmp_path / "pub")])
    assert (tmp_path / "capacity.md").read_text() == md and (tmp_path / "pub" / "capacity.md").read_text() == md
    assert (tmp_path / "pub" / "capacity_k.png").is_file()


@pytest.mark.slow
def test_capacity_calibration_then_study_smoke(tmp_path):
    """Calibration, then the study reading its choice, on 2 layers, a few facts and 2 steps (minutes)."""
    from benchmarks import study_capacity

    common = ["--out", str(tmp_path), "--layers", "2", "--methods", "hd-pissa,lora", "--micro-batch", "1",
              "--botchan-windows", "2", "--k-sweep", "2"]
    cal = study_capacity.main(common + ["--calibrate", "--calibrate-facts", "8,16", "--steps", "2",
                                        "--cost-steps", "1"])
    assert cal["num_facts"] == 8 and cal["steps"] == 2 and set(cal["step_s"]) == {"full", "lora", "hd-pissa", "pissa"}
    assert (tmp_path / "capacity_calibration.md").is_file()
    out = study_capacity.main(common + ["--lrs", "1", "--max-lrs", "1", "--recall-points", "2"])
    a = out["analysis"]
    assert out["args"]["num_facts"] == 8 and out["args"]["steps"] == 2
    for m in ("hd-pissa", "lora"):
        for r in a["per_method"][m]["runs"]:
            assert [s for s, _ in r["curve"]] == [0, 1, 2]
            assert r["export_agreement"] == 1.0 and r["export_loss_gap"] < 1e-3, r  # live model == its export
    assert set(a["k_sweep"]) == {"2", "8"}
    assert out["effective_rank"]["checkpoints"]["hd-pissa K=2"]["aggregate"]["max"] <= 2 * 2 * 8
    for name in ("capacity.md", "capacity_results.json", "capacity_curves.png", "capacity_k.png",
                 "capacity_forgetting.png", "capacity_spectra.png"):
        assert (tmp_path / name).is_file(), name


def test_help_runs_from_any_directory(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "study_capacity.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stderr[-2000:]
    for flag in ("--calibrate", "--estimate-only", "--reuse", "--k-sweep", "--selection-every"):
        assert flag in proc.stdout, flag
