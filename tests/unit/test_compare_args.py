"""compare: spec parsing and validation, the plan, and the run loop (with a stand-in trainer)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from diffusers_optim import compare, rundir
from diffusers_optim.config import parse_train_args
from diffusers_optim.errors import UserError


def test_spec_is_resolved_once_and_passed_as_optimizer_args():
    """The registry resolves a spec here; runs get its own argument names, never a round trip through flags."""
    from diffusers_optim.optim import get_spec, parse_optimizer_args, resolve
    from diffusers_optim.trainer import resolve_optimizer

    sgd = compare.resolve_choice("sgd:lr=0.01,momentum=0.9")
    assert (sgd.name, sgd.lr) == ("sgd", 0.01)
    assert parse_optimizer_args(sgd.extra) == {"momentum": 0.9, "weight_decay": 0.0, "nesterov": False}
    (adamw,) = compare.resolve_choices(["adamw:betas=(0.9,0.99),weight_decay=0.01,amsgrad=true"])
    expected = resolve("adamw", {"betas": (0.9, 0.99), "weight_decay": 0.01, "amsgrad": True}).kwargs
    assert parse_optimizer_args(adamw.extra) == {k: v for k, v in expected.items() if k != "lr"}
    (arm,) = compare.build_arms([adamw], {})
    run = compare.plan_run(arm, adamw.lr, 0, "final", [], "g")
    cfg = parse_train_args([*run.args, "--output_dir", "x"])
    assert (cfg.adam_beta1, cfg.adam_weight_decay) == (None, None)  # no generic flags: only --optimizer_args
    assert dict(resolve_optimizer(cfg, get_spec("adamw")).kwargs) == dict(expected)
    # without lr= the registry's default is the base lr (a multiplier of 1.0 for Prodigy-style entries)
    assert compare.resolve_choice("adamw").lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "specs, message",
    [
        (["adamx"], "unknown optimizer 'adamx'"),
        (["sgd:lr"], "'lr' is not key=value"),
        (["adamw:"], "ends with ':'"),
        ([":lr=1"], "has no name"),
        (["sgd:lr=-1"], "lr must be a number > 0"),
        (["adamw:foo=1"], "does not take the hyperparameter 'foo'"),
        (["sgd:lr=0.1,lr=0.2"], "given twice"),
        ([], "at least one optimizer"),
        (["adamw", "adamw:lr=1e-4"], "are the same run"),
    ],
)
def test_bad_specs_are_user_errors(specs, message):
    with pytest.raises(UserError, match=message):
        compare.resolve_choices(specs)


def test_same_optimizer_twice_is_named_by_what_differs_alone():
    """The optimizer, then only the hyperparameter the two sgd arms differ in (not their shared lr, nor lion's);
    the folders' prefix is derived from that name."""
    arms = compare.build_arms(compare.resolve_choices(["sgd:lr=0.01", "sgd:lr=0.01,momentum=0.5", "lion"]), {})
    assert [a.label for a in arms] == ["sgd momentum=0.9", "sgd momentum=0.5", "lion"]
    assert [a.slug for a in arms] == ["sgd-momentum=0.9", "sgd-momentum=0.5", "lion"]
    # resolved, sgd's default momentum 0.9 written out is the same run as leaving it out
    with pytest.raises(UserError, match="are the same run"):
        compare.resolve_choices(["sgd:lr=0.01", "sgd:lr=0.01,momentum=0.9"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr_grid"], "at least one multiplier"),
        (["--lr_grid", "1", "x"], "cannot read 'x'"),
        (["--lr_grid", "0", "1"], "positive"),
        (["--lr_grid", "1", "1"], "repeated"),
        (["--seeds", "0", "0"], "repeated"),
        (["--learning_rate", "0.1"], "set by the comparison"),
        (["--seed", "3"], "set by the comparison"),
        (["--max_train_step", "3"], "Did you mean --max_train_steps"),
        (["--batch_size", "3"], "Did you mean --train_batch_size"),
        (["--max_train_steps", "many"], "cannot read 'many' as int"),
        (["--accelerate_config", "/nonexistent.yaml"], "accelerate config not found"),
    ],
)
def test_bad_comparison_flags_are_user_errors(tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        compare.parse_comparison(["--optimizers", "adamw", "--output_dir", str(tmp_path), *argv])
    assert not any(tmp_path.iterdir())  # nothing planned, nothing run


def test_plan_shares_every_flag_but_the_optimizer(tmp_path):
    cmp = compare.parse_comparison(
        ["--optimizers", "adamw", "sgd:lr=0.01,momentum=0.9", "--seeds", "0", "1"]
        + ["--output_dir", str(tmp_path / "cmp"), "--max_train_steps=30", "--use_ema", "--init_seed", "5", "--lr_warmup_steps", "2"]
    )
    assert cmp.common == ["--max_train_steps", "30", "--use_ema", "true", "--init_seed", "5", "--lr_warmup_steps", "2"]
    assert cmp.group == "cmp"
    runs = [compare.plan_run(a, a.choice.lr, s, "final", cmp.common, cmp.group) for a in cmp.arms for s in cmp.seeds]
    assert [r.path for r in runs] == ["runs/adamw-lr0.0001-s0", "runs/adamw-lr0.0001-s1"] + [
        "runs/sgd-lr0.01-s0",
        "runs/sgd-lr0.01-s1",
    ]
    cfgs = [parse_train_args(r.args + ["--output_dir", str(tmp_path)]) for r in runs]
    assert {(c.max_train_steps, c.use_ema, c.init_seed, c.run_group) for c in cfgs} == {(30, True, 5, "cmp")}
    assert [(c.optimizer, c.learning_rate, c.seed) for c in cfgs[1:3]] == [("adamw", 1e-4, 1), ("sgd", 0.01, 0)]
    assert "momentum=0.9" in cfgs[2].optimizer_args.split(",")  # resolved hyperparameters, in sgd's own names
    assert cfgs[3].run_name == "sgd-lr0.01-s1"
    cmd = compare.trainer_command(runs[0], tmp_path, None)
    if sys.platform.startswith("linux"):  # behind the supervisor that passes on the comparison's death
        assert cmd[1:4] == ["-c", compare.DIE_WITH_PARENT, str(os.getpid())]
        cmd = cmd[4:]
    assert cmd[1:4] == ["-m", "diffusers_optim.cli", "train"] and cmd[-2:] == [
        "--output_dir",
        str(tmp_path / runs[0].path),
    ]


class FakeTrainer:
    """Stands in for the trainer process: writes a run folder by the contract; val/loss falls with lr."""

    def __init__(self, fail_optimizer: str | None = None):
        self.fail_optimizer = fail_optimizer
        self.launched: list[str] = []

    def __call__(self, cmd: list[str], log_path: Path) -> int:
        cfg = parse_train_args(cmd[cmd.index("train") + 1 :])
        self.launched.append(cfg.run_name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True)
        rundir.write_json(out / rundir.CONFIG, {"config": cfg.to_dict(), "run_name": cfg.run_name})
        if cfg.optimizer == self.fail_optimizer:
            log_path.write_text("Traceback...\nRuntimeError: loss exploded\n")
            return 1
        # falls with lr and rises with beta1 and warmup; the seed shifts every arm alike (so pairing removes it)
        val = 1.0 / (1.0 + 100 * cfg.learning_rate) + 0.01 * cfg.seed
        val += 0.1 * (cfg.adam_beta1 or 0.0) + 0.002 * (cfg.lr_warmup_steps or 0)
        rec = {"step": cfg.max_train_steps, "elapsed_s": 1.0, "train/loss": val, "val/loss": val}
        rundir.append_record(out / rundir.METRICS, rec)
        rundir.write_summary(out, {"status": "complete", "steps": cfg.max_train_steps, "final": {"val/loss": val}})
        return 0


def run(tmp_path: Path, trainer: FakeTrainer, *extra: str) -> dict[str, Path]:
    argv = [
        "--optimizers",
        "adamw:lr=1e-3",
        "sgd:lr=0.01",
        "--seeds",
        "0",
        "1",
        "--output_dir",
        str(tmp_path),
    ]
    return compare.run_comparison(
        compare.parse_comparison(argv + ["--max_train_steps", "7", "--lr_warmup_steps", "1", *extra]), trainer
    )


def test_failed_run_is_recorded_and_completed_runs_are_reused(tmp_path):
    trainer = FakeTrainer(fail_optimizer="sgd")
    paths = run(tmp_path, trainer)
    assert trainer.launched == ["adamw-lr0.001-s0", "adamw-lr0.001-s1", "sgd-lr0.01-s0", "sgd-lr0.01-s1"]
    failures = json.loads((tmp_path / "failures.json").read_text())
    assert (
        set(failures) == {"sgd-lr0.01-s0", "sgd-lr0.01-s1"} and "loss exploded" in failures["sgd-lr0.01-s0"]
    )
    summary = json.loads(paths["summary_json"].read_text())
    assert [(o["arm"], o["status"]) for o in summary["arms"]] == [
        ("adamw", "complete"),
        ("sgd", "failed"),
    ]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["command"].startswith("diffusers-optim compare --optimizers adamw:lr=1e-3")

    # a rerun trains only what is not complete (the failed folders restart from scratch) and clears failures
    again = FakeTrainer()
    run(tmp_path, again)
    assert again.launched == ["sgd-lr0.01-s0", "sgd-lr0.01-s1"]
    assert json.loads((tmp_path / "failures.json").read_text()) == {}


def test_changed_flags_refuse_to_reuse_a_run(tmp_path):
    run(tmp_path, FakeTrainer())
    with pytest.raises(UserError, match="differs in: max_train_steps"):
        compare.run_comparison(
            compare.parse_comparison(
                ["--optimizers", "adamw:lr=1e-3", "--output_dir", str(tmp_path), "--max_train_steps", "9", "--lr_warmup_steps", "1"]
            ),
            FakeTrainer(),
        )


def test_incomplete_run_with_checkpoint_resumes(tmp_path):
    cmds = []
    argv = ["--optimizers", "adamw:lr=1e-3", "--output_dir", str(tmp_path), "--max_train_steps", "7", "--lr_warmup_steps", "1"]
    cmp = compare.parse_comparison(argv)
    ckpt = tmp_path / "runs" / "adamw-lr0.001-s0" / "checkpoints" / "checkpoint-5"
    ckpt.mkdir(parents=True)

    def launcher(cmd, log_path):
        cmds.append(cmd)
        return 1

    compare.run_comparison(cmp, launcher)
    assert cmds[0][-2:] == ["--resume_from_checkpoint", "latest"]


def test_lr_grid_tunes_on_first_seed_then_runs_best_on_all(tmp_path):
    trainer = FakeTrainer()
    paths = run(tmp_path, trainer, "--lr_grid", "0.5", "2")
    tuning = [n for n in trainer.launched[:4]]
    assert tuning == ["adamw-lr0.0005-s0", "adamw-lr0.002-s0", "sgd-lr0.005-s0", "sgd-lr0.02-s0"]
    # FakeTrainer's val/loss falls with lr, so the larger lr wins; seed 0 reuses its trial instead of rerunning
    assert trainer.launched[4:] == ["adamw-lr0.002-s1", "sgd-lr0.02-s1"]
    assert (tmp_path / "runs" / "adamw-lr0.002-s0").is_symlink()
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["chosen_lr"] == {"adamw": 0.002, "sgd": 0.02}
    summary = json.loads(paths["summary_json"].read_text())
    assert len(summary["tuning"]) == 4 and len(summary["runs"]) == 4
    adamw = next(o for o in summary["arms"] if o["arm"] == "adamw")
    assert adamw["val/loss"] == pytest.approx(1 / 1.2 + 0.005 + 0.002) and not math.isnan(adamw["val/loss_std"])


def test_accelerate_config_launches_the_training_script(tmp_path):
    config = tmp_path / "acc.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\n")
    cmp = compare.parse_comparison(
        ["--optimizers", "lion", "--output_dir", str(tmp_path / "c"), "--accelerate_config", str(config)]
    )
    run = compare.plan_run(cmp.arms[0], cmp.arms[0].choice.lr, 0, "final", cmp.common, cmp.group)
    cmd = compare.trainer_command(run, cmp.root, cmp.accelerate_config)
    launch = cmd.index("--config_file")
    assert cmd[launch - 1] in ("launch", "accelerate.commands.launch") and cmd[launch + 1] == str(config)
    assert cmd[launch + 2].endswith("train_scripts/train_unconditional.py")
    assert cmd[launch + 3 :][:4] == ["--optimizer", "lion", "--learning_rate", "3e-05"]


@pytest.mark.parametrize("machines, parallel, own", [(1, 2, True), (1, 1, False), (2, 2, False)])
def test_runs_launched_side_by_side_each_get_a_port_of_their_own(tmp_path, machines, parallel, own):
    """Two one-machine `accelerate launch` runs at once would both take the config's port and the second would fail
    to start: each launch of the pool gets a free one. One at a time, or a config of several machines (whose
    other machines dial its port), keeps the config's."""
    config = tmp_path / "acc.yaml"
    config.write_text(f"distributed_type: MULTI_GPU\nnum_machines: {machines}\nnum_processes: 2\n"
                      "main_process_port: 29500\n")
    argv = ["--optimizers", "adamw", "sgd", "--output_dir", str(tmp_path / "c"), "--accelerate_config", str(config),
            "--num_parallel", str(parallel)]
    cmds = []

    def launcher(cmd, log_path):
        cmds.append(cmd)
        return 1

    compare.run_comparison(compare.parse_comparison(argv), launcher)
    ports = [cmd[cmd.index("--main_process_port") + 1] for cmd in cmds if "--main_process_port" in cmd]
    assert len(cmds) == 2 and len(ports) == (2 if own else 0)
    assert len(set(ports)) == len(ports) and all(0 < int(p) < 65536 for p in ports)


def test_diffusers_flag_names_pass_through_as_ours():
    assert compare.parse_passthrough(["--eval_batch_size", "4", "--ddpm_num_inference_steps=2"]) == [
        ("num_samples", "4"), ("num_inference_steps", "2")]


GRID_ARGV = ["--optimizers", "adam", "--grid", "adam_beta1=0.5,0.9", "--grid", "lr_warmup_steps=0,5"]
GRID_LABELS = [
    "adam beta1=0.5 lr_warmup_steps=0",
    "adam beta1=0.5 lr_warmup_steps=5",
    "adam beta1=0.9 lr_warmup_steps=0",
    "adam beta1=0.9 lr_warmup_steps=5",
]


def grid_comparison(out: Path, trainer: FakeTrainer, *extra: str) -> dict[str, Path]:
    argv = [*GRID_ARGV, "--seeds", "0", "1", "--output_dir", str(out), "--max_train_steps", "10", *extra]
    return compare.run_comparison(compare.parse_comparison(argv), trainer)


def test_grid_plans_8_runs_in_4_arms_with_intervals_and_distinct_labels(tmp_path):
    trainer = FakeTrainer()
    paths = grid_comparison(tmp_path, trainer)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["runs"]) == 8 and [a["label"] for a in plan["arms"]] == GRID_LABELS
    assert plan["grid"] == {"adam_beta1": ["0.5", "0.9"], "lr_warmup_steps": ["0", "5"]}
    assert len(trainer.launched) == 8 and "adam-beta1=0.9-lr_warmup_steps=5-lr0.0001-s1" in trainer.launched

    summary = json.loads(paths["summary_json"].read_text())
    arms = {a["arm"]: a for a in summary["arms"]}
    assert sorted(arms) == GRID_LABELS and summary["rank_by"] == "val/loss"
    for label, arm in arms.items():
        beta1, warmup = (float(part.split("=")[1]) for part in label.split()[1:])
        assert arm["settings"] == {"adam_beta1": beta1, "lr_warmup_steps": warmup}
        expected = 1 / 1.01 + 0.005 + 0.1 * beta1 + 0.002 * warmup  # mean over seeds 0 and 1
        assert arm["val/loss"] == pytest.approx(expected) and arm["val/loss_n"] == 2
        assert arm["val/loss_std"] == pytest.approx(0.01 / math.sqrt(2))
        assert arm["val/loss_ci_low"] < expected < arm["val/loss_ci_high"]
    # the seed moves every arm alike: paired by seed, every gap to the best is resolved exactly
    assert summary["arms"][0]["arm"] == GRID_LABELS[0] and not any(a["tied"] for a in summary["arms"])
    gap = arms[GRID_LABELS[3]]["diff_vs_best"]
    assert gap["mean"] == pytest.approx(0.04 + 0.01) and gap["seeds"] == [0, 1] and gap["resolved"]
    html_text, md = paths["report_html"].read_text(), paths["report_md"].read_text()
    for label in GRID_LABELS:
        assert f"{label}</td>" in html_text and f"| {label} |" in md
    assert f"{GRID_LABELS[3]} vs {GRID_LABELS[0]}: val/loss higher by" in md


