"""What several processes must agree on: start-up checks decided once, and when to stop.

Start-up: checks that touch the file system or the network (create the output folder, probe that it is
writable, find the checkpoint, create the Hub repo) run on the main process only; the others wait for its
verdict, so every process raises the same error or gets the same answer. Run on every process, two processes
raced on one probe file and the loser called a good folder unwritable (issue 16).

Stop: a signal raised as an exception in the middle of a step left the other process waiting in the step's
gradient all-reduce (a deadlock until the launcher killed both), and could save weights of step N+1 labelled N.
Now a signal only sets a flag; at each step boundary the processes agree (one tiny all-reduce) and all stop
after the same step, save one checkpoint together and exit with the same status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

import torch
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


# Under a launcher one request reaches a worker twice. Torch elastic (`accelerate launch` of several processes,
# torchrun) forwards a signal sent to every process (Slurm's scancel, `kill` of the job) a moment after the worker
# got it directly. Accelerate's single-process launcher (1.16+) answers Ctrl-C, which its worker also gets from the
# terminal, with a SIGTERM to the worker's process tree. Signals this close together are one request; a later one
# is the user insisting.
REPEAT_WINDOW_S = 2.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# accelerate's single-process launcher SIGKILLs what is left of its worker's tree this long after its SIGTERM
SIMPLE_LAUNCHER_GRACE_S = 5.0


def launcher() -> str | None:
    """Who started this process, as far as stopping goes: "torch elastic" (TORCHELASTIC_RUN_ID: several processes
    or machines), "accelerate" (`accelerate launch` of one process, which runs the script as its plain child and
    sets no variable of its own that a user could not also set), or None."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "torch elastic"
    import psutil  # accelerate's own dependency (its launcher uses it)

    try:
        argv = psutil.Process(os.getppid()).cmdline()
    except (psutil.Error, OSError):
        return None
    return "accelerate" if is_accelerate_launch(argv) else None


def is_accelerate_launch(argv: list[str]) -> bool:
    """`accelerate launch ...`, `accelerate-launch ...`, `python -m accelerate.commands.launch ...` or
    `python -m accelerate.commands.accelerate_cli launch ...`, as a process's command line."""
    head = [os.path.basename(arg) for arg in argv[:3]]
    if "accelerate-launch" in head or "accelerate.commands.launch" in head:
        return True
    return "launch" in argv[1:4] and any(name in ("accelerate", "accelerate.commands.accelerate_cli") for name in head)


def slow_save_warning(save_s: float, started_by: str | None) -> str | None:
    """A warning when a Ctrl-C stop (the step in progress, then a checkpoint) may outlast accelerate's one-process
    launcher, which kills its worker SIMPLE_LAUNCHER_GRACE_S after Ctrl-C (nothing sets that); the step gets the
    rest of the grace."""
    if started_by != "accelerate" or save_s < 0.6 * SIMPLE_LAUNCHER_GRACE_S:
        return None
    return (f"saving a checkpoint took {save_s:.1f} s: `accelerate launch` with one process kills its worker "
            f"{SIMPLE_LAUNCHER_GRACE_S:.0f} s after Ctrl-C, so a stop may lose the steps since the last checkpoint; "
            "start one-process runs with `python SCRIPT FLAGS` (the same run) to keep Ctrl-C's checkpoint")


def shelter_data_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a stop is the training process's to handle, not its data workers'.

    Ctrl-C reaches every process of the terminal's group, Slurm and torch elastic signal whole sessions, and
    accelerate's one-process launcher SIGTERMs the whole process tree: a data worker that died of any of them made
    torch's SIGCHLD handler raise "DataLoader worker ... is killed by signal" inside the step or the save, so the run
    crashed instead of saving its checkpoint. So a worker ignores both signals; the trainer closes its workers as
    soon as the loop ends (trainer.close_data_workers: before the checkpoint, the final save, and on any error), and
    a worker whose training process died exits by itself (torch's watchdog).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@dataclass(frozen=True)
class Stop:
    """Why every process stops at this step boundary: a signal (its number) and/or a diverged run."""

    signum: int = 0
    diverged: bool = False
    bad_images: bool = False  # more images failed to load than --max_bad_images allows (a count all ranks share)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


class StopRequest:
    """SIGINT/SIGTERM set a flag (never an exception mid-step); `agreed()` at a step boundary turns the flags of
    all processes into one decision, so every process saves the same checkpoint and none is left in a collective.

    A second signal (under a launcher: more than REPEAT_WINDOW_S after the first) exits at once with status 130,
    without a checkpoint.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.signum = 0
        self.first_at = self.left_at = 0.0
        self.stopped_by_signal = False
        self.group = stop_group(accelerator)
        self.launcher = launcher()  # once: it asks the OS for the parent's command line
        self.repeat_window = REPEAT_WINDOW_S if self.launcher else 0.0

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:
            self.signum, self.first_at = signum, time.monotonic()
            return
        if time.monotonic() - self.first_at > self.repeat_window:
            os.write(2, f"\n{signal.Signals(signum).name} again: exiting now, without a checkpoint\n".encode())
            os._exit(130)

    @contextlib.contextmanager
    def listening(self):
        """Handle SIGINT and SIGTERM while the loop runs (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            self.left_at = time.monotonic()
            for sig, handler in previous.items():
                signal.signal(sig, self.late(handler) if self.stopped_by_signal else handler)

    def late(self, previous):
        """After a signal stop: a copy of the signal still on its way (the launcher forwards to one worker after
        another, so on a busy machine it can arrive after this process has agreed, saved and left the loop) is the
        same request and ignored; a signal more than REPEAT_WINDOW_S after that gets the previous handler."""

        def handle(signum: int, frame: FrameType | None) -> None:
            if time.monotonic() - self.left_at <= REPEAT_WINDOW_S:
                return
            signal.signal(signum, previous)
            signal.raise_signal(signum)

        return handle

    def agreed(self, diverged: bool = False) -> Stop | None:
        """One decision for all processes at this step boundary: stop if any process got a signal or diverged."""
        local = [self.signum, int(diverged)]
        if self.group is not False:
            # MAX of two ints on a CPU (gloo) group: no GPU sync, and accelerate's reduce offers only sum/mean.
            flags = torch.tensor(local, dtype=torch.int32)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.group)
            local = flags.tolist()
        self.stopped_by_signal = bool(local[0])  # this process's own copy of the signal may still be on its way
        return Stop(signum=local[0], diverged=bool(local[1])) if any(local) else None


def stop_group(accelerator: Accelerator):
    """The process group for the stop flag: False for one process, the default group if it is gloo, else a new
    gloo group (on NCCL a CPU tensor cannot be reduced, and a GPU one would add a device sync)."""
    if accelerator.num_processes == 1 or not torch.distributed.is_initialized():
        return False
    if torch.distributed.get_backend() == "gloo":
        return None
    return torch.distributed.new_group(backend="gloo")
