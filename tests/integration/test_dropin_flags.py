"""diffusers' flags with diffusers' meaning: epoch cadences on steps, --logging_dir, xformers, checkpoint-N."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from diffusers_optim.checkpoint import find_checkpoint
from diffusers_optim.trainer import Trainer


def image_folder(path: Path, n: int) -> Path:
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def test_epoch_cadences_map_onto_steps_and_model_is_saved_mid_run(tiny_config, tmp_path, caplog):
    # 11 images, 4 held out: 7 training images at batch 4 = 2 steps per epoch
    folder = image_folder(tmp_path / "imgs", 11)
    cfg = tiny_config("--train_data_dir", str(folder), "--num_validation_images", "4", "--train_batch_size", "4",
                      "--resolution", "8", "--num_epochs", "3", "--save_images_epochs", "2", "--save_model_epochs", "1",
                      "--checkpointing_steps", "2", "--stop_after_steps", "2", "--logging_dir", "tb",
                      "--enable_xformers_memory_efficient_attention", "--report_to", "tensorboard")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg)
    assert "scaled_dot_product_attention" in caplog.text  # the xformers flag is answered with a notice
    assert (trainer.max_steps, cfg.sample_steps, trainer.save_model_steps) == (6, 4, 2)
    assert trainer.train() == {"status": "stopped", "steps": 2}
    out = Path(cfg.output_dir)
    assert (out / "model_index.json").is_file()  # --save_model_epochs 1: the pipeline after epoch 1 (step 2)
    assert json.loads((out / "config.json").read_text())["config"]["sample_steps"] == 4
    assert list((out / "tb").rglob("events.out.tfevents.*"))  # --logging_dir, relative to --output_dir
    assert not (out / "logs").exists()
    assert find_checkpoint(out, "checkpoint-2") == out / "checkpoints" / "checkpoint-000002"