def test_summarize_never_merges_arms_of_merged_folders(tmp_path):
    """Two comparisons whose runs share names but not settings, copied into one folder, stay two arms."""
    import shutil

    from diffusers_optim import report

    base = ["--optimizers", "adam", "--seeds", "0", "1", "--max_train_steps", "10"]
    for warmup in ("0", "5"):
        argv = [*base, "--output_dir", str(tmp_path / f"w{warmup}"), "--lr_warmup_steps", warmup]
        compare.run_comparison(compare.parse_comparison(argv), FakeTrainer())
    merged = tmp_path / "merged"
    for warmup in ("0", "5"):
        for run_dir in (tmp_path / f"w{warmup}" / "runs").iterdir():
            shutil.copytree(run_dir, merged / "runs" / f"{run_dir.name}-from-w{warmup}")
    summary = json.loads(report.summarize(merged)["summary_json"].read_text())
    arms = {a["arm"]: a for a in summary["arms"]}
    assert sorted(arms) == ["adam lr_warmup_steps=0", "adam lr_warmup_steps=5"]
    assert all(a["runs_total"] == 2 and a["val/loss_n"] == 2 for a in arms.values())
    assert arms["adam lr_warmup_steps=5"]["val/loss"] - arms["adam lr_warmup_steps=0"]["val/loss"] == pytest.approx(0.01)

    # and into a folder that has a plan: the planned arms plus the runs added by hand, still not merged
    grid_comparison(tmp_path / "grid", FakeTrainer())
    for run_dir in (tmp_path / "w5" / "runs").iterdir():
        shutil.copytree(run_dir, tmp_path / "grid" / "runs" / f"extra-{run_dir.name}")
    summary = json.loads(report.summarize(tmp_path / "grid")["summary_json"].read_text())
    assert len(summary["arms"]) == 5 and {a["runs_total"] for a in summary["arms"]} == {2}


