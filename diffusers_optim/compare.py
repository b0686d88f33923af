"""Equal-budget comparisons: arms (optimizer x any --grid of training flags) run over seeds, then a report.

    diffusers-optim compare --optimizers adamw sgd:lr=0.01,momentum=0.9 lion:lr=3e-5 --seeds 0 1 \\
        --output_dir outputs/cmp [--grid lr_warmup_steps=0,100] [--lr_grid 0.3 1 3] [training flags...]

An arm is one optimizer spec with one value of every --grid; every arm gets the same training flags, step
budget and seed list, so only what names the arm differs (the trainer derives data order, noise, timesteps,
sampling noise and, unless --fixed_init, the initial weights from --seed). Each run is its own trainer process (or
`accelerate launch`), on a pool of this machine (--backend local) or as a task on a Ray cluster (--backend ray, see
ray_backend.py), so the same command scales to many GPUs and machines. Layout of --output_dir: plan.json (written
first), runs/<arm>-lr<lr>-s<seed>/, tuning/ (lr-grid trials), logs/, failures.json, then summary.json/csv,
report.html and report.md (see diffusers_optim/report/).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any

from diffusers_optim import rundir
from diffusers_optim.arms import NOT_ARM_KEYS, arm_names, arm_settings, arm_slugs, settings_from_args
from diffusers_optim.checkpoint import all_checkpoints
from diffusers_optim.config import (
    SECRET_FIELDS,
    coerce_value,
    field_types,
    flag_aliases,
    parse_train_args,
    redact_argv,
    split_secrets,
    unknown_flag,
)
from diffusers_optim.errors import UserError
from diffusers_optim.live import ProgressBoard, final_lines, live_view
from diffusers_optim.optim.args import split_top_level
from diffusers_optim.ray_backend import RaySettings, add_ray_flags, connected, free_port, resolve_backend
from diffusers_optim.report import last_value, read_json, read_metrics, summarize
from diffusers_optim.report.verdicts import MIN_EFFECT_HELP, parse_min_effects

logger = logging.getLogger(__name__)

FALLBACK_LR = 1e-4  # for a registry entry without a default lr
# flags the comparison sets per run; passing them through would break the equal-budget design
CONTROLLED_FLAGS = (
    "optimizer",
    "optimizer_args",
    "learning_rate",
    "seed",
    "output_dir",
    "run_name",
    "run_group",
    "arm_name",
    "resume_from_checkpoint",
    "overwrite_output_dir",
)
# flags that may differ between a finished run and the plan without making it a different run
NOT_COMPARED = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "logger", "arm_name", *SECRET_FIELDS)
# trainer flags that name a run rather than set it: a rerun finds an earlier version's folders by the other flags
NAMING_FLAGS = ("--run_name", "--arm_name")
# secret flags reach the trainers through their environment, never through argv (plan.json, logs, `ps`)
SECRET_ENV = {"hub_token": "HF_TOKEN"}
# How long a rerun waits for a trainer left by a killed comparison to save its checkpoint and let go of its folder.
ORPHAN_WAIT_S = 120
# A tiny supervisor in front of every trainer (Linux). PR_SET_PDEATHSIG makes the kernel signal it when the
# comparison dies, even by SIGKILL, where no handler of ours could run; it passes ONE SIGTERM on, so the trainer
# checkpoints and exits. Why not exec the trainer with the death signal set on it directly: the kernel repeats the
# signal once for every thread of the dying comparison (its thread pool), and a second SIGTERM cuts the trainer's
# checkpoint short. subprocess's preexec_fn would also be unsafe with that thread pool. The parent-pid check
# covers a comparison that died before prctl took effect; Ctrl-C reaches the trainer itself (same process group).
# The trainer gets the same death signal from the supervisor (one thread: one signal), for a supervisor that is
# itself killed: Ray SIGKILLs the children of a worker whose task is cancelled with force.
DIE_WITH_PARENT = """
import ctypes, os, signal, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen(sys.argv[2:], preexec_fn=lambda: libc.prctl(1, signal.SIGTERM))
forwarded = []
def forward(signum, frame):
    if not forwarded:
        forwarded.append(signum)
        child.send_signal(signal.SIGTERM)
