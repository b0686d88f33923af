"""Crash-safe, resumable checkpoints on top of `accelerator.save_state` / `load_state`.

A checkpoint is written under a hidden temporary name and renamed into place only when complete, so a run
killed mid-save never leaves a folder that looks resumable. `manifest.json` (every file with its size) is written
last and marks a checkpoint as complete; resume checks it, so a checkpoint damaged later (a truncated copy, a full
disk) is skipped for the newest intact one. Sizes, not checksums: they catch truncation and missing files at no
cost, where hashing would read every byte of a multi-GB checkpoint twice per save and resume.

Checkpoints assume a filesystem shared by all processes (as Accelerate's own save_state does).
Loading (accelerate 1.15): model weights come from safetensors; optimizer, LR scheduler and RNG files are
read with `torch.load(weights_only=True)`. Objects registered with `register_for_checkpointing` are read
with weights_only=False by Accelerate, so only resume from checkpoints you trust.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger

from diffusers_optim import rundir
from diffusers_optim.errors import UserError

logger = get_logger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-checkpoint-"
OLD_PREFIX = ".old-checkpoint-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# UNet2DModel config keys that decide the shapes of the saved tensors.
SHAPE_KEYS = (
    "sample_size",
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "norm_num_groups",
    "attention_head_dim",
    "time_embedding_type",
    "class_embed_type",
    "num_class_embeds",
)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def is_complete(path: Path) -> bool:
    """A checkpoint is complete when it has its final name and its manifest (written last)."""
    return CHECKPOINT_RE.match(path.name) is not None and (path / MANIFEST).is_file()


def build_manifest(path: Path) -> dict[str, int]:
    """Every file under a checkpoint folder (but the manifest) with its size in bytes."""
    return {f.relative_to(path).as_posix(): f.stat().st_size for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != MANIFEST}


def damage(path: Path) -> str | None:
    """Why a checkpoint cannot be trusted (missing manifest, missing or resized file), or None if it is intact."""
    try:
        expected = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST} (its save never finished)"
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size} (truncated or overwritten)"
    return None


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_RE.match(Path(path).name).group(1))


def latest_usable(output_dir: Path, warn: bool = True) -> Path | None:
    """The newest intact checkpoint of the current timeline; damaged newer ones are skipped with a warning."""
    for path in reversed(current_timeline(output_dir)):
        problem = damage(path)
        if problem is None:
            return path
        if warn:
            logger.warning(f"skipping damaged checkpoint {path}: {problem}", main_process_only=True)
    return None


def all_checkpoints(output_dir: Path) -> list[Path]:
    """Every folder with a checkpoint's final name, intact or not, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=checkpoint_step)


def current_timeline(output_dir: Path) -> list[Path]:
    """Every checkpoint folder but those beyond a rewind that a crash interrupted (they belong to the abandoned
    timeline and are on their way to .rewound: see rundir.rewind), oldest first."""
    cut = rundir.unfinished_rewind(output_dir)
    return [p for p in all_checkpoints(output_dir) if cut is None or checkpoint_step(p) <= cut]


def newer_checkpoints(output_dir: Path, step: int) -> list[Path]:
    """The checkpoint folders of steps after `step`, intact or not: on a resume at `step`, an abandoned timeline."""
    return [p for p in all_checkpoints(output_dir) if checkpoint_step(p) > step]


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints under output_dir/checkpoints, oldest first (by step)."""
    return [p for p in all_checkpoints(output_dir) if is_complete(p)]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder under path to disk, so a rename never points at unwritten data."""
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(folder)


