"""Learning curves of several runs side by side (training loss and held-out loss vs iteration)
from the trainer's --log-json files, as one PNG.

    python tools/plot_curves.py hd-pissa=runs/hd/log.jsonl lora=runs/lora/log.jsonl --out curves.png
"""
from __future__ import annotations

import argparse
import os
import sys

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", metavar="NAME=LOG_JSON", help="a bare path is named after its file")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--smooth", type=int, default=1, help="moving average over this many iterations")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    from megatron_hdpissa.analysis.plotting import plot_learning_curves, read_log_json

    runs = {}
    try:
        for item in args.logs:
            name, sep, path = item.partition("=")
            if not sep:
                name, path = os.path.splitext(os.path.basename(item))[0], item
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such --log-json file")
            runs[name] = read_log_json(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {plot_learning_curves(runs, args.out, args.title, args.smooth)}")
    return 0

