"""The linter is part of the suite: style rules (pyproject's [tool.ruff]) hold for every file we ship."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing():
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.skip("ruff is not installed (it comes with the 'test' extra)")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "diffusers_optim", "train_scripts", "tests",
                           "benchmarks", "scripts"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
