"""Effective rank of fine-tuning updates: singular spectra of W_T - W_0 per projection, several
fine-tuned checkpoints against one base, JSON summary and a log-scale PNG of the spectra.

    python tools/effective_rank.py --base BASE \
        --finetuned hd-pissa=runs/hd/hf lora=runs/lora/ckpt pissa=runs/pissa/hf \
        --json rank.json --plot spectra.png [--threshold 1e-3] [--reference lora]

BASE and each fine-tuned path may be a Hugging Face folder or a Megatron checkpoint folder of
any tensor / pipeline parallel size (auto-detected). The effective rank is the number of
singular values above THRESHOLD x the largest one (default 1e-3). A Megatron `--save` folder of
a --peft lora / pissa run holds W_res, not the update: its adapter factors are merged here
(s B A added; --no-merge-adapters disables that), or pass the run's merged `--export-hf` folder
instead. HD-PiSSA and full fine-tuning
checkpoints hold the updated weights already.
"""
from __future__ import annotations

import argparse
import os
import sys

def parse_args(argv=None) -> argparse.Namespace:
    from megatron_hdpissa.analysis.effective_rank import DEFAULT_THRESHOLD, PROJECTIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="the checkpoint fine-tuning started from")
    p.add_argument("--finetuned", nargs="+", required=True, metavar="NAME=PATH",
                   help="fine-tuned checkpoints to compare (a bare PATH is named after its folder)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="count singular values above this fraction of the largest")
    p.add_argument("--projections", default=",".join(PROJECTIONS), help="comma list of HF projection names")
    p.add_argument("--layers", default=None, help="comma list of layer indices (default: all)")
    p.add_argument("--reference", default=None,
                   help="report ratios of effective rank to this --finetuned name (default: 'lora' if given)")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--plot", default=None, help="write the spectra PNG here")
    p.add_argument("--title", default="", help="plot title")
    p.add_argument("--no-merge-adapters", action="store_true",
                   help="read a LoRA/PiSSA training checkpoint's W_res as is (not the update)")
    return p.parse_args(argv)


def _named(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(item)), item
        if not name or not path:
            raise ValueError(f"--finetuned {item!r}: expected NAME=PATH")
        if name in out:
            raise ValueError(f"--finetuned: the name {name!r} is given twice")
        out[name] = path
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_hdpissa.analysis.effective_rank import analyse, format_table, write_json
    from megatron_hdpissa.analysis.plotting import plot_spectra

    try:
        finetuned = _named(args.finetuned)
        projections = [p for p in args.projections.split(",") if p]
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
        reference = args.reference or ("lora" if "lora" in finetuned else None)
        summary, results = analyse(
            args.base, finetuned, args.threshold, projections, layers, reference,
            merge_adapters=not args.no_merge_adapters, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"effective rank = number of {summary['definition']}")
    print(format_table(summary))
    if args.json:
        print(f"wrote {write_json(summary, args.json)}")
    if args.plot:
        print(f"wrote {plot_spectra(results, args.threshold, args.plot, args.title)}")
    return 0

