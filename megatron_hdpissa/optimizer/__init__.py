"""Optimizers: one AdamW rule for all methods, HD-PiSSA's per-rank step and merge, the baselines' AdamW."""