def _write_json(path: Path, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale(root: Path) -> None:
    """Delete leftovers of saves that crashed (temporary and superseded folders)."""
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            logger.info(f"removing leftover of an interrupted save: {path}", main_process_only=True)
            shutil.rmtree(path, ignore_errors=True)


def _model_config(accelerator: Accelerator) -> dict[str, Any] | None:
    """Config of the first prepared model that has one (the UNet)."""
    for model in accelerator._models:
        config = getattr(accelerator.unwrap_model(model), "config", None)
        if config is not None:
            return dict(config)
    return None


def _prune(root: Path, total_limit: int) -> None:
    """Keep the newest total_limit complete checkpoints."""
    complete = list_checkpoints(root.parent)
    for old in complete[: max(len(complete) - total_limit, 0)]:
        logger.info(f"checkpoints_total_limit={total_limit}: removing {old}", main_process_only=True)
        shutil.rmtree(old)


def _commit(tmp: Path, final: Path, state_text: str) -> None:
    """Main process: mark the temporary checkpoint complete and move it into place atomically."""
    _write_json(tmp / STATE_FILE, state_text)
    _write_json(tmp / MANIFEST, json.dumps({"files": build_manifest(tmp)}, indent=2))  # last: marks it complete
    _fsync_tree(tmp)
    old = None
    if final.exists():  # saving the same step twice (e.g. after a resume): replace, never merge
        old = final.with_name(OLD_PREFIX + final.name)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    total_limit: int | None,
    model_config: dict[str, Any] | None = None,
) -> Path:
    """Save a resumable checkpoint of everything prepared by `accelerator`; all processes must call this."""
    model_config = model_config if model_config is not None else _model_config(accelerator)
    # Serialize first: a bad value fails here, before anything is written.
    state_text = json.dumps(
        {"step": step, **trainer_state, "model_config": model_config}, indent=2, default=str
    )
    root = Path(output_dir) / CHECKPOINTS_DIR
    tmp, final = root / f"{TMP_PREFIX}{step:06d}", root / checkpoint_name(step)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every process has written its RNG state before the rename
    if accelerator.is_main_process:
        _commit(tmp, final, state_text)
        if total_limit is not None:
            _prune(root, total_limit)
        logger.info(f"saved checkpoint {final}", main_process_only=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_of_step(output_dir: Path, step: int) -> Path | None:
    """The complete checkpoint saved at `step` (diffusers names it checkpoint-6, we checkpoint-000006)."""
    return next((p for p in list_checkpoints(output_dir) if checkpoint_step(p) == step), None)


def find_checkpoint(output_dir: Path, spec: str) -> Path | None:
    """The checkpoint to resume from: 'latest' (None if there is none yet) or a folder path."""
    if spec == "latest":
        found = current_timeline(Path(output_dir))
        usable = latest_usable(Path(output_dir))
        if found and usable is None:  # never a silent restart from scratch over a run's damaged checkpoints
            raise UserError(f"no usable checkpoint in {Path(output_dir) / CHECKPOINTS_DIR}: every one is damaged "
                            f"({found[-1].name}: {damage(found[-1])}); pass --overwrite_output_dir to start over")
        return usable
    path = Path(spec).expanduser()
    if not path.exists() and (Path(output_dir) / CHECKPOINTS_DIR / spec).exists():
        path = Path(output_dir) / CHECKPOINTS_DIR / spec  # diffusers-style: just the folder name
    elif not path.exists() and CHECKPOINT_RE.match(spec):
        path = checkpoint_of_step(Path(output_dir), int(CHECKPOINT_RE.match(spec).group(1))) or path
    if not path.is_dir():
        available = ", ".join(p.name for p in list_checkpoints(Path(output_dir))) or "none"
        raise UserError(
            f"--resume_from_checkpoint {spec}: no such folder (checkpoints in {output_dir}: {available})"
        )
    problem = damage(path) if CHECKPOINT_RE.match(path.name) else "a temporary name (its save was interrupted)"
    if problem is not None:
        raise UserError(f"--resume_from_checkpoint {spec}: not a complete checkpoint ({problem}); "
                        "use 'latest' or another checkpoint")
    return path


def _normalize(value: Any) -> Any:
    """Compare configs as JSON sees them (tuples and lists alike)."""
    return json.loads(json.dumps(value, default=str))


def shape_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two UNet configs in the keys that decide tensor shapes."""
    diffs = []
    for key in SHAPE_KEYS:
        if key in saved or key in current:
            old, new = _normalize(saved.get(key)), _normalize(current.get(key))
            if old != new:
                diffs.append(f"{key}: saved {old}, now {new}")
    return diffs


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer_state.json of a checkpoint folder."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise UserError(f"checkpoint {path} is incomplete: {STATE_FILE} is missing")
    try:
        return json.loads(state_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"checkpoint {path}: cannot read {STATE_FILE} ({err})") from None


def load_checkpoint(accelerator: Accelerator, path: Path, model_config: dict[str, Any]) -> dict[str, Any]:
    """Restore everything prepared by `accelerator` from `path` and return the trainer state."""
    state = read_trainer_state(path)
    saved_config = state.get("model_config")
    if saved_config is not None and model_config is not None:
        diffs = shape_differences(saved_config, dict(model_config))
        if diffs:
            raise UserError(f"checkpoint {path} was saved from a different model shape ({'; '.join(diffs)})")
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, ValueError, KeyError) as err:  # intact files that still do not fit this run
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load checkpoint {path}: {first}") from None
    logger.info(f"resumed from {path} at step {state.get('step')}", main_process_only=True)
    return state
