"""What the notebooks show: plotly set-up, and numbers printed only with digits that are stable.

Figures are emitted as the plotly JSON mimetype only: deterministic for the same data (no inline
plotly.js, no random div ids), so strict nbval can compare them, and small. The site builder turns
them into interactive HTML with a local copy of plotly.js (offline, no CDN).

Stored outputs are compared digit by digit on other machines, whose last bits differ. :func:`shown`
and :func:`decade` print a number only when a relative change of ``rel`` would not alter what is
printed, and raise :class:`UnstableDigits` otherwise: the fix is a coarser format, never a retry.
"""
from __future__ import annotations

import math
import numbers


class UnstableDigits(AssertionError):
    """A number sits so close to a rounding boundary that another machine could print it differently."""


def init_notebook() -> None:
    """Renderer ``plotly_mimetype`` and template ``none`` for every figure of the notebook."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype"
    pio.templates.default = "none"


def rounded(values, digits: int = 4):
    """Nested lists of Python floats rounded to ``digits`` (numpy/torch arrays are converted)."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (list, tuple)):
        return [rounded(v, digits) for v in values]
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        return round(float(values), digits)
    return values


def shown(x: float, spec: str, rel: float = 1e-6) -> str:
    """``format(x, spec)``, refusing digits that a relative change of ``rel`` in ``x`` would alter.

    ``rel`` is the noise the number may carry between machines: 1e-6 (the default) is far above the
    float64 rounding of a well-conditioned result and far below the digits a notebook prints.
    """
    text = format(x, spec)
    if any(format(y, spec) != text for y in (x * (1 - rel), x * (1 + rel))):
        raise UnstableDigits(f"{x!r} prints as {text!r}, but a relative change of {rel:g} prints "
                             f"{format(x * (1 - rel), spec)!r} / {format(x * (1 + rel), spec)!r}: use fewer digits")
    return text


def decade(x: float, rel: float = 1e-3) -> str:
    """The smallest power of ten above ``x > 0`` (``"1e-05"`` for 2.3e-06): an order of magnitude that
    stays the same under a relative change of ``rel`` (else :class:`UnstableDigits`)."""
    if not x > 0:
        raise ValueError(f"decade needs a positive number, got {x!r}")
    k = [math.ceil(math.log10(y)) for y in (x * (1 - rel), x, x * (1 + rel))]
    if len(set(k)) != 1:
        raise UnstableDigits(f"{x!r} is within a relative {rel:g} of a power of ten: its decade is not stable")
    return f"{10.0 ** k[1]:.0e}"


# ------------------------------------------------------------------------------------------------------
# Figures: the notebooks call these so that a page shows the idea, not forty lines of plotly. Every value
# that enters a figure is rounded (``digits``) so that the stored JSON is the same on every machine.
# ------------------------------------------------------------------------------------------------------

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
MARKERS = ("circle", "diamond", "square", "triangle-up", "x", "cross", "star", "triangle-down")


def _figure(rows: int = 1, cols: int = 1, **subplots):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    return go.Figure() if rows == cols == 1 and not subplots else make_subplots(rows=rows, cols=cols, **subplots)


def _digits(values, digits: int | None):
    """``rounded(values, digits)``; ``digits=None`` keeps values the caller has already made stable (e.g. 3
    significant digits on a log axis, where rounding to decimals would erase small values)."""
    return [float(v) for v in values] if digits is None else rounded(values, digits)


def heatmaps(panels, *, zmin: float, zmax: float, title: str, colorscale: str = "Viridis", reversescale: bool = False,
             x=None, y=None, xaxis_title: str | None = None, yaxis_title: str | None = None,
             text: str | None = None, colorbar_title: str | None = None, reverse_y: bool = False,
             spacing: float = 0.08, width: int = 820, height: int = 400, digits: int = 3):
    """One row of heatmaps on one colour scale ``[zmin, zmax]`` (a colour bar on the last panel).

    ``panels`` maps a panel title to a 2-D array; ``text`` (e.g. ``".2f"``) writes each value in its cell,
    which keeps a figure readable where neighbouring colours are close.
    """
    names = list(panels)
    fig = _figure(1, len(names), subplot_titles=names, horizontal_spacing=spacing, shared_yaxes=y is not None)
    for col, name in enumerate(names, start=1):
        extra = {"texttemplate": f"%{{z:{text}}}", "textfont": {"size": 11}} if text else {}
        fig.add_heatmap(
            z=rounded(panels[name], digits), x=x, y=y, zmin=zmin, zmax=zmax, colorscale=colorscale,
            reversescale=reversescale, showscale=col == len(names),
            colorbar={"title": {"text": colorbar_title}} if colorbar_title else None, row=1, col=col, **extra,
        )
        fig.update_xaxes(title_text=xaxis_title, row=1, col=col)
        fig.update_yaxes(autorange="reversed" if reverse_y else None, title_text=yaxis_title if col == 1 else None,
                         row=1, col=col)
    fig.update_layout(title=title, width=width, height=height)
    return fig


