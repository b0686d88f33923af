"""Bad input fails in seconds, before training, with ONE line (`error: ...`, exit 2) and leaves the output folder as it was."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_optim import cli

SECONDS = 30  # generous: the 2-core test machine is shared; a bad input normally fails in well under a second


@pytest.fixture(autouse=True)
def _setup(offline_env):
    torch.set_num_threads(1)


def write_pngs(folder: Path, count: int, size=(16, 16)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones too) by relative path, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def run_train(capsys, tiny_flags):
    """`diffusers-optim train` in this process with the tiny flags: returns (exit status, stderr)."""

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = cli.main(["train", *tiny_flags, "--max_train_steps", "2", *args])
        return code, capsys.readouterr().err

    return run


def assert_one_line_error(code: int, err: str, expected: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """Bad inputs on disk: data folders, YAML files, an incomplete checkpoint."""
    good = tmp_path / "good"
    write_pngs(good, 6)
    corrupt = tmp_path / "corrupt"
    write_pngs(corrupt, 6)
    (corrupt / "img_02.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    truncated = tmp_path / "truncated"
    write_pngs(truncated, 6, size=(64, 64))
    data = (truncated / "img_03.png").read_bytes()
    (truncated / "img_03.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "unknown_key.yaml").write_text("learning_rat: 1e-4\n")
    (tmp_path / "wrong_type.yaml").write_text("train_batch_size: eight\n")
    (tmp_path / "bad_choice.yaml").write_text("prediction_type: noise\n")
    partial = tmp_path / "partial" / "checkpoint-000004"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    return {"tmp": tmp_path, "good": good, "corrupt": corrupt, "truncated": truncated, "partial": partial}


# (id, flags given the `files` paths, text the one-line error must contain)
CASES = [
    (
        "unknown optimizer",
        lambda f: ["--optimizer", "adamww"],
        "unknown optimizer 'adamww'. Did you mean 'adamw'?",
    ),
    (
        "malformed --optimizer_args",
        lambda f: ["--optimizer_args", "weight_decay"],
        "cannot read 'weight_decay'",
    ),
    (
        "unknown --optimizer_args key",
        lambda f: ["--optimizer_args", "foo=1"],
        "does not take the hyperparameter 'foo'",
    ),
    ("lr = 0", lambda f: ["--learning_rate", "0"], "--learning_rate must be > 0"),
    ("lr < 0", lambda f: ["--learning_rate=-1e-4"], "--learning_rate must be > 0"),
    ("lr < 0 without '='", lambda f: ["--learning_rate", "-1e-4"], "--flag=-1e-4"),
    (
        "resolution the UNet cannot take",
        lambda f: ["--resolution", "17"],
        "--resolution 17 does not fit this UNet",
    ),
    (
        "missing data folder",
        lambda f: ["--train_data_dir", str(f["tmp"] / "nope")],
        "--train_data_dir not found",
    ),
    ("empty data folder", lambda f: ["--train_data_dir", str(f["tmp"] / "empty")], "no images found"),
    ("data folder is a file", lambda f: ["--train_data_dir", str(f["tmp"] / "a_file")], "is not a folder"),
    ("corrupt image", lambda f: ["--train_data_dir", str(f["corrupt"])], "corrupt or unreadable image"),
    ("truncated image", lambda f: ["--train_data_dir", str(f["truncated"])], "corrupt or unreadable image"),
    ("missing resume path", lambda f: ["--resume_from_checkpoint", str(f["tmp"] / "ckpt")], "no such folder"),
    (
        "partial checkpoint",
        lambda f: ["--resume_from_checkpoint", str(f["partial"])],
        "not a complete checkpoint",
    ),
    (
        "unknown config key",
        lambda f: ["--config", str(f["tmp"] / "unknown_key.yaml")],
        "unknown config key 'learning_rat'. Did you mean 'learning_rate'?",
    ),
    (
        "config value of the wrong type",
        lambda f: ["--config", str(f["tmp"] / "wrong_type.yaml")],
        "config key 'train_batch_size': cannot read 'eight' as int",
    ),
    (
        "config value not among the choices",
        lambda f: ["--config", str(f["tmp"] / "bad_choice.yaml")],
        "config key 'prediction_type': 'noise' is not one of",
    ),
    ("missing config file", lambda f: ["--config", str(f["tmp"] / "nope.yaml")], "config file not found"),
    (
        "unknown flag",
        lambda f: ["--learnig_rate", "1e-4"],
        "unknown flag --learnig_rate. Did you mean --learning_rate?",
    ),
    ("flag value of the wrong type", lambda f: ["--train_batch_size", "eight"], "invalid int value: 'eight'"),
    ("unknown --report_to", lambda f: ["--report_to", "wandbb"], "Did you mean 'wandb'?"),
    ("too few eval samples", lambda f: ["--num_eval_samples", "3"], "--num_eval_samples must be at least 7"),
    ("no validation draws", lambda f: ["--num_validation_draws", "0"], "--num_validation_draws must be at least 1"),
]


@pytest.mark.parametrize("make_args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_previous_run_untouched(
    tmp_path, files, run_train, copy_finished_run, make_args, expected
):
    out = copy_finished_run(tmp_path / "out")
    before = snapshot(out)
    start = time.perf_counter()
    # --overwrite_output_dir: even when replacing is allowed, a failed check must not have cleared anything yet.
    code, err = run_train("--output_dir", str(out), "--overwrite_output_dir", *make_args(files))
    assert time.perf_counter() - start < SECONDS
    line = assert_one_line_error(code, err, expected)
    assert snapshot(out) == before
    print(f"BAD INPUT {' '.join(make_args(files))} -> {line}")


def test_corrupt_and_truncated_images_are_named(files, tmp_path, run_train):
    for folder, name in ((files["corrupt"], "img_02.png"), (files["truncated"], "img_03.png")):
        code, err = run_train("--output_dir", str(tmp_path / "out"), "--train_data_dir", str(folder))
        assert_one_line_error(code, err, str(folder / name))
        assert "--skip_bad_images" in err


def test_unreadable_data_folder(files, tmp_path, run_train, monkeypatch):
    # We run as root, whom chmod does not stop: make the folder unreadable in the permission check instead.
    import os

    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == files["good"] else real_access(p, mode)
    )
    code, err = run_train("--output_dir", str(tmp_path / "out"), "--train_data_dir", str(files["good"]))
    assert_one_line_error(
        code, err, f"--train_data_dir is not readable (check its permissions): {files['good']}"
    )


@pytest.mark.parametrize(
    "bad, expected",
    [
        (["--optimizer", "adamww"], "unknown optimizer"),
        (["--adam_epsilon", "0"], "--adam_epsilon must be > 0"),
        (["--optimizer_args", "foo=1"], "does not take the hyperparameter 'foo'"),
    ],
)
def test_optimizer_checks_come_before_the_data_scan(files, tmp_path, run_train, monkeypatch, bad, expected):
    import diffusers_optim.trainer as trainer

    def no_scan(*args, **kwargs):
        raise AssertionError("the data folder was scanned before the optimizer flags were checked")

    monkeypatch.setattr(trainer, "build_datasets", no_scan)
    code, err = run_train(
        "--output_dir", str(tmp_path / "out"), "--train_data_dir", str(files["corrupt"]), *bad
    )
    assert_one_line_error(code, err, expected)


@pytest.fixture
def no_hub_login(tmp_path, monkeypatch):
    """HF_TOKEN unset and an empty HF_HOME, so there is no saved login either."""
    import huggingface_hub.constants as constants

    home = tmp_path / "empty_hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    # huggingface_hub read HF_HOME at import time: point its token files at the empty home too.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))


@pytest.mark.parametrize(
    "offline, expected",
    [
        ("0", "--push_to_hub needs a Hub token: run `hf auth login`, set HF_TOKEN, or pass --hub_token"),
        ("1", "--push_to_hub needs network, but HF_HUB_OFFLINE is set"),
    ],
    ids=["no-credentials", "offline"],
)
def test_push_to_hub_fails_before_training(
    no_hub_login, files, tmp_path, run_train, copy_finished_run, monkeypatch, offline, expected
):
    import diffusers_optim.trainer as trainer

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(
        trainer, "build_datasets", lambda *a, **k: pytest.fail("data scanned before the hub check")
    )
    out = copy_finished_run(tmp_path / "out")
    before = snapshot(out)
    code, err = run_train("--output_dir", str(out), "--overwrite_output_dir", "--push_to_hub")
    assert_one_line_error(code, err, expected)
    assert snapshot(out) == before


def test_output_dir_under_a_file(tmp_path, run_train):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    code, err = run_train("--output_dir", str(blocker / "run"))
    assert_one_line_error(code, err, f"cannot write to output directory {blocker / 'run'}: Not a directory")
    assert blocker.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [blocker]


def test_existing_run_needs_overwrite_or_resume(tmp_path, run_train, copy_finished_run):
    out = copy_finished_run(tmp_path / "out")
    before = snapshot(out)
    code, err = run_train("--output_dir", str(out))
    assert_one_line_error(code, err, "already holds a run")
    assert "--resume_from_checkpoint latest" in err and "--overwrite_output_dir" in err
    assert snapshot(out) == before


def test_resume_from_a_checkpoint_of_another_model_shape(copy_finished_run, tmp_path, run_train):
    out = copy_finished_run(tmp_path / "out")  # a real run of the tiny preset
    other = tmp_path / "other_unet.json"
    other.write_text(
        json.dumps(
            dict(
                block_out_channels=[8, 16],
                layers_per_block=1,
                norm_num_groups=4,
                down_block_types=["DownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "UpBlock2D"],
            )
        )
    )
    before = snapshot(out)
    code, err = run_train(
        "--output_dir",
        str(out),
        "--resume_from_checkpoint",
        "latest",
        "--model_config_name_or_path",
        str(other),
        "--allow_config_change",  # else refused earlier as another experiment; no allowance changes shapes
    )
    line = assert_one_line_error(code, err, "was saved from a different model shape")
    assert "block_out_channels: saved [16, 32], now [8, 16]" in line
    assert snapshot(out) == before
    print(f"BAD INPUT resume with another model shape -> {line}")


def test_mixed_image_modes_train_and_bad_images_are_skipped_and_counted(tmp_path, run_train, caplog):
    folder = tmp_path / "mixed"
    write_pngs(folder, 4, size=(20, 16))
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 255, (16, 24), dtype=np.uint8)
    Image.fromarray(gray, "L").save(folder / "mode_l.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 4), dtype=np.uint8), "RGBA").save(folder / "mode_rgba.png")
    Image.fromarray(gray, "L").convert("P").save(folder / "mode_p.png")
    palette = Image.fromarray(gray, "L").convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "mode_p_transparent.png", transparency=0)
    (folder / "zz_broken.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    code, err = run_train(
        "--output_dir",
        str(out),
        "--train_data_dir",
        str(folder),
        "--skip_bad_images",
        "--num_validation_images",
        "4",
        "--train_batch_size",
        "4",
    )
    assert code == 0, err
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 2
    assert json.loads((out / "config.json").read_text())["num_skipped_images"] == 1
    assert "skipped 1 unreadable images" in caplog.text
