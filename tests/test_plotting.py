"""The notebooks' figure helpers: what a figure promises (shared colour scale, curves that stay apart, digits
that every machine prints alike) is in its JSON."""
from __future__ import annotations

import numpy as np
import pytest

from lorax_ref.experiments.plotting import bars, heatmaps, lines, rotation_form


def test_heatmaps_share_one_colour_scale_and_write_values_when_asked():
    fig = heatmaps({"a": np.eye(2), "b": [[0.123456, 1.0], [0.5, 0.25]]}, zmin=0.1, zmax=0.9, text=".2f", title="t")
    maps = [t for t in fig.data if t.type == "heatmap"]
    assert len(maps) == 2
    assert all((m.zmin, m.zmax) == (0.1, 0.9) for m in maps)
    assert [m.showscale for m in maps] == [False, True]  # one colour bar for the row
    assert maps[1].z[0][0] == 0.123  # rounded to 3 digits: the stored JSON is the same everywhere
    assert all(m.texttemplate == "%{z:.2f}" for m in maps)


def test_lines_keep_close_curves_distinguishable():
    fig = lines([1, 2, 3], {"U": [1.0, 0.99, 0.98], "V": [1.0, 0.99, 0.981]}, dash={"V": "dash"}, title="t", xaxis_title="x")
    u, v = fig.data
    assert u.marker.symbol != v.marker.symbol and u.line.color != v.line.color
    assert (u.line.dash, v.line.dash) == ("solid", "dash")


def test_lines_panels_keep_colours_and_one_legend_entry_per_name():
    fig = lines([0, 1], {"left": {"a": [0, 1], "b": [1, 0]}, "right": {"a": [2, 3]}}, title="t", xaxis_title="x",
                colors={"b": "#000000"}, hide_legend=("b",))
    a_left, b_left, a_right = fig.data
    assert a_left.line.color == a_right.line.color and b_left.line.color == "#000000"
    assert (a_left.showlegend, b_left.showlegend, a_right.showlegend) == (True, False, False)
    assert a_right.xaxis == "x2"


def test_lines_digits():
    fig = lines([1e-12, 1e-6], {"e": [3.14159e-11, 2.0]}, digits=None, log_x=True, title="t", xaxis_title="x")
    assert list(fig.data[0].y) == [3.14159e-11, 2.0]  # digits=None: kept as given (small values on a log axis)
    fig = lines([0.5, 1.5], {"e": [0.123456, 2.0]}, digits=2, title="t", xaxis_title="x")
    assert list(fig.data[0].y) == [0.12, 2.0]


def test_bands_and_bars():
    fig = lines([1, 2], {"m": [0.5, 0.6]}, bands={"± sd": ([0.4, 0.5], [0.6, 0.7])}, title="t", xaxis_title="x")
    assert fig.data[0].fill == "toself" and list(fig.data[0].y) == [0.4, 0.5, 0.7, 0.6]
    fig = bars(["a", "b"], {"s": [1, 2], "t": [3, 4]}, horizontal=True, barmode="stack", title="t")
    assert fig.layout.barmode == "stack" and all(b.orientation == "h" for b in fig.data)


def test_rotation_form_zooms_the_cosine_panel_to_its_data():
    fig = rotation_form(np.eye(3), -np.eye(3), [0.99, 0.97, 0.94], [0.995, 0.96, 0.93], title="t")
    u, v = fig.data[2:]
    assert (u.line.dash, v.line.dash) == ("solid", "dash") and u.marker.symbol != v.marker.symbol
    low, high = fig.layout.yaxis3.range
    assert low == pytest.approx(0.895) and high == pytest.approx(1.005)  # 0.93 → floor to 0.90, minus a margin