signal.signal(signal.SIGTERM, forward)
code = child.wait()
sys.exit(128 - code if code < 0 else code)
"""
# training flags that set a generic optimizer hyperparameter (the trainer maps them onto the registry's names)
GRID_GENERIC = {
    "adam_beta1": "betas",
    "adam_beta2": "betas",
    "adam_weight_decay": "weight_decay",
    "adam_epsilon": "eps",
    "momentum": "momentum",
}
METRIC_PREFIXES = ("val/", "val_t/", "eval/", "train/", "loss_t/", "perf/", "optim/")
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train_scripts" / "train_unconditional.py"

Launcher = Callable[[list[str], Path], int]


@dataclass(frozen=True)
class OptimizerChoice:
    """One `name[:k=v,...]` from --optimizers, resolved once by the registry."""

    text: str  # as the user wrote it
    name: str  # the registry's canonical name
    lr: float  # base learning rate (the spec's lr=, else the registry default)
    extra: (
        str | None
    )  # every other resolved hyperparameter in the optimizer's own names, for --optimizer_args


@dataclass(frozen=True)
class Arm:
    """One optimizer choice with one value of every --grid flag: the unit that is run over seeds."""

    choice: OptimizerChoice
    settings: dict[str, str]  # grid flag -> value, in --grid order
    extra: (
        str | None
    )  # the choice's resolved hyperparameters minus those a grid flag sets, for --optimizer_args
    label: str = ""  # the arm's one name: the optimizer and what distinguishes it (arms.arm_names)
    slug: str = ""  # the run folders' prefix, derived from the name (arms.arm_slugs): `adam-betas=0.5-0.999`

    def flags(self) -> list[str]:
        """Trainer flags of the arm after --optimizer and --learning_rate: the grid's values, then its other
        resolved hyperparameters."""
        args: list[str] = []
        for flag, value in self.settings.items():
            args += [f"--{flag}", value]
        if self.extra:
            args += ["--optimizer_args", self.extra]
        return args


@dataclass
class PlannedRun:
    """One training run of the comparison."""

    name: str
    stage: str  # "tune" (lr-grid trial on the first seed) or "final"
    optimizer: str  # the registry's name
    spec: str
    learning_rate: float
    seed: int
    path: str  # relative to the comparison folder
    args: list[str] = field(default_factory=list)  # trainer flags (without --resume_from_checkpoint)
    arm: str = ""  # the arm's name
    settings: dict[str, str] = field(default_factory=dict)  # the arm's --grid values


# ---- parsing and validation (all before any run starts) ---------------------------------------


def parse_spec_text(text: str) -> tuple[str, dict[str, str]]:
    """`sgd:lr=0.01,momentum=0.9` -> ("sgd", {"lr": "0.01", "momentum": "0.9"}), syntax only."""
    name, _, rest = text.partition(":")
    if not name.strip():
        raise UserError(f"optimizer spec '{text}' has no name; expected name[:key=value,...]")
    args: dict[str, str] = {}
    if rest.strip():
        for item in split_top_level(rest, what=f"optimizer spec '{text}'"):
            key, eq, value = item.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise UserError(f"optimizer spec '{text}': '{item}' is not key=value")
            if key.strip() in args:
                raise UserError(f"optimizer spec '{text}': '{key.strip()}' is given twice")
            args[key.strip()] = value.strip()
    elif ":" in text:
        raise UserError(f"optimizer spec '{text}' ends with ':'; expected name[:key=value,...]")
    return name.strip(), args


def parse_float(text: str, what: str, positive: bool = True) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{what}: cannot read {text!r} as a number") from None
    if not math.isfinite(value) or (positive and value <= 0):
        raise UserError(f"{what} must be a positive number, got {text!r}")
    return value


def resolve_choice(text: str) -> OptimizerChoice:
    """Resolve one spec with the registry (name, arguments, ranges): its lr and the rest as --optimizer_args."""
    from diffusers_optim.optim import format_optimizer_args, get_spec, parse_optimizer_args, resolve

    name, raw = parse_spec_text(text)
    spec = get_spec(name)
    try:
        resolved = resolve(spec, parse_optimizer_args(",".join(f"{k}={v}" for k, v in raw.items())))
    except UserError as err:
        raise UserError(f"optimizer spec '{text}': {err}") from None
    lr_name = spec.hparam_names.get("lr", "lr")
    rest = {k: v for k, v in resolved.kwargs.items() if k != lr_name}
    return OptimizerChoice(
        text=text,
        name=spec.name,
        lr=float(resolved.lr or FALLBACK_LR),
        extra=format_optimizer_args(rest) or None,
    )


def resolve_choices(texts: list[str]) -> list[OptimizerChoice]:
    """All specs, validated; duplicates are errors."""
    if not texts:
        raise UserError("--optimizers needs at least one optimizer, e.g. --optimizers adamw lion:lr=3e-5")
    choices = [resolve_choice(t) for t in texts]
    seen: dict[tuple, str] = {}
    for c in choices:
        key = (c.name, c.lr, c.extra)
        if key in seen:
            raise UserError(f"optimizer specs '{seen[key]}' and '{c.text}' are the same run; list each once")
        seen[key] = c.text
    return choices


def parse_lr_grid(values: list[str] | None) -> list[float] | None:
    """--lr_grid multipliers: positive, distinct numbers."""
    if values is None:
        return None
    if not values:
        raise UserError("--lr_grid needs at least one multiplier, e.g. --lr_grid 0.3 1 3")
    grid = [parse_float(v, "--lr_grid") for v in values]
    if len(set(grid)) != len(grid):
        raise UserError(f"--lr_grid has repeated multipliers: {' '.join(values)}")
    return grid


def parse_passthrough(rest: list[str]) -> list[tuple[str, str]]:
    """Training flags given to every run, as (flag, value); a bare boolean flag means true."""
    pairs, types = [], field_types()
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise UserError(f"unexpected argument '{token}' (training flags look like --max_train_steps 200)")
        key, eq, value = token[2:].partition("=")
        key = flag_aliases().get(key, key)  # diffusers' --eval_batch_size is our --num_samples
        if not eq and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            value, i = rest[i + 1], i + 1
        elif not eq:
            value = "true"
        i += 1
        if key != "config" and key not in types:
            raise unknown_flag(f"--{key}", "training flag")
        if key in SECRET_FIELDS:
            raise UserError(f"--{key} reached the run flags; pass it before them")  # split_secrets took it out
        if key in CONTROLLED_FLAGS:
            raise UserError(f"--{key} is set by the comparison for each run; it cannot be passed through")
        if key != "config":
            coerce_value(key, value, types[key])
        pairs.append((key, value))
    return pairs


def parse_grids(texts: list[str] | None, passthrough: list[tuple[str, str]]) -> dict[str, list[str]]:
    """--grid FLAG=V1,V2,... (repeatable) -> {flag: values}; each value is read by the flag's declared type."""
    grids: dict[str, list[str]] = {}
    types, given = field_types(), {k for k, _ in passthrough}
    for text in texts or []:
        flag, eq, rest = text.partition("=")
        flag = flag.strip().removeprefix("--")
        values = [v.strip() for v in rest.split(",")] if eq else []
        if not flag or not values or not all(values):
            raise UserError(f"--grid '{text}': expected FLAG=V1,V2,... e.g. --grid lr_warmup_steps=0,100,500")
        if flag not in types:
            raise unknown_flag(f"--{flag}", "--grid training flag")
        if flag in CONTROLLED_FLAGS:
            hint = {
                "optimizer": "--optimizers",
                "learning_rate": "--lr_grid or lr= in a spec",
                "seed": "--seeds",
            }
            raise UserError(
                f"--grid {flag}: the comparison sets it per run ({hint.get(flag, 'not a grid flag')})"
            )
        if flag in grids or flag in given:
            raise UserError(f"--{flag} is given twice (in --grid and as a training flag or another --grid)")
        if flag in NOT_ARM_KEYS:
            raise UserError(
                f"--grid {flag}: it does not change what is trained, so its runs would be one arm"
            )
        try:
            typed = [coerce_value(flag, v, types[flag]) for v in values]
        except UserError as err:
            raise UserError(f"--grid {flag}: {str(err).split(': ', 1)[-1]}") from None
        if len({json.dumps(v) for v in typed}) != len(typed):
            raise UserError(f"--grid {flag} has repeated values: {','.join(values)}")
        grids[flag] = values
    return grids


