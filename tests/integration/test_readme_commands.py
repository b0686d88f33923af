"""Every command in README.md and docs/ that trains or compares runs as written, shrunk to tiny scale.

Shrinking changes only scale (steps, resolution, preset, batch, sampling sizes, the number of seeds), the output
folder, the image folder (a small local one) and the tracker (none instead of an account). Each command's own flags,
optimizers, grids and first seed stay. A command under `accelerate launch --config_file FILE` runs in this process on the CPU; its
config file is read with accelerate's own loader (GPU topologies cannot run here).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_optim import cli, compare

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHRINK = {"--max_train_steps": "2", "--resolution": "8", "--model_preset": "tiny", "--train_batch_size": "4",
          "--num_validation_images": "4", "--num_inference_steps": "1", "--num_samples": "2",
          "--num_eval_samples": "8", "--report_to": "none", "--gradient_accumulation_steps": "1"}  # fmt: skip
# Seeds are scale too: a study's seed list shrinks to its first seed (each seed is the same run with another seed).
SHRINK_LISTS = {"--seeds": 1}
TRAINS = ("train_unconditional.py", "diffusers-optim train", "diffusers-optim compare", "compare_optimizers.py")


def shell_commands(path: Path) -> list[str]:
    """Commands of the shell code blocks of a Markdown file, continuation lines joined, comments dropped."""
    commands, language, block = [], None, []
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if language is None:
                language, block = line[3:].strip(), []
                continue
            if language in ("", "bash", "sh", "shell", "console"):
                for command in "\n".join(block).replace("\\\n", " ").splitlines():
                    command = command.split(" #")[0].strip()
                    if command and not command.startswith("#") and any(t in command for t in TRAINS):
                        commands.append(command)
            language = None
        elif language is not None:
            block.append(line)
    return commands




def flag_values(args: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(args, args[1:]) if a.startswith("--") and not b.startswith("--")}


def shorten_lists(args: list[str]) -> list[str]:
    """Each flag of SHRINK_LISTS keeps only its first values."""
    kept, flag, count = [], None, 0
    for arg in args:
        if arg.startswith("--"):
            flag, count = arg, 0
        elif flag in SHRINK_LISTS:
            count += 1
            if count > SHRINK_LISTS[flag]:
                continue
        kept.append(arg)
    return kept


def shrink(args: list[str], out: Path, images: Path) -> list[str]:
    """The command's flags at tiny scale: values replaced in place, lists cut, missing scale flags appended."""
    args = shorten_lists(args)
    overrides = {**SHRINK, "--output_dir": str(out), "--train_data_dir": str(images)}
    args = [overrides.get(prev, arg) if prev in overrides else arg for prev, arg in zip(["", *args], args)]
    for flag, value in SHRINK.items():
        if flag not in args:
            args += [flag, value]
    return args


def split_launcher(words: list[str]) -> tuple[str | None, str, list[str]]:
    """(accelerate config or None, 'train' or 'compare', the command's own flags)."""
    words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]  # ACCELERATE_USE_CPU=true ...
    config = flag_values(words).get("--config_file") if words[:2] == ["accelerate", "launch"] else None
    for i, word in enumerate(words):
        if word.endswith("train_unconditional.py") or words[i : i + 2] == ["diffusers-optim", "train"]:
            return config, "train", words[i + (1 if word.endswith(".py") else 2) :]
        if word.endswith("compare_optimizers.py") or words[i : i + 2] == ["diffusers-optim", "compare"]:
            return config, "compare", words[i + (1 if word.endswith(".py") else 2) :]
    raise AssertionError(f"no training command in {' '.join(words)}")


def unique(commands: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each command once: a script may repeat one shown before it (e.g. after `exec`)."""
    seen: set[str] = set()
    kept = []
    for source, command in commands:
        key = command.removeprefix("exec ")
        if key not in seen:
            seen.add(key)
            kept.append((source, command))
    return kept


COMMANDS = unique([(path.relative_to(ROOT).as_posix(), cmd) for path in DOCS for cmd in shell_commands(path)])


# accelerate's state (AcceleratorState, GradientState) is one per process: two Trainers built at once in two of
# compare's pool threads raced on it ("'GradientState' object has no attribute 'plugin_kwargs'", once in a clean
# clone's suite). The real pool runs each trainer in its own process; in-process, they take turns.
IN_PROCESS = threading.Lock()


def in_process(cmd: list[str], log_path: Path) -> int:
    """compare's launcher, running each planned trainer command (`python -m diffusers_optim.cli ...`) in-process,
    one at a time."""
    from diffusers_optim.compare import DIE_WITH_PARENT

    if cmd[1:3] == ["-c", DIE_WITH_PARENT]:  # the supervisor that ends a trainer with its comparison
        cmd = cmd[4:]
    assert cmd[1:3] == ["-m", "diffusers_optim.cli"], cmd
    with IN_PROCESS:
        return cli.main(cmd[3:])


def test_the_docs_have_training_and_comparison_commands():
    kinds = {split_launcher(shlex.split(cmd))[1] for _, cmd in COMMANDS}
    assert kinds == {"train", "compare"} and len(COMMANDS) >= 8, COMMANDS


@pytest.mark.slow
@pytest.mark.parametrize("source, command", COMMANDS, ids=[f"{s}:{i}" for i, (s, _) in enumerate(COMMANDS)])
def test_command_runs_as_written_at_tiny_scale(source, command, tmp_path, offline_env, monkeypatch):
    monkeypatch.chdir(ROOT)  # commands are written for the repository root (accelerate_configs/, train_scripts/)
    images = tmp_path / "my_images"
    images.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8, 3), 32 * i, dtype=np.uint8)).save(images / f"{i}.png")
    config, kind, args = split_launcher(shlex.split(command))
    if config is not None:
        from accelerate.commands.config.config_args import load_config_from_file

        assert load_config_from_file(config).distributed_type is not None
    args = shrink(args, tmp_path / "out", images)
    if kind == "train":
        assert cli.main(["train", *args]) == 0, command
        assert (tmp_path / "out" / "run_summary.json").is_file()
    else:
        cmp = compare.parse_comparison(args)  # a --backend ray command's flags too, as written
        if cmp.ray is not None:
            # its runs train here on the local pool, in this process (a cluster of GPUs cannot run here; the Ray
            # path itself is tests/integration/test_ray_backend.py)
            if cmp.accelerate_config:
                from accelerate.commands.config.config_args import load_config_from_file

                assert load_config_from_file(cmp.accelerate_config).num_processes == cmp.ray.gpus_per_run
            cmp = dataclasses.replace(cmp, ray=None, accelerate_config=None)
        compare.run_comparison(cmp, launcher=in_process)
        assert (tmp_path / "out" / "summary.json").is_file()
