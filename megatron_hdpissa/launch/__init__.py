"""Launching: SLURM / torchrun environments to ranks, and the multi-node self-test."""
