"""The study's runs: its state (`Study`), the material, one fine-tune (trained or reused), its evaluations."""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import study_budget
from benchmarks import study_metrics as sm

ROOT = Path(__file__).resolve().parents[1]


class Study:
    """Paths, material and bookkeeping shared by the stages; `log` prints one progress line."""

    def __init__(self, args, estimate: dict | None = None, folder: str = "study"):
        from megatron_hdpissa.data.material import cache_dir

        self.args = args
        self.out = Path(args.out) if args.out else cache_dir() / folder
        self.cache = cache_dir()
        self.t0 = time.time()
        self.estimate = estimate if estimate is not None else study_budget.estimate(args)
        self.runs_done, self.runs_reused = 0, 0
        # sweeps (half the methods widened once), second seeds, facts
        self.planned_runs = round(len(args.methods) * (args.lrs + 0.5 + 2))
        self.stage_s: dict[str, float] = {}  # wall seconds per phase of main()
        self.work_s = {"training": 0.0, "evaluation": 0.0}  # the same time split by kind of work

    def log(self, msg: str) -> None:
        used = (time.time() - self.t0) / 60
        print(f"[{used:5.1f} / ~{self.estimate['total_s'] / 60:.0f} min] {msg}", flush=True)

    def phase(self, name: str, start: float) -> float:
        now = time.time()
        self.stage_s[name] = now - start
        return now

    def work(self, kind: str, start: float) -> None:
        self.work_s[kind] = self.work_s.get(kind, 0.0) + time.time() - start


def prepare(st: Study) -> None:
    """The HF model and its Megatron conversion, the GSM8K parts, the facts, the Botchan windows."""
    from benchmarks import study_data
    from megatron_hdpissa.checkpoint.atomic import TRACKER_FILE
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
    from megatron_hdpissa.data.sft import SFTDataset, SFTExample, write_jsonl
    from megatron_hdpissa.data.material import gsm8k_test_path, smollm2_hf_dir
    from megatron_hdpissa.data.tokenizer import HuggingFaceTokenizer

    a = st.args
    logging.getLogger("megatron_hdpissa.data.sft").setLevel(logging.ERROR)  # truncation counts are recorded
    st.hf = smollm2_hf_dir(num_layers=a.layers)
    st.base = st.out / f"base-{st.hf.name}"
    if not (st.base / TRACKER_FILE).is_file():
        convert_hf_to_megatron(st.hf, st.base, tp_size=1, force=True, progress=False)
    mat = st.out / "material"
    parts = study_data.gsm8k_splits(str(gsm8k_test_path()), a.num_test, a.num_val)
    st.num_train = len(parts["train"])
    for name, records in parts.items():
        write_jsonl(records, str(mat / f"{name}.jsonl"))
    facts = study_data.make_facts(a.num_facts, a.facts_seed)
    write_jsonl([{"question": f["question"], "answer": f["answer"]} for f in facts], str(mat / "facts.jsonl"))
    st.files = {name: mat / f"{name}.jsonl" for name in ("train", "val", "test", "facts")}
    st.tok = tok = HuggingFaceTokenizer(str(st.hf))

    def sft(records, template, length):
        return SFTDataset([SFTExample(r["question"], r["answer"]) for r in records], tok, length, template)

    st.val, st.test = sft(parts["val"], a.template, a.seq_length), sft(parts["test"], a.template, a.seq_length)
    st.facts = sft(facts, "{prompt}", 32)
    st.em_refs = [r["answer"] for r in parts["test"][:a.num_em]]
    full = sft(parts["test"][:a.num_em], a.template, 4096)  # untruncated, for the prompts
    st.em_prompts = [e.ids[:e.num_prompt] for e in full.examples]
    text = study_data.gutenberg_body(study_data.botchan_path(st.cache).read_text(encoding="utf-8-sig"))
    st.botchan = study_data.text_chunks(tok.encode(text), a.botchan_length, a.botchan_windows)
    st.facts_tokens = sum(len(e.ids) - 1 for e in st.facts.examples)


