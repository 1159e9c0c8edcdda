"""The report's charts: tick labels that fit their margin, a colour for every series."""

from __future__ import annotations

import re

from guarded_serving.report import svg


def _tick_labels(chart: str) -> list[tuple[float, str]]:
    return [(float(x), t) for x, t in re.findall(r'<text x="([\d.]+)" y="[\d.]+" class="ax" text-anchor="end">([^<]*)</text>', chart)]


def test_large_values_get_short_tick_labels_that_fit_left_of_the_plot() -> None:
    chart = svg.lines(["w1", "w2", "w3"], {"rows": [2500.0, 2750.0, 3000.0]}, y_label="rows")
    ticks = _tick_labels(chart)
    assert [t for _, t in ticks] == ["0", "1.65k", "3.3k"]
    for right_edge, label in ticks:  # right-aligned: the label spans [x - width, x]
        assert right_edge - len(label) * svg.CHAR_W >= 16, (label, right_edge)  # clear of the y label
    bars = svg.overlaid_bars(["a", "b"], [12345.0, 0.0], [0.0, 27500.0])
    assert all(x - len(t) * svg.CHAR_W >= 0 for x, t in _tick_labels(bars))


def test_every_series_has_its_own_colour_and_legend_row() -> None:
    series = {f"feature_{i}": [0.1 * i, 0.2] for i in range(30)}
    chart = svg.lines(["w1", "w2"], series)
    colours = re.findall(r'<polyline [^>]*stroke="([^"]+)"', chart)
    assert len(colours) == 30 and len(set(colours)) == 30
    height = int(re.search(r'height="(\d+)"', chart).group(1))
    last_legend_y = max(int(y) for y in re.findall(r'<rect x="[\d.]+" y="(\d+)" width="9"', chart))
    assert last_legend_y + 9 <= height
