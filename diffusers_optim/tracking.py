"""Where metrics go: Accelerate's trackers (W&B, TensorBoard) and a local `metrics.jsonl` that needs no account."""

from __future__ import annotations

import math
import netrc
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger
from PIL import Image

from diffusers_optim import rundir
from diffusers_optim.errors import UserError

logger = get_logger(__name__)

TRACKERS = {"wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": ["wandb", "tensorboard"], "none": []}
STEP_KEY = "train/step"


def resolve_trackers(report_to: str) -> list[str]:
    """--report_to value -> Accelerate tracker names."""
    if report_to not in TRACKERS:
        from diffusers_optim.errors import unknown_choice

        raise unknown_choice("--report_to value", report_to, TRACKERS)
    return TRACKERS[report_to]


def wandb_has_credentials() -> bool:
    """True when W&B can reach a server: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].rstrip("/")
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def ensure_wandb_mode() -> str:
    """Offline mode with one notice when there is no login, instead of an interactive prompt or a crash."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        return mode
    if not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        logger.warning(
            "No W&B login found: logging to W&B in offline mode. Upload later with `wandb sync <output_dir>/wandb`.",
            main_process_only=True,
        )
        return "offline"
    return mode or "online"


def wandb_run_id(output_dir: Path) -> str:
    """A run id stored in the output folder, so a resumed run continues the same W&B run."""
    path = output_dir / rundir.WANDB_ID
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    rundir.write_text(path, run_id)
    return run_id


def init_trackers(accelerator: Accelerator, trackers: list[str], project: str, output_dir: Path,
                  config: dict[str, Any], run_name: str, group: str | None, tags: list[str],
                  entity: str | None = None) -> None:
    """Start the trackers on the main process; W&B gets the full config, group, name, tags and a stable id."""
    if not trackers:
        return
    init_kwargs: dict[str, Any] = {}
    if "wandb" in trackers:
        ensure_wandb_mode()
        init_kwargs["wandb"] = dict(
            name=run_name, group=group, tags=tags, dir=str(output_dir), entity=entity,
            id=wandb_run_id(output_dir) if accelerator.is_main_process else None, resume="allow",
        )
    accelerator.init_trackers(project, config=flatten_config(config), init_kwargs=init_kwargs)
    if "wandb" in trackers and accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        # Every metric is plotted against our optimizer step, so curves line up across resumes and runs.
        run.define_metric(STEP_KEY)
        run.define_metric("*", step_metric=STEP_KEY)


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> flat 'a/b' keys with tracker-friendly values (TensorBoard hparams take no lists/None)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, prefix=f"{name}/"))
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat


class MetricsLog:
    """Writes one JSON object per log step to metrics.jsonl and the same keys to every tracker."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, trackers: list[str]):
        self.accelerator = accelerator
        self.path = output_dir / rundir.METRICS
        self.trackers = trackers

    def truncate_after(self, step: int) -> None:
        """On resume: drop records logged after the checkpoint, so the file reads as one uninterrupted run."""
        if self.accelerator.is_main_process:
            rundir.truncate_metrics(self.path, step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record metrics (plain Python numbers) for one optimizer step."""
        if not self.accelerator.is_main_process:
            return
        rundir.append_record(self.path, {"step": step, **{k: _json_number(v) for k, v in metrics.items()}})
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                # No explicit wandb step: train/step is the x-axis (define_metric), so a resumed run never
                # has records dropped for going "back in time".
                tracker.log({STEP_KEY: step, **metrics})
            else:
                tracker.log(metrics, step=step)

    def log_image(self, key: str, image: Image.Image, step: int, caption: str = "") -> None:
        """Send an image (the sample grid) to every tracker."""
        if not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                import wandb

                tracker.log({STEP_KEY: step, key: wandb.Image(image, caption=caption)})
            elif tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")


def _json_number(value: Any) -> Any:
    """NaN/inf are not JSON: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_writable(output_dir: Path) -> None:
    """Fail early, in words, if the output folder cannot be created or written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # a probe file of its own: a fixed name is a race between two processes checking the same folder
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write_test-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to output directory {output_dir}: {err.strerror or err}") from None
