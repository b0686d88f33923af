"""diffusers-optim: how does the optimizer change diffusion training?"""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes (imported by diffusers when installed) warns at import about 4-bit CPU inference kernels
# that this project never uses; keep that noise out of every training log.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
