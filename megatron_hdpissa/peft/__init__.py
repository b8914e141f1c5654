"""Parameter-efficient fine-tuning methods on megatron-core parallel linears: HD-PiSSA, LoRA, PiSSA."""
