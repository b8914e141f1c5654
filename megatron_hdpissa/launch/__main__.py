"""`python -m megatron_hdpissa.launch`: see megatron_hdpissa.launch.launcher."""
import sys

from megatron_hdpissa.launch.launcher import main

if __name__ == "__main__":
    sys.exit(main())