def build_arms(choices: list[OptimizerChoice], grids: dict[str, list[str]]) -> list[Arm]:
    """The cross product of the optimizer choices and every grid, each with its name and folder prefix."""
    combos = [(c, dict(zip(grids, values))) for c in choices for values in product(*grids.values())]
    arms = [Arm(c, s, arm_extra(c, s)) for c, s in combos]
    # named from the settings each arm's runs will record (as the report names runs added by hand from their
    # config.json), the --grid flags first and in their order
    recorded = [arm_settings(settings_from_args(arm_flags(arm))) for arm in arms]
    names = arm_names([{**{k: r[k] for k in grids if k in r}, **r} for r in recorded])
    return [replace(arm, label=name, slug=slug) for arm, name, slug in zip(arms, names, arm_slugs(names))]


def arm_flags(arm: Arm) -> list[str]:
    """The trainer flags that make the arm (those of plan_run without the seed and the names)."""
    return ["--optimizer", arm.choice.name, "--learning_rate", fmt_lr(arm.choice.lr), *arm.flags()]


def arm_extra(choice: OptimizerChoice, settings: dict[str, str]) -> str | None:
    """The choice's --optimizer_args without what a grid flag sets, so the flag is the value's only source.

    The choice carries every resolved hyperparameter (defaults included); `--grid adam_beta1=...` next to
    `betas=(0.9,0.999)` there would be the same setting twice. The registry fills what the flag leaves open
    (beta2) with the optimizer's default, which is what the dropped entry held unless the spec set it.
    """
    from diffusers_optim.optim import format_optimizer_args, get_spec, parse_optimizer_args

    varied = [GRID_GENERIC[f] for f in settings if f in GRID_GENERIC]
    if not varied:
        return choice.extra
    spec, given = get_spec(choice.name), parse_spec_text(choice.text)[1]
    own = {spec.hparam_names.get(key, key) for key in varied}
    clash = sorted((set(varied) | own) & set(given))
    if clash:
        flag = next(
            f for f in settings if f in GRID_GENERIC and spec.hparam_names.get(GRID_GENERIC[f]) in own
        )
        raise UserError(
            f"optimizer spec '{choice.text}' sets {clash[0]}, which --grid {flag} varies; set it in one place"
        )
    rest = (
        {k: v for k, v in parse_optimizer_args(choice.extra).items() if k not in own} if choice.extra else {}
    )
    return format_optimizer_args(rest) or None


