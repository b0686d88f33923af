"""`compare --backend ray`: every planned run as a Ray task on a cluster, with the local pool's guarantees.

Why Ray and not a scheduler of ours: Ray places each run on a node where its resources (--cpus_per_run,
--gpus_per_run) are free, gives it its GPUs (CUDA_VISIBLE_DEVICES), retries a task whose worker or node died
(max_retries) and cancels tasks (ray.cancel). What stays ours is what a run is: the task runs the same trainer
command as the local pool (compare.launch_run: the CLI, or `accelerate launch` for a run on several GPUs) on the
run's folder under the comparison folder, which every node must see (shared storage; docs/launching.md).

The guarantees, as on the local pool:
- equal budgets and seeds: the plan is compare's, unchanged; Ray only decides where and when each run trains.
- reuse: complete runs are found on the driver and never submitted.
- resume: a task whose trainer died by a signal (killed, out of memory, preempted) raises TrainerDied, which Ray
  retries (retry_exceptions) as it retries a task whose worker died; the retry reads the run folder again and
  resumes from its last checkpoint (`--resume_from_checkpoint latest`), at most --max_retries times.
- one trainer per run: the run folder's lock (rundir.RunLock, an flock the kernel drops when its holder dies); a
  retry first waits for a trainer that is still saving its checkpoint (compare.run_state).
- Ctrl-C or SIGTERM on the driver: every task is cancelled; a running one first passes one SIGTERM to its
  trainer, which saves a checkpoint and stops; a task still running after that is cancelled with force. Every
  run stays resumable, and the same command resumes them.
- the summary and report are built on the driver from the run folders once every task has ended (compare).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusers_optim.errors import UserError, unknown_choice

if TYPE_CHECKING:
    from diffusers_optim.compare import PlannedRun

logger = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
RAY_FLAGS = ("ray_address", "cpus_per_run", "gpus_per_run", "max_retries")
INSTALL_HINT = "pip install 'diffusers-optim[ray]'"
DEFAULT_CPUS, DEFAULT_GPUS, DEFAULT_RETRIES = 1.0, 0.0, 3
POLL_S = 1.0  # how often the driver looks for started runs, and a task for ray.cancel's interrupt
STOP_WAIT_S = 120.0  # how long a cancelled trainer may take to save its checkpoint before its task is killed
# What a trainer takes from the driver's environment on any node: W&B, Hub and Accelerate settings, and secrets
# (--hub_token reaches the trainers as HF_TOKEN). Passed as a task argument, not as a runtime_env, so that a
# token is not shown with the job's settings on the dashboard. OMP_NUM_THREADS and CUDA_VISIBLE_DEVICES are
# the task's own (its --cpus_per_run and its GPUs), never the driver's.
FORWARDED_ENV = ("WANDB_", "HF_", "HUGGING_FACE_", "ACCELERATE_", "TQDM_")


@dataclass(frozen=True)
class RaySettings:
    """Where and with what each run of a `--backend ray` comparison is scheduled, resolved once from the flags."""

    address: str | None  # None: Ray's own choice (RAY_ADDRESS, else a cluster `ray start` began here, else new)
    cpus_per_run: float = DEFAULT_CPUS
    gpus_per_run: float = DEFAULT_GPUS
    max_retries: int = DEFAULT_RETRIES

    def describe(self) -> str:
        where = {None: "the Ray cluster", "local": "a new local Ray cluster", "auto": "the Ray cluster started here"}
        where = where.get(self.address, f"the Ray cluster at {self.address}")
        return (f"each as a Ray task of {self.cpus_per_run:g} CPU and {self.gpus_per_run:g} GPU on {where}, "
                f"retried up to {self.max_retries} times")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- flags (all checked before anything is touched) ------------------------------------------------------------


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """compare's --backend and the Ray flags (as text: every bad value becomes a one-line error of ours)."""
    parser.add_argument(
        "--backend",
        default="local",
        help="Where the runs train: local (processes on this machine, --num_parallel at a time) or ray (tasks on "
        f"a Ray cluster; `{INSTALL_HINT}`, see docs/launching.md). Default: local.",
    )
    parser.add_argument(
        "--ray_address",
        default=None,
        help="With --backend ray, the cluster: auto (the one `ray start` began on this machine), HOST:PORT of its "
        "head, ray://HOST:PORT (Ray Client) or local (a new one-machine cluster for this comparison). Default: "
        "Ray's own choice (RAY_ADDRESS, else a cluster started on this machine, else a new one).",
    )
    parser.add_argument(
        "--cpus_per_run",
        default=None,
        help=f"With --backend ray, CPUs reserved for each run (its trainer's threads). Default: {DEFAULT_CPUS:g}.",
    )
    parser.add_argument(
        "--gpus_per_run",
        default=None,
        help="With --backend ray, GPUs reserved for each run; above 1 the run is launched with `accelerate "
        f"launch` (needs --accelerate_config with as many processes). Default: {DEFAULT_GPUS:g}.",
    )
    parser.add_argument(
        "--max_retries",
        default=None,
        help="With --backend ray, how many times a run whose trainer or worker died is retried from its last "
        f"checkpoint. Default: {DEFAULT_RETRIES}.",
    )