@pytest.mark.parametrize(
    "grid, message",
    [
        (["adam_beta1=1.5,0.9"], "arm 'adam beta1=1.5': --adam_beta1 must be below 1"),
        (["lr_warmup_steps=0,-5"], "arm 'adam lr_warmup_steps=-5': --lr_warmup_steps must be at least 0"),
        (["lr_scheduler=cosine,cosin"], "arm 'adam lr_scheduler=cosin': unknown --lr_scheduler"),
        (["max_grad_norm=0,big"], "--grid max_grad_norm: cannot read 'big' as float"),
        (["seed=1,2"], "--grid seed: the comparison sets it per run \\(--seeds\\)"),
        (["learning_rate=1,2"], "--lr_grid"),
        (["report_to=none,wandb"], "does not change what is trained"),
        (["max_grad_nrom=1"], "unknown --grid training flag --max_grad_nrom"),
        (["max_grad_norm"], "expected FLAG=V1,V2"),
        (["max_grad_norm=1,"], "expected FLAG=V1,V2"),
        (["adam_beta1=0.5,0.50"], "repeated values"),
        (["max_train_steps=10,20"], "given twice"),
        (["ema_max_decay=0.9", "ema_max_decay=0.99"], "given twice"),
    ],
)
def test_bad_grids_are_one_line_errors_before_any_run(tmp_path, grid, message):
    argv = ["--optimizers", "adam", "--output_dir", str(tmp_path), "--max_train_steps", "10"]
    with pytest.raises(UserError, match=message):
        compare.parse_comparison(argv + [x for g in grid for x in ("--grid", g)])
    assert not any(tmp_path.iterdir())


