"""Equal-budget optimizer comparison: `python train_scripts/compare_optimizers.py --optimizers adamw lion ...`."""

import sys

from diffusers_optim.cli import run_main
from diffusers_optim.compare import main

if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
