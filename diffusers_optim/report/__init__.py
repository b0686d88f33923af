"""Summaries and local reports of a comparison folder: summary.json/csv, report.html, report.md.

`diffusers-optim summarize DIR` rebuilds everything from the run folders alone, so a report can be
regenerated after the fact (or after a run was added by hand). The package: reading.py (run folders),
summary.py (rows and ranking), figures.py (PNGs), render.py (one section list, HTML and Markdown).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from diffusers_optim.errors import UserError
from diffusers_optim.report.reading import last_value, load_comparison, read_json, read_metrics
from diffusers_optim.report.render import md_table, ranking_table, write_reports
from diffusers_optim.report.summary import (
    TARGET_SLACK,
    build_summary,
    count_spikes,
    label_arms,
    write_summary,
)
from diffusers_optim.report.verdicts import MIN_EFFECT_HELP, parse_min_effects

__all__ = [
    "build_summary",
    "count_spikes",
    "last_value",
    "load_comparison",
    "main",
    "print_ranking",
    "read_json",
    "read_metrics",
    "summarize",
]

logger = logging.getLogger(__name__)


def summarize(root: str | Path, target: float | None = None, rank_by: str | None = None,
              min_effect: dict[str, float] | None = None) -> dict[str, Path]:
    """Rebuild summary.json/csv, report.html and report.md of a comparison folder; returns their paths."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"comparison folder not found: {root}")
    summary = build_summary(root, target, rank_by, min_effect)
    json_path, csv_path = write_summary(summary, root)
    runs = load_comparison(root, "final")
    label_arms(runs)
    html_path, md_path = write_reports(summary, runs, root)
    return dict(summary_json=json_path, summary_csv=csv_path, report_html=html_path, report_md=md_path)


def print_ranking(root: Path) -> str:
    """The ranking table as markdown text (what `compare` and `summarize` print at the end)."""
    return md_table(ranking_table(read_json(Path(root) / "summary.json")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-optim summarize", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="A comparison folder (made by `diffusers-optim compare`).")
    parser.add_argument(
        "--target_val_loss",
        type=float,
        default=None,
        help=f"Validation loss to time every run to (default: worst arm's best x {TARGET_SLACK}).",
    )
    parser.add_argument(
        "--rank_by",
        default=None,
        help="Metric to rank arms on (default: the comparison's, else eval/fd when logged, else val/loss).",
    )
    parser.add_argument("--min_effect", nargs="*", default=None, metavar="METRIC=VALUE", help=MIN_EFFECT_HELP)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = summarize(args.output_dir, args.target_val_loss, args.rank_by, parse_min_effects(args.min_effect))
    for name, path in paths.items():
        logger.info("%-12s %s", name, path)
    logger.info("\n%s", print_ranking(Path(args.output_dir)))
    return 0
