"""diffusers-optim: how does the optimizer change diffusion training?"""

__version__ = "0.1.0"
