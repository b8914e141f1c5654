"""Convert a Hugging Face LLaMA / Mistral / Qwen2 / Qwen3 folder into a Megatron checkpoint:
`--ckpt-format torch_dist` (default, as Megatron-LM: megatron-core dist_checkpointing, loadable at
any TP / PP layout) or `torch` (the legacy mp_rank_TT[_PPP] shards of one layout, streamed)."""
from __future__ import annotations

import argparse
import sys

from megatron_hdpissa.checkpoint.dist import CKPT_FORMATS, TORCH_DIST
from megatron_hdpissa.convert.hf_megatron import DTYPE_NAMES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hf-dir", required=True, help="HF model folder (config.json + *.safetensors)")
    p.add_argument("--save", "--megatron-dir", dest="save", required=True,
                   help="output checkpoint folder (DIR/latest_checkpointed_iteration.txt, DIR/iter_0000000/)")
    p.add_argument("--ckpt-format", choices=CKPT_FORMATS, default=TORCH_DIST,
                   help="torch_dist: one checkpoint for every TP / PP layout (whole model in memory "
                        "while converting); torch: legacy mp_rank_TT[_PPP]/model_optim_rng.pt shards "
                        "of the layout below, streamed one shard at a time")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP shards to write (torch); checked against the model only (torch_dist)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages to write, must divide the number of layers (torch); checked "
                        "only (torch_dist)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                   help="cast weights (default: keep the HF dtype)")
    p.add_argument("--iteration", type=int, default=0, help="iteration number to record")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    try:
        out = convert_hf_to_megatron(
            args.hf_dir, args.save, args.tensor_model_parallel_size,
            pp_size=args.pipeline_model_parallel_size, dtype=DTYPE_NAMES[args.dtype] if args.dtype else None,
            iteration=args.iteration, force=args.force, progress=not args.no_progress,
            ckpt_format=args.ckpt_format,
        )
    except (OSError, ValueError) as e:  # a missing or unwritable folder, a full disk, bad input: one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.ckpt_format == "torch_dist":
        print(f"wrote {out} (--ckpt-format torch_dist: loads at any tensor / pipeline parallel size)")
    else:
        print(f"wrote {out} (--ckpt-format torch --tensor-model-parallel-size "
              f"{args.tensor_model_parallel_size} --pipeline-model-parallel-size "
              f"{args.pipeline_model_parallel_size})")
    return 0

