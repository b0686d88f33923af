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
