"""Streamed folders through the real training script: an image that fails only at load time (it passed the
header check) is replaced and counted, or stops the run with one line and a checkpoint."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import script_command

N_IMAGES = 100  # more than the check's sampled full decodes, so one file is checked by its header only


@pytest.fixture
def folder_with_a_late_failure(tmp_path):
    from diffusers_optim.data import NUM_SAMPLE_DECODES

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(N_IMAGES):
        Image.fromarray(np.full((8, 8, 3), i * 2, dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    n_train = N_IMAGES - 8  # --num_validation_images 8 (TINY_FLAGS) are held out from the end
    sampled = set(np.linspace(0, n_train - 1, NUM_SAMPLE_DECODES).round().astype(int).tolist())
    bad = next(i for i in range(n_train) if i not in sampled)
    path = folder / f"img{bad:03d}.png"
    path.write_bytes(path.read_bytes()[:-30])  # truncated: the header reads, the pixels do not
    return folder


def _train(folder, out, offline_env, *extra):
    # 12 steps x batch 8 = 96 images > 92 training images: every image is loaded at least once
    args = ["--train_data_dir", str(folder), "--resolution", "8", "--max_train_steps", "12", "--logging_steps", "4",
            "--checkpointing_steps", "0", "--dataloader_num_workers", "1", "--output_dir", str(out), *extra]
    return subprocess.run(script_command(*args), capture_output=True, text=True, env=offline_env, timeout=600)


def test_skip_bad_images_replaces_and_counts_a_load_time_failure(folder_with_a_late_failure, tmp_path, offline_env):
    proc = _train(folder_with_a_late_failure, tmp_path / "run", offline_env, "--skip_bad_images")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["data/skipped_images"] == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataloader_num_workers"] == 1


def test_without_skip_a_load_time_failure_stops_with_one_line_and_a_checkpoint(folder_with_a_late_failure, tmp_path,
                                                                              offline_env):
    proc = _train(folder_with_a_late_failure, tmp_path / "run", offline_env)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "failed to load during training" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
