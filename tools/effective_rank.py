#!/usr/bin/env python
"""`hdpissa-effective-rank` from a source checkout. The tool is megatron_hdpissa/cli/effective_rank.py;
`pip install .` installs it as the `hdpissa-effective-rank` command, with the same flags."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_hdpissa.cli.effective_rank import main, parse_args  # noqa: E402 (after the path insert)

if __name__ == "__main__":
    sys.exit(main())
