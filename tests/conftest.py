"""Shared fixtures: a tiny, fast training config (tiny UNet, digits, a few steps) for in-process and script tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "train_scripts" / "train_unconditional.py"

# Flags of a run that takes seconds on CPU: tiny UNet at 16x16 digits, no warmup, tiny validation and sampling.
TINY_FLAGS = [
    "--model_preset",
    "tiny",
    "--resolution",
    "16",
    "--train_batch_size",
    "8",
    "--lr_warmup_steps",
    "0",
    "--num_validation_images",
    "8",
    "--num_inference_steps",
    "2",
    "--num_samples",
    "4",
    "--num_eval_samples",
    "8",
    "--learning_rate",
    "1e-3",
    "--validation_steps",
    "0",
    "--sample_steps",
    "0",
]


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """One torch thread per test process: tiny UNets run several times faster than with two threads fighting
    over the two cores with the other xdist worker (subprocess tests get OMP_NUM_THREADS=1 the same way)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Every test starts accelerate afresh, as every real run does: an Accelerator an earlier in-process test built
    (its mixed precision, its device) would otherwise refuse the next test's settings in the same worker."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)  # the process group (if any) stays usable
    GradientState._reset_state()


@pytest.fixture
def tiny_flags() -> list[str]:
    """A fresh copy of TINY_FLAGS (add --output_dir and --max_train_steps)."""
    return list(TINY_FLAGS)


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: a TrainConfig for the tiny run in tmp_path/run, with keyword overrides."""
    from diffusers_optim.config import parse_train_args

    def make(*extra: str, **overrides):
        cfg = parse_train_args(
            [*TINY_FLAGS, "--output_dir", str(tmp_path / "run"), "--max_train_steps", "4", *extra]
        )
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg

    return make


@pytest.fixture
def offline_env(monkeypatch, tmp_path) -> dict[str, str]:
    """An offline environment with no Hub or W&B login, for this process and for child processes."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HOME": str(tmp_path / "hf_home"),
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    return {**os.environ}


def script_command(*args: str) -> list[str]:
    """The real training script, as a user runs it, with the tiny flags first."""
    return [sys.executable, str(TRAIN_SCRIPT), *TINY_FLAGS, *args]


@pytest.fixture(scope="session")
def finished_run_template(tmp_path_factory) -> Path:
    """A real finished run (4 tiny steps, logged every step, checkpoints every 2 steps), trained once per test process
    through the CLI; tests get copies (`finished_run`) instead of writing run folders by hand."""
    from diffusers_optim import cli

    out = tmp_path_factory.mktemp("finished_run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
            mp.setenv(key, value)
        args = ["--output_dir", str(out), "--max_train_steps", "4", "--logging_steps", "1", "--checkpointing_steps", "2"]
        assert cli.main(["train", *TINY_FLAGS, *args]) == 0
    return out


@pytest.fixture
def copy_finished_run(finished_run_template):
    """Factory: a copy of the real finished run at the given path (hidden files included)."""
    import shutil

    def copy(out: Path) -> Path:
        return Path(shutil.copytree(finished_run_template, out, symlinks=True))

    return copy


# The longest tests (tens of seconds to minutes each, mostly two-process launches), longest first.
LONGEST = ("test_sigint_and_sigterm_inside_a_step", "test_ray_backend_matches_the_local_pool",
           "test_a_killed_trainer_resumes_under_ray", "test_tiny_comparison_end_to_end",
           "test_two_processes_match_one_process", "test_compare_sigkilled_leaves_no_orphan")


def pytest_collection_modifyitems(items):
    """The longest tests first, then the other slow end-to-end ones, the other integration tests, and the unit
    tests last (stable order otherwise). `make test` hands the tests to xdist's workers one at a time
    (--maxschedchunk 1), so each worker takes the next longest when it is free and both end together on short
    ones. (With xdist's default chunks, the first worker got the first 81 tests, every long one among them, and ran
    them one after another for ~450 s while the other finished the rest in ~230 s and sat idle.)"""

    def rank(item) -> tuple[int, int]:
        longest = [i for i, name in enumerate(LONGEST) if item.name.startswith(name)]
        if longest:
            return (0, longest[0])
        if item.get_closest_marker("slow"):
            return (1, 0)
        return (2 if "integration" in item.nodeid else 3, 0)  # the short unit tests fill the end evenly

    items.sort(key=rank)
