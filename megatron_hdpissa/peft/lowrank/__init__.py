"""LoRA and PiSSA baselines: one adapter replicated over data-parallel ranks."""
