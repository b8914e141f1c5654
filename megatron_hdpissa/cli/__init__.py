"""Command-line tools (installed as `hdpissa-*` commands; `tools/*.py` runs them from a source checkout)."""
