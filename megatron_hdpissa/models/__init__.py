"""megatron-core GPTModel building from HF configs, norms, recompute, pipeline stages, CPU shims."""
