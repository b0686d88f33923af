"""The report's gradient-probe section (grad_t/ keys): norms per bucket, the cosine matrix, update alignment.

One section function for render.SECTIONS and the figures it draws (matplotlib's Figure API, like figures.py).
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

from diffusers_optim.report import figures
from diffusers_optim.report.reading import Run, is_number

PAIR_RE = re.compile(r"^grad_t/cos/(\d+-\d+)__(\d+-\d+)$")
TEXT = (
    "Gradient probes on a fixed probe batch (held-out images, frozen noise, timesteps stratified by bucket; the "
    "same for every optimizer). g_b is the gradient of bucket b's mean loss. Norm: how hard each noise level "
    "pulls. Cosine between buckets: whether noise levels agree (1) or conflict (below 0) on the direction to "
    "move. cos(-g_b, update): whether the step the optimizer applied lowered bucket b's loss (positive) and "
    "by how much of its direction. cos(g, first moment): how much the momentum history agrees with the "
    "present gradient (the beta1 question; optimizers without a first-moment buffer have none)."
)


def probe_keys(records: list[dict], prefix: str) -> list[str]:
    """`grad_t/<prefix>/<lo>-<hi>` keys present, in bucket order."""
    keys = {k for r in records for k in r if k.startswith(f"grad_t/{prefix}/") and "__" not in k}
    return sorted(keys, key=lambda k: int(k.rsplit("/", 1)[1].split("-")[0]))


def cosine_matrices(runs: list[Run]) -> tuple[list[str], dict[str, list[list[float]]]]:
    """Bucket ranges and, per arm, the matrix of cos(g_a, g_b) averaged over every probe and seed."""
    ranges: set[str] = set()
    values: dict[str, dict[tuple[str, str], list[float]]] = {}
    for arm, group in figures.group_runs(runs).items():
        for rec in (rec for run in group for rec in run.records):
            for key, value in rec.items():
                match = PAIR_RE.match(key)
                if match and is_number(value) and math.isfinite(value):
                    ranges.update(match.groups())
                    values.setdefault(arm, {}).setdefault(match.groups(), []).append(value)
    order = sorted(ranges, key=lambda r: int(r.split("-")[0]))
    matrices = {}
    for name, pairs in values.items():
        m = [[1.0 if a == b else math.nan for b in order] for a in order]
        for (a, b), vals in pairs.items():
            i, j = order.index(a), order.index(b)
            m[i][j] = m[j][i] = statistics.fmean(vals)
        matrices[name] = m
    return order, matrices


def plot_cosine_matrices(runs: list[Run], path: Path, arm_order: list[str] | None = None) -> Path | None:
    """One heatmap per arm (in `arm_order`, the report's rank order): cos(g_a, g_b) between buckets, annotated."""
    order, matrices = cosine_matrices(runs)
    if not matrices:
        return None
    rank = {name: i for i, name in enumerate(arm_order or [])}
    matrices = dict(sorted(matrices.items(), key=lambda item: rank.get(item[0], len(rank))))
    n = len(matrices)
    fig = figures.new_figure(0.9 * len(order) * n + 2.0, 0.8 * len(order) + 1.6)
    axes = fig.subplots(1, n, squeeze=False)[0]
    image = None
    for ax, (name, m) in zip(axes, matrices.items()):
        image = ax.imshow(m, cmap="RdBu", vmin=-1, vmax=1)
        ax.set_title(name)
        ax.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(order)), order if ax is axes[0] else [], fontsize=7)
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(v) > 0.6 else "black")
    fig.colorbar(image, ax=list(axes), label="cos(g_a, g_b), mean over probes and seeds", shrink=0.8)
    fig.savefig(path, dpi=figures.DPI, bbox_inches="tight")  # tight_layout cannot place a shared colorbar
    return path


def grad_probes_section(ctx):
    """Per-bucket gradient norm curves, the cosine matrix per optimizer, update and momentum alignment."""
    from diffusers_optim.report.render import Image, Section, Text

    records = ctx.records
    norms = probe_keys(records, "norm")
    if not norms:
        return None  # the runs had --grad_probe_steps 0
    d = ctx.figure_dir
    path = figures.plot_curves(ctx.runs, [*norms, "grad_t/full_norm"], d / "grad_t_norm.png", "gradient norm",
                               styles=ctx.styles)
    blocks = [Text(TEXT), Image(path, "gradient norm per timestep bucket")]
    matrix = plot_cosine_matrices(ctx.runs, d / "grad_t_cos_matrix.png", list(ctx.styles))
    if matrix is not None:
        blocks.append(Image(matrix, "cosine between bucket gradients"))
    updates = probe_keys(records, "update_cos") + ["grad_t/full_update_cos"]
    path = figures.plot_curves(ctx.runs, updates, d / "grad_t_update_cos.png", "cos(-g_b, update)", log_y=False,
                               styles=ctx.styles)
    blocks.append(Image(path, "update alignment per bucket"))
    history = [k for k in ("grad_t/full_momentum_cos", "grad_t/cos_mean") if any(k in r for r in records)]
    path = figures.plot_curves(ctx.runs, history, d / "grad_t_momentum_cos.png", "cosine", log_y=False,
                               styles=ctx.styles)
    blocks.append(Image(path, "momentum alignment and mean bucket cosine"))
    return Section("Gradients by timestep bucket", blocks)
