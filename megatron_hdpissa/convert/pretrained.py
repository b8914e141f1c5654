"""What `--pretrained-checkpoint` names, resolved: a converted checkpoint of ours, a Megatron-LM / Megatron-Bridge checkpoint, or a Hugging Face folder.

`resolve_pretrained(DIR)` tells them apart from the folder:

- `model_config.json` next to the tracker: a checkpoint this package wrote (the converters, the
  trainer); loaded by `convert/load.py` (torch_dist at any TP / PP, legacy at its own TP);
- `latest_checkpointed_iteration.txt` without it: Megatron-LM / Megatron-Bridge; the model from
  their `args` (`convert/megatron_lm_checkpoint.py`), the weights resliced for any TP / PP;
- `config.json` and `*.safetensors`: a Hugging Face folder, converted in memory for this rank's
  (TP, PP) position straight from the safetensors files (the HF -> Megatron converter's slicing;
  no intermediate folder), as `tools/convert_hf_to_megatron.py` would have written it.

The result carries what a run needs besides the weights (the `ModelConfig`, the tokenizer folder)
and `write_files(dst)` puts them next to a run's checkpoints, so those are ordinary converted
checkpoints whatever the base was.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from megatron_hdpissa.checkpoint.atomic import TOKENIZER_DIR, TRACKER_FILE
from megatron_hdpissa.convert.hf_mapping import IGNORED_HF_KEYS, expected_hf_keys, megatron_shard_from_hf
from megatron_hdpissa.convert.hf_sources import SafetensorsFolder, copy_non_weight_files
from megatron_hdpissa.convert.load import load_megatron_checkpoint, load_megatron_state_dict
from megatron_hdpissa.convert.moe_load import expert_ranks
from megatron_hdpissa.convert.megatron_lm_checkpoint import (megatron_lm_model_config, megatron_lm_state_dict,
                                                             megatron_lm_tokenizer)
from megatron_hdpissa.models.config import MODEL_CONFIG_FILE, ModelConfig
from megatron_hdpissa.models.pipeline_stages import pipeline_rank_and_size

CONVERTED, MEGATRON_LM, HF = "converted", "Megatron-LM", "Hugging Face"
HF_CONFIG_FILE = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class PretrainedBase:
    """A base model folder of one of the three kinds, with its model description and tokenizer
    (None: none found; the run must name one with --tokenizer-model)."""

    directory: Path
    kind: str
    model_config: ModelConfig
    tokenizer_dir: Path | None

    def state_dict(self, tp_rank: int, tp_size: int, pp_rank: int = 0, pp_size: int = 1) -> dict:
        """The GPTModel state dict of (TP rank, pipeline stage) at this layout (local layer numbers)."""
        if self.kind == CONVERTED:
            return load_megatron_state_dict(self.directory, tp_rank, tp_size, pp_rank=pp_rank, pp_size=pp_size)
        if self.kind == MEGATRON_LM:
            return megatron_lm_state_dict(self.directory, tp_rank, tp_size, pp_rank, pp_size, self.model_config)
        src = hf_source(self.directory, self.model_config)
        ep_size, ep_rank, etp_size, etp_rank = expert_ranks(tp_rank, tp_size)  # MoE: this rank's experts
        return megatron_shard_from_hf(src, self.model_config, tp_size, tp_rank, pp_size=pp_size, pp_rank=pp_rank,
                                      ep_size=ep_size, ep_rank=ep_rank, etp_size=etp_size, etp_rank=etp_rank)

    def load_into(self, model) -> None:
        """Load this rank's (TP shard, pipeline stage) into a GPTModel built for megatron-core's
        current layout (strict)."""
        if self.kind == CONVERTED:  # torch_dist through megatron-core's own resharding load
            load_megatron_checkpoint(model, self.directory)
            return
        from megatron.core import parallel_state as ps

        initialised = ps.model_parallel_is_initialized()
        tp_rank = ps.get_tensor_model_parallel_rank() if initialised else 0
        tp_size = ps.get_tensor_model_parallel_world_size() if initialised else 1
        pp_rank, pp_size = pipeline_rank_and_size(None, None)
        state = self.state_dict(tp_rank, tp_size, pp_rank, pp_size)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{self.directory} ({self.kind}) does not fit the model: {e}") from e

    def write_files(self, dst) -> None:
        """`model_config.json` and `tokenizer/` of this base into `dst` (each only if missing there)."""
        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        if not (dst / MODEL_CONFIG_FILE).exists():
            if self.kind == CONVERTED:
                shutil.copy2(self.directory / MODEL_CONFIG_FILE, dst / MODEL_CONFIG_FILE)
            else:
                self.model_config.save(dst)
        if self.tokenizer_dir is not None and self.tokenizer_dir.is_dir() and not (dst / TOKENIZER_DIR).exists():
            if self.kind == CONVERTED:
                shutil.copytree(self.tokenizer_dir, dst / TOKENIZER_DIR)
            else:  # an HF folder / a tokenizer folder: its files but the weights and the model config
                copy_non_weight_files(self.tokenizer_dir, dst / TOKENIZER_DIR)


def hf_source(hf_dir: Path, config: ModelConfig) -> SafetensorsFolder:
    """The HF folder's safetensors, refusing tensors the conversion does not know."""
    src = SafetensorsFolder(hf_dir)
    unexpected = sorted(k for k in src.keys() - expected_hf_keys(config, src.keys()) if not IGNORED_HF_KEYS.match(k))
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # a stored copy of the tied embedding
    if unexpected:
        raise ValueError(f"{hf_dir}: tensors the {config.model_type} conversion does not know: {unexpected[:5]}"
                         + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    return src


def resolve_pretrained(directory) -> PretrainedBase:
    """Tell which kind of base `directory` is and read its model description (see the module
    docstring); one error naming the folder when it is none of them."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} does not exist")
    if (d / MODEL_CONFIG_FILE).is_file():
        return PretrainedBase(d, CONVERTED, ModelConfig.load(d), d / TOKENIZER_DIR)
    if (d / TRACKER_FILE).is_file():
        return PretrainedBase(d, MEGATRON_LM, megatron_lm_model_config(d), megatron_lm_tokenizer(d))
    if (d / HF_CONFIG_FILE).is_file():
        config = ModelConfig.from_hf(d)
        hf_source(d, config)  # the weights are there and known, before any process group forms
        tokenizer = d if any((d / f).is_file() for f in _TOKENIZER_FILES) else None
        return PretrainedBase(d, HF, config, tokenizer)
    raise ValueError(f"{d} is neither a converted checkpoint ({MODEL_CONFIG_FILE}), a Megatron-LM / "
                     f"Megatron-Bridge checkpoint ({TRACKER_FILE}) nor a Hugging Face folder "
                     f"({HF_CONFIG_FILE} and *.safetensors)")
