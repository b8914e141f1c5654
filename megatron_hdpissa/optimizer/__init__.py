"""Optimizers: per-rank AdamW on the factors, the delta aggregation into W, masters, clipping."""
