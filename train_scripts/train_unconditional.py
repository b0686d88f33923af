#!/usr/bin/env python
"""Train a diffusers UNet2DModel with any registered optimizer.

    accelerate launch train_scripts/train_unconditional.py --optimizer lion --learning_rate 3e-5 --output_dir out

Flags follow diffusers' examples/unconditional_image_generation/train_unconditional.py; `--help` lists them all.
"""

import sys

from diffusers_optim.cli import run_main
from diffusers_optim.trainer import main

if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
