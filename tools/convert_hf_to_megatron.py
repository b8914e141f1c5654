#!/usr/bin/env python
"""`hdpissa-convert-hf-to-megatron` from a source checkout. The tool is megatron_hdpissa/cli/convert_hf_to_megatron.py;
`pip install .` installs it as the `hdpissa-convert-hf-to-megatron` command, with the same flags."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_hdpissa.cli.convert_hf_to_megatron import main, parse_args  # noqa: E402 (after the path insert)

if __name__ == "__main__":
    sys.exit(main())
