"""The report: ONE list of sections, rendered to two formats (self-contained HTML, Markdown with PNG files).

A section is a function `(ReportContext) -> Section | None` listed in SECTIONS; it returns its title and blocks
(text, tables, figures it draws into ctx.figure_dir, sample grids, code). Adding a section to both reports is
one function and one line in SECTIONS; the formatters know blocks, not sections.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers_optim.metrics.keys import floor_key, se_key
from diffusers_optim.report import figures
from diffusers_optim.report.grad_probes import grad_probes_section
from diffusers_optim.report.reading import BUCKET_RE, Run, bucket_keys, final_grid, is_number
from diffusers_optim.report.recommend import recommendation
from diffusers_optim.report.style import (
    ArmStyle,
    arm_styles,
    is_fraction_key,
    is_number_cell,
    percent,
    sig,
    split_columns,
    swatch_svg,
)
from diffusers_optim.report.summary import SPIKE_FACTOR

FIGURES_DIR = "report_files"
TITLE = "Optimizer comparison"
BAD_CELLS = ("FAILED", "INCOMPLETE", "MISSING", "PARTIAL")
STAT_SUFFIXES = ("_std", "_n", "_ci_low", "_ci_high")

# ---- blocks --------------------------------------------------------------------------------------


@dataclass
class Text:
    text: str


@dataclass
class Table:
    head: list[str]
    body: list[list[str]]
    swatches: dict[str, str] = field(default_factory=dict)  # cell text -> inline SVG of its arm's line style


@dataclass
class Image:
    path: Path
    alt: str


@dataclass
class Gallery:
    items: list[tuple[str, Path | None]]  # (caption, image or None when the run has none)


@dataclass
class Code:
    text: str


Block = Text | Table | Image | Gallery | Code


@dataclass
class Section:
    title: str | None  # None: no heading (the introduction)
    blocks: list[Block] = field(default_factory=list)


@dataclass
class ReportContext:
    """What a section may draw on: the summary, the final runs, and where its figures go."""

    summary: dict[str, Any]
    runs: list[Run]
    figure_dir: Path

    @property
    def records(self) -> list[dict[str, Any]]:
        return [rec for run in self.runs for rec in run.records]

    @property
    def styles(self) -> dict[str, ArmStyle]:
        """Each arm's colour, dashes and marker, in ranking order: the same in every figure and table."""
        return arm_styles([row["arm"] for row in self.summary["arms"]] + [r.arm for r in self.runs])

    def with_swatches(self, table: Table) -> Table:
        table.swatches = {name: swatch_svg(style) for name, style in self.styles.items()}
        return table


# ---- numbers for people --------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A number rounded to significant digits for people (0.009375 -> 0.00938, 2e-4), '-' for none."""
    return sig(value, strip=True)


def fmt_pm(mean: Any, half: Any, key: str = "") -> str:
    """`0.0412 ± 0.0014`: a mean and the half-width of its interval; shares of a whole as percentages."""
    show = percent if is_fraction_key(key) else sig
    if not is_number(mean):
        return show(mean)
    return show(mean) + (f" ± {show(half, 2)}" if is_number(half) and half > 0 else "")


def pm(row: dict[str, Any], key: str) -> str:
    """An arm's metric as `mean ± half-width of its 95% interval` over seeds (the mean alone from one seed)."""
    low, high = row.get(key + "_ci_low"), row.get(key + "_ci_high")
    half = (high - low) / 2 if is_number(low) and is_number(high) else None
    return fmt_pm(row.get(key), half, key)


def diff_text(diff: dict[str, Any]) -> str:
    """`higher by 0.012 ± 0.004` for a paired difference a - b."""
    mean, low, high = diff.get("mean"), diff.get("low"), diff.get("high")
    if not is_number(mean):
        return "no paired seeds"
    half = (high - low) / 2 if is_number(low) and is_number(high) else None
    word = "higher" if mean > 0 else "lower"
    return f"{word} by {fmt_pm(abs(mean), half)}"


