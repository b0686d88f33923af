"""The real training script, with a signal sent at a deterministic point inside a step (run by test_distributed.py).

    STOP_AT=RANK:STEP:WHERE:SIGNAL:TARGET  STOP_LOG=DIR  accelerate launch ... signal_at.py TRAIN_FLAGS...

Process RANK, inside step STEP (0-based, i.e. the step that would end as STEP+1), sends SIGNAL:
  WHERE   forward (the forward pass of the first micro-batch), backward (after the backward passes,
          before clipping), optimizer (just before optimizer.step()).
  TARGET  group: the terminal's process group, as Ctrl-C: under torch elastic the launcher's (it forwards the
          signal to the workers, which run in sessions of their own); with one process (no launcher, or
          accelerate's simple launcher) the group this process shares with its launcher, if any; all: that group and every worker directly, as Slurm does (each
          worker gets it twice); self: this process only (the other one learns it through the agreement).
Each process writes DIR/exit-<rank>.json with its exit status and the time it exits; the sender writes
DIR/signal.json with the time it sent the signal.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil

from diffusers_optim.cli import run_main
from diffusers_optim.trainer import Trainer, main

RANK = int(os.environ.get("RANK", "0"))  # no RANK: one process, no launcher or accelerate's simple one
LOG = Path(os.environ["STOP_LOG"])
rank, step, where, signame, target = os.environ["STOP_AT"].split(":")
SIGNUM = signal.Signals[signame]


def send() -> None:
    launcher = psutil.Process(os.getppid())
    if target == "self":
        os.kill(os.getpid(), SIGNUM)
    elif "RANK" in os.environ:  # torch elastic: the workers run in sessions of their own, the launcher in the user's
        os.killpg(os.getpgid(launcher.pid), SIGNUM)
    else:  # one process, with no launcher or accelerate's simple one: all of them share the terminal's group
        os.killpg(os.getpgrp(), SIGNUM)
    if target == "all":
        for worker in launcher.children():
            os.kill(worker.pid, SIGNUM)
    (LOG / "signal.json").write_text(json.dumps({"time": time.time(), "rank": RANK}))


def at(method_name: str, when: str) -> None:
    """Wrap a Trainer method so that it sends the signal when this process reaches it in step STEP."""
    original = getattr(Trainer, method_name)

    def wrapped(self, *args, **kwargs):
        if when == where and RANK == int(rank) and self.step == int(step) and not (LOG / "signal.json").exists():
            send()
        return original(self, *args, **kwargs)

    setattr(Trainer, method_name, wrapped)


at("compute_loss", "forward")
at("clip_gradients", "backward")
at("optimizer_step", "optimizer")
code = run_main(main, sys.argv[1:])
(LOG / f"exit-{RANK}.json").write_text(json.dumps({"code": code, "time": time.time()}))
sys.exit(code)
