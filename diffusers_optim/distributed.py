"""What several processes must agree on: start-up checks decided once, and when to stop.

Start-up: checks that touch the file system or the network (create the output folder, probe that it is
writable, find the checkpoint, create the Hub repo) run on the main process only; the others wait for its
verdict, so every process raises the same error or gets the same answer. Run on every process, two processes
raced on one probe file and the loser called a good folder unwritable (issue 16).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from diffusers_optim.errors import UserError

T = TypeVar("T")


def decided_on_main(accelerator: Accelerator, check: Callable[[], T]) -> T:
    """Run `check` on the main process and return its result on every process, or raise its UserError on all.

    The main process prints the error; on the others it is raised `quiet`, so the user reads it once.
    Any other exception on the main process still reaches the others (as a UserError naming it), so no
    process is left waiting for a verdict that never comes.
    """
    verdict: list[Any] = [None, None]  # [result, error message]
    if accelerator.is_main_process:
        try:
            verdict[0] = check()
        except UserError as err:
            verdict[1] = str(err)
        except BaseException as err:
            if accelerator.num_processes > 1:
                broadcast_object_list([None, f"the main process failed: {type(err).__name__}: {err}"])
            raise
    if accelerator.num_processes > 1:
        broadcast_object_list(verdict)
    if verdict[1] is not None:
        error = UserError(verdict[1])
        error.quiet = not accelerator.is_main_process
        raise error
    return verdict[0]
