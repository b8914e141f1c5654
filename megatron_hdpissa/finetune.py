"""`python -m megatron_hdpissa.finetune`: the fine-tuning trainer (megatron_hdpissa.training.finetune)."""
from megatron_hdpissa.training.finetune import cli

if __name__ == "__main__":
    cli()
