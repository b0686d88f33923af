"""How the report looks: one style per arm (colour AND dashes AND marker), cell text that contrasts, numbers for people.

Every arm keeps its style in every figure and in the tables' key swatches, so a reader can follow one arm
through the report; two arms with identical curves stay visible (different dashes, markers at offset points).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

# Okabe & Ito's colour-blind-safe palette (Color Universal Design), ordered for contrast on white: the yellow,
# the weakest on white, comes last.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#000000", "#F0E442")
# Dash patterns in line widths (matplotlib's and SVG's dash arrays): solid, dashed, dotted, dash-dot.
DASHES: tuple[tuple[float, ...], ...] = ((), (6.0, 3.0), (1.2, 2.4), (6.0, 2.4, 1.2, 2.4))
DASH_NAMES = ("solid", "dashed", "dotted", "dash-dot")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MARKER_NAMES = {"o": "circle", "s": "square", "^": "triangle", "D": "diamond", "v": "down triangle",
                "P": "plus", "X": "cross", "*": "star"}
# The same markers drawn in a 36x12 SVG swatch, centred at (18, 6).
MARKER_SVG = {
    "o": '<circle cx="18" cy="6" r="3.5" fill="{color}"/>',
    "s": '<rect x="14.5" y="2.5" width="7" height="7" fill="{color}"/>',
    "^": '<polygon points="18,1.5 22.5,10 13.5,10" fill="{color}"/>',
    "D": '<polygon points="18,1.5 22.5,6 18,10.5 13.5,6" fill="{color}"/>',
    "v": '<polygon points="13.5,2 22.5,2 18,10.5" fill="{color}"/>',
    "P": '<polygon points="16.5,2 19.5,2 19.5,4.5 22,4.5 22,7.5 19.5,7.5 19.5,10 16.5,10 16.5,7.5 14,7.5 14,4.5 '
         '16.5,4.5" fill="{color}"/>',
    "X": '<polygon points="14,3 15.5,1.5 18,4 20.5,1.5 22,3 19.5,6 22,9 20.5,10.5 18,8 15.5,10.5 14,9 16.5,6" '
         'fill="{color}"/>',
    "*": '<polygon points="18,1 19.2,4.6 23,4.6 19.9,6.9 21.1,10.5 18,8.3 14.9,10.5 16.1,6.9 13,4.6 16.8,4.6" '
         'fill="{color}"/>',
}
NUM_MARKS = 8  # markers per line: enough to tell lines apart, few enough not to hide the curve
MAX_COLUMNS = 10  # a table with more columns is split (key columns repeated), so every table fits a page
SIGNIFICANT = 3  # significant digits of a number shown alone


@dataclass(frozen=True)
class ArmStyle:
    """How one arm is drawn everywhere in the report."""

    color: str
    dashes: tuple[float, ...]
    marker: str

    @property
    def dash_name(self) -> str:
        return DASH_NAMES[DASHES.index(self.dashes)]

    def line_kwargs(self, index: int, num_points: int) -> dict[str, Any]:
        """matplotlib `plot` keywords; markers start at an offset per arm so identical curves show every arm."""
        step = max(2, num_points // NUM_MARKS)  # never every point: arms on one curve take turns at the points
        return dict(color=self.color, linestyle=(0, self.dashes) if self.dashes else "-", linewidth=1.8,
                    marker=self.marker, markersize=5, markevery=(index % step, step),
                    markerfacecolor="white" if index // len(MARKERS) % 2 else self.color)


def arm_style(index: int) -> ArmStyle:
    """The index-th arm's style: (colour, dashes) pairs stay distinct for 32 arms, markers cycle with the colour."""
    cycle = index // len(PALETTE)
    return ArmStyle(PALETTE[index % len(PALETTE)], DASHES[(index + cycle) % len(DASHES)],
                    MARKERS[(index + cycle) % len(MARKERS)])


def arm_styles(names: list[str]) -> dict[str, ArmStyle]:
    """Styles by arm name, in the order given (the report passes the ranking order, the same in every figure)."""
    return {name: arm_style(i) for i, name in enumerate(dict.fromkeys(names))}


