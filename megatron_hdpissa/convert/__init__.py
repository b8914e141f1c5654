"""Hugging Face <-> megatron-core conversion, resharding and merged export."""
