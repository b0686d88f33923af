"""Live progress of a comparison: a line per running run and an overall line, read from the run folders.

Each trainer rewrites `status.json` in its run folder on log steps and phase changes (progress.py), so the view
works for any backend that writes run folders where the comparison can read them, and for any --num_parallel.
On a terminal the view is redrawn in place (rich); otherwise (CI, a log file) it prints plain lines periodically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers_optim.progress import format_duration, read_status
from diffusers_optim.report.style import sig

logger = logging.getLogger(__name__)

TTY_REFRESH_S = 1.0  # redraw period on a terminal
PLAIN_EVERY_S = 30.0  # period of the plain progress lines when stdout is not a terminal


@dataclass
class RunView:
    """What the board knows about one planned run."""

    name: str
    path: Path
    state: str = "queued"  # queued | running | done | failed | reused
    started: float | None = None
    ended: float | None = None
    status: dict[str, Any] = field(default_factory=dict)
    first_step: int | None = None  # the step it was at when first seen (a resumed run starts above 0)


class ProgressBoard:
    """The runs of one stage of a comparison and their progress; thread-safe (runs end on pool threads)."""

    def __init__(self, root: Path, runs: list[tuple[str, str]], title: str = "runs"):
        self.root, self.title = Path(root), title
        self.runs = {name: RunView(name, self.root / path) for name, path in runs}
        self.lock = threading.Lock()
        self.t0 = time.time()

    # ---- events from the executor ------------------------------------------------------------
    def started(self, name: str) -> None:
        with self.lock:
            view = self.runs[name]
            view.state, view.started = "running", time.time()
        logger.info("started %s (log: %s)", name, self.root / "logs" / f"{name}.log")

    def reused(self, name: str) -> None:
        with self.lock:
            self.runs[name].state = "reused"

    def finished(self, name: str, ok: bool) -> None:
        with self.lock:
            view = self.runs[name]
            view.state, view.ended = ("done" if ok else "failed"), time.time()
            view.status = read_status(view.path) or view.status
        took = format_duration(view.ended - view.started) if view.started else "?"
        if ok:
            logger.info("finished %s in %s", name, took)

    # ---- reading ---------------------------------------------------------------------------------
    def poll(self) -> None:
        """Refresh the status of every running run from its folder."""
        with self.lock:
            running = [v for v in self.runs.values() if v.state == "running"]
        for view in running:
            status = read_status(view.path)
            if status:
                view.status = status
                if view.first_step is None and status.get("phase") == "training":
                    view.first_step = status.get("step", 0)

    def counts(self) -> dict[str, int]:
        states = [v.state for v in self.runs.values()]
        return {s: states.count(s) for s in ("queued", "running", "done", "failed", "reused")}

    def steps(self) -> tuple[int, int | None]:
        """(steps done, total steps) over the runs this comparison trains now; total None until one run reports."""
        trained = [v for v in self.runs.values() if v.state != "reused"]
        known = [v.status["max_steps"] for v in trained if v.status.get("max_steps")]
        if not known:
            return 0, None
        typical = sorted(known)[len(known) // 2]  # every run of a comparison has the same budget, usually
        done = sum(v.status.get("step", 0) if v.state != "done" else v.status.get("max_steps", typical)
                   for v in trained)
        return done, sum(v.status.get("max_steps", typical) for v in trained)

    def eta(self) -> float | None:
        """Seconds left for the whole stage: the steps left at the pace measured so far (all parallel runs).

        The pace counts only steps trained while this view watched (not those a resumed run brought along),
        over the whole time since the stage started (run start-up, evaluation and waiting included).
        """
        done, total = self.steps()
        trained = sum(max(0, v.status.get("step", 0) - v.first_step) for v in self.runs.values()
                      if v.first_step is not None)
        elapsed = time.time() - self.t0
        if total is None or trained <= 0 or elapsed <= 0:
            return None
        return (total - done) / (trained / elapsed)

    # ---- lines -----------------------------------------------------------------------------------
    def run_line(self, view: RunView) -> str:
        s = view.status
        if not s:
            return f"{view.name}: starting"
        parts = [f"step {s.get('step', 0)}/{s.get('max_steps', '?')}"]
        if _finite(s.get("loss")):
            parts.append(f"loss {s['loss']:.4g}")
        if _finite(s.get("images_per_sec")):
            parts.append(f"{s['images_per_sec']:.0f} img/s")
        parts.append(f"ETA {format_duration(run_eta(s))}")
        if s.get("phase") not in (None, "training"):
            parts.append(str(s["phase"]))
        return f"{view.name}: " + ", ".join(parts)

    def overall_line(self) -> str:
        c = self.counts()
        done, total = self.steps()
        finished = c["done"] + c["failed"] + c["reused"]
        parts = [f"{finished}/{len(self.runs)} runs finished", f"{c['running']} running"]
        if c["failed"]:
            parts.append(f"{c['failed']} FAILED")
        parts.append(f"steps {done}/{total if total is not None else '?'}")
        parts.append(f"ETA {format_duration(self.eta())}")
        return f"{self.title}: " + ", ".join(parts)

    def running(self) -> list[RunView]:
        return [v for v in self.runs.values() if v.state == "running"]


def run_eta(status: dict[str, Any]) -> float | None:
    """The trainer's ETA, less the time since it was written."""
    eta = status.get("eta_s")
    if not _finite(eta):
        return None
    return max(0.0, eta - max(0.0, time.time() - status.get("updated", time.time())))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---- the two renderers ---------------------------------------------------------------------------


