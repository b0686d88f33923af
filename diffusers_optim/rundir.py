"""The one owner of the run folder and the comparison folder: names, atomic writers, tolerant readers, state, lock.

A run folder (`--output_dir` of `train`) holds config.json, metrics.jsonl, samples/, checkpoints/ (see
checkpoint.py for one checkpoint's format), the saved DDPMPipeline and run_summary.json (written last: its
presence marks a complete run). A comparison folder holds plan.json, runs/, tuning/, logs/, failures.json and the
summary/report files. Everything else reads and writes these through this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from diffusers_optim.errors import UserError

logger = logging.getLogger(__name__)

# ---- run folder ------------------------------------------------------------------------------------
CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "run_summary.json"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
WANDB_ID = "wandb_run_id.txt"
STATUS = "status.json"  # live progress for onlookers (format: progress.py)
LOCK = ".lock"  # flock'ed by the process that writes the folder; never deleted (see RunLock)
HOLDER = ".lock.holder"  # who holds the lock: pid, host, start time; removed on release
OVERWRITTEN = ".overwritten"  # an old run moved aside by --overwrite_output_dir, until the new one checkpoints
REWOUND = ".rewound"  # what a resume from an older checkpoint set aside (see rewind), until the run checkpoints
REWIND_NOTE = "rewind.json"  # in REWOUND: the rewind's step, and whether everything beyond it was moved yet
SAMPLE_RE = re.compile(r"^step_(\d+)\.png$")  # samples/step_NNNNNN.png, one grid per sampling step
# files whose presence means "this folder already holds a run"
RUN_MARKERS = (METRICS, SUMMARY, CHECKPOINTS, "model_index.json")
# everything a run writes at the top of its folder (what --overwrite_output_dir moves aside)
# the final DDPMPipeline and its model card (hub.CARD), written at the end of a run
PIPELINE_FILES = ("model_index.json", "unet", "scheduler", "README.md")
RUN_FILES = (CONFIG, METRICS, SUMMARY, SAMPLES, CHECKPOINTS, WANDB_ID, STATUS, "logs", "wandb", *PIPELINE_FILES,
             REWOUND)

# ---- comparison folder ------------------------------------------------------------------------------
PLAN = "plan.json"
FAILURES = "failures.json"
RUNS = "runs"
TUNING = "tuning"
LOGS = "logs"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"


# ---- writers: a reader never sees half a file ---------------------------------------------------------
def write_text(path: Path, text: str) -> None:
    """Write via a temporary file, fsync and rename, so a crash leaves the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON file (indented, trailing newline)."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def append_record(path: Path, record: dict[str, Any]) -> None:
    """One JSON line; a crash can tear only this last line, which the readers skip."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


# ---- tolerant readers -----------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict, or {} when it is absent or unreadable (a run killed mid-write)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as records; an unreadable line (the torn last line of a killed run) is skipped and reported."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            logger.warning("skipping unreadable line %d of %s (torn by a crash?)", number, path)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: keep the records up to `step` (and drop torn lines), so the file reads as one uninterrupted run."""
    path = Path(path)
    if path.is_file():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


# ---- state ---------------------------------------------------------------------------------------------
def existing_run(folder: Path) -> list[str]:
    """The files that show `folder` already holds a run (empty if it holds none)."""
    return [name for name in RUN_MARKERS if (Path(folder) / name).exists()]


def is_complete(folder: Path) -> bool:
    return read_json(Path(folder) / SUMMARY).get("status") == "complete"


def run_state(folder: Path) -> str:
    """complete | running (locked by a live process) | resumable (has a usable checkpoint) | empty."""
    from diffusers_optim.checkpoint import latest_usable

    folder = Path(folder)
    if lock_holder(folder) is not None:
        return "running"
    if is_complete(folder):
        return "complete"
    return "resumable" if latest_usable(folder, warn=False) is not None else "empty"


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    """run_summary.json, written last: its presence marks a complete run."""
    write_json(Path(folder) / SUMMARY, summary)


# ---- --overwrite_output_dir: move aside first, delete only when the new run has something to show ---------
def move_aside(folder: Path) -> Path | None:
    """Move the old run's files into folder/.overwritten (kept if a previous replacement never got that far)."""
    folder = Path(folder)
    aside = folder / OVERWRITTEN
    present = [name for name in RUN_FILES if (folder / name).exists() or (folder / name).is_symlink()]
    if not present:
        return None
    if aside.exists():  # an earlier replacement died before its first checkpoint: what is on top is its debris
        logger.warning("%s still holds the run being replaced; discarding the interrupted replacement", aside)
        for name in present:
            _remove(folder / name)
        return aside
    aside.mkdir()
    for name in present:
        os.replace(folder / name, aside / name)
    logger.warning("--overwrite_output_dir: the previous run was moved to %s; it is deleted once this run saves "
                   "its first checkpoint or finishes", aside)
    return aside


def drop_overwritten(folder: Path) -> None:
    """The new run has a checkpoint (or finished): the run it replaced can go."""
    aside = Path(folder) / OVERWRITTEN
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
        logger.info("deleted the replaced run %s", aside)


def drop_replaced(folder: Path) -> None:
    """The run has a checkpoint of its own (or finished): an overwritten run and a rewound timeline can go."""
    drop_overwritten(folder)
    aside = Path(folder) / REWOUND
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
        logger.info("deleted the rewound-over part of the run %s", aside)