def resolve_backend(args: argparse.Namespace) -> RaySettings | None:
    """The backend flags, checked: RaySettings for --backend ray, None for the local pool; UserError otherwise."""
    if args.backend not in BACKENDS:
        raise unknown_choice("backend", args.backend, BACKENDS)
    given = [f"--{name}" for name in RAY_FLAGS if getattr(args, name) is not None]
    if args.backend == "local":
        if given:
            raise UserError(f"{given[0]} is a flag of --backend ray (the local backend trains --num_parallel runs "
                            "at once on this machine)")
        return None
    if args.num_parallel is not None:
        raise UserError("--num_parallel is a flag of --backend local; on Ray, --cpus_per_run and --gpus_per_run "
                        "decide how many runs train at once")
    settings = RaySettings(
        address=parse_address(args.ray_address),
        cpus_per_run=parse_amount(args.cpus_per_run, "--cpus_per_run", DEFAULT_CPUS, zero_ok=False),
        gpus_per_run=parse_amount(args.gpus_per_run, "--gpus_per_run", DEFAULT_GPUS, zero_ok=True),
        max_retries=parse_retries(args.max_retries),
    )
    check_gpus_per_run(settings.gpus_per_run, args.accelerate_config)
    if importlib.util.find_spec("ray") is None:  # not imported here: `import ray` takes seconds
        raise UserError(f"--backend ray needs Ray, which is not installed: {INSTALL_HINT}")
    return settings


def parse_address(text: str | None) -> str | None:
    """auto, local, HOST:PORT or ray://HOST:PORT (syntax only: whether a cluster answers is known on connecting)."""
    if text is None or text in ("auto", "local"):
        return text
    host, colon, port = text.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--ray_address {text!r}: expected auto, local, HOST:PORT or ray://HOST:PORT "
                        "(e.g. 10.0.0.1:6379, the address `ray start --head` prints)")
    return text


def parse_amount(text: str | None, flag: str, default: float, zero_ok: bool) -> float:
    """A resource amount: a finite number, positive (or zero when zero_ok); above 1, GPUs come whole."""
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{flag}: cannot read {text!r} as a number") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise UserError(f"{flag} must be a {'non-negative' if zero_ok else 'positive'} number, got {text!r}")
    if flag == "--gpus_per_run" and value > 1 and not value.is_integer():
        raise UserError(f"--gpus_per_run {text}: a run on more than one GPU takes whole GPUs (e.g. 2)")
    return value


def parse_retries(text: str | None) -> int:
    if text is None:
        return DEFAULT_RETRIES
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"--max_retries: cannot read {text!r} as a whole number") from None
    if value < 0:
        raise UserError(f"--max_retries must be 0 or more, got {text!r}")
    return value


def check_gpus_per_run(gpus: float, accelerate_config: str | None) -> None:
    """A run on several GPUs is one `accelerate launch` with one process per GPU, on one node."""
    if gpus <= 1:
        return
    need = f"--gpus_per_run {gpus:g} needs --accelerate_config with num_processes: {gpus:g} (one process per GPU)"
    if not accelerate_config:
        raise UserError(f"{need}, e.g. accelerate_configs/multi_gpu_bf16.yaml")
    import yaml

    try:
        config = yaml.safe_load(Path(accelerate_config).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"accelerate config {accelerate_config}: cannot read it ({err})".splitlines()[0]) from None
    if not isinstance(config, dict):
        raise UserError(f"accelerate config {accelerate_config}: expected a mapping of settings")
    if int(config.get("num_machines") or 1) > 1:
        raise UserError(f"{accelerate_config} spans {config['num_machines']} machines; with --backend ray each run "
                        "trains on one node (Ray spreads the runs over the machines)")
    processes = config.get("num_processes")
    if processes is not None and int(processes) != int(gpus):
        raise UserError(f"{need}; {accelerate_config} has num_processes: {processes}")


