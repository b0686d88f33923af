"""A W&B report of one comparison group: loss by timestep bucket per optimizer, val loss, grad norm, lr, samples,
and the per-timestep gradient probes (grad_t/).

    diffusers-optim report --entity E --project P --group G [--title T] [--dry-run FILE]

Built with wandb-workspaces (`pip install 'diffusers-optim[reports]'`). `--dry-run FILE` builds the very same
report objects and writes their specification as JSON, without network or a W&B login.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffusers_optim.config import TrainConfig
from diffusers_optim.errors import UserError
from diffusers_optim.metrics.buckets import bucket_keys
from diffusers_optim.metrics.probes import ProbeKeys

logger = logging.getLogger(__name__)

GROUP_BY = "config.optimizer"  # the trainer logs its config, so runs group by the optimizer's name


def arm_grouping(plan: dict) -> list[str]:
    """W&B config keys that tell a comparison's arms apart (from its plan.json); seeds of one arm share one line.

    The arm's name (`arm_name`, set by compare) when every run was trained with it; for runs of an earlier version,
    the optimizer, its arguments and lr when two arms share an optimizer, and every --grid flag."""
    runs = plan.get("runs") or []
    if runs and all("--arm_name" in run.get("args", []) for run in runs):
        return ["config.arm_name"]
    keys = ["optimizer"]
    names = [o["name"] for o in plan.get("optimizers", [])]
    if len(set(names)) < len(names):
        keys += ["optimizer_args", "learning_rate"]
    keys += sorted(plan.get("grid") or {})
    return [f"config.{k}" for k in keys]
DRY_RUN_PROJECT_ID = "dry-run"


def import_reports():
    """wandb_workspaces.reports.v2, or a UserError that says which extra installs it."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise UserError(
            "`diffusers-optim report` needs the package 'wandb-workspaces': "
            "pip install 'diffusers-optim[reports]' (or pip install wandb-workspaces)"
        ) from None
    return wr


def line_plot(wr, key: str, title: str, log_y: bool = False, x: int = 0, y: int = 0, w: int = 8):
    """One metric over steps, one line per optimizer (mean over seeds, min-max band)."""
    return wr.LinePlot(
        title=title,
        x="Step",
        y=[key],
        log_y=log_y or None,
        groupby_aggfunc="mean",
        groupby_rangefunc="minmax",
        layout=wr.Layout(x=x, y=y, w=w, h=6),
    )


