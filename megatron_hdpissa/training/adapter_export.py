"""`--export-hf-adapter DIR`: the trained model as an HF PEFT adapter for the original base, computed
by rank 0 from the run's final checkpoint (`--save`, or a temporary one written for it)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from megatron_hdpissa.checkpoint.atomic import barrier
from megatron_hdpissa.distributed.collectives import broadcast_object
from megatron_hdpissa.peft.common import ConfigError
from megatron_hdpissa.training.arguments import ADAPTER_FLAGS


def export_trained_adapter(args, rank0: bool, save: Callable[[Path], object], log) -> None:
    """Collective. With `--save` the final checkpoint there is read (`main` saved it just
    before); else `save(dir)` writes one into a temporary folder next to the adapter folder,
    removed afterwards. Rank 0 writes the adapter; its error, if any, is raised on every rank."""
    from megatron_hdpissa.convert.peft_adapter import export_hf_adapter

    out = Path(args.export_hf_adapter).absolute()
    tmp = None
    if not args.save:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(broadcast_object(tempfile.mkdtemp(prefix=f".{out.name}.checkpoint-", dir=out.parent)
                                    if rank0 else None))
        save(tmp)
    error = None
    if rank0:
        try:
            export_hf_adapter(args.save or tmp, out, base=args.pretrained_checkpoint, rank=args.export_adapter_rank,
                              force=True, log=log)
        except ConfigError as e:
            error = str(e.renamed(ADAPTER_FLAGS))
        except (OSError, ValueError) as e:
            error = str(e)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    error = broadcast_object(error)
    barrier()
    if error:
        raise ValueError(f"--export-hf-adapter {out}: {error}")
