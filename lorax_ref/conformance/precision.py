"""The kit's numbers: example sizes, time limits, and the tolerance of each floating-point format."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


DEFAULT_MAX_EXAMPLES = 25  # per property; hypothesis then shrinks a failure
DEFAULT_TIMEOUT = 5.0  # seconds per call; every call of the kit is on matrices of at most 16×16
DEFAULT_SHRINK_STEPS = 200  # new examples tried while shrinking one failing property: a count, so every machine
# shrinks to the same example (the gallery's shrinks end on their own within 62; measured)
DEFAULT_SHRINK_BUDGET = 10.0  # seconds: a safety net for slow candidates only (the gallery's shrinks take < 2 s)
LOAD_TIMEOUT = 120.0  # seconds for a child process to start and import the candidate (torch alone takes seconds)
MAX_DIM = 16  # largest m, n of a generated layer: mistakes show on small layers, and draws cost ~ size
MIN_DIM = 2  # smallest m, n: on a 1×1 layer every wrong value is "a constant factor" off, which explains nothing
TOL = 1e-9  # float64, relative to the size of the expected value (or of the update)
TOL_SVD = 1e-6  # float64, for candidates that compute their own SVD (Layer transfer): spectra gaps are >= 5%
LOW_PRECISION_FACTOR = 16  # lower precisions: rtol = 16 · u · κ (measured worst case of correct code: see Precision)


# ---------------------------------------------------------------------------------------------------
# Precision: the dtype a candidate computes in, and the tolerance that follows from it
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    r"""A floating-point format, its unit roundoff ``u`` and the kit's tolerance rule for it.

    .. math:: \text{rtol} = \begin{cases} 10^{-9} \; (10^{-6} \text{ with the candidate's own SVD}) & \text{float64} \\
              16 \cdot u \cdot \kappa & \text{float32, float16, bfloat16} \end{cases}

    with :math:`\kappa = \sqrt{k}` for a case whose largest dimension is ``k``, times
    :math:`\sqrt{k}\,\max_{W \in \{W_s, W_t\}} \sigma_1(W) / (\sigma_r(W) - \sigma_{r+1}(W))` where the candidate
    computes the SVD itself (at different shapes the smallest gap :math:`\sigma_i - \sigma_{i+1}, i \le r`;
    :func:`_kappa`). Right implementations computed in that precision stay below
    ``5·u·κ`` on the kit's cases; ``tests/test_conformance.py`` asserts below ``LOW_PRECISION_FACTOR / 2``.
    """

    name: str
    u: float  # unit roundoff: 2^-p for a p-bit significand (half the gap between 1 and the next number)
    symbol: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.name)

    def rtol(self, kappa: float, own_svd: bool) -> float:
        if self.name == "float64":
            return TOL_SVD if own_svd else TOL
        return LOW_PRECISION_FACTOR * self.u * kappa

    def rule(self, own_svd: bool = False) -> str:
        """The tolerance rule in words, for reports."""
        if self.name == "float64":
            return f"float64: rtol = {TOL_SVD if own_svd else TOL:g}"
        return f"{self.name}: rtol = {LOW_PRECISION_FACTOR}·{self.symbol}·κ ({self.symbol} = {self.u:.3g})"


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("float64", 2.0**-53, "u₆₄"),
    Precision("float32", 2.0**-24, "u₃₂"),
    Precision("float16", 2.0**-11, "u₁₆"),
    Precision("bfloat16", 2.0**-8, "u_bf16"),
)}  # ordered from the most to the least precise


def _lower(precision: Precision) -> list[Precision]:
    """The precisions less precise than ``precision`` (a diagnosis tries them in this order)."""
    names = list(PRECISIONS)
    return [PRECISIONS[n] for n in names[names.index(precision.name) + 1:]]


def _sci(x: float) -> str:
    """``2.2e-7`` rather than Python's ``2.2e-07``."""
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), f"{x:.2g}")