def evaluate(st: Study, hf_dir: Path, cache: Path, keys: tuple[str, ...], label: str) -> dict:
    """The evaluations `keys` of one HF folder, cached in `cache` (JSON) key by key."""
    import torch

    from benchmarks import study_eval

    done = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [k for k in keys if k not in done]
    if not missing:
        return done
    if not (Path(hf_dir) / "config.json").is_file():
        raise FileNotFoundError(f"[{label}] evaluations {missing} need the export {hf_dir}, which is gone; "
                                "rerun without --reuse for this run")
    torch.set_num_threads(st.args.threads or os.cpu_count() or 1)
    t = time.time()
    model, a = study_eval.load_model(hf_dir), st.args
    for key in missing:
        t_key = time.time()
        if key in ("val", "test"):
            sums, counts = study_eval.sft_losses(model, st.val if key == "val" else st.test, a.eval_batch)
            done[key] = {"mean": sm.token_mean(sums, counts), "sums": sums, "counts": counts}
        elif key == "botchan":
            sums, counts = study_eval.text_losses(model, st.botchan, a.eval_batch)
            done[key] = {"mean": sm.token_mean(sums, counts), "sums": sums, "counts": counts}
        elif key == "facts":
            flags = study_eval.recall_flags(model, st.facts)
            done[key] = {**sm.proportion(flags), "flags": flags}
        elif key == "facts_loss":  # per fact: answer-token loss sum and count
            sums, counts = study_eval.sft_losses(model, st.facts, a.eval_batch)
            done[key] = {"mean": sm.token_mean(sums, counts), "sums": sums, "counts": counts}
        elif key == "em":
            ids = study_eval.greedy_generate(model, st.em_prompts, a.max_new_tokens, st.tok.eos_id,
                                             st.tok.pad_id, a.gen_batch)
            texts = [st.tok.decode(x) for x in ids]
            scored = sm.score_answers(texts, st.em_refs)
            done[key] = {name: {**sm.proportion(flags), "flags": flags} for name, flags in scored.items()}
            done[key]["generated"] = texts
            done[key]["hit_cap"] = sum(len(x) >= a.max_new_tokens for x in ids)
        done.setdefault("seconds", {})[key] = time.time() - t_key
        cache.write_text(json.dumps(done) + "\n")
    st.work("evaluation", t)
    return done


def run_name(task: str, method: str, lr: float, seed: int) -> str:
    return f"{task}-{method}-lr{lr:g}-s{seed}"