def test_grid_crosses_optimizers_and_lr_grid_tunes_each_arm(tmp_path):
    trainer = FakeTrainer()
    argv = ["--optimizers", "adamw:lr=1e-3", "sgd:lr=0.01", "--grid", "max_grad_norm=0,1.0", "--seeds", "0"]
    argv += ["--output_dir", str(tmp_path), "--max_train_steps", "7", "--lr_warmup_steps", "1", "--lr_grid", "1", "2"]
    compare.run_comparison(compare.parse_comparison(argv), trainer)
    plan = json.loads((tmp_path / "plan.json").read_text())
    labels = ["adamw max_grad_norm=0", "adamw max_grad_norm=1", "sgd max_grad_norm=0", "sgd max_grad_norm=1"]
    assert [a["label"] for a in plan["arms"]] == labels
    assert sorted(plan["chosen_lr"]) == sorted(labels)  # one tuned lr per arm
    assert len(trainer.launched) == 8  # 4 arms x 2 multipliers; the final seed reuses the winning trial
    spec = compare.resolve_choices(["adam:betas=(0.8,0.99)"])
    with pytest.raises(UserError, match="'adam:betas=\\(0.8,0.99\\)' sets betas, which --grid adam_beta1 varies"):
        compare.build_arms(spec, {"adam_beta1": ["0.5", "0.9"]})