def with_se(row: dict[str, Any], key: str) -> str:
    """A run's metric with the standard error of its measurement when the run logged one (`0.201 ± se 0.0008`)."""
    se = row.get(se_key(key))
    return fmt(row.get(key)) + (f" ± se {sig(se, 2)}" if is_number(se) else "")


def floor_of(summary: dict[str, Any], key: str) -> float | None:
    """The metric's floor (real held-out images against the reference, same sample count), mean over runs."""
    if not key.startswith("eval/"):
        return None
    values = [r[floor_key(key)] for r in summary["runs"] if is_number(r.get(floor_key(key)))]
    return sum(values) / len(values) if values else None


def status_cell(status: str, ok: str = "ok") -> str:
    return status.upper() if status != "complete" else ok


# ---- tables --------------------------------------------------------------------------------------

# GPU runs log the device's peak allocation; CPU runs only the whole process's peak resident memory
MEMORY_COLUMNS = (("perf/device_peak_memory_mb", "GPU peak MB"), ("perf/process_peak_rss_mb", "process RSS MB"))


def memory_column(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The memory key these rows have, and a header that says which memory it is."""
    return next((c for c in MEMORY_COLUMNS if any(is_number(r.get(c[0])) for r in rows)), MEMORY_COLUMNS[-1])


VERDICT_WORDS = {"worse": "worse", "negligible": "negligible", "equivalent": "equivalent", "tied": "tied",
                 "no interval": "no interval", "better": "better"}


def verdict(row: dict[str, Any]) -> str:
    """best | worse (by at least the smallest difference that matters) | negligible (resolved, smaller) |
    equivalent (resolved within it) | tied (not resolved) | no interval (fewer than 2 seeds) | not ranked."""
    if row.get("unranked"):
        return f"not ranked: {row['unranked']}"
    if row.get("best"):
        return "best"
    if row.get("verdict") in VERDICT_WORDS:
        return VERDICT_WORDS[row["verdict"]]
    if row.get("diff_vs_best") is None:
        return "no data"
    return "tied" if row.get("tied") else "resolved"


def verdict_text(diff: dict[str, Any]) -> str:
    """What one comparison resolves, in words, with its interval."""
    effect = diff.get("min_effect") or 0.0
    word = diff.get("verdict")
    if diff.get("resolved"):
        return diff_text(diff)
    if word == "equivalent":
        return f"equivalent: within ±{sig(effect, 2)} ({diff_text(diff)})"
    if word == "negligible":
        return f"resolved but below the smallest difference that matters, {sig(effect, 2)} ({diff_text(diff)})"
    return f"not resolved ({diff_text(diff)})"


def statistics_line(summary: dict[str, Any]) -> str | None:
    """How the verdicts were reached, and what they promise, in one sentence."""
    stats = summary.get("statistics")
    if not stats:
        return None
    effects = ", ".join(f"{k} {sig(v, 2)}" for k, v in stats["min_effect"].items() if v)
    return (f"Verdicts: {stats['method']}; the {len(stats['family'])} metrics below are one family whose chance of "
            f"stating any false difference is at most {stats['alpha']:.0%} ({stats['ranking_share']:.0%} of it for "
            f"{summary['rank_by']}). Smallest differences that matter: {effects or 'none measured (any resolved one)'}.")


def ranking_table(summary: dict[str, Any]) -> Table:
    """One row per arm in rank order: the ranking metric with its interval and the paired gap to the best."""
    metric = summary["rank_by"]
    others = [k for k in ("val/loss", "train/loss", "eval/fd") if k != metric]
    memory_key, memory_head = memory_column(summary["arms"])
    costs = ["perf/images_per_sec", memory_key, "optim/state_bytes_per_param", "nonfinite_steps", "loss_spikes"]
    head = ["rank", "arm", "lr", "seeds ok", metric, "vs best (simultaneous)", "verdict", *others]
    head += [
        "steps to target",
        "s to target",
        "img/s",
        memory_head,
        "state B/param",
        "non-finite",
        "spikes",
        "clipped",
        "status",
    ]
    body = []
    for r in summary["arms"]:
        target = (
            (fmt(r["target_step"]), fmt(r["target_seconds"]))
            if r["target_step"] is not None
            else (f"not reached ({r['target_reached']})" if not r.get("target_unknown") else
                  f"{r['target_reached']} reached, {r['target_unknown']} unknown (no curves)", "-")
        )
        gap = diff_text(r["diff_vs_best"]) if r.get("diff_vs_best") else "-"
        body.append(
            [
                "-" if r["rank"] is None else str(r["rank"]),
                r["arm"],
                fmt(r["learning_rate"]),
                f"{r['runs_complete']}/{r['runs_total']}",
                pm(r, metric),
                gap,
                verdict(r),
                *[pm(r, k) for k in others],
                *target,
                *[pm(r, k) for k in [*costs, "clipped_fraction_mean"]],
                status_cell(r["status"]),
            ]
        )
    return Table(head, body)


def runs_table(rows: list[dict[str, Any]]) -> Table:
    head = ["run", "arm", "lr", "seed", "status", "steps", "val/loss", "train/loss", "steps to target", "error"]
    body = [
        [
            r["run"],
            r["arm"],
            fmt(r["learning_rate"]),
            fmt(r["seed"]),
            status_cell(r["status"], ok="complete"),
            fmt(r["steps"]),
            with_se(r, "val/loss"),
            fmt(r.get("train/loss")),
            fmt(r["target_step"]) if r["target_step"] is not None else
            "no curves" if r.get("curves_missing") else "not reached",
            (r["error"] or "").splitlines()[-1][:200] if r["error"] else "",
        ]
        for r in rows
    ]
    return Table(head, body)


def bucket_table(summary: dict[str, Any]) -> Table:
    rows = summary["arms"]
    keys = list(dict.fromkeys(k for r in rows for k in r if BUCKET_RE.match(k) or k.startswith("eval/")))
    keys = [k for k in keys if not k.endswith(STAT_SUFFIXES)]
    return Table(["arm", *keys], [[r["arm"], *[pm(r, k) for k in keys]] for r in rows])


def data_gaps(summary: dict[str, Any]) -> list[str]:
    """What the numbers lack and why: runs whose curves are lost, arms and runs left out of the ranking."""
    metric = summary["rank_by"]
    lines = [f"{r['run']}: curves missing ({r['curves_missing']}); its final values come from run_summary.json, its "
             "time to target, throughput, memory and spikes are unknown." for r in summary["runs"]
             if r.get("curves_missing")]
    lines += [f"{r['arm']} is not ranked on {metric}: {r['unranked']}." for r in summary["arms"] if r.get("unranked")]
    ranked = {r["arm"] for r in summary["arms"] if r.get("rank") is not None}
    lines += [f"{r['run']} is left out of the {metric} ranking: {r['unranked']}." for r in summary["runs"]
              if r.get("unranked") and r["status"] == "complete" and r["arm"] in ranked]
    return lines


def findings(summary: dict[str, Any]) -> list[str]:
    """Plain sentences: what the seeds resolved between each arm and the best, and what they did not."""
    metric, arms = summary["rank_by"], summary["arms"]
    best = next((r["arm"] for r in arms if r.get("best")), "none (no arm has a value)")
    direction = "higher" if summary.get("higher_is_better") else "lower"
    seeds = max((r.get(metric + "_n") or 0 for r in arms), default=0)
    lines = [
        f"Ranked by {metric} ({direction} is better), mean over up to {seeds} seed(s) with 95% t-intervals; "
        f"differences between arms are paired by seed. Best: {best}.",
        *data_gaps(summary),
    ]
    if statistics_line(summary):
        lines.append(statistics_line(summary))
    floor = floor_of(summary, metric)
    if floor is not None:
        lines.append(
            f"Floor of {metric}: {fmt(floor)}, the score of real held-out images at the same sample count; "
            "an arm near it samples as well as this metric can tell."
        )
    if len(arms) == 1:
        return lines
    if seeds < 2:
        return lines + [
            "Nothing is resolved: one seed per arm gives no interval (use --seeds with 2 or more)."
        ]
    by_pair: dict[str, list[dict[str, Any]]] = {}
    for diff in summary["comparisons"]:
        by_pair.setdefault(diff["a"], []).append(diff)
    for arm, diffs in by_pair.items():
        head = next((d for d in diffs if d["metric"] == metric), None)
        rest = [d for d in diffs if d["metric"] != metric]
        if not any(d.get("n") for d in diffs):
            lines.append(f"{arm}: no seed finished in both {arm} and {best}, so nothing to compare.")
            continue
        text = f"{arm} vs {best}: {metric} " + verdict_text(head or {})
        resolved = [f"{d['metric']} {diff_text(d)}" for d in rest if d["resolved"]]
        equivalent = [d["metric"] for d in rest if d.get("verdict") == "equivalent"]
        open_ = [d["metric"] for d in rest if not d["resolved"] and d.get("verdict") != "equivalent"]
        parts = [*resolved, *([f"equivalent on {', '.join(equivalent)}"] if equivalent else []),
                 *([f"{', '.join(open_)} not resolved"] if open_ else [])]
        if parts:
            text += "; " + "; ".join(parts)
        lines.append(text + ".")
    tied = [r["arm"] for r in arms if r.get("tied")]
    if tied:
        lines.append(f"Not distinguishable from {best} on {metric}: {', '.join(tied)}.")
    return lines


# ---- sections (the one list both formats render) ---------------------------------------------------


def recommendation_section(ctx: ReportContext) -> Section | None:
    """The first thing a reader sees: which arm to pick, where it wins and loses, what is not resolved."""
    sentences = recommendation(ctx.summary)
    return Section("Recommendation", [Text(s) for s in sentences]) if sentences else None


def intro_section(ctx: ReportContext) -> Section:
    s = ctx.summary
    notes = (
        f"± is the half-width of the 95% t-interval over seeds. Target validation loss: {fmt(s['target_val_loss'])} "
        f"({s['target_rule']}). Loss spike: train/loss > {SPIKE_FACTOR:g}x the median of all earlier values."
    )
    return Section("What the seeds resolved", [*(Text(line) for line in findings(s)), Text(notes)])


LOAD_DEPENDENT = {"s to target": "s to target*", "img/s": "img/s*", "GPU peak MB": "GPU peak MB*",
                  "process RSS MB": "process RSS MB*"}


def load_note(summary: dict[str, Any]) -> Text:
    """What the starred columns depend on, so nobody reads a busy machine's numbers as an optimizer's cost."""
    parallel = re.search(r"--num_parallel[ =](\d+)", summary.get("command") or "")
    shared = f"{parallel.group(1)} runs trained at a time here" if parallel else "other runs sharing the machine"
    return Text(f"Starred columns depend on the machine and its load ({shared}; process RSS MB is the whole "
                "process's memory, not the optimizer's): compare them within one comparison only.")


def ranking_section(ctx: ReportContext) -> Section:
    ranking = ctx.with_swatches(ranking_table(ctx.summary))
    ranking.head = [LOAD_DEPENDENT.get(h, h) for h in ranking.head]
    buckets = ctx.with_swatches(bucket_table(ctx.summary))
    return Section("Ranking", [ranking, load_note(ctx.summary), *([buckets] if len(buckets.head) > 1 else [])])


def forest_section(ctx: ReportContext) -> Section:
    keys = list(dict.fromkeys([ctx.summary["rank_by"], "val/loss"]))
    keys = [k for k in keys if any(is_number(r.get(k)) for r in ctx.summary["arms"])] or keys[:1]
    floors = {k: floor_of(ctx.summary, k) for k in keys}
    path = figures.plot_forest(ctx.summary, keys, ctx.figure_dir / "forest.png", floors)
    text = (
        "Left: each arm's mean (diamond) and 95% interval (bar) over its seeds (dots). Right: the difference from "
        "the best arm, seed by seed; an interval that crosses zero is not resolved (hollow: tied)."
    )
    return Section("Intervals over seeds", [Text(text), Image(path, "forest plot")])


def val_curves_section(ctx: ReportContext) -> Section:
    keys = ["val/loss", *bucket_keys(ctx.records, "val_t")]
    path = figures.plot_curves(ctx.runs, keys, ctx.figure_dir / "val_loss_by_bucket.png", "val loss",
                               styles=ctx.styles)
    return Section(
        "Validation loss by timestep bucket",
        [Text("Mean over seeds; the band spans the seeds' min and max."), Image(path, "validation loss by bucket")],
    )


def heatmap_section(ctx: ReportContext) -> Section:
    keys = bucket_keys(ctx.records, "val_t") or ["val/loss"]
    path = figures.plot_heatmap(ctx.summary, keys, ctx.figure_dir / "final_val_heatmap.png")
    return Section("Final validation loss by timestep bucket", [Image(path, "heatmap")])


def grad_lr_section(ctx: ReportContext) -> Section:
    # the step size actually applied (Prodigy's d*lr, not its multiplier); runs from before it was logged: lr
    step = "train/effective_lr" if any("train/effective_lr" in rec for rec in ctx.records) else "train/lr"
    keys = ["train/grad_norm", step]
    path = figures.plot_curves(ctx.runs, keys, ctx.figure_dir / "grad_norm_lr.png", "", styles=ctx.styles)
    return Section("Gradient norm and step size", [Image(path, "grad norm and step size")])


def grids_section(ctx: ReportContext) -> Section:
    items = [(f"{r.arm} lr={fmt(r.learning_rate)} seed={r.seed} [{r.status}]", final_grid(r)) for r in ctx.runs]
    return Section("Final sample grids", [Gallery(items)])


def runs_section(ctx: ReportContext) -> Section:
    return Section("Runs", [runs_table(ctx.summary["runs"])])


def tuning_section(ctx: ReportContext) -> Section | None:
    tuning = ctx.summary["tuning"]
    return Section("Learning-rate tuning", [runs_table(tuning)]) if tuning else None


def reproduce_section(ctx: ReportContext) -> Section:
    command = ctx.summary["command"] or "(no plan.json: this folder was not made by `diffusers-optim compare`)"
    return Section("Reproduce", [Code(command)])


SectionFn = Callable[[ReportContext], Section | None]
SECTIONS: list[SectionFn] = [
    recommendation_section,
    intro_section,
    ranking_section,
    forest_section,
    val_curves_section,
    heatmap_section,
    grad_lr_section,
    grad_probes_section,
    grids_section,
    runs_section,
    tuning_section,
    reproduce_section,
]


def build_document(ctx: ReportContext) -> list[Section]:
    """Every section of the report, in order (a section with nothing to show returns None and is left out)."""
    ctx.figure_dir.mkdir(parents=True, exist_ok=True)
    return [s for s in (fn(ctx) for fn in SECTIONS) if s is not None]


# ---- format 1: HTML (self-contained: CSS inline, images embedded) -------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; overflow-wrap: anywhere; }
th { background: #f0f0f0; } td.arm, td.text { text-align: left; } td.arm { white-space: nowrap; }
svg.swatch { vertical-align: middle; margin-right: 6px; }
tr.bad td { background: #fde8e8; color: #900; }
img { max-width: 100%; } .grids { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; text-align: center; } figure img { image-rendering: pixelated; width: 192px; }
pre { background: #f6f6f6; padding: 1em; white-space: pre-wrap; overflow-wrap: anywhere; }
.recommendation { background: #eef5fb; border-left: 4px solid #0072B2; padding: 0.5em 1em; }
"""


def embed_png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def html_table(table: Table) -> str:
    """One <table> per MAX_COLUMNS columns (key columns repeated): a wide table is split, never scrolled."""
    return "\n".join(html_table_part(head, body, table.swatches) for head, body in split_table(table))


def split_table(table: Table) -> list[tuple[list[str], list[list[str]]]]:
    """The table's parts, each narrow enough for a page; the rank and arm columns start every part."""
    keep = 2 if table.head[:1] == ["rank"] else 1
    return split_columns(table.head, table.body, keep=keep)


def cell_class(text: str, swatches: dict[str, str]) -> str:
    return "arm" if text in swatches else ("num" if is_number_cell(text) else "text")


def html_table_part(head: list[str], body: list[list[str]], swatches: dict[str, str]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = []
    for row in body:
        cls = ' class="bad"' if any(c in BAD_CELLS for c in row) else ""
        tds = "".join(f'<td class="{cell_class(c, swatches)}">{swatches.get(c, "")}{html.escape(c)}</td>'
                      for c in row)
        rows.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def html_block(block: Block) -> str:
    if isinstance(block, Text):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Table):
        return html_table(block)
    if isinstance(block, Image):
        return embed_png(block.path, block.alt)
    if isinstance(block, Code):
        return f"<pre>{html.escape(block.text)}</pre>"
    figs = []
    for caption, path in block.items:
        img = embed_png(path, caption) if path else "<p><b>no sample grid</b></p>"
        figs.append(f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>")
    return "<div class='grids'>" + "".join(figs) + "</div>"


def to_html(doc: list[Section], title: str = TITLE) -> str:
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    for section in doc:
        if section.title:
            parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [html_block(b) for b in section.blocks]
    parts.append("</body></html>")
    return "\n".join(parts)


# ---- format 2: Markdown (PNG files beside it, sample grids copied in) ---------------------------------


def md_table(table: Table) -> str:
    parts = []
    for head, body in split_table(table):
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def md_block(block: Block, base: Path, files: Path) -> str:
    def rel(p: Path) -> str:
        return p.relative_to(base).as_posix()

    if isinstance(block, Text):
        return block.text
    if isinstance(block, Table):
        return md_table(block)
    if isinstance(block, Image):
        return f"![{block.alt}]({rel(block.path)})"
    if isinstance(block, Code):
        return f"```\n{block.text}\n```"
    lines = []
    for caption, path in block.items:
        if path is None:
            lines.append(f"**no sample grid**: {caption}\n")
            continue
        copy = files / f"grid_{path.parent.parent.name}.png"  # named by its run folder (samples/ is inside)
        shutil.copyfile(path, copy)
        lines.append(f"![{caption}]({rel(copy)})  \n{caption}\n")
    return "\n".join(lines)


def to_markdown(doc: list[Section], base: Path, files: Path, title: str = TITLE) -> str:
    lines = [f"# {title}", ""]
    for section in doc:
        if section.title:
            lines += [f"## {section.title}", ""]
        lines += [x for b in section.blocks for x in (md_block(b, base, files), "")]
    return "\n".join(lines)


def write_reports(summary: dict[str, Any], runs: list[Run], root: Path) -> tuple[Path, Path]:
    """report.html and report.md of a comparison folder, from one document."""
    ctx = ReportContext(summary, runs, root / FIGURES_DIR)
    doc = build_document(ctx)
    html_path, md_path = root / "report.html", root / "report.md"
    html_path.write_text(to_html(doc))
    md_path.write_text(to_markdown(doc, root, ctx.figure_dir))
    return html_path, md_path
