"""Plotly set-up shared by the notebooks.

Figures are emitted as the plotly JSON mimetype only: deterministic for the same data (no inline
plotly.js, no random div ids), so strict nbval can compare them, and small. The site builder turns
them into interactive HTML with a local copy of plotly.js (offline, no CDN).
"""
from __future__ import annotations

import numbers


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
