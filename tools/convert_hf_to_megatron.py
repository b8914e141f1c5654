#!/usr/bin/env python
"""Convert a Hugging Face LLaMA / Mistral / Qwen2 folder into a legacy Megatron checkpoint."""
from __future__ import annotations

import argparse
import sys

DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # conversion.DTYPE_NAMES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hf-dir", required=True, help="HF model folder (config.json + *.safetensors)")
    p.add_argument("--save", "--megatron-dir", dest="save", required=True,
                   help="output checkpoint folder (DIR/iter_0000000/mp_rank_TT[_PPP]/model_optim_rng.pt)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP shards to write")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages to write (must divide the number of layers)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast weights (default: keep the HF dtype)")
    p.add_argument("--iteration", type=int, default=0, help="iteration number to record")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_hdpissa.conversion import DTYPE_NAMES, convert_hf_to_megatron

    try:
        out = convert_hf_to_megatron(
            args.hf_dir, args.save, args.tensor_model_parallel_size,
            pp_size=args.pipeline_model_parallel_size, dtype=DTYPE_NAMES[args.dtype] if args.dtype else None,
            iteration=args.iteration, force=args.force, progress=not args.no_progress,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (--tensor-model-parallel-size {args.tensor_model_parallel_size} "
          f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
