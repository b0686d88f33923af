"""The report read at a glance: every arm its own colour AND line style, tables that fit, numbers for people."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_optim import report
from diffusers_optim.report.style import (
    MAX_COLUMNS,
    PALETTE,
    arm_style,
    percent,
    sig,
    split_columns,
    text_color_on,
)

VAL = [1.0, 0.6, 0.45, 0.40, 0.38, 0.37]


def write_run(root: Path, optimizer: str, lr: float, val: list[float], clipped: float) -> None:
    """A finished run folder as the trainer leaves it (config, metrics.jsonl, grid, run_summary.json)."""
    name = f"{optimizer}-lr{lr:g}-s0"
    path = root / "runs" / name
    (path / "samples").mkdir(parents=True)
    config = {"config": {"optimizer": optimizer, "learning_rate": lr, "seed": 0}, "run_name": name,
              "optimizer": {"name": optimizer, "hparams": {"lr": lr}}}
    (path / "config.json").write_text(json.dumps(config))
    records = []
    for i, v in enumerate(val):
        step = 50 * (i + 1)
        records.append({"step": step, "elapsed_s": 3.0 * step, "train/loss": v * 1.1, "val/loss": v,
                        "val_t/000-249": 3 * v, "val_t/250-499": 1.5 * v, "val_t/500-749": v / 2,
                        "val_t/750-999": v / 4, "train/grad_norm": 2.0 / (i + 1), "train/lr": lr * (1 - i / 6),
                        "train/clipped_fraction": clipped, "perf/images_per_sec": 152.33 + i,
                        "perf/process_peak_rss_mb": 512.0, "optim/state_mb": 0.009375,
                        "optim/state_bytes_per_param": 8.0046875})
    records.append({"step": 50 * len(val), "eval/fd": 0.6 + val[-1], "eval/confident_frac": 0.84375})
    (path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).save(path / "samples" / "step_000300.png")
    summary = {"status": "complete", "steps": 300, "wall_time_s": 900.0, "nonfinite_steps": 0,
               "sample_grid": "samples/step_000300.png"}
    (path / "run_summary.json").write_text(json.dumps(summary))


@pytest.fixture
def three_arms(tmp_path: Path) -> Path:
    """adam and adamw with IDENTICAL curves (the case where one hid the other), and a different sgd."""
    write_run(tmp_path, "adamw", 2e-3, VAL, clipped=0.25)
    write_run(tmp_path, "adam", 2e-3, VAL, clipped=0.25)
    write_run(tmp_path, "sgd", 0.05, [v * 1.2 for v in VAL], clipped=0.009375)
    return tmp_path


class Cells(HTMLParser):
    """Tables (header cells and rows of (class, text, swatch attributes)) and the CSS of a report.html."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self.css = ""
        self._cell: dict | None = None
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"head": [], "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("th", "td"):
            self._cell = {"tag": tag, "class": attrs.get("class", ""), "text": "", "swatch": None}
        elif tag == "svg" and self._cell is not None:
            self._cell["swatch"] = (attrs["data-color"], attrs["data-dash"], attrs["data-marker"])
        elif tag == "style":
            self._in_style = True

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            table = self.tables[-1]
            (table["head"] if tag == "th" else table["rows"][-1]).append(self._cell)
            self._cell = None
        elif tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        elif self._in_style:
            self.css += data


def parse(html_text: str) -> Cells:
    cells = Cells()
    cells.feed(html_text)
    return cells


def test_each_arm_has_its_own_colour_and_line_style_everywhere(three_arms: Path):
    paths = report.summarize(three_arms)
    page = parse(paths["report_html"].read_text())
    swatches: dict[str, set] = {}
    for table in page.tables:
        for row in table["rows"]:
            for cell in row:
                if cell["swatch"]:
                    swatches.setdefault(cell["text"].strip(), set()).add(cell["swatch"])
    assert set(swatches) == {"adam", "adamw", "sgd"}
    assert all(len(styles) == 1 for styles in swatches.values()), swatches  # one style per arm, every table
    pairs = [(color, dash) for (color, dash, _) in (next(iter(s)) for s in swatches.values())]
    assert len(set(pairs)) == 3 and len({color for color, _ in pairs}) == 3, pairs
    assert {color for color, _ in pairs} <= set(PALETTE)

    # the two identical curves are both visible in the figure: each arm's colour covers many pixels
    figure = np.asarray(Image.open(three_arms / "report_files" / "val_loss_by_bucket.png").convert("RGB")).astype(int)
    for color in {color for color, _ in pairs}:
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        near = (np.abs(figure - rgb).sum(axis=-1) < 60).sum()
        assert near > 300, (color, near)