def check_arms(arms: list[Arm], common: list[str]) -> None:
    """Every arm's flags through the training script's own parser and checks, before any run starts."""
    from diffusers_optim.optim import get_spec
    from diffusers_optim.trainer import resolve_optimizer

    for arm in arms:
        try:
            lr = ["--learning_rate", fmt_lr(arm.choice.lr)]
            cfg = parse_train_args([*common, "--optimizer", arm.choice.name, *lr, *arm.flags()])
            spec = get_spec(cfg.optimizer)
            resolve_optimizer(cfg, spec)
            check_schedule(cfg, spec)
        except UserError as err:
            raise UserError(f"arm '{arm.label}': {err}") from None


def check_schedule(cfg, spec) -> None:
    """The LR schedule's own resolution and checks (warmup >= 0 and below the budget), on a stand-in optimizer."""
    import torch

    from diffusers_optim.schedules import build_lr_scheduler, default_warmup_steps, resolve_lr_scheduler

    if cfg.num_epochs is not None:
        return  # the budget depends on the data set's size; the trainer checks it when it starts
    name = resolve_lr_scheduler(cfg.lr_scheduler, spec.schedule_free)
    warmup = (
        cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else default_warmup_steps(cfg.max_train_steps)
    )
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    build_lr_scheduler(name, stand_in, warmup, cfg.max_train_steps, cfg.lr_num_cycles)


# ---- planning ------------------------------------------------------------------------------


def fmt_lr(lr: float) -> str:
    return f"{lr:.6g}"


def plan_run(arm: Arm, lr: float, seed: int, stage: str, common: list[str], group: str) -> PlannedRun:
    """One run: the shared training flags, then what differs (the arm's settings, lr, seed)."""
    name = f"{arm.slug}-lr{fmt_lr(lr)}-s{seed}"
    path = f"{'tuning' if stage == 'tune' else 'runs'}/{name}"
    args = [*common, "--optimizer", arm.choice.name, "--learning_rate", fmt_lr(lr), "--seed", str(seed)]
    args += arm.flags()
    args += ["--run_group", group, "--run_name", name, "--arm_name", arm.label]
    choice = arm.choice
    return PlannedRun(
        name,
        stage,
        choice.name,
        choice.text,
        float(fmt_lr(lr)),
        seed,
        path,
        args,
        arm.label,
        dict(arm.settings),
    )


def run_key(stage: str, args: list[str]) -> tuple:
    """What makes two planned runs the same run whatever they are named: the stage and every other trainer flag."""
    pairs = zip(args[::2], args[1::2])
    return (stage, *(item for pair in pairs if pair[0] not in NAMING_FLAGS for item in pair))


def adopt_earlier_folders(runs: list[PlannedRun], root: Path, earlier: list[dict[str, Any]]) -> list[PlannedRun]:
    """A rerun of a comparison planned by an earlier version (whose run names differ) finds its folders: a planned
    run whose folder is not there takes the name, folder and flags of the same run in the earlier plan.json."""
    found = {run_key(r.get("stage", "final"), r.get("args", [])): r for r in earlier
             if r.get("path") and (root / r["path"]).exists()}
    adopted = []
    for run in runs:
        old = found.get(run_key(run.stage, run.args))
        if old is not None and old["path"] != run.path and not (root / run.path).exists():
            run = replace(run, name=old["name"], path=old["path"], args=list(old["args"]))
        adopted.append(run)
    return adopted


