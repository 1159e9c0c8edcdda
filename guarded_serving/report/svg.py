"""Small inline-SVG charts for the self-contained HTML report (no JavaScript, no external files)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

TRAIN_COLOR = "#8c9cb0"
LIVE_COLOR = "#e4572e"
PALETTE = ["#e4572e", "#17bebb", "#ffc914", "#2e282a", "#76b041", "#7d5ba6", "#f18f01", "#3c91e6"]
#: Width of one character of the axis font (11 px), for sizing the margin that holds tick labels.
CHAR_W = 6.2
LEGEND_ROW = 12


def color(k: int) -> str:
    """The colour of series ``k``: the palette first, then hues spread by the golden angle, so
    every feature of a wide table gets a colour of its own.

    >>> color(0), color(8) != color(0), len({color(k) for k in range(60)})
    ('#e4572e', True, 60)
    """
    if k < len(PALETTE):
        return PALETTE[k]
    return f"hsl({(k - len(PALETTE)) * 137.508 % 360:.1f},62%,{42 + 8 * (k % 3)}%)"


def _fmt(v: float) -> str:
    """A short tick label: 2750 -> 2.75k, 0.004 -> 4e-3.

    >>> [_fmt(v) for v in (0, 0.5, 12.25, 2750, 1_500_000, 0.004)]
    ['0', '0.5', '12.25', '2.75k', '1.5M', '4e-3']
    """
    if v == 0:
        return "0"
    a = abs(v)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= scale:
            return f"{v / scale:.3g}{suffix}"
    if a < 0.01:
        mantissa, _, exp = f"{v:.2e}".partition("e")
        return f"{float(mantissa):g}e{int(exp)}"
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _left_margin(ticks: Sequence[float], minimum: int) -> int:
    """Room for the longest tick label left of the plot."""
    return max(minimum, int(max(len(_fmt(t)) for t in ticks) * CHAR_W) + 10)


def overlaid_bars(labels: Sequence[str], training: Sequence[float], live: Sequence[float],
                  width: int = 420, height: int = 170, title: str = "") -> str:
    """Two distributions (proportions) over the same bins, side by side per bin."""
    n = max(len(labels), 1)
    top = max([*training, *live, 1e-9])
    pad_b, pad_t = 34, 18
    pad_l = _left_margin([top * 0.5, top], 34)
    plot_w, plot_h = width - pad_l - 6, height - pad_b - pad_t
    bw = plot_w / n
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{escape(title)}">']
    if title:
        parts.append(f'<text x="{pad_l}" y="12" class="t">{escape(title)}</text>')
    for frac in (0.5, 1.0):
        y = pad_t + plot_h * (1 - frac)
        parts.append(f'<line x1="{pad_l}" x2="{width - 6}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{pad_l - 4}" y="{y + 3:.1f}" class="ax" text-anchor="end">{_fmt(top * frac)}</text>')
    for i, (tr, lv) in enumerate(zip(training, live, strict=True)):
        x = pad_l + i * bw
        for j, (v, fill, name) in enumerate(((tr, TRAIN_COLOR, "training"), (lv, LIVE_COLOR, "live"))):
            h = plot_h * v / top
            parts.append(
                f'<rect x="{x + bw * (0.1 + 0.4 * j):.1f}" y="{pad_t + plot_h - h:.1f}" '
                f'width="{bw * 0.4:.1f}" height="{h:.1f}" fill="{fill}">'
                f'<title>{escape(str(labels[i]))}: {name} {v:.3f}</title></rect>'
            )
    step = max(1, math.ceil(n / 8))
    for i in range(0, n, step):
        x = pad_l + (i + 0.5) * bw
        parts.append(f'<text x="{x:.1f}" y="{height - pad_b + 13}" class="ax" text-anchor="middle">'
                     f'{escape(str(labels[i])[:9])}</text>')
    parts.append(
        f'<rect x="{width - 120}" y="{height - 14}" width="9" height="9" fill="{TRAIN_COLOR}"/>'
        f'<text x="{width - 108}" y="{height - 6}" class="ax">training</text>'
        f'<rect x="{width - 60}" y="{height - 14}" width="9" height="9" fill="{LIVE_COLOR}"/>'
        f'<text x="{width - 48}" y="{height - 6}" class="ax">live</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def lines(x_labels: Sequence[str], series: dict[str, Sequence[float | None]], width: int = 640,
          height: int = 200, title: str = "", y_label: str = "", threshold: float | None = None,
          y_max: float | None = None) -> str:
    """Line chart of several series over the same x positions (None leaves a gap)."""
    n = len(x_labels)
    values = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    top = y_max if y_max is not None else max([*values, threshold or 0.0, 1e-9]) * 1.1
    pad_b, pad_t, pad_r = 30, 20, 150
    pad_l = _left_margin([0.0, top * 0.5, top], 44) + (14 if y_label else 0)  # the y label left of the ticks
    height = max(height, pad_t + LEGEND_ROW * len(series) + 6)  # a legend row for every series
    plot_w, plot_h = width - pad_l - pad_r, height - pad_b - pad_t
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{escape(title)}">']
    if title:
        parts.append(f'<text x="{pad_l}" y="13" class="t">{escape(title)}</text>')

    def xy(i: int, v: float) -> tuple[float, float]:
        x = pad_l + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)
        return x, pad_t + plot_h * (1 - min(v, top) / top)

    for frac in (0.0, 0.5, 1.0):
        y = pad_t + plot_h * (1 - frac)
        parts.append(f'<line x1="{pad_l}" x2="{pad_l + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{pad_l - 4}" y="{y + 3:.1f}" class="ax" text-anchor="end">{_fmt(top * frac)}</text>')
    if y_label:
        parts.append(f'<text x="10" y="{pad_t + plot_h / 2:.0f}" class="ax" transform="rotate(-90 10 {pad_t + plot_h / 2:.0f})" text-anchor="middle">{escape(y_label)}</text>')
    if threshold is not None and threshold <= top:
        _, y = xy(0, threshold)
        parts.append(f'<line x1="{pad_l}" x2="{pad_l + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="thr"/>')
    for k, (name, s) in enumerate(series.items()):
        c = color(k)
        pts = [xy(i, v) for i, v in enumerate(s) if v is not None and math.isfinite(v)]
        if len(pts) > 1:
            d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="1.8"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.4" fill="{c}"><title>{escape(name)}</title></circle>')
        ly = pad_t + LEGEND_ROW * k + 6
        parts.append(f'<rect x="{pad_l + plot_w + 10}" y="{ly - 8}" width="9" height="9" fill="{c}"/>'
                     f'<text x="{pad_l + plot_w + 23}" y="{ly}" class="ax">{escape(name[:22])}</text>')
    step = max(1, math.ceil(n / 6))
    for i in range(0, n, step):
        x, _ = xy(i, 0)
        parts.append(f'<text x="{x:.1f}" y="{height - 10}" class="ax" text-anchor="middle">{escape(x_labels[i])}</text>')
    parts.append("</svg>")
    return "".join(parts)