def test_no_table_is_wider_than_the_page_allows(three_arms: Path):
    paths = report.summarize(three_arms)
    page = parse(paths["report_html"].read_text())
    assert page.tables
    for table in page.tables:
        assert len(table["head"]) <= MAX_COLUMNS, [c["text"] for c in table["head"]]
        assert all(len(row) == len(table["head"]) for row in table["rows"] if row)
    css = re.sub(r"\s+", " ", page.css)
    assert "overflow-x" not in css  # a table is split, never hidden behind a scroll bar
    assert re.search(r"table \{[^}]*max-width: 100%", css)
    assert re.search(r"td[^{]*\{[^}]*overflow-wrap: anywhere", css)
    # the 17 columns of the ranking are all still there, split with the arm column repeated
    ranking = [t for t in page.tables if t["head"] and t["head"][0]["text"] == "rank"]
    assert len(ranking) >= 2 and all(t["head"][1]["text"] == "arm" for t in ranking)
    heads = [c["text"] for t in ranking for c in t["head"][2:]]
    assert {"val/loss", "eval/fd", "img/s*", "s to target*", "clipped", "status"} <= set(heads)


def test_numbers_are_rounded_and_shares_are_percentages(three_arms: Path):
    paths = report.summarize(three_arms)
    page = parse(paths["report_html"].read_text())
    text = paths["report_html"].read_text()
    numbers = [c["text"] for t in page.tables for row in t["rows"] for c in row if c["class"] == "num"]
    assert numbers
    for cell in numbers:
        for number in re.findall(r"\d[\d.]*", cell.split("e")[0]):
            digits = number.replace(".", "").lstrip("0")
            assert len(digits) <= 3 or "." not in number, cell  # 0.009375 -> 0.00938; integers stay whole
    assert "8.0046875" not in text and "8.00" in text  # state bytes per parameter, rounded
    assert "process RSS MB*" in text  # CPU memory is labelled as the whole process's
    assert "84.4%" in text and "0.84375" not in text  # confident share
    assert "25%" in text  # clipped fraction
    assert "Starred columns depend on the machine and its load" in text


def test_split_columns_balances_and_repeats_key_columns():
    head = [f"c{i}" for i in range(17)]
    parts = split_columns(head, [head], keep=2, max_columns=10)
    assert [len(h) for h, _ in parts] == [10, 9]
    assert all(h[:2] == ["c0", "c1"] for h, _ in parts)
    assert sorted({c for h, _ in parts for c in h}) == sorted(head)


def test_styles_stay_distinct_for_many_arms():
    pairs = {(arm_style(i).color, arm_style(i).dashes) for i in range(32)}
    assert len(pairs) == 32


@pytest.mark.parametrize("value, text", [(0.009375, "0.00938"), (0.1953, "0.195"), (1600, "1600"),
                                         (2e-4, "2e-4"), (152.33, "152"), (1.25e-7, "1.25e-7")])
def test_significant_digits(value, text):
    assert sig(value, strip=True) == text


def test_percent():
    assert percent(0.84375) == "84.4%" and percent(None) == "-"


def test_heatmap_text_contrasts_with_its_cell():
    from matplotlib import colormaps

    viridis = colormaps["viridis"]
    assert text_color_on(viridis(0.0)) == "white"  # dark purple
    assert text_color_on(viridis(1.0)) == "black"  # yellow
    assert text_color_on((1.0, 1.0, 1.0, 1.0)) == "black"