# ---- a resume from an older checkpoint than the folder's newest (a rewind) -----------------------------
def rewind(folder: Path, step: int, newer: list[Path]) -> Path | None:
    """Before the first step of a resume at `step`, set aside what lies beyond it; None when nothing does.

    `newer` are the folder's checkpoints of later steps (the abandoned timeline, which `latest` must never pick);
    with them go run_summary.json (the folder is no longer complete), the final pipeline and its card, the sample
    grids of later steps and a copy of the whole metrics.jsonl (the resume then cuts it back to `step`). All of it
    moves to folder/.rewound and
    is deleted when the run saves a checkpoint or finishes (drop_replaced). The note is written first and marked
    done last, so a crash in between leaves `latest` blind to checkpoints beyond `step` (unfinished_rewind) and
    the next resume completes the move.
    """
    folder = Path(folder)
    aside = folder / REWOUND
    later = [p for p in sorted((folder / SAMPLES).glob("step_*.png")) if _sample_step(p) > step]
    if not newer and not (folder / SUMMARY).exists() and unfinished_rewind(folder) is None:
        return None  # an ordinary resume after a crash: nothing beyond `step` but unlogged metrics
    aside.mkdir(exist_ok=True)
    write_json(aside / REWIND_NOTE, {"step": step, "done": False})
    moved = [name for name in (SUMMARY,) if _set_aside(folder / name, aside / name)]  # first: not complete now
    # the abandoned timeline's final pipeline: DDPMPipeline.from_pretrained(folder) must not load it meanwhile
    moved += [name for name in PIPELINE_FILES if _set_aside(folder / name, aside / name)]
    moved += [p.name for p in newer if _set_aside(p, aside / CHECKPOINTS / p.name)]
    moved += [f"{SAMPLES}/{p.name}" for p in later if _set_aside(p, aside / SAMPLES / p.name)]
    if (folder / METRICS).is_file() and not (aside / METRICS).exists():  # an earlier rewind's copy is the older
        shutil.copyfile(folder / METRICS, aside / METRICS)  # byte for byte
    write_json(aside / REWIND_NOTE, {"step": step, "done": True})
    logger.warning("resuming at step %d: %s moved to %s, deleted when this run saves a checkpoint or finishes; "
                   "%s is cut back to step %d (the whole file is kept there)", step,
                   ", ".join(moved) or "nothing more", aside, METRICS, step)
    return aside


def unfinished_rewind(folder: Path) -> int | None:
    """The step of a rewind a crash interrupted (its checkpoints beyond that step are not yet moved), else None."""
    note = read_json(Path(folder) / REWOUND / REWIND_NOTE)
    return int(note["step"]) if isinstance(note.get("step"), int) and note.get("done") is False else None


def _sample_step(path: Path) -> int:
    match = SAMPLE_RE.match(path.name)
    return int(match.group(1)) if match else -1


def _set_aside(path: Path, dest: Path) -> bool:
    """Move path to dest; if dest is already there (set aside by an earlier rewind), what is on top is debris of
    the rewound run that died before its first checkpoint, and is deleted. False when path does not exist."""
    if not path.exists():
        return False
    if dest.exists():
        _remove(path)
        return True
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ---- the lock ------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """An exclusive lock on a run or comparison folder, held while a process writes it.

    `filelock` takes an flock on `.lock`: the kernel drops it when the holder dies, however it dies, so a
    killed process never leaves a lock that blocks the next run. `.lock.holder` names the holder (filelock
    truncates the lock file itself on open, so it cannot carry the pid); a holder file of a dead pid is a
    stale lock, taken over with a notice. The lock file is never deleted: unlinking it while another process
    waits on the old inode would let two processes hold "the" lock at once.
    """

    def __init__(self, folder: Path, what: str = "run folder"):
        self.folder = Path(folder)
        self.what = what
        self._lock = FileLock(self.folder / LOCK, timeout=0)

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise UserError(in_use_message(self.folder, self.what)) from None
        previous = read_json(self.folder / HOLDER)
        pid = previous.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and previous.get("host") == socket.gethostname():
            logger.warning("%s: taking over the lock of pid %s, which is no longer running", self.folder, pid)
        write_json(self.folder / HOLDER, {"pid": os.getpid(), "host": socket.gethostname(),
                                          "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            (self.folder / HOLDER).unlink(missing_ok=True)
            self._lock.release(force=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(folder: Path) -> dict[str, Any] | None:
    """Who holds the folder's lock right now (pid, host, started), or None if nobody does."""
    folder = Path(folder)
    if not (folder / LOCK).exists():
        return None
    probe = FileLock(folder / LOCK, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return read_json(folder / HOLDER) or {"pid": "unknown"}
    probe.release(force=True)
    return None


def in_use_message(folder: Path, what: str = "run folder") -> str:
    holder = read_json(Path(folder) / HOLDER)
    who = f"pid {holder.get('pid', 'unknown')}"
    if holder.get("host") and holder.get("host") != socket.gethostname():
        who += f" on {holder['host']}"
    since = f", since {holder['started']}" if holder.get("started") else ""
    return f"{what} {folder} is in use by another process ({who}{since}); wait for it to end or stop it"


def wait_unlocked(folder: Path, timeout: float, what: str = "run folder") -> None:
    """Wait up to `timeout` s for a holder to let go (a stopped trainer saving its last checkpoint), else UserError."""
    deadline = time.monotonic() + timeout
    while lock_holder(folder) is not None:
        if time.monotonic() > deadline:
            raise UserError(in_use_message(folder, what))
        time.sleep(0.5)


@contextlib.contextmanager
def locked(folder: Path, what: str = "run folder") -> Iterator[RunLock]:
    """`with locked(folder):` holds the folder's lock for the block."""
    lock = RunLock(folder, what).acquire()
    try:
        yield lock
    finally:
        lock.release()