def test_a_run_that_never_started_stays_in_its_planned_arm(tmp_path):
    """The trainer records values it resolved (a default warmup); an arm whose runs all failed before writing
    a config takes them from the runs that did, so its label names only what the plan varied."""
    fake = FakeTrainer()

    def launcher(cmd: list[str], log_path: Path) -> int:
        if "--adam_beta1" in cmd and cmd[cmd.index("--adam_beta1") + 1] == "0.9":
            return 1  # died before writing anything
        return fake([*cmd, "--lr_warmup_steps", "1"], log_path)  # a value the trainer resolved and recorded

    argv = ["--optimizers", "adam", "--grid", "adam_beta1=0.5,0.9", "--seeds", "0", "1", "--max_train_steps", "10"]
    compare.run_comparison(compare.parse_comparison([*argv, "--output_dir", str(tmp_path)]), launcher)
    summary = json.loads((tmp_path / "summary.json").read_text())
    arms = [(a["arm"], a["status"]) for a in summary["arms"]]
    assert arms == [("adam beta1=0.5", "complete"), ("adam beta1=0.9", "failed")]
    assert "no seed finished in both adam beta1=0.9 and adam beta1=0.5" in (tmp_path / "report.md").read_text()


def test_hub_token_reaches_no_plan_flag_or_log_only_the_trainers_environment(tmp_path):
    secret = "hf_SECRETabc123"
    for token_args in (["--hub_token", secret], [f"--hub_token={secret}"]):
        cmp = compare.parse_comparison(
            ["--optimizers", "adamw", "--output_dir", str(tmp_path), *token_args, "--max_train_steps", "3"]
        )
        assert cmp.secrets == {"hub_token": secret} and secret not in repr(cmp)
        assert cmp.common == ["--max_train_steps", "3"] and "<redacted>" in cmp.command
    run = compare.plan_run(cmp.arms[0], 1e-4, 0, "final", cmp.common, cmp.group)
    log = tmp_path / "logs" / "run.log"
    compare.launch_subprocess([sys.executable, "-c", "pass", "--hub_token", secret], log)
    assert secret not in log.read_text() and "--hub_token '<redacted>'" in log.read_text()
    assert secret not in " ".join(compare.trainer_command(run, tmp_path, None))