def rich_table(board: ProgressBoard):
    """One row per running run: name, step/total, loss, img/s, ETA, phase."""
    from rich.table import Table

    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    for column, justify in (("run", "left"), ("step", "right"), ("loss", "right"), ("img/s", "right"),
                            ("ETA", "right"), ("phase", "left")):
        table.add_column(column, justify=justify, no_wrap=column != "phase")
    for view in board.running():
        s = view.status
        table.add_row(view.name, f"{s.get('step', 0)}/{s.get('max_steps', '?')}",
                      f"{s['loss']:.4g}" if _finite(s.get("loss")) else "-",
                      f"{s['images_per_sec']:.0f}" if _finite(s.get("images_per_sec")) else "-",
                      format_duration(run_eta(s)), str(s.get("phase", "starting")))
    return table


def rich_view(board: ProgressBoard):
    """The table, then the overall line under it (in the table, it would widen the run column)."""
    from rich.console import Group
    from rich.text import Text

    overall = Text(board.overall_line(), style="bold")
    return Group(rich_table(board), overall) if board.running() else overall  # no empty header at the end


@contextlib.contextmanager
def live_view(board: ProgressBoard, every: float | None = None, stream=None) -> Iterator[None]:
    """Show the board while the block runs: redrawn in place on a terminal, else plain lines every `every` s."""
    stream = stream or sys.stdout
    if stream.isatty():
        with _rich_live(board, every or TTY_REFRESH_S, stream):
            yield
    else:
        with _plain_lines(board, every or PLAIN_EVERY_S):
            yield


@contextlib.contextmanager
def _rich_live(board: ProgressBoard, every: float, stream) -> Iterator[None]:
    from rich.console import Console
    from rich.live import Live

    console = Console(file=stream)
    with Live(console=console, refresh_per_second=max(0.2, 1 / every), transient=False,
              redirect_stdout=True, redirect_stderr=False, get_renderable=lambda: _polled(board)), \
            _log_through(console):
        yield


def _polled(board: ProgressBoard):
    board.poll()
    return rich_view(board)


@contextlib.contextmanager
def _log_through(console) -> Iterator[None]:
    """Root log handlers that print to stdout write above the live view instead of through it."""
    from rich.logging import RichHandler

    root = logging.getLogger()
    plain = [h for h in root.handlers if isinstance(h, logging.StreamHandler) and
             getattr(h, "stream", None) in (sys.stdout, sys.__stdout__)]
    rich_handler = RichHandler(console=console, show_time=False, show_level=False, show_path=False)
    rich_handler.setFormatter(logging.Formatter("%(message)s"))
    for handler in plain:
        root.removeHandler(handler)
    root.addHandler(rich_handler)
    try:
        yield
    finally:
        root.removeHandler(rich_handler)
        for handler in plain:
            root.addHandler(handler)


@contextlib.contextmanager
def _plain_lines(board: ProgressBoard, every: float) -> Iterator[None]:
    """A thread printing the board's lines every `every` seconds (only when something moved)."""
    stop = threading.Event()

    def loop() -> None:
        last: list[tuple] = []
        while not stop.wait(every):
            board.poll()
            running = board.running()
            moved = [(v.name, v.status.get("step"), v.status.get("phase")) for v in running]
            if running and moved != last:  # a log file gets a line when a run moved, not one per period
                for line in [*map(board.run_line, running), board.overall_line()]:
                    logger.info("[%s] %s", format_duration(time.time() - board.t0), line)
                last = moved

    thread = threading.Thread(target=loop, name="progress-lines", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    logger.info("%s", board.overall_line())


# ---- the end of a comparison ---------------------------------------------------------------------


# what each verdict against the best means, in the terminal's ranking (report.verdicts)
VERDICT_NOTES = {"tied": "  (tied with the best: difference not resolved)",
                 "equivalent": "  (equivalent to the best: within the smallest difference that matters)",
                 "negligible": "  (resolved from the best, but by less than the smallest difference that matters)",
                 "no interval": "  (no interval: fewer than 2 seeds)"}


def final_lines(summary: dict[str, Any], report_path: Path) -> str:
    """A compact ranking for the terminal (arm, primary metric with its 95% interval, tied marks) and the report's path."""
    metric = summary.get("rank_by") or "val/loss"
    rows = summary.get("arms", [])
    width = max([len(str(r.get("arm", ""))) for r in rows] + [3])
    direction = "higher" if summary.get("higher_is_better") else "lower"
    lines = [f"ranking by final {metric} (mean over seeds ± 95% interval, {direction} is better):"]
    for row in rows:
        value = row.get(metric)
        cell = sig(value)
        low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
        if _finite(low) and _finite(high):
            cell += f" ± {sig((high - low) / 2, 2)}"
        note = "" if row.get("status") == "complete" else f"  {str(row.get('status', '')).upper()}"
        note += VERDICT_NOTES.get(row.get("verdict") or ("tied" if row.get("tied") else ""), "")
        if row.get("unranked"):
            note += f"  (not ranked: {row['unranked']})"
        lines.append(f"  {row.get('rank') or '-':>2}  {str(row.get('arm')):<{width}}  {cell}"
                     f"  ({row.get('runs_complete', 0)}/{row.get('runs_total', 0)} runs){note}")
    lines.append(f"report: {report_path}")
    return "\n".join(lines)
