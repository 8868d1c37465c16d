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