def test_recommendation_from_the_summary_statistics():
    """Shaped like summary.json with intervals over seeds, paired differences from the best and tied marks."""
    from diffusers_optim.report.recommend import recommendation

    def arm(label, fd, val, **extra):
        return {"arm": label, "runs_complete": 3, "eval/fd": fd, "eval/fd_ci_low": fd - 0.05,
                "eval/fd_ci_high": fd + 0.05, "eval/fd_n": 3, "val/loss": val, **extra}

    def diff(a, metric, mean, resolved):
        return {"a": a, "b": "adamw", "metric": metric, "mean": mean, "resolved": resolved}

    summary = {
        "rank_by": "eval/fd", "higher_is_better": False,
        "arms": [arm("adamw", 0.6, 0.197, best=True, verdict="best", **{"optim/state_bytes_per_param": 8.0}),
                 arm("adam", 0.61, 0.198, tied=True, verdict="tied", **{"optim/state_bytes_per_param": 8.0,
                                                                     "perf/images_per_sec": 1500.0}),
                 arm("prodigy", 0.74, 0.195, tied=False, verdict="worse")],
        "comparisons": [diff("adam", "val_t/000-249", 0.001, False), diff("prodigy", "val_t/000-249", 0.01, True),
                        diff("prodigy", "val_t/750-999", -0.004, True), diff("prodigy", "eval/fd", 0.14, True),
                        diff("prodigy", "val_t/250-499", 0.02, True), diff("adam", "val_t/250-499", 0.01, True),
                        diff("prodigy", "val_t/500-749", 0.01, True)],
    }
    pick, buckets, disagree = recommendation(summary)  # what is unresolved: the findings section, right below
    # adam is not resolved from adamw: no pick, the tied set is named and the choice in it made on cost
    assert pick == ("No single pick on eval/fd: adamw and adam are not resolved apart by a difference that matters. "
                    "They need about the same optimizer-state memory (8 B/param): any will do; adamw has the lowest "
                    "mean (0.600 ± 0.050).")
    summary["arms"][1]["optim/state_bytes_per_param"] = 4.0  # as lion's: half of Adam's
    assert recommendation(summary)[0].endswith("Among them adam needs the least optimizer-state memory (4 B/param "
                                               "against 8+); adamw has the lowest mean (0.600 ± 0.050).")
    summary["arms"][1]["optim/state_bytes_per_param"] = 8.0
    # buckets where the same arms are beaten share one clause, in timestep order
    assert buckets == ("By timestep bucket, adamw has lower validation loss than prodigy at t 000-249 and t 500-749; lower "
                       "validation loss than prodigy, adam at t 250-499; higher than prodigy at t 750-999 "
                       "(resolved over seeds by at least each bucket's smallest difference that matters).")
    assert disagree.startswith("Loss and sample quality disagree: prodigy has the best val/loss (0.195)")
    summary["statistics"] = {"resolved_best": True, "min_effect": {"eval/fd": 0.058}}
    assert recommendation(summary)[0] == ("Pick adamw: the best eval/fd (0.600 ± 0.050; lower is better), resolved "
                                          "ahead of every other arm by at least 0.058, the smallest difference that "
                                          "matters.")
    del summary["comparisons"]
    unresolved = recommendation(summary)[-1]  # a summary without paired comparisons: said here
    assert unresolved.startswith("Not resolved from adamw on eval/fd") and unresolved.count("adam") == 2


def test_recommendation_with_one_seed_says_nothing_is_resolved(three_arms: Path):
    paths = report.summarize(three_arms)
    text = paths["report_md"].read_text()
    first = text.split("## ", 2)[1]
    assert first.startswith("Recommendation") and "No pick: one seed per arm gives no interval" in first
    assert "By timestep bucket (means, not resolved)" in first
    assert "one seed per arm" in text.split("## ", 3)[2]  # the findings, right after the recommendation


def test_a_log_axis_with_nothing_positive_warns_nothing(tmp_path: Path):
    """A short run logged only at its end, where a decayed lr is 0: matplotlib's "no positive values" warning."""
    import warnings

    write_run(tmp_path, "adamw", 0.0, [0.5], clipped=0.0)  # train/lr is lr * 1 = 0 at its only point
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.summarize(tmp_path)
