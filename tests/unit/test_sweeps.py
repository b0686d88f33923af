"""Every sweep file is a runnable `wandb sweep` config: real training flags, parseable values, accelerate launch."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffusers_optim.config import coerce_value, field_types
from diffusers_optim.optim import get_spec

SWEEPS = sorted((Path(__file__).resolve().parents[2] / "sweeps").glob("*.yaml"))


def test_there_are_sweeps():
    assert len(SWEEPS) >= 4


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_is_valid(path: Path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["command"][:4] == ["${env}", "accelerate", "launch", "train_scripts/train_unconditional.py"]
    assert sweep["command"][-1] == "${args}"
    assert (path.parents[1] / "train_scripts" / "train_unconditional.py").is_file()
    types = field_types()
    params = sweep["parameters"]
    assert len(params["optimizer"]["values"]) * len(params["learning_rate"]["values"]) >= 3
    for name, param in params.items():
        assert name in types, f"{path.name}: '{name}' is not a training flag"
        values = param["values"] if "values" in param else [param["value"]]
        for value in values:
            coerced = coerce_value(name, value, types[name])  # a UserError names the bad value
            if name == "learning_rate":
                assert isinstance(coerced, float) and coerced > 0
    for name in params["optimizer"]["values"]:
        assert get_spec(name).name == name