def test_a_bad_training_number_is_refused_before_the_folder_is_touched(tmp_path):
    with pytest.raises(UserError, match="--max_train_steps must be at least 1"):
        compare.parse_comparison(["--optimizers", "adamw", "--output_dir", str(tmp_path / "cmp"),
                                  "--max_train_steps", "0"])
    assert not (tmp_path / "cmp").exists()


def test_every_arm_gets_the_same_compile_mode(tmp_path):
    """Fairness: speed flags are shared flags, so no arm is compiled differently from another."""
    cmp = compare.parse_comparison(
        ["--optimizers", "adamw", "lion", "sgd", "--seeds", "0", "1", "--output_dir", str(tmp_path / "cmp"),
         "--torch_compile", "--compile_mode", "max-autotune", "--channels_last"])
    runs = [compare.plan_run(a, a.choice.lr, s, "final", cmp.common, cmp.group) for a in cmp.arms for s in cmp.seeds]
    cfgs = [parse_train_args(r.args + ["--output_dir", str(tmp_path)]) for r in runs]
    assert {(c.torch_compile, c.compile_mode, c.channels_last) for c in cfgs} == {(True, "max-autotune", True)}
    with pytest.raises(UserError, match="--grid torch_compile: it does not change what is trained"):
        compare.parse_comparison(["--optimizers", "adamw", "--output_dir", str(tmp_path / "g"),
                                  "--grid", "torch_compile=true,false"])


