"""The W&B report, built offline: --dry-run writes the real report objects' specification."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("wandb_workspaces")

from diffusers_optim import wandb_report  # noqa: E402


def panels_of(spec: dict) -> list[dict]:
    grids = [b for b in spec["spec"]["blocks"] if b["type"] == "panel-grid"]
    return [p for g in grids for p in g["metadata"]["panelBankSectionConfig"]["panels"]]


def test_dry_run_writes_panels_grouped_by_optimizer_and_filtered_by_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "report.json"
    argv = ["--entity", "team", "--project", "optim", "--group", "cmp-7", "--num_timestep_buckets", "2"]
    assert wandb_report.main(argv + ["--dry-run", str(out)]) == 0
    spec = json.loads(out.read_text())
    assert spec["displayName"] == "Optimizer comparison: cmp-7"
    assert spec["project"] == {"name": "optim", "entityName": "team"}
    grids = [b for b in spec["spec"]["blocks"] if b["type"] == "panel-grid"]
    for grid in grids:
        (runset,) = grid["metadata"]["runSets"]
        assert runset["grouping"] == [{"section": "config", "name": "optimizer.value"}]
        assert runset["filters"]["filters"] == [
            {"key": {"section": "run", "name": "group"}, "op": "=", "value": "cmp-7", "disabled": False}
        ]
    metrics = [m for p in panels_of(spec) for m in p["config"].get("metrics", [])]
    expected = ["val/loss", "train/grad_norm", "train/effective_lr", "val_t/000-499", "val_t/500-999", "loss_t/000-499",
                "grad_t/norm/000-499", "grad_t/norm/500-999", "grad_t/cos/000-499__500-999", "grad_t/cos_mean",
                "grad_t/update_cos/000-499", "grad_t/full_update_cos", "grad_t/full_momentum_cos"]
    assert set(expected) <= set(metrics)
    media = [p for p in panels_of(spec) if p["viewType"] == "Media Browser"]
    assert media and media[0]["config"]["mediaKeys"] == ["samples/grid"]


def test_missing_required_flags_exit_with_usage():
    with pytest.raises(SystemExit):
        wandb_report.main(["--entity", "e"])


def test_comparison_plan_groups_lines_by_arm_and_names_the_group(tmp_path, monkeypatch):
    """With --comparison, seeds of one arm share a line and arms never do; for a plan whose runs carry no
    --arm_name (an earlier version's), the grid flags and, when two arms share an optimizer, its arguments and lr
    join the grouping; the group comes from the plan."""
    from dataclasses import asdict

    from diffusers_optim import compare, rundir

    monkeypatch.setenv("WANDB_MODE", "offline")
    cmp = compare.parse_comparison(["--optimizers", "adamw:lr=1e-3", "adamw:lr=2e-3,weight_decay=0.1", "sgd",
                                    "--grid", "lr_warmup_steps=0,5", "--grid", "adam_beta1=0.5,0.9",
                                    "--seeds", "0", "1", "--output_dir", str(tmp_path / "cmp")])
    # the fields of plan.json this reads, as run_comparison writes them
    plan = {"optimizers": [asdict(c) for c in cmp.choices], "grid": cmp.grids, "run_group": cmp.group}
    (tmp_path / "cmp").mkdir()
    rundir.write_json(tmp_path / "cmp" / rundir.PLAN, plan)
    out = tmp_path / "report.json"
    argv = ["--entity", "team", "--project", "optim", "--comparison", str(tmp_path / "cmp"), "--dry-run", str(out)]
    assert wandb_report.main(argv) == 0
    spec = json.loads(out.read_text())
    for grid in (b for b in spec["spec"]["blocks"] if b["type"] == "panel-grid"):
        (runset,) = grid["metadata"]["runSets"]
        assert [g["name"] for g in runset["grouping"]] == [
            "optimizer.value", "optimizer_args.value", "learning_rate.value", "adam_beta1.value",
            "lr_warmup_steps.value"]
        assert runset["filters"]["filters"][0]["value"] == plan["run_group"]


def test_grouping_is_by_optimizer_alone_when_names_differ_and_there_is_no_grid():
    plan = {"optimizers": [{"name": "adamw"}, {"name": "sgd"}], "grid": {}}
    assert wandb_report.arm_grouping(plan) == ["config.optimizer"]


def test_comparison_without_a_plan_is_one_line(tmp_path, capsys):
    from diffusers_optim import cli

    assert cli.main(["report", "--entity", "e", "--project", "p", "--comparison", str(tmp_path)]) == 2
    assert "no plan.json there" in capsys.readouterr().err


def test_runs_planned_by_this_version_share_a_line_per_arm_under_its_name(tmp_path):
    """Every planned run passes --arm_name (W&B's config.arm_name) and the lines group by it alone; a plan with a run
    of an earlier version (no such flag) falls back to the settings' keys."""
    from dataclasses import asdict

    from diffusers_optim import compare

    cmp = compare.parse_comparison(["--optimizers", "adam:betas=(0.5,0.999)", "adam", "--seeds", "0", "1",
                                    "--output_dir", str(tmp_path)])
    runs = [asdict(compare.plan_run(a, a.choice.lr, s, "final", cmp.common, cmp.group)) for a in cmp.arms for s in (0, 1)]
    plan = {"optimizers": [asdict(c) for c in cmp.choices], "grid": {}, "runs": runs}
    assert [r["args"][r["args"].index("--arm_name") + 1] for r in runs[::2]] == [a.label for a in cmp.arms]
    assert wandb_report.arm_grouping(plan) == ["config.arm_name"]
    runs[0]["args"] = runs[0]["args"][: runs[0]["args"].index("--arm_name")]
    assert wandb_report.arm_grouping(plan) == ["config.optimizer", "config.optimizer_args", "config.learning_rate"]
