"""Plug-ins for other training frameworks (Megatron-LM)."""
