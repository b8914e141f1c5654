"""Analysis of fine-tuning updates: effective rank of W_T - W_0."""