def write_plan(root: Path, plan: dict[str, Any], runs: list[PlannedRun]) -> Path:
    path = root / rundir.PLAN
    rundir.write_json(path, {**plan, "runs": [asdict(r) for r in runs]})
    return path


# ---- running -------------------------------------------------------------------------------


def trainer_command(
    run: PlannedRun, root: Path, accelerate_config: str | None, launch_args: list[str] | None = None
) -> list[str]:
    """The trainer as its own process: the CLI, or `accelerate launch` with the user's config (and launch_args,
    e.g. a --main_process_port of its own)."""
    args = [*run.args, "--output_dir", str(root / run.path)]
    if accelerate_config is None:
        return die_with_parent([sys.executable, "-m", "diffusers_optim.cli", "train", *args])
    exe = shutil.which("accelerate")
    launch = [exe, "launch"] if exe else [sys.executable, "-m", "accelerate.commands.launch"]
    launch += ["--config_file", accelerate_config, *(launch_args or [])]
    return die_with_parent([*launch, str(TRAIN_SCRIPT), *args])


def die_with_parent(cmd: list[str]) -> list[str]:
    """The command, run so that it gets one SIGTERM when this process dies (no orphan keeps training)."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), *cmd]


def shown_command(cmd: list[str]) -> str:
    """The command as logged: without the exec wrapper, secrets redacted."""
    if len(cmd) > 3 and cmd[1:3] == ["-c", DIE_WITH_PARENT]:
        cmd = cmd[4:]
    return shlex.join(redact_argv(cmd))


def launch_run(
    run: PlannedRun,
    state: str,
    root: Path,
    accelerate_config: str | None,
    launcher: Launcher,
    launch_args: list[str] | None = None,
) -> int:
    """Train one run that is not complete, from the state of its folder (see run_state); returns the exit status.

    The local pool calls it on the comparison's machine, the Ray backend inside the run's task on its node."""
    cmd = trainer_command(run, root, accelerate_config, launch_args)
    if state == "resume":
        cmd += ["--resume_from_checkpoint", "latest"]
    elif state == "restart":
        remove_run_dir(root / run.path)  # killed before its first checkpoint: nothing to keep
    return launcher(cmd, run_log(root, run))


def own_port(accelerate_config: str | None, num_parallel: int) -> list[str] | None:
    """`--main_process_port` of a free port for a one-machine `accelerate launch` run beside others on this machine:
    they would all take the config's port (or accelerate's 29500), and every one but the first would fail to start.
    A config of several machines keeps its port, which the other machines dial."""
    if accelerate_config is None or num_parallel < 2:
        return None
    from accelerate.commands.config.config_args import load_config_from_file

    if (load_config_from_file(accelerate_config).num_machines or 1) > 1:
        return None
    return ["--main_process_port", str(free_port())]


def run_log(root: Path, run: PlannedRun) -> Path:
    """The file a run's trainer output is appended to (every attempt of the run)."""
    return root / rundir.LOGS / f"{run.name}.log"


def launch_subprocess(cmd: list[str], log_path: Path) -> int:
    """Run one trainer process, its output appended to log_path; returns its exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"==> {shown_command(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def config_differences(run: PlannedRun, run_dir: Path) -> list[str]:
    """Planned flags whose value differs from the config the run folder was trained with."""
    saved = read_json(run_dir / "config.json").get("config", {})
    types, diffs = field_types(), []
    args = run.args
    for key, value in zip(args[::2], args[1::2]):
        key = key[2:]
        if key in NOT_COMPARED or key not in types:
            continue
        if coerce_value(key, value, types[key]) != saved.get(key):
            diffs.append(key)
    saved_dir = saved.get("output_dir")
    if saved_dir and Path(saved_dir).resolve() != run_dir.resolve():
        diffs.append("output_dir")
    return diffs


def run_state(run: PlannedRun, root: Path) -> str:
    """complete | resume | restart | fresh | mismatch: what to do with the run's folder."""
    run_dir = root / run.path
    if not run_dir.exists():
        return "fresh"
    # a trainer left by a comparison killed a moment ago gets SIGTERM and is still saving its checkpoint
    rundir.wait_unlocked(run_dir, ORPHAN_WAIT_S)
    if (run_dir / rundir.CONFIG).is_file() and config_differences(run, run_dir):
        return "mismatch"
    if rundir.is_complete(run_dir):
        return "complete"
    # a damaged checkpoint is the trainer's to report (it resumes from an older one or says why it cannot)
    return "resume" if all_checkpoints(run_dir) else "restart"


