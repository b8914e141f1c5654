"""Convert a Megatron checkpoint back into a Hugging Face folder: `torch_dist` (megatron-core
dist_checkpointing) or legacy `torch` (TP shards, pipeline stages), detected from the folder."""
from __future__ import annotations

import argparse
import sys

from megatron_hdpissa.convert.hf_megatron import DTYPE_NAMES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--megatron-dir", "--load", dest="megatron_dir", required=True,
                   help="checkpoint folder holding latest_checkpointed_iteration.txt")
    p.add_argument("--save", "--hf-dir", dest="save", default=None, help="output HF folder (the merged model)")
    p.add_argument("--export-hf-adapter", default=None, metavar="DIR",
                   help="write the training checkpoint's HF PEFT LoRA adapter for the original base here")
    p.add_argument("--export-adapter-rank", type=int, default=None, metavar="R",
                   help="HD-PiSSA: the adapter's rank R (default 2 K r)")
    p.add_argument("--pretrained-checkpoint", default=None,
                   help="the original base W_0 of --export-hf-adapter (Megatron or HF folder; default: the "
                        "run's own --pretrained-checkpoint, from the checkpoint's meta)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None,
                   help="expected TP size of a legacy checkpoint (default: whatever it holds)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=None,
                   help="expected pipeline size of a legacy checkpoint (default: whatever it holds)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                   help="cast weights (default: keep the checkpoint dtype)")
    p.add_argument("--max-shard-size-gb", type=float, default=4.0,
                   help="split model.safetensors into files of at most this size")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.save and not args.export_hf_adapter:
        p.error("give --save (the merged HF model) and / or --export-hf-adapter (a PEFT adapter)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_hdpissa.convert.hf_megatron import convert_megatron_to_hf
    from megatron_hdpissa.convert.peft_adapter import export_hf_adapter
    from megatron_hdpissa.peft.common import ConfigError

    try:
        if args.save:
            out = convert_megatron_to_hf(
                args.megatron_dir, args.save,
                dtype=DTYPE_NAMES[args.dtype] if args.dtype else None,
                force=args.force, progress=not args.no_progress,
                max_shard_bytes=int(args.max_shard_size_gb * 1024**3),
                tp_size=args.tensor_model_parallel_size, pp_size=args.pipeline_model_parallel_size,
            )
            print(f"wrote {out}")
        if args.export_hf_adapter:
            export_hf_adapter(args.megatron_dir, args.export_hf_adapter, base=args.pretrained_checkpoint,
                              rank=args.export_adapter_rank, force=args.force)
    except ConfigError as e:  # the library's parameter named as this tool's flag
        from megatron_hdpissa.training.arguments import ADAPTER_FLAGS

        print(f"error: {e.renamed(ADAPTER_FLAGS)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # a missing or unwritable folder, a full disk, bad input: one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