def lines(x, series, *, title: str, xaxis_title: str, yaxis_title: str | None = None, y_range=None,
          log_x: bool = False, log_y: bool = False, dash=None, colors=None, hide_legend=(), bands=None,
          mode: str = "lines+markers", width: int = 700, height: int = 380, digits: int | None = 4, legend=None):
    """Curves against ``x``. ``series`` maps a name to its y values — or, for side-by-side panels, a panel
    title to such a mapping (a name keeps its colour across panels and appears once in the legend).

    Each series gets its own colour *and* marker symbol, and ``dash`` (name → "dot", "dash", …) its own line
    style, so curves that lie on top of each other stay distinguishable. ``colors`` (name → colour) ties a
    series to another one's colour; names in ``hide_legend`` get no legend entry. ``bands`` (name → (lower,
    upper)) shades a range behind a single panel's curves, e.g. mean ± 2 sd.
    """
    panels = series if all(isinstance(v, dict) for v in series.values()) else {None: series}
    fig = _figure(1, len(panels), subplot_titles=list(panels)) if len(panels) > 1 else _figure()
    for name, (lower, upper) in (bands or {}).items():
        fig.add_scatter(x=_digits(list(x) + list(x)[::-1], digits), y=_digits(list(lower) + list(upper)[::-1], digits),
                        fill="toself", mode="lines", line={"width": 0}, opacity=0.25, name=name, hoverinfo="skip")
    seen: list[str] = []
    for col, curves in enumerate(panels.values(), start=1):
        for name, ys in curves.items():
            if name not in seen:
                seen.append(name)
            i = seen.index(name)
            trace = dict(
                x=_digits(x, digits), y=_digits(ys, digits), mode=mode, name=name, legendgroup=name,
                showlegend=name not in hide_legend
                and (col == 1 or name not in [n for c in list(panels.values())[: col - 1] for n in c]),
                line={"color": (colors or {}).get(name, COLORS[i % len(COLORS)]), "dash": (dash or {}).get(name, "solid")},
                marker={"symbol": MARKERS[i % len(MARKERS)], "size": 7},
            )
            if len(panels) > 1:
                fig.add_scatter(**trace, row=1, col=col)
            else:
                fig.add_scatter(**trace)
    fig.update_xaxes(title_text=xaxis_title, type="log" if log_x else None, exponentformat="power" if log_x else None)
    fig.update_yaxes(range=y_range, type="log" if log_y else None, exponentformat="power" if log_y else None)
    if yaxis_title:
        fig.update_yaxes(title_text=yaxis_title, col=1) if len(panels) > 1 else fig.update_yaxes(title_text=yaxis_title)
    fig.update_layout(title=title, width=width, height=height, **({"legend": legend} if legend else {}))
    return fig


def bars(categories, series, *, title: str, xaxis_title: str | None = None, yaxis_title: str | None = None,
         barmode: str = "group", horizontal: bool = False, log_y: bool = False, colors=None,
         width: int = 700, height: int = 380, digits: int = 4):
    """Bars of each series (name → one value per category), grouped or stacked; ``colors`` is a list of one
    colour per category, for a single series (e.g. to highlight the top r)."""
    fig = _figure()
    for name, values in series.items():
        values = rounded(values, digits)
        marker = {"color": colors} if colors is not None else {}
        if horizontal:
            fig.add_bar(y=list(categories), x=values, name=name, orientation="h", marker=marker)
        else:
            fig.add_bar(x=list(categories), y=values, name=name, marker=marker)
    fig.update_layout(barmode=barmode, title=title, xaxis_title=xaxis_title, yaxis_title=yaxis_title,
                      yaxis_type="log" if log_y else None, width=width, height=height)
    return fig


def rotation_form(R_u, R_v, cos_u, cos_v, *, title: str, width: int = 900, height: int = 380):
    """Eq. (3)'s rotation form at a glance: ``R_u`` and ``R_v`` as heatmaps on [-1, 1], and the cosines of the
    principal angles on each side (their singular values). The cosine panel zooms its y-axis to the data and
    draws U solid with circles, V dashed with diamonds, so that two close curves do not hide each other."""
    fig = _figure(1, 3, subplot_titles=("R_u = Ū_tᵀ Ū_s", "R_v = V̄_sᵀ V̄_t", "principal-angle cosines"),
                  column_widths=[0.36, 0.36, 0.28], horizontal_spacing=0.12)
    for col, R in ((1, R_u), (2, R_v)):
        fig.add_heatmap(z=rounded(R, 3), zmin=-1, zmax=1, colorscale="RdBu", reversescale=True, showscale=col == 2,
                        colorbar={"x": 0.675, "xanchor": "left", "thickness": 12, "len": 0.9}, row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    idx = list(range(1, len(cos_u) + 1))
    for ys, name, color, dash, symbol in ((cos_u, "left (U)", COLORS[0], "solid", "circle"),
                                          (cos_v, "right (V)", COLORS[1], "dash", "diamond")):
        fig.add_scatter(x=idx, y=rounded(ys, 4), mode="lines+markers", name=name,
                        line={"color": color, "dash": dash}, marker={"symbol": symbol, "size": 8}, row=1, col=3)
    low = math.floor(20 * min(min(cos_u), min(cos_v))) / 20  # down to the next multiple of 0.05
    fig.update_yaxes(range=[low - 0.005, 1.005], row=1, col=3)
    fig.update_xaxes(title_text="i", row=1, col=3)
    fig.update_layout(title=title, width=width, height=height,  # the legend sits in the empty lower part of the panel
                      legend={"x": 0.80, "y": 0.04, "xanchor": "left", "yanchor": "bottom", "bgcolor": "rgba(255,255,255,0.8)"})
    return fig
