"""What a person sees while a run works: phase messages on the console and a small status file for onlookers.

The status file (`status.json` in the run folder) is rewritten atomically on every log step and at every phase
change, so a comparison (any backend, any process) can show a live line per run by reading run folders alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from diffusers_optim import rundir

STATUS_FILE = rundir.STATUS
logger = logging.getLogger(__name__)


class TqdmConsoleHandler(logging.Handler):
    """Log records printed with tqdm.write, so a message never tears the progress bar it appears under.

    The stream is looked up at each record (not kept), so a redirected or captured sys.stderr is honoured.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never break training
            self.handleError(record)


class PlainFormatter(logging.Formatter):
    """The message alone; accelerate's "[RANK 0] " tag is dropped (main-process-only messages need no tag)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).removeprefix("[RANK 0] ")


def setup_console_logging() -> None:
    """Show this package's info messages (phases, checkpoints, resume) on stderr; idempotent.

    Warnings and errors are left to Python's usual path (the root logger's handlers, else stderr), so they
    are neither printed twice nor hidden from a program that configured logging itself.
    """
    package = logging.getLogger("diffusers_optim")
    if not any(isinstance(h, TqdmConsoleHandler) for h in package.handlers):
        handler = TqdmConsoleHandler()
        handler.setFormatter(PlainFormatter("%(message)s"))
        # A handler on the package means Python's last-resort stderr handler is never used for its records, so
        # warnings are printed here too unless the root logger has handlers of its own (then they go there).
        handler.addFilter(lambda record: record.levelno < logging.WARNING or not logging.getLogger().handlers)
        package.addHandler(handler)
    if package.level == logging.NOTSET or package.level > logging.INFO:
        package.setLevel(logging.INFO)


def format_duration(seconds: float | None) -> str:
    """12.3 s, 4m05s, 1h02m: short and readable at a glance."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    """Replace the run's status file atomically (a reader sees the old or the new file, never half of one)."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".{STATUS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**status, "updated": time.time()}, default=float))
    os.replace(tmp, run_dir / STATUS_FILE)


def read_status(run_dir: Path) -> dict[str, Any]:
    """A run's last status, or {} before its first write."""
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


class RunStatus:
    """The trainer's side: what the run is doing now, written to the status file and announced on the console."""

    def __init__(self, run_dir: Path, run_name: str, max_steps: int, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.state: dict[str, Any] = {"run": run_name, "step": 0, "max_steps": max_steps, "phase": "starting"}
        self.t0, self.step0 = time.perf_counter(), 0

    def start_training(self, step: int) -> None:
        """Training (re)starts at `step`: the ETA is measured from here, not from a previous session."""
        self.t0, self.step0 = time.perf_counter(), step
        self.update(step=step, phase="training")

    def update(self, **fields: Any) -> None:
        """Record new values (step, loss, img/s, phase) and rewrite the status file."""
        if not self.enabled:
            return
        self.state.update(fields)
        done = self.state["step"] - self.step0
        seconds = time.perf_counter() - self.t0
        remaining = self.state["max_steps"] - self.state["step"]
        self.state["eta_s"] = seconds / done * remaining if done > 0 else None
        write_status(self.run_dir, self.state)

    @contextlib.contextmanager
    def phase(self, name: str, detail: str = "", step: int | None = None) -> Iterator[None]:
        """Announce a slow phase (what, then how long it took) and show it in the status file meanwhile."""
        where = f"[step {step}] " if step is not None else ""
        if self.enabled:
            logger.info("%s%s%s ...", where, name, f": {detail}" if detail else "")
        previous = self.state.get("phase")
        self.update(phase=name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.update(phase=previous if previous != name else "training")
        if self.enabled:
            logger.info("%s%s done in %s", where, name, format_duration(time.perf_counter() - start))
