"""Checkpoints: atomic folders, the legacy and torch_dist layouts, safe loading, trainer state."""
