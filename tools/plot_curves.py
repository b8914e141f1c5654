#!/usr/bin/env python
"""`hdpissa-plot-curves` from a source checkout. The tool is megatron_hdpissa/cli/plot_curves.py;
`pip install .` installs it as the `hdpissa-plot-curves` command, with the same flags."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_hdpissa.cli.plot_curves import main  # noqa: E402 (after the path insert)

if __name__ == "__main__":
    sys.exit(main())