def test_an_arm_keeps_its_planned_name_when_tuning_gives_arms_of_one_optimizer_different_lrs(tmp_path):
    """The recorded lrs differ after tuning (one arm's larger trial failed), yet report and summary name each arm as
    plan.json does: the optimizer and its betas, the chosen lr staying in the lr column."""
    fake = FakeTrainer()

    def launcher(cmd: list[str], log_path: Path) -> int:
        lr, spec = float(cmd[cmd.index("--learning_rate") + 1]), cmd[cmd.index("--optimizer_args") + 1]
        return 1 if lr > 1e-3 and spec.startswith("betas=(0.5,") else fake(cmd, log_path)

    argv = ["--optimizers", "adam:lr=1e-3,betas=(0.5,0.999)", "adam:lr=1e-3,betas=(0.9,0.999)", "--lr_grid", "0.5",
            "2", "--seeds", "0", "1", "--max_train_steps", "10", "--output_dir", str(tmp_path)]
    paths = compare.run_comparison(compare.parse_comparison(argv), launcher)
    names = ["adam betas=(0.5,0.999)", "adam betas=(0.9,0.999)"]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [a["label"] for a in plan["arms"]] == names
    assert plan["chosen_lr"] == {names[0]: 0.0005, names[1]: 0.002}
    summary = json.loads(paths["summary_json"].read_text())
    assert sorted(a["arm"] for a in summary["arms"]) == names
    assert {r["arm"] for r in summary["runs"]} == set(names)
    assert all(f"| {name} |" in paths["report_md"].read_text() for name in names)


def test_a_rerun_finds_the_run_folders_an_earlier_version_named_otherwise(tmp_path, monkeypatch):
    """A comparison planned with other folder names (an earlier version's naming) is rerun: every finished run is
    found and reused, nothing is trained again, and its runs stay the arms' runs (no folder counted twice)."""
    from diffusers_optim import arms

    argv = ["--optimizers", "adam:lr=1e-3,betas=(0.5,0.999)", "adam:lr=1e-3,betas=(0.9,0.999)", "--seeds", "0", "1",
            "--max_train_steps", "10", "--output_dir", str(tmp_path)]
    with monkeypatch.context() as earlier:
        earlier.setattr(compare, "arm_slugs", lambda names: [f"v1-{s}" for s in arms.arm_slugs(names)])
        compare.run_comparison(compare.parse_comparison(argv), FakeTrainer())
    old_folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(old_folders) == 4 and all(name.startswith("v1-adam-betas=") for name in old_folders)

    again = FakeTrainer()
    paths = compare.run_comparison(compare.parse_comparison(argv), again)
    assert again.launched == [] and sorted(p.name for p in (tmp_path / "runs").iterdir()) == old_folders
    summary = json.loads(paths["summary_json"].read_text())
    assert sorted((a["arm"], a["runs_total"]) for a in summary["arms"]) == [
        ("adam betas=(0.5,0.999)", 2), ("adam betas=(0.9,0.999)", 2)]
    # a new comparison in a fresh folder gets this version's folder names
    fresh = FakeTrainer()
    compare.run_comparison(compare.parse_comparison([*argv[:-1], str(tmp_path / "fresh")]), fresh)
    assert fresh.launched[0] == "adam-betas=0.5-0.999-lr0.001-s0"