def bucket_panels(wr, prefix: str, keys: list[str], row: int) -> list:
    """A row of panels, one per timestep bucket, three to a row."""
    return [
        line_plot(wr, key, f"{prefix} t={key.split('/', 1)[1]}", True, x=8 * (i % 3), y=row + 6 * (i // 3))
        for i, key in enumerate(keys)
    ]


def probe_panels(wr, keys: ProbeKeys) -> list:
    """The gradient probes: norms per bucket, the pairwise cosines, update and momentum alignment."""
    norms = bucket_panels(wr, "grad norm", keys.norm, 0)
    row = 6 * -(-len(keys.norm) // 3)
    cosines = wr.BarPlot(title="cos(g_a, g_b) per bucket pair (latest probe)", metrics=keys.cos,
                         groupby_aggfunc="mean", groupby_rangefunc="minmax", layout=wr.Layout(x=0, y=row, w=12, h=8))
    alignment = [
        line_plot(wr, "grad_t/cos_mean", "mean cos between buckets' gradients", x=12, y=row, w=12),
        line_plot(wr, "grad_t/full_update_cos", "cos(-g, update): the step vs the gradient", x=0, y=row + 8),
        line_plot(wr, "grad_t/full_momentum_cos", "cos(g, first moment): the beta1 question", x=8, y=row + 8),
    ]
    updates = [line_plot(wr, key, f"cos(-g_b, update) t={key.split('/')[-1]}", x=8 * (i % 3),
                         y=row + 14 + 6 * (i // 3)) for i, key in enumerate(keys.update_cos)]
    return [*norms, cosines, *alignment, *updates]


def build_report(
    entity: str,
    project: str,
    group: str,
    title: str | None = None,
    num_train_timesteps: int = TrainConfig.ddpm_num_steps,
    num_buckets: int = TrainConfig.num_timestep_buckets,
    group_by: list[str] | None = None,
    verdicts: list[str] | None = None,
):
    """The report object: one runset filtered to the group and grouped by arm (default: by optimizer), and its
    panels; with `verdicts` (the local report's recommendation and how it was reached), those sentences first."""
    wr = import_reports()
    val_keys = bucket_keys(num_train_timesteps, num_buckets, "val_t")
    train_keys = bucket_keys(num_train_timesteps, num_buckets, "loss_t")

    def grid(panels: list):
        runset = wr.Runset(
            entity=entity, project=project, name=group, filters=f"Group = '{group}'", groupby=group_by or [GROUP_BY]
        )
        return wr.PanelGrid(runsets=[runset], panels=panels)

    overview = [
        line_plot(wr, "val/loss", "validation loss", True, x=0),
        line_plot(wr, "train/grad_norm", "gradient norm (before clipping)", True, x=8),
        line_plot(wr, "train/effective_lr", "step size (effective lr: d*lr for Prodigy)", True, x=16),
    ]
    samples = [
        wr.MediaBrowser(
            title="samples (fixed noise)",
            media_keys=["samples/grid"],
            num_columns=4,
            layout=wr.Layout(x=0, y=0, w=24, h=10),
        )
    ]
    blocks = [
        wr.P(
            f"Optimizer comparison of the runs in W&B group '{group}', one line per arm "
            f"(grouped by {', '.join(k.removeprefix('config.') for k in group_by or [GROUP_BY])}; mean over seeds, "
            f"min-max band). Made by diffusers-optim."
        ),
        *([wr.H2("Verdicts"), *(wr.P(line) for line in verdicts)] if verdicts else []),
        wr.H2("Validation loss, gradient norm, learning rate"),
        grid(overview),
        wr.H2("Validation loss by timestep bucket"),
        wr.P("Fixed held-out images, frozen noise and timesteps: the fairest view of each noise level."),
        grid(bucket_panels(wr, "val loss", val_keys, 0)),
        wr.H2("Training loss by timestep bucket"),
        grid(bucket_panels(wr, "train loss", train_keys, 0)),
        wr.H2("Gradients by timestep bucket (grad_t/)"),
        wr.P("Gradient probes on a fixed probe batch: each bucket's gradient norm, how much the buckets' gradients "
             "agree (cosine), and how well the applied update and the momentum buffer align with them."),
        grid(probe_panels(wr, ProbeKeys(num_train_timesteps, num_buckets))),
        wr.H2("Samples"),
        grid(samples),
    ]
    return wr.Report(
        entity=entity,
        project=project,
        title=title or f"Optimizer comparison: {group}",
        description=f"diffusers-optim comparison, W&B group '{group}'",
        blocks=blocks,
    )


@contextlib.contextmanager
def offline_project_lookup() -> Iterator[None]:
    """Answer the one query a report makes while being built (a runset's project id) without network."""
    from wandb_workspaces.reports.v2 import interface

    def fake_graphql(_api, query, variables):
        if "internalId" not in str(query):
            raise RuntimeError("dry run: unexpected W&B query")
        return {"project": {"internalId": DRY_RUN_PROJECT_ID}}

    saved = interface.execute_graphql, interface._get_api
    interface.execute_graphql, interface._get_api = fake_graphql, lambda: None
    try:
        yield
    finally:
        interface.execute_graphql, interface._get_api = saved


def report_spec(report) -> dict[str, Any]:
    """The report's specification, as it would be sent to W&B (with a placeholder project id)."""
    with offline_project_lookup():
        model = report._to_model()
    return json.loads(model.model_dump_json(by_alias=True, exclude_none=True))


def read_plan(root: Path) -> dict:
    """A comparison folder's plan.json, or a one-line UserError."""
    from diffusers_optim import rundir

    path = root / rundir.PLAN
    if not path.is_file():
        raise UserError(f"--comparison {root}: no {rundir.PLAN} there (is it a comparison's --output_dir?)")
    return rundir.read_json(path)


def comparison_verdicts(root: Path) -> list[str] | None:
    """The comparison's verdicts, word for word as report.html/md states them (from its summary.json), so the W&B
    report and the local one never disagree; None before the comparison has a summary."""
    from diffusers_optim import rundir
    from diffusers_optim.report.recommend import recommendation
    from diffusers_optim.report.render import statistics_line

    path = root / rundir.SUMMARY_JSON
    if not path.is_file():
        return None
    summary = rundir.read_json(path)
    return [*recommendation(summary), *filter(None, [statistics_line(summary)])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-optim report", description=__doc__.splitlines()[0])
    parser.add_argument("--entity", required=True, help="W&B entity (team or user).")
    parser.add_argument("--project", required=True, help="W&B project of the runs.")
    parser.add_argument("--group", default=None, help="W&B group of the comparison (its --run_group); "
                        "default: the group in --comparison's plan.json.")
    parser.add_argument("--comparison", default=None, metavar="DIR",
                        help="The comparison folder: its plan.json names the group and the settings that tell its arms "
                        "apart (lines are grouped by those; without it, by optimizer).")
    parser.add_argument(
        "--title", default=None, help="Report title (default: 'Optimizer comparison: GROUP')."
    )
    parser.add_argument("--num_timestep_buckets", type=int, default=TrainConfig.num_timestep_buckets)
    parser.add_argument("--ddpm_num_steps", type=int, default=TrainConfig.ddpm_num_steps)
    parser.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        default=None,
        metavar="FILE",
        help="Write the report's specification (JSON) to FILE instead of saving it to W&B.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    group, group_by, verdicts = args.group, None, None
    if args.comparison:
        plan = read_plan(Path(args.comparison))
        group, group_by = group or plan.get("run_group"), arm_grouping(plan)
        verdicts = comparison_verdicts(Path(args.comparison))
    if not group:
        parser.error("--group is required (or --comparison DIR, whose plan.json names it)")
    report = build_report(
        args.entity, args.project, group, args.title, args.ddpm_num_steps, args.num_timestep_buckets, group_by,
        verdicts,
    )
    if args.dry_run:
        path = Path(args.dry_run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report_spec(report), indent=2) + "\n")
        logger.info("report specification written to %s (dry run: nothing sent to W&B)", path)
        return 0
    report.save()
    logger.info("report saved: %s", report.url)
    return 0
