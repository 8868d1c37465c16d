"""The one registry of equations: label → function.

A correction to the paper's numbering is a one-line change here. ``tests/test_registry.py`` checks
that every label appears in its function's docstring and is exercised by a test, and that the README
table and the notebooks name the same labels.
"""
from __future__ import annotations

import re
from typing import Callable

from . import core
from .errors import LoraxInputError

EQUATIONS: dict[str, Callable] = {
    "Eq. (1)": core.lorax_delta,
    "Eq. (2)": core.project,
    "Eq. (3)": core.transfer_same_dim,
    "Eq. (3) rotation form": core.transferred_sigma,
    "Eq. (3) low-rank form": core.transfer_lora,
    "Table 5 ablation": core.copy_sigma_transfer,
    "§4.2.2 alignment maps": core.alignment_maps,
    "§4.2.2": core.transfer_mismatch,
    "Eq. (4)": core.subspace_similarity,
    "Layer transfer": core.transfer_layer,
}

#: Where each label comes from, with a one-line note: ``"paper"`` (stated in the paper, as reconstructed:
#: its PDF could not be read), ``"derived"`` (derived in this package) or ``"convention"`` (a choice of this
#: package where the paper says nothing). README § Provenance tabulates the claims around them.
PROVENANCE: dict[str, tuple[str, str]] = {
    "Eq. (1)": ("paper", "exact form reconstructed from summaries"),
    "Eq. (2)": ("paper", "the fixed-point statement; project() computes the projection"),
    "Eq. (3)": ("paper", "projection form"),
    "Eq. (3) rotation form": ("paper", "ΔΣ_{t←s} = Ū_tᵀŪ_s ΔΣ_s V̄_sᵀV̄_t"),
    "Eq. (3) low-rank form": ("derived", "Eq. (3) applied to the factors of a plain LoRA"),
    "Table 5 ablation": ("paper", "the ablation's rule, written out by us"),
    "§4.2.2 alignment maps": ("paper", "the least-squares objective; the minimum-norm solution is our convention"),
    "§4.2.2": ("paper", "it reduces to the Table 5 copy (derived, notebook 03)"),
    "Eq. (4)": ("paper", "exact form reconstructed; which side the paper gates on is not known"),
    "Layer transfer": ("convention", "our composition: bases, Eq. (3) or §4.2.2, a gate (threshold, side)"),
}
KINDS = ("paper", "derived", "convention")


def slug(label: str) -> str:
    """A shell-friendly name for a label: ``"Eq. (3) rotation form"`` → ``"eq3-rotation-form"``."""
    text = label.lower().replace("§", "sec").replace("eq. (", "eq").replace(".", "")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def lookup(name: str) -> tuple[str, Callable]:
    """The ``(label, function)`` for a label, its slug, or the function's name."""
    for label, func in EQUATIONS.items():
        if name in (label, slug(label), func.__name__):
            return label, func
    known = ", ".join(f"{slug(label)} ({label})" for label in EQUATIONS)
    raise LoraxInputError(f"unknown equation {name!r}; known: {known}")