# ---- the driver ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def connected(settings: RaySettings | None) -> Iterator[None]:
    """On the Ray cluster for the block (nothing for the local backend, nor when already connected)."""
    if settings is None:
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    check_reachable(settings.address)
    try:
        # log_to_driver off: each trainer's output goes to its run's log file, as on the local pool
        ray.init(address=settings.address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError) as err:
        flag = f"--ray_address {settings.address}" if settings.address else "--backend ray"
        raise UserError(f"{flag}: {first_line(err)} (start a cluster with `ray start --head`, or pass "
                        "--ray_address local for one on this machine)") from None
    try:
        check_cluster(settings)
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str | None) -> None:
    """A HOST:PORT that nothing listens on is an error at once (ray.init would retry it for minutes)."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise UserError(f"--ray_address {address}: nothing answers there ({err.strerror or err}); is the cluster "
                        f"started (`ray start --head --port {port}` on {host})?") from None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_cluster(settings: RaySettings) -> None:
    """Warn about resources that make runs wait forever or leave GPUs idle (an autoscaler may still add nodes)."""
    import ray

    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if not any(r.get("CPU", 0) >= settings.cpus_per_run and r.get("GPU", 0) >= settings.gpus_per_run for r in nodes):
        logger.warning("no node of the Ray cluster has %g CPUs and %g GPUs for one run: the runs wait until one "
                       "joins (lower --cpus_per_run / --gpus_per_run?)", settings.cpus_per_run, settings.gpus_per_run)
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus and not settings.gpus_per_run:
        logger.warning("the Ray cluster has %g GPUs but --gpus_per_run is 0: every run trains on CPU", gpus)


def execute(
    runs: list[PlannedRun],
    root: Path,
    accelerate_config: str | None,
    settings: RaySettings,
    started: Callable[[str], None],
    finished: Callable[[PlannedRun, int | str], None],
) -> None:
    """Submit every run as a task and report each as it starts and ends; Ctrl-C/SIGTERM cancels them all."""
    import ray

    if not runs:
        return
    task = ray.remote(train_task)
    resources = dict(num_cpus=settings.cpus_per_run, num_gpus=settings.gpus_per_run,
                     max_retries=settings.max_retries, retry_exceptions=[TrainerDied])
    config = str(Path(accelerate_config).resolve()) if accelerate_config else None  # the same path on every node
    env = {key: value for key, value in os.environ.items() if key.startswith(FORWARDED_ENV)}
    sizes = {run.name: log_size(root, run) for run in runs}
    refs = {task.options(name=run.name, **resources).remote(run, str(root), config, env, settings.cpus_per_run): run
            for run in runs}
    pending, seen = list(refs), set()
    signals: list[int] = []
    try:
        with stop_signals(signals):
            while pending and not signals:
                done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
                # a task appends its trainer's command to the run's log as it starts it: that is when the run starts
                for ref in [*done, *pending]:
                    run = refs[ref]
                    if run.name not in seen and (ref in done or log_size(root, run) > sizes[run.name]):
                        seen.add(run.name)
                        started(run.name)
                for ref in done:
                    finished(refs[ref], outcome(ref))
            if signals:  # Ctrl-C or SIGTERM (scancel, Slurm's --signal, a preempted node)
                stop(pending)
                raise SystemExit(128 + signals[0])  # 130, 143; no traceback: that is how a person stops it
    except KeyboardInterrupt:  # not on the main thread (no handlers of ours): Python's own Ctrl-C
        stop(pending)
        raise SystemExit(130) from None


@contextlib.contextmanager
def stop_signals(received: list[int]) -> Iterator[None]:
    """SIGINT and SIGTERM are noted in `received` (the loop then cancels the tasks), never raised as exceptions.

    Why not Python's KeyboardInterrupt: it is raised wherever the main thread happens to be, mostly inside
    ray.wait, whose C++ loop runs the handler (PyErr_CheckSignals) and turns the exception into a status; a
    Ctrl-C there could vanish, and the run went on to the end. A flag set by our handler cannot be lost, and the
    loop looks at it at least every POLL_S. SIGTERM likewise: Ray's native crash handler catches it in a driver,
    which then aborts, and ray.wait turned a SystemExit into status 1. The terminal's Ctrl-C reaches only this
    process: Ray starts its services and workers with SIGINT blocked, and so every trainer of a task (they
    stop through ray.cancel, see stop())."""
    if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread
        yield
        return

    def note(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def log_size(root: Path, run: PlannedRun) -> int:
    from diffusers_optim.compare import run_log

    try:
        return run_log(root, run).stat().st_size
    except OSError:
        return 0


def outcome(ref: Any) -> int | str:
    """A task's trainer exit status, or why the task failed (its error, after Ray's retries)."""
    import ray

    try:
        return int(ray.get(ref))
    except ray.exceptions.RayTaskError as err:  # raised by our task (TrainerDied after every retry, UserError)
        return first_line(getattr(err, "cause", None) or err)
    except ray.exceptions.RayError as err:  # the worker or node died on the last try; the task was cancelled
        return f"Ray: {type(err).__name__}: {first_line(err)}"


def stop(pending: list[Any]) -> None:
    """Cancel every task so that each run keeps a checkpoint: gently, then with force."""
    import ray

    if not pending:
        return
    logger.warning("interrupted: cancelling %d Ray tasks; running trainers save a checkpoint first", len(pending))
    for ref in pending:
        ray.cancel(ref)  # queued: never starts; running: KeyboardInterrupt in the task, which stops its trainer
    _, running = ray.wait(pending, num_returns=len(pending), timeout=STOP_WAIT_S)
    for ref in running:
        # still running: its worker is killed, and the kernel passes SIGTERM to the trainer (compare.DIE_WITH_PARENT).
        # Only those: a force cancel of a task that has just ended can crash Ray's core worker (a RAY_CHECK in
        # TaskManager::CompletePendingTask, "Tried to complete task that was not pending": exit 1, a C++ trace).
        ray.cancel(ref, force=True)
    logger.warning("stopped: every run keeps its last checkpoint; the same command resumes them")


# ---- the task, on a worker -------------------------------------------------------------------------------------


class TrainerDied(RuntimeError):
    """A run's trainer was killed by a signal (or interrupted): Ray retries the task, which resumes the run."""


