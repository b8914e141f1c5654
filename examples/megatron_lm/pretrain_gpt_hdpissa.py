"""Fine-tune a GPT with HD-PiSSA inside Megatron-LM's own training loop (`megatron.training.pretrain`).

Laid out like Megatron-LM's `pretrain_gpt.py` (model provider, batch, loss, forward step, dataset
provider), with the HD-PiSSA plug-in (`megatron_hdpissa.integrations.megatron_lm`) added in three
places: the flags (`--peft`, `--hd-pissa-*`), the model provider (wrapped: adapters attached, the
factors kept out of Megatron's DDP, decomposed at the first forward after the checkpoint loaded)
and the optimizer (`get_megatron_optimizer` answers with HD-PiSSA's optimizer for the factors and
Megatron's own optimizer for any other trainable parameter).

Run it from a Megatron-LM installation (megatron-core >= 0.17 wheels ship `megatron.training`),
on GPUs, with Megatron-LM's flags plus the HD-PiSSA ones, e.g. a smoke run on mock data:

    torchrun --nproc-per-node 2 examples/megatron_lm/pretrain_gpt_hdpissa.py \
        --transformer-impl local --bf16 --num-layers 2 --hidden-size 256 --num-attention-heads 4 \
        --ffn-hidden-size 1024 --seq-length 128 --max-position-embeddings 128 \
        --micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 1e-4 --weight-decay 0 \
        --mock-data --tokenizer-type NullTokenizer --vocab-size 4096 \
        --hd-pissa-rank 8 [--use-distributed-optimizer] [--load ckpt --finetune]

Up to Megatron-LM 0.17 `pretrain()` parses the flags (`extra_args_provider=`); from 0.18 the
script parses them first (`parse_and_validate_args(extra_args_provider=...)`) and hands
`pretrain()` a config container built without a model config, so that the model provider
builds the model. `main()` picks the route from the installed signatures.
"""
from __future__ import annotations

import inspect
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_hdpissa.integrations import megatron_lm as hd_pissa  # noqa: E402

BATCH_KEYS_INT = ("tokens", "labels", "position_ids")


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """A megatron-core GPTModel from Megatron-LM's flags, with megatron-core's local layers (the
    adapters wrap its ColumnParallelLinear / RowParallelLinear)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training import get_args, print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    print_rank_0("building GPT model ...")
    config = config or core_transformer_config_from_args(args)
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm,
                                    qk_layernorm=args.qk_layernorm, normalization=args.normalization)
    kwargs = dict(config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
                  max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
                  post_process=post_process, fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
                  parallel_output=True,
                  share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                  position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                  rotary_base=args.rotary_base)
    accepted = inspect.signature(GPTModel.__init__).parameters
    for name, value in (("vp_stage", vp_stage), ("pg_collection", pg_collection)):
        if name in accepted and value is not None:
            kwargs[name] = value
    return GPTModel(**kwargs)


def get_batch(data_iterator):
    """This micro-batch, broadcast from the tensor-parallel source rank (only it reads data)."""
    from megatron.core import mpu, tensor_parallel

    if mpu.get_context_parallel_world_size() > 1:
        raise ValueError("--context-parallel-size > 1 is not supported by this example")
    data = next(data_iterator) if data_iterator is not None else None
    if mpu.get_tensor_model_parallel_world_size() == 1:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return tuple(data[k].to(device, non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids"))
    ints = tensor_parallel.broadcast_data(list(BATCH_KEYS_INT), data, torch.int64)
    floats = tensor_parallel.broadcast_data(["loss_mask"], data, torch.float32)
    return ints["tokens"], ints["labels"], floats["loss_mask"], ints["position_ids"]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM's convention: (masked loss sum, token count, {"lm loss": [sum, count]})."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model):
    """One micro-batch: the GPT's per-token losses and the loss function that reduces them."""
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask, position_ids = get_batch(data_iterator)
    timers("batch-generator").stop()
    output_tensor = model(tokens, position_ids, None, labels=labels)  # causal mask from the layers
    return output_tensor, partial(loss_func, loss_mask)


def _tokenizer(args):
    try:  # megatron-core 0.19 on
        from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    except ImportError:
        from megatron.training import get_tokenizer

        return get_tokenizer()
    return build_tokenizer(args)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """GPT datasets from `--data-path` (or `--mock-data`), built on tensor-parallel rank 0."""
    from megatron.core import mpu
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, print_rank_0
    from megatron.training.utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, tokenizer=_tokenizer(args),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=False)
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    datasets = BlendedMegatronDatasetBuilder(
        MockGPTDataset if args.mock_data else GPTDataset, train_val_test_num_samples,
        lambda: mpu.get_tensor_model_parallel_rank() == 0, config).build()
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


train_valid_test_datasets_provider.is_distributed = True  # every rank calls it (Megatron-LM's convention)


def main(training=None, arguments=None, argument_utils=None, ModelType=None) -> None:
    """Parse, install the optimizer hook, run `pretrain`. The modules default to the installed
    Megatron-LM's (tests pass stand-ins)."""
    if training is None:
        from megatron.core.enums import ModelType
        from megatron.training import arguments, training
        try:
            from megatron.training import argument_utils
        except ImportError:  # up to 0.17
            argument_utils = None
    flags = hd_pissa.compose_args_providers(hd_pissa.extra_args_provider)
    provider = hd_pissa.wrap_model_provider(model_provider)
    defaults = {"tokenizer_type": "GPT2BPETokenizer"}
    hd_pissa.use_hd_pissa_optimizer(training)
    parse = getattr(arguments, "parse_and_validate_args", None)
    if hd_pissa.args_provider_api(training.pretrain, parse) == "pretrain":  # up to 0.17
        training.pretrain(train_valid_test_datasets_provider, provider, ModelType.encoder_or_decoder,
                          forward_step, extra_args_provider=flags, args_defaults=defaults)
        return
    args = parse(extra_args_provider=flags, args_defaults=defaults)
    container = argument_utils.pretrain_cfg_container_from_args(args)  # no model config: the provider builds it
    training.pretrain(container, train_valid_test_datasets_provider, model_type=ModelType.encoder_or_decoder,
                      forward_step_func=forward_step, model_provider=provider)


if __name__ == "__main__":
    main()
