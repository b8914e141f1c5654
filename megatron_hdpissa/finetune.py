"""`python -m megatron_hdpissa.finetune`: the fine-tuning trainer (megatron_hdpissa.training.finetune)."""
from megatron_hdpissa.training.quiet import quiet_megatron_notices

quiet_megatron_notices()  # before the first megatron-core import: its Apex / TE notices become one line
from megatron_hdpissa.training.finetune import cli  # noqa: E402

if __name__ == "__main__":
    cli()