def finetune_command(st: Study, task: str, method: str, lr: float, seed: int, run: Path, curves: bool) -> list[str]:
    """The trainer's command line (port left out; `launch` adds it)."""
    a = st.args
    if task == "gsm8k":
        data = ["--data-path", str(st.files["train"]), "--prompt-template", a.template,
                "--seq-length", str(a.seq_length), "--micro-batch-size", "1",
                "--global-batch-size", str(a.global_batch), "--train-iters", str(a.steps),
                "--lr-warmup-iters", str(min(a.warmup, max(0, a.steps - 1)))]
        if curves:
            data += ["--valid-data-path", str(st.files["val"]), "--eval-interval", str(max(1, a.steps // 2)),
                     "--eval-iters", str(max(1, a.curve_problems // a.nproc))]  # the first validation problems
    else:
        data = ["--data-path", str(st.files["facts"]), "--prompt-template", "{prompt}", "--seq-length", "32",
                "--micro-batch-size", str(a.facts_micro_batch), "--global-batch-size", str(a.facts_global_batch),
                "--train-iters", str(a.facts_steps), "--lr-warmup-iters", str(min(a.warmup, a.facts_steps - 1))]
    cmd = ["--pretrained-checkpoint", str(st.base), *data, "--peft", method, "--hd-pissa-rank", str(a.rank),
           "--lr", f"{lr:g}", "--lr-decay-style", "cosine", "--seed", str(seed), "--log-interval", "1",
           "--log-json", str(run / "log.jsonl"), "--export-hf", str(run / "hf"), "--no-progress"]
    if a.alpha is not None:
        cmd += ["--hd-pissa-alpha", f"{a.alpha:g}"]
    if method == "hd-pissa":
        cmd += ["--hd-pissa-virtual-ranks", str(a.k // a.nproc)]
    return cmd


def launch(st: Study, cmd: list[str], entry: str = "megatron_hdpissa.finetune", nproc: int | None = None) -> list[str]:
    from megatron_hdpissa.distributed.groups import free_port

    head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc or st.args.nproc),
            "--master-port", str(free_port()), "-m", entry]
    return head + cmd


_TRAINABLE = re.compile(r"([0-9.]+)M trainable parameters per rank")


def fine_tune(st: Study, task: str, method: str, lr: float, seed: int, keys: tuple[str, ...],
              curves: bool = False, command=None, name: str | None = None, entry: str = "megatron_hdpissa.finetune",
              nproc: int | None = None) -> dict:
    """Train (or reuse) one run, then evaluate its export on `keys`; returns its record. `command`
    (a function of the run folder) replaces the trainer command of `task`; `entry` is the module
    torchrun starts, `nproc` its process count (default --nproc)."""
    from megatron_hdpissa.analysis.plotting import read_log_json

    name = name or run_name(task, method, lr, seed)
    run = st.out / "runs" / name
    cmd = command(run) if command else finetune_command(st, task, method, lr, seed, run, curves)
    done_file = run / "done.json"
    rec = json.loads(done_file.read_text()) if st.args.reuse and done_file.is_file() else None
    if rec is not None and rec["args"] != cmd:
        st.log(f"[{name}] the finished run was made with other settings: training it again")
        rec = None
    reused = rec is not None
    st.runs_reused += reused
    if rec is None:
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        full = launch(st, cmd, entry, nproc)
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // (nproc or st.args.nproc))),
                   PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t = time.time()
        with open(run / "stdout.log", "w") as f:
            proc = subprocess.run(full, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        wall = time.time() - t
        st.work("training", t)
        text = (run / "stdout.log").read_text()
        diverged = "non-finite loss" in text
        if proc.returncode and not diverged:
            raise RuntimeError(f"[{name}] the fine-tune failed (exit {proc.returncode}); see {run / 'stdout.log'}:\n"
                               + "\n".join(text.splitlines()[-20:]))
        curves_ = read_log_json(run / "log.jsonl") if (run / "log.jsonl").is_file() else {"train": [], "valid": []}
        trainable = _TRAINABLE.search(text)
        rec = {"name": name, "task": task, "method": method, "lr": lr, "seed": seed, "args": cmd,
               "command": shlex.join(full), "wall_s": wall, "diverged": diverged,
               "trainable_M": float(trainable.group(1)) if trainable else None,
               "train": curves_["train"], "valid": curves_["valid"], "hf": str(run / "hf")}
        done_file.write_text(json.dumps(rec, indent=1) + "\n")
    st.runs_done += 1
    if not rec["diverged"]:
        rec["eval"] = evaluate(st, run / "hf", run / "eval.json", keys, name)
    shown = {k: rec["eval"][k].get("mean", rec["eval"][k].get("rate")) for k in keys} if not rec["diverged"] else {}
    st.log(f"run {st.runs_done} of about {st.planned_runs}: {name} {'DIVERGED ' if rec['diverged'] else ''}"
           f"{'reused (trained' if reused else 'trained'} in {rec['wall_s']:.0f}s{')' if reused else ''}; "
           + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return rec


def drop_export(st: Study, rec: dict) -> None:
    if not st.args.keep_exports:
        shutil.rmtree(rec["hf"], ignore_errors=True)


def add_model_args(p, methods, extra=()):
    """Both studies' "model and methods" flags (`extra`: (flag, kwargs) pairs added before
    --threads); returns the argument group."""
    m = p.add_argument_group("model and methods")
    m.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (dry runs)")
    m.add_argument("--methods", default=",".join(methods), help=f"comma list from {methods}")
    m.add_argument("--rank", type=int, default=8, help="per-rank adapter rank r (every method)")
    m.add_argument("--alpha", type=float, default=None, help="s = alpha / r (default alpha = r)")
    m.add_argument("--k", type=int, default=8, help="K: HD-PiSSA slices = data-parallel ranks emulated")
    m.add_argument("--nproc", type=int, default=2, help="processes per fine-tune; divides K")
    for flag, kwargs in extra:
        m.add_argument(flag, **kwargs)
    m.add_argument("--threads", type=int, default=None, help="threads for evaluation (default: all cores)")
    return m


def check_sweep_args(p, a, methods, lr_centres: dict) -> None:
    """The flags every study shares: --nproc / --k, --seeds (the sweep's and the repeat's),
    --lr-centres (NAME=LR items over `lr_centres`), --lrs / --max-lrs; errors through `p.error`."""
    if a.k % a.nproc:
        p.error(f"--nproc {a.nproc} must divide --k {a.k}")
    a.seeds = [int(x) for x in a.seeds.split(",")]
    if len(a.seeds) != 2:
        p.error("--seeds takes two seeds: the sweep's and the repeat's")
    centres = dict(lr_centres)
    for item in a.lr_centres.split(","):
        name, _, value = item.partition("=")
        if name not in methods or not value:
            p.error(f"--lr-centres: bad item {item!r}")
        centres[name] = float(value)
    a.lr_centres = centres
    if not 1 <= a.lrs <= a.max_lrs:
        p.error("need 1 <= --lrs <= --max-lrs")


def sweep_lrs(st: Study, method: str, run, score, label: str) -> dict:
    """The learning-rate sweep every study runs: `run(lr)` on the grid around the method's centre,
    widened while the best `score(record)` (lower is better, None: diverged) is at an edge; the
    runs other than the best lose their exports."""
    a = st.args
    runs, scores = {}, {}
    todo = sm.lr_grid(a.lr_centres[method], a.lrs)
    while todo:
        for lr in todo:
            runs[lr] = rec = run(lr)
            scores[lr] = score(rec)
        nxt = sm.next_lr(scores, a.max_lrs)
        if nxt is not None:
            st.log(f"[{method}] best LR at the edge of {sorted(scores)}: widening to {nxt:g}")
        todo = [nxt] if nxt is not None else []
    best, at_edge = sm.best_lr(scores)
    if scores[best] is None:
        raise RuntimeError(f"[{method}] every learning rate of {sorted(scores)} diverged; lower --lr-centres")
    for lr, rec in runs.items():
        if lr != best:
            drop_export(st, rec)
    st.log(f"[{method}] best LR {best:g} ({label} {scores[best]:.4f})" + (" AT AN EDGE" if at_edge else ""))
    return {"scores": scores, "best": best, "at_edge": at_edge, "flags": sm.sweep_flags(scores), "runs": runs}
