"""Any optimizer class by import path, through the real Trainer: mapped flags, warnings, records, one-line errors."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from diffusers_optim import cli, hub
from diffusers_optim.trainer import Trainer

MY_OPT = '''
import torch


class MyOpt(torch.optim.SGD):
    """A user's own optimizer: SGD whose constructor has a different default lr."""

    def __init__(self, params, lr=0.05, momentum=0.5, dampening=0.0):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening)
'''


def test_torch_class_by_path_trains_and_is_recorded_like_a_registered_one(tiny_config, caplog):
    cfg = tiny_config("--optimizer", "torch.optim.NAdam", "--adam_beta1", "0.8", "--momentum", "0.9",
                      "--optimizer_args", "momentum_decay=0.01,decoupled_weight_decay=true", "--max_train_steps", "2")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg)
    assert "'torch.optim.NAdam' has no momentum; ignoring momentum=0.9" in caplog.text  # NAdam takes no momentum
    group = trainer.optimizer.param_groups[0]
    assert type(trainer.optimizer.optimizer).__name__ == "NAdam"
    assert group["betas"] == (0.8, 0.999) and group["momentum_decay"] == 0.01 and group["decoupled_weight_decay"]
    assert trainer.resolved.lr == 1e-3  # --learning_rate 1e-3 of the tiny flags
    trainer.train()
    record = json.loads((Path(cfg.output_dir) / "config.json").read_text())["optimizer"]
    assert record["name"] == "torch.optim.NAdam" and record["hparams"]["betas"] == [0.8, 0.999]
    assert "by import path" in record["description"]
    card = hub.build_model_card(hub.run_card_info(Path(cfg.output_dir)))
    assert "torch.optim.NAdam" in card.text and "optimizer-torch-optim-nadam" in card.data.tags


def test_users_own_class_by_module_colon_class(tiny_config, tmp_path, monkeypatch):
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "module.py").write_text(MY_OPT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_pkg", raising=False)
    cfg = tiny_config("--optimizer", "my_pkg.module:MyOpt", "--max_train_steps", "2", "--learning_rate", "0.02")
    trainer = Trainer(cfg)
    assert dict(trainer.resolved.kwargs) == {"lr": 0.02, "momentum": 0.5}  # its own default momentum
    assert trainer.optimizer.param_groups[0]["dampening"] == 0.0
    assert trainer.train()["status"] == "complete"
    assert trainer.spec.package == "my_pkg"


@pytest.mark.parametrize("path, message", [
    ("torch.optim.NoSuchAdam", "module 'torch.optim' has no 'NoSuchAdam'"),
    ("no_such_pkg_xyz.optim:Opt", "cannot import module 'no_such_pkg_xyz.optim'"),
    ("torch.nn.Linear", "is not a torch.optim.Optimizer subclass"),
    ("torch.optim.NAdam", "does not take the hyperparameter 'nesterovv'. It takes: lr, betas"),
])  # fmt: skip
def test_bad_import_paths_are_one_line_errors(tiny_flags, tmp_path, capsys, path, message):
    extra = ["--optimizer_args", "nesterovv=true"] if path == "torch.optim.NAdam" else []
    code = cli.main(["train", *tiny_flags, "--optimizer", path, *extra, "--output_dir", str(tmp_path / "run"),
                     "--max_train_steps", "2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()