def train_task(run: PlannedRun, root: str, accelerate_config: str | None, env: dict[str, str], cpus: float) -> int:
    """One run on a Ray worker: resume or start it from what its folder holds; returns the trainer's exit status."""
    from diffusers_optim import compare

    os.environ.update(env)
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(cpus)))  # the run's share of the node, as on the local pool
    state = compare.run_state(run, Path(root))  # waits for a trainer of a killed attempt to let go of the folder
    if state == "complete":  # the trainer finished just before its worker died
        return 0
    # two multi-process runs on one node would both take accelerate's default port (29500)
    launch_args = ["--main_process_port", str(free_port())] if accelerate_config else None
    status = compare.launch_run(run, state, Path(root), accelerate_config, launch_until_cancelled, launch_args)
    if status < 0 or status >= 128:  # killed by a signal (128+N through the supervisor), or interrupted (130)
        raise TrainerDied(f"the trainer of {run.name} died (exit status {status}) and was retried "
                          "from its last checkpoint until --max_retries ran out")
    return status


def launch_until_cancelled(cmd: list[str], log_path: Path) -> int:
    """compare.launch_subprocess, but a cancelled task first lets its trainer save a checkpoint and stop."""
    from diffusers_optim.compare import shown_command

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        newline = "\n" if log.tell() else ""  # a killed attempt's last line (its progress bar) has no newline
        log.write(f"{newline}==> {shown_command(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return proc.wait(timeout=POLL_S)  # in slices: ray.cancel's KeyboardInterrupt lands between them
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)  # the supervisor passes one SIGTERM on: checkpoint, then exit
            wait_through_interrupts(proc)
            raise


def wait_through_interrupts(proc: subprocess.Popen) -> None:
    """Wait for a trainer that is saving its checkpoint: Ray repeats a cancel whose task is still running (each a
    KeyboardInterrupt here), and a task that ended first would let the trainer be killed mid-save."""
    while proc.poll() is None:
        with contextlib.suppress(KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.wait(timeout=POLL_S)


def free_port() -> int:
    """A TCP port free on this node now, for one `accelerate launch`'s rendezvous."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