def check_reusable(runs: list[PlannedRun], root: Path, overwrite: bool) -> None:
    """Refuse (before any run) to train over a folder that holds a differently-configured run."""
    for run in runs:
        if run_state(run, root) != "mismatch":
            continue
        diffs = ", ".join(config_differences(run, root / run.path))
        if not overwrite:
            raise UserError(
                f"{root / run.path} holds a run with a different config (differs in: {diffs}); "
                "use a new --output_dir, or --overwrite to retrain it"
            )
        logger.warning("retraining %s (config differs in: %s)", run.name, diffs)
        remove_run_dir(root / run.path)


def remove_run_dir(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def last_lines(path: Path, count: int = 20) -> str:
    lines = (
        [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if path.is_file()
        else []
    )
    return "\n".join(lines[-count:])


def execute(
    runs: list[PlannedRun],
    root: Path,
    launcher: Launcher,
    accelerate_config: str | None,
    num_parallel: int = 1,
    progress_every: float | None = None,
    ray: RaySettings | None = None,
) -> dict[str, str]:
    """Train every run not already complete (num_parallel at a time on the local pool, or as Ray tasks when `ray`
    is given); a failure is recorded and the rest go on."""
    from concurrent.futures import ThreadPoolExecutor

    failures_path = root / rundir.FAILURES
    failures = read_json(failures_path)
    lock = threading.Lock()
    stage = "tuning" if runs and runs[0].stage == "tune" else "runs"
    board = ProgressBoard(root, [(r.name, r.path) for r in runs], stage)
    logger.info(
        "%s: %d to train, %s; each run's full output goes to %s",
        stage,
        len(runs),
        f"{num_parallel} at a time" if ray is None else ray.describe(),
        root / "logs" / "<run>.log",
    )

    def record(run: PlannedRun, ok: bool, status: int | str = 0) -> None:
        with lock:
            if ok:
                failures.pop(run.name, None)
            else:
                what = f"exit status {status}" if isinstance(status, int) else status
                failures[run.name] = f"{what}\n{last_lines(run_log(root, run))}".strip()
                logger.warning("run %s FAILED (%s); see %s", run.name, what.splitlines()[0], run_log(root, run))
            rundir.write_json(failures_path, failures)

    def reused(run: PlannedRun, state: str) -> bool:
        if state == "complete":
            logger.info("reusing complete run %s", run.path)
            board.reused(run.name)
            record(run, True)
        return state == "complete"

    def finished(run: PlannedRun, status: int | str) -> None:
        ok = status == 0 and run_state(run, root) == "complete"
        record(run, ok, status)
        board.finished(run.name, ok)

    def train_one(run: PlannedRun) -> None:
        state = run_state(run, root)
        if not reused(run, state):
            board.started(run.name)
            port = own_port(accelerate_config, num_parallel)  # each launch its own
            finished(run, launch_run(run, state, root, accelerate_config, launcher, port))

    with live_view(board, progress_every):
        if ray is None:
            with ThreadPoolExecutor(max_workers=num_parallel) as pool:
                list(pool.map(train_one, runs))  # list() re-raises the first exception of a worker
        else:
            from diffusers_optim import ray_backend

            todo = [run for run in runs if not reused(run, run_state(run, root))]
            ray_backend.execute(todo, root, accelerate_config, ray, board.started, finished)
    return failures


def final_val_loss(run_dir: Path) -> float:
    """A finished run's final val/loss; inf for a failed or diverged run."""
    summary = read_json(run_dir / "run_summary.json")
    if summary.get("status") != "complete":
        return math.inf
    value = summary.get("final", {}).get("val/loss")
    if value is None:
        value = last_value(read_metrics(run_dir / "metrics.jsonl"), "val/loss")
    return float(value) if value is not None and math.isfinite(value) else math.inf


def choose_lrs(arms: list[Arm], tune_runs: list[PlannedRun], root: Path) -> dict[str, float]:
    """Each arm's grid lr with the best final val/loss (its base lr if every trial failed)."""
    chosen = {}
    for arm in arms:
        trials = [r for r in tune_runs if r.arm == arm.label]
        scored = [(final_val_loss(root / r.path), r.learning_rate) for r in trials]
        best_loss, best_lr = min(scored)
        if math.isinf(best_loss):
            logger.warning("every lr trial of %s failed; its final runs use the base lr", arm.label)
            best_lr = arm.choice.lr
        chosen[arm.label] = best_lr
    return chosen


def link_tuned_runs(final_runs: list[PlannedRun], tune_runs: list[PlannedRun], root: Path) -> None:
    """A final run identical to a finished trial (same lr, first seed) points to it instead of rerunning."""
    trials = {run_key("", r.args): r for r in tune_runs}  # by flags: either may keep an earlier version's name
    for run in final_runs:
        trial = trials.get(run_key("", run.args))
        target = root / run.path
        if trial and not target.exists() and run_state(trial, root) == "complete":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(Path("..") / trial.path)


# ---- the command ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-optim compare",
        allow_abbrev=False,  # --seed must reach the trainer's error, not silently become --seeds
        description=__doc__.splitlines()[0],
        epilog="Any other --flag is a training flag given unchanged to every run (see `diffusers-optim train --help`).",
    )
    parser.add_argument(
        "--optimizers", nargs="*", required=True, help="Specs: name[:k=v,...]; lr= sets the run's lr."
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="Seeds, the same for every optimizer."
    )
    parser.add_argument("--output_dir", required=True, help="The comparison folder.")
    parser.add_argument(
        "--grid",
        action="append",
        default=None,
        metavar="FLAG=V1,V2,...",
        help="Vary any training flag: one arm per value, crossed with the optimizers and the other grids "
        "(repeatable), e.g. --grid lr_warmup_steps=0,100,500 --grid max_grad_norm=0,1.0",
    )
    parser.add_argument(
        "--lr_grid",
        nargs="*",
        default=None,
        help="Multipliers of each arm's base lr to try (on the first seed).",
    )
    parser.add_argument("--accelerate_config", default=None, help="Launch each run with `accelerate launch`.")
    parser.add_argument("--target_val_loss", type=float, default=None, help="Time-to-target threshold.")
    parser.add_argument(
        "--rank_by",
        default=None,
        help="Metric to rank arms on, with intervals over seeds (default: eval/fd when logged, else val/loss).",
    )
    parser.add_argument("--min_effect", nargs="*", default=None, metavar="METRIC=VALUE", help=MIN_EFFECT_HELP)
    parser.add_argument(
        "--run_group", default=None, help="W&B group of every run (default: the folder's name)."
    )
    parser.add_argument("--overwrite", action="store_true", help="Retrain run folders whose config differs.")
    parser.add_argument(
        "--num_parallel",
        type=int,
        default=None,
        help="Runs trained at once by --backend local (each gets cores/N threads; default: 1); on GPUs pair it "
        "with CUDA_VISIBLE_DEVICES per run.",
    )
    add_ray_flags(parser)
    parser.add_argument(
        "--progress_every",
        type=float,
        default=None,
        help="Seconds between progress updates (default: live on a terminal, a plain line every 30 s otherwise).",
    )
    return parser


@dataclass
class Comparison:
    """The validated inputs of one comparison."""

    root: Path
    choices: list[OptimizerChoice]
    arms: list[Arm]
    grids: dict[str, list[str]]
    seeds: list[int]
    grid: list[float] | None
    common: list[str]
    group: str
    accelerate_config: str | None
    target: float | None
    rank_by: str | None
    overwrite: bool
    min_effect: dict[str, float]
    command: str
    num_parallel: int = 1
    progress_every: float | None = None
    ray: RaySettings | None = None  # --backend ray: where and with what each run is scheduled; None: local pool
    secrets: dict[str, str] = field(default_factory=dict, repr=False)  # e.g. hub_token, for the trainers' env


def parse_comparison(argv: list[str]) -> Comparison:
    """Parse and validate everything a comparison needs; any problem is a UserError before any run."""
    command = shlex.join(["diffusers-optim", "compare", *redact_argv(argv)])
    argv, secrets = split_secrets(argv)  # before anything can record the command line
    args, rest = build_parser().parse_known_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds has repeated values: {' '.join(map(str, args.seeds))}")
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise UserError(f"accelerate config not found: {args.accelerate_config}")
    if args.accelerate_config and not TRAIN_SCRIPT.is_file():
        raise UserError(f"--accelerate_config needs {TRAIN_SCRIPT} (a source checkout of diffusers-optim)")
    if args.num_parallel is not None and args.num_parallel < 1:
        raise UserError(f"--num_parallel must be at least 1 (got {args.num_parallel})")
    ray = resolve_backend(args)
    if args.progress_every is not None and not args.progress_every > 0:
        raise UserError(f"--progress_every must be a positive number of seconds (got {args.progress_every})")
    if args.rank_by is not None and not args.rank_by.startswith(METRIC_PREFIXES):
        raise UserError(
            f"--rank_by {args.rank_by}: not a logged metric (they start with {', '.join(METRIC_PREFIXES)})"
        )
    grid = parse_lr_grid(args.lr_grid)
    choices = resolve_choices(args.optimizers)
    passthrough = parse_passthrough(rest)
    common = [item for key, value in passthrough for item in (f"--{key}", value)]
    grids = parse_grids(args.grid, passthrough)
    arms = build_arms(choices, grids)
    check_arms(arms, common)
    root = Path(args.output_dir).resolve()
    return Comparison(
        root=root,
        choices=choices,
        arms=arms,
        grids=grids,
        seeds=args.seeds,
        grid=grid,
        common=common,
        group=args.run_group or root.name,
        accelerate_config=args.accelerate_config,
        target=args.target_val_loss,
        rank_by=args.rank_by,
        overwrite=args.overwrite,
        min_effect=parse_min_effects(args.min_effect),
        command=command,
        secrets=secrets,
        num_parallel=args.num_parallel or 1,
        progress_every=args.progress_every,
        ray=ray,
    )


def run_comparison(cmp: Comparison, launcher: Launcher = launch_subprocess) -> dict[str, Path]:
    """Plan, (tune,) train every run, then write the summary and reports; returns the report paths."""
    with connected(cmp.ray):  # --backend ray: on the cluster for the whole comparison (a no-op otherwise)
        return plan_and_train(cmp, launcher)


def plan_and_train(cmp: Comparison, launcher: Launcher) -> dict[str, Path]:
    """run_comparison's body: the plan, the tuning stage, the final stage, the summary."""
    cmp.root.mkdir(parents=True, exist_ok=True)
    plan: dict[str, Any] = dict(
        command=cmp.command,
        optimizers=[asdict(c) for c in cmp.choices],
        arms=[dict(label=a.label, slug=a.slug, optimizer=a.choice.name, settings=a.settings) for a in cmp.arms],
        seeds=cmp.seeds,
        grid=cmp.grids,
        rank_by=cmp.rank_by,
        min_effect=cmp.min_effect,
        lr_grid=cmp.grid,
        train_args=cmp.common,
        run_group=cmp.group,
        accelerate_config=cmp.accelerate_config,
        backend="ray" if cmp.ray else "local",
        ray=cmp.ray.as_dict() if cmp.ray else None,
    )
    earlier = read_json(cmp.root / rundir.PLAN).get("runs", [])  # a rerun's: its folders may be named otherwise
    tune: list[PlannedRun] = []
    if cmp.grid:
        tune = [
            plan_run(a, a.choice.lr * m, cmp.seeds[0], "tune", cmp.common, cmp.group)
            for a in cmp.arms
            for m in cmp.grid
        ]
        tune = adopt_earlier_folders(tune, cmp.root, earlier)
        write_plan(cmp.root, {**plan, "chosen_lr": None}, tune)
        check_reusable(tune, cmp.root, cmp.overwrite)
        execute(tune, cmp.root, launcher, cmp.accelerate_config, cmp.num_parallel, cmp.progress_every, cmp.ray)
    chosen = choose_lrs(cmp.arms, tune, cmp.root) if cmp.grid else {a.label: a.choice.lr for a in cmp.arms}
    final = [
        plan_run(a, chosen[a.label], s, "final", cmp.common, cmp.group) for a in cmp.arms for s in cmp.seeds
    ]
    final = adopt_earlier_folders(final, cmp.root, earlier)
    write_plan(cmp.root, {**plan, "chosen_lr": chosen}, tune + final)
    check_reusable(final, cmp.root, cmp.overwrite)
    link_tuned_runs(final, tune, cmp.root)
    execute(final, cmp.root, launcher, cmp.accelerate_config, cmp.num_parallel, cmp.progress_every, cmp.ray)
    return summarize(cmp.root, cmp.target, cmp.rank_by)  # plan.json carries --min_effect


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    cmp = parse_comparison(argv)
    if cmp.num_parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
        # share the cores between the runs instead of letting each one oversubscribe them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cmp.num_parallel))
    # the trainers find a --hub_token in their environment (HF_TOKEN), so it is in no command line or file
    os.environ.update({SECRET_ENV[key]: value for key, value in cmp.secrets.items()})
    # one comparison per folder; a comparison killed a moment ago lost its lock with its life
    # connected first: a cluster that cannot be reached is an error before the folder is touched
    with connected(cmp.ray), rundir.locked(cmp.root, "comparison folder"):
        paths = run_comparison(cmp)
    logger.info("summary: %s, %s", paths["summary_json"], paths["summary_csv"])
    logger.info("\n%s", final_lines(read_json(paths["summary_json"]), paths["report_html"]))
    return 0
