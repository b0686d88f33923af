"""`{run_name}` in --output_dir: every run of a sweep gets its own folder."""

from pathlib import Path

from diffusers_optim.trainer import Trainer


def test_run_name_placeholder_gives_each_run_its_own_folder(tiny_config, tmp_path):
    cfg = tiny_config("--optimizer", "lion", "--learning_rate", "3e-5", "--seed", "2",
                      output_dir=str(tmp_path / "sweep" / "{run_name}"))
    trainer = Trainer(cfg)
    assert trainer.out == tmp_path / "sweep" / "lion-lr3e-05-s2"
    assert Path(cfg.output_dir) == trainer.out  # the saved config records the real folder
    assert not (tmp_path / "sweep" / "{run_name}").exists()