def swatch_svg(style: ArmStyle) -> str:
    """A small inline SVG of the arm's line and marker, for tables and legends in HTML."""
    dash = f' stroke-dasharray="{",".join(f"{2 * d:g}" for d in style.dashes)}"' if style.dashes else ""
    marker = MARKER_SVG[style.marker].format(color=style.color)
    return (f'<svg class="swatch" width="36" height="12" role="img" aria-label="{style.color} {style.dash_name} '
            f'{MARKER_NAMES[style.marker]}" data-color="{style.color}" data-dash="{style.dash_name}" '
            f'data-marker="{style.marker}"><line x1="0" y1="6" x2="36" y2="6" stroke="{style.color}" '
            f'stroke-width="2"{dash}/>{marker}</svg>')


def text_color_on(rgba: tuple[float, ...]) -> str:
    """Black or white, whichever contrasts more with a cell colour (WCAG relative luminance)."""
    def channel(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # contrast with white (1.05 / (L + 0.05)) beats contrast with black ((L + 0.05) / 0.05) below L ~ 0.179
    return "white" if luminance < 0.179 else "black"


# ---- numbers for people ------------------------------------------------------------------------------


def sig(value: Any, digits: int = SIGNIFICANT, strip: bool = False) -> str:
    """A number rounded to significant digits, without exponent for everyday sizes: 0.009375 -> 0.00938.

    strip drops trailing zeros (a setting like lr 0.05 reads better than 0.0500; a measured 0.650 keeps them).
    """
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e6):
        return f"{int(value):d}"
    if not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    magnitude = math.floor(math.log10(abs(value)))
    if -3 <= magnitude < 6:
        text = _round_half_up(value, max(0, digits - 1 - magnitude))
        if abs(float(text)) >= 10 ** (magnitude + 1):  # 99.95 rounds up a magnitude: 100, not 100.0
            text = _round_half_up(value, max(0, digits - 2 - magnitude))
        return _strip_zeros(text) if strip else text
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return f"{_strip_zeros(mantissa)}e{int(exponent)}"  # 2e-4, 1.25e-7


def _round_half_up(value: float, places: int) -> str:
    """Half up on the decimal digits people see (0.009375 -> 0.00938), not on the binary float (0.00937)."""
    return str(Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def _strip_zeros(text: str) -> str:
    """0.500 -> 0.5, 2.00 -> 2 (the digits kept are the significant ones)."""
    return text.rstrip("0").rstrip(".") if "." in text else text


def percent(value: Any, digits: int = SIGNIFICANT) -> str:
    """A fraction as a percentage: 0.84375 -> 84.4%."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return sig(value)
    return f"{sig(100 * value, digits)}%"


NUMBER_CELL = re.compile(r"^[-+]?(\d[\d.,]*(e-?\d+)?%?|nan|inf|-)( ± \S+)?\*?$")


def is_number_cell(text: str) -> bool:
    """Cells holding a number (aligned right, so digits line up); names and words align left."""
    return bool(NUMBER_CELL.match(text))


def is_fraction_key(key: str) -> bool:
    """Metrics that are shares of a whole, shown as percentages."""
    return key.endswith(("_frac", "_fraction", "fraction_mean"))


def split_columns(head: list[str], body: list[list[str]], keep: int = 2,
                  max_columns: int = MAX_COLUMNS) -> list[tuple[list[str], list[list[str]]]]:
    """A wide table as several tables of at most max_columns, each repeating the first `keep` (key) columns."""
    if len(head) <= max_columns:
        return [(head, body)]
    rest = len(head) - keep
    per_part = math.ceil(rest / math.ceil(rest / (max_columns - keep)))  # balanced: no part of one column
    parts = []
    for start in range(keep, len(head), per_part):
        cols = [*range(keep), *range(start, min(start + per_part, len(head)))]
        parts.append(([head[c] for c in cols], [[row[c] for c in cols] for row in body]))
    return parts
