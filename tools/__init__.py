"""Command-line tools (conversion, effective rank, plots, result comparison) and their shared figures."""
