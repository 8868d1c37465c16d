"""A gallery of LoRA-X implementations people really write, for the conformance kit.

Each :class:`Entry` is a candidate function, the equation label it claims to implement, the convention
to call it with, and the checks of :mod:`lorax_ref.conformance` that must catch it (``caught_by``).
``tests/test_conformance.py`` asserts that every entry fails at least those checks and that the kit's
diagnosis is ``expected_diagnosis``; ``notebooks/10_verify_your_implementation.ipynb`` shows the reports.

* :data:`WRONG` — wrong formulas: the three mistakes of the first implementation audited in notebook 05,
  ``Vh`` used for ``V``, no truncation, Φ normalised by ``r_s·r_t``, padding or cropping instead of
  projecting, a forgotten ``α/r``, a copy instead of the rotation — and the behaviours of two public
  re-implementations (re-created here, not copied): LoRA factors padded or cropped instead of projected, a
  layer gate on a Φ normalised by ``r_s·r_t`` with a 0.3 threshold, a similarity that crops rows when heights
  differ.
* :data:`CONVENTION` — right formulas written for another convention (``Vh`` bases, numpy arrays): the
  kit must say "convention mismatch", not "wrong formula".
* :data:`PRECISION` — right formulas computed in float32, float16 or bfloat16 (as most real code is),
  and an Eq. (3) that only runs on float32 inputs: by default the kit fails them (its float64 tolerances
  are far below their rounding) but says "lower precision", never "wrong formula", and every check
  passes with ``Convention(dtype=...)`` / ``--dtype``.
* :data:`BROKEN` — candidates that raise, return the wrong shape, return NaN or hang: reported, not
  crashed on.

The candidates are written the way they appear in the wild (torch, ``torch.linalg.svd`` returning
``Vh``), with a comment on the wrong line. Do not use them for anything but testing the kit.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .calling import Convention


@dataclass(frozen=True)
class Entry:
    name: str
    equation: str  # a label of lorax_ref.EQUATIONS
    func: Callable
    title: str
    why: str  # what is wrong, in one or two sentences
    caught_by: tuple[str, ...]  # check ids that must fail
    expected_diagnosis: str = "wrong formula"
    convention: Convention = field(default_factory=Convention)
    fixed_by: Convention | None = None  # CONVENTION and PRECISION entries: the convention under which every check passes


# ---------------------------------------------------------------------------------------------------
# The implementation audited in notebook 05: its three mistakes
# ---------------------------------------------------------------------------------------------------


def plan_base_singular_values(dW_s, W_s, W_t, r):
    """The plan of notebook 05, step 1: ``delta_sigma_s = torch.diag(S_s)``."""
    U_s, S_s, Vh_s = torch.linalg.svd(W_s, full_matrices=False)
    U_t, S_t, Vh_t = torch.linalg.svd(W_t, full_matrices=False)
    U_s, S_s, V_s = U_s[:, :r], S_s[:r], Vh_s[:r].T
    U_t, V_t = U_t[:, :r], Vh_t[:r].T
    delta_sigma_s = torch.diag(S_s)  # WRONG: the base weight's singular values, not the adapter (dW_s is unused)
    delta_sigma_transfer = U_t.T @ U_s @ delta_sigma_s @ V_s.T @ V_t
    return U_t @ delta_sigma_transfer @ V_t.T


def plan_pinv_of_cross_product(U_s, V_s, U_t, V_t):
    """The plan of notebook 05, step 2: ``P = U_t @ pinv(U_s.T @ U_t) @ U_s.T``."""
    P = U_t @ torch.linalg.pinv(U_s.T @ U_t) @ U_s.T  # WRONG: U_s.T @ U_t needs m_s = m_t; not argmin ‖P U_s − U_t‖
    Q = V_t @ torch.linalg.pinv(V_s.T @ V_t) @ V_s.T
    return P, Q


def plan_ill_typed_alignment(dW_s, U_s, V_s, U_t, V_t):
    """The plan of notebook 05, step 4: ``delta_sigma_s = U_s_aligned.T @ delta_W_s @ V_s_aligned`` (with correct P̂, Q̂)."""
    P = U_t @ torch.linalg.pinv(U_s)  # the least-squares P̂ (step 2 fixed), so only mistake 3 remains
    Q = V_t @ torch.linalg.pinv(V_s)
    U_s_aligned, V_s_aligned = P @ U_s, Q @ V_s  # (m_t, r), (n_t, r)
    delta_sigma_s = U_s_aligned.T @ dW_s @ V_s_aligned  # WRONG: a target-space basis times a source-space matrix
    delta_sigma_transfer = U_t.T @ U_s_aligned @ delta_sigma_s @ V_s_aligned.T @ V_t
    return U_t @ delta_sigma_transfer @ V_t.T


# ---------------------------------------------------------------------------------------------------
# Other mistakes people make
# ---------------------------------------------------------------------------------------------------


def vh_columns_as_v(dW_s, W_s, W_t, r):
    """``torch.linalg.svd`` returns ``Vh``; its first r *columns* are taken as if they were ``V``."""
    U_t, _, Vh_t = torch.linalg.svd(W_t, full_matrices=False)
    U_t, V_t = U_t[:, :r], Vh_t[:, :r]  # WRONG: Vh[:, :r] are not right singular vectors (V = Vh[:r].T)
    return U_t @ U_t.T @ dW_s @ V_t @ V_t.T


def no_truncation(dW_s, W_s, W_t, r):
    """Projects onto all k = min(m, n) singular directions instead of the top r."""
    U_t, _, Vh_t = torch.linalg.svd(W_t, full_matrices=False)
    V_t = Vh_t.T  # WRONG: no [:, :r] — the projector of a full basis is the identity on that side
    return U_t @ U_t.T @ dW_s @ V_t @ V_t.T


def similarity_over_rs_rt(U_a, U_b):
    """Eq. (4) normalised by r_s·r_t instead of r."""
    return float((U_a.T @ U_b).pow(2).sum() / (U_a.shape[1] * U_b.shape[1]))  # WRONG: Φ(U, U) = 1/r


def pad_or_crop(dW_s, U_s, V_s, U_t, V_t):
    """§4.2.2 by zero-padding or cropping ΔW_s to the target shape, then projecting."""
    m_t, n_t = U_t.shape[0], V_t.shape[0]
    m, n = min(m_t, dW_s.shape[0]), min(n_t, dW_s.shape[1])
    dW = torch.zeros(m_t, n_t, dtype=dW_s.dtype, device=dW_s.device)
    dW[:m, :n] = dW_s[:m, :n]  # WRONG: row i of the source is not row i of the target; use the alignment maps
    return U_t @ U_t.T @ dW @ V_t @ V_t.T


def eq3_pads_other_shapes(dW_s, U_t, V_t):
    """Eq. (3) that silently pads or crops a ΔW_s of another shape instead of refusing it."""
    m_t, n_t = U_t.shape[0], V_t.shape[0]
    m, n = min(m_t, dW_s.shape[0]), min(n_t, dW_s.shape[1])
    dW = torch.zeros(m_t, n_t, dtype=dW_s.dtype, device=dW_s.device)
    dW[:m, :n] = dW_s[:m, :n]  # WRONG: a shape mismatch must raise, not be papered over
    return U_t @ U_t.T @ dW @ V_t @ V_t.T


def forgot_alpha_over_r(lora_B, lora_A, alpha, W_s, W_t, r):
    """A PEFT-style transfer: merges ``B @ A`` without the ``alpha / rank`` scale, then applies Eq. (3)."""
    dW_s = lora_B @ lora_A  # WRONG: PEFT's ΔW is (alpha / rank) · B A
    U_t, _, Vh_t = torch.linalg.svd(W_t, full_matrices=False)
    U_t, V_t = U_t[:, :r], Vh_t[:r].T
    return U_t @ U_t.T @ dW_s @ V_t @ V_t.T


def as_peft_factors(func, inputs):
    """Call hook for :func:`forgot_alpha_over_r`: hands it ``ΔW_s`` as PEFT factors with ``alpha = 2·rank``.

    ``ΔW_s = (alpha / rank) · B A`` with ``B = U·diag(S)·(rank/alpha)``, ``A = Vh`` from an SVD of ``ΔW_s``.
    A hook like this one is how a function with another signature is wired to the kit.
    """
    dW_s = inputs["dW_s"]
    U, S, Vh = torch.linalg.svd(dW_s, full_matrices=False)  # (m, k), (k,), (k, n)
    rank = S.shape[0]
    alpha = 2.0 * rank
    B = U * S * (rank / alpha)  # (m, k)
    A = Vh  # (k, n)
    return func(B, A, alpha, inputs["W_s"], inputs["W_t"], inputs["r"])


def copy_without_rotation(U_t, U_s, dSigma_s, V_s, V_t):
    """Eq. (3) rotation form that skips the rotation: ΔΣ_t←s = ΔΣ_s (the Table 5 ablation)."""
    return torch.diag(dSigma_s) if dSigma_s.ndim == 1 else dSigma_s.clone()  # WRONG: U_tᵀU_s and V_sᵀV_t are dropped


# ---------------------------------------------------------------------------------------------------
# Behaviours of two public re-implementations (re-created, wrapped to the reference signatures)
# ---------------------------------------------------------------------------------------------------


def pads_lora_factors(B, A, U_t, V_t):
    """Eq. (3) low-rank form that fits LoRA factors to the target shape by zero-padding or cropping them."""
    m_t, n_t, k = U_t.shape[0], V_t.shape[0], B.shape[1]
    B_t = torch.zeros(m_t, k, dtype=B.dtype, device=B.device)
    A_t = torch.zeros(k, n_t, dtype=A.dtype, device=A.device)
    B_t[: min(m_t, B.shape[0])] = B[:m_t]  # WRONG: no projection onto U_t, and row i of B is not row i of the target
    A_t[:, : min(n_t, A.shape[1])] = A[:, :n_t]
    return B_t, A_t


def _similarity_crop_rows(U_a, U_b):
    m = min(U_a.shape[0], U_b.shape[0])
    return U_a[:m], U_b[:m]  # WRONG: bases of different heights live in different spaces; this must raise


def similarity_crops_rows(U_a, U_b):
    """Eq. (4) that crops both bases to the smaller height when the layers differ in size."""
    U_a, U_b = _similarity_crop_rows(U_a, U_b)
    return float((U_a.T @ U_b).pow(2).sum() / min(U_a.shape[1], U_b.shape[1]))


def gate_on_phi_over_rs_rt(dW_s, W_s, W_t, r):
    """Layer transfer gated on Φ = ‖U_sᵀU_t‖²_F / (r_s·r_t) (rows cropped to a common height) below 0.3."""
    U_s, _, Vh_s = torch.linalg.svd(W_s, full_matrices=False)
    U_t, _, Vh_t = torch.linalg.svd(W_t, full_matrices=False)
    U_s, V_s, U_t, V_t = U_s[:, :r], Vh_s[:r].T, U_t[:, :r], Vh_t[:r].T
    phi = min(float((a.T @ b).pow(2).sum()) / (r * r) for a, b in (_similarity_crop_rows(U_s, U_t),
                                                                   _similarity_crop_rows(V_s, V_t)))
    if phi < 0.3:  # WRONG: Φ/(r_s·r_t) is at most 1/r, so this gate drops layers whose subspaces agree
        return torch.zeros_like(W_t)
    if W_s.shape == W_t.shape:
        return U_t @ U_t.T @ dW_s @ V_t @ V_t.T  # Eq. (3)
    P, Q = U_t @ torch.linalg.pinv(U_s), V_t @ torch.linalg.pinv(V_s)  # §4.2.2, right
    U_al, V_al = P @ U_s, Q @ V_s
    return U_t @ (U_t.T @ U_al @ (U_s.T @ dW_s @ V_s) @ V_al.T @ V_t) @ V_t.T


# ---------------------------------------------------------------------------------------------------
# Right formulas, other conventions
# ---------------------------------------------------------------------------------------------------


def written_for_vh(dW_s, U_t, Vh_t):
    """Eq. (3) written for the ``Vh (r, n)`` that ``torch.linalg.svd`` returns."""
    return U_t @ U_t.T @ dW_s @ Vh_t.T @ Vh_t  # right, if Vh_t really is (r, n)


def written_for_numpy(U_t, U_s, dSigma_s, V_s, V_t):
    """Eq. (3) rotation form in numpy (``ndarray.dot``)."""
    dS = np.diag(dSigma_s) if dSigma_s.ndim == 1 else dSigma_s
    return U_t.T.dot(U_s).dot(dS).dot(V_s.T).dot(V_t)  # torch's .dot is for 1-D vectors only


# ---------------------------------------------------------------------------------------------------
# Right formulas, lower precision
# ---------------------------------------------------------------------------------------------------


def eq3_float32_projectors(dW_s, U_t, V_t):
    """Eq. (3) with float32 projectors, as in code that casts the weights to float32 before its SVD."""
    P_U = U_t.float() @ U_t.float().T  # (m, m) float32
    P_V = V_t.float() @ V_t.float().T  # (n, n) float32
    return P_U @ dW_s @ P_V  # right in float32; a float64 dW_s raises "expected m1 and m2 to have the same dtype"


def _eq1(U_s, dSigma_s, V_s):
    return U_s @ (torch.diag(dSigma_s) if dSigma_s.ndim == 1 else dSigma_s) @ V_s.T


def _eq3(dW_s, U_t, V_t):
    return U_t @ U_t.T @ dW_s @ V_t @ V_t.T


def _eq4(U_a, U_b):
    return float((U_a.T @ U_b).pow(2).sum() / min(U_a.shape[1], U_b.shape[1]))


def _at_least_float32(X):
    return X.float() if X.dtype in (torch.float16, torch.bfloat16) else X  # torch.linalg has no half precision


def _top_r(W, r):
    U, _, Vh = torch.linalg.svd(_at_least_float32(W), full_matrices=False)
    return U[:, :r].to(W.dtype), Vh[:r].T.to(W.dtype)


def _layer(dW_s, W_s, W_t, r):
    """Eq. (3) with the top-r SVD bases of W_t at equal shapes, §4.2.2 otherwise."""
    U_t, V_t = _top_r(W_t, r)
    if W_s.shape == W_t.shape:
        return U_t @ U_t.T @ dW_s @ V_t @ V_t.T
    U_s, V_s = _top_r(W_s, r)
    P = U_t @ torch.linalg.pinv(_at_least_float32(U_s)).to(U_s.dtype)  # (m_t, m_s)
    Q = V_t @ torch.linalg.pinv(_at_least_float32(V_s)).to(V_s.dtype)  # (n_t, n_s)
    U_al, V_al = P @ U_s, Q @ V_s
    return U_t @ (U_t.T @ U_al @ (U_s.T @ dW_s @ V_s) @ V_al.T @ V_t) @ V_t.T


def _computed_in(formula: Callable, dtype: torch.dtype) -> Callable:
    """``formula`` computed in ``dtype`` whatever the inputs' dtype (the output stays in ``dtype``)."""
    def candidate(*args):
        return formula(*(torch.as_tensor(a).to(dtype) if isinstance(a, (torch.Tensor, np.ndarray)) else a for a in args))

    name = f"{formula.__name__.lstrip('_')}_in_{str(dtype).split('.')[-1]}"
    candidate.__name__ = candidate.__qualname__ = name
    candidate.__doc__ = f"{formula.__name__.lstrip('_')} computed in {dtype} (inputs cast to it)."
    candidate.__signature__ = inspect.signature(formula)
    return candidate


eq1_in_float32, eq1_in_float16, eq1_in_bfloat16 = (_computed_in(_eq1, d) for d in (torch.float32, torch.float16, torch.bfloat16))
eq3_in_float32, eq3_in_float16, eq3_in_bfloat16 = (_computed_in(_eq3, d) for d in (torch.float32, torch.float16, torch.bfloat16))
eq4_in_float32, eq4_in_float16, eq4_in_bfloat16 = (_computed_in(_eq4, d) for d in (torch.float32, torch.float16, torch.bfloat16))
layer_in_float32 = _computed_in(_layer, torch.float32)


# ---------------------------------------------------------------------------------------------------
# Candidates that do not even run properly
# ---------------------------------------------------------------------------------------------------


def raises(dW_s, U_t, V_t):
    raise NotImplementedError("TODO: implement Eq. (3)")


def wrong_shape(dW_s, U_t, V_t):
    return (U_t @ U_t.T @ dW_s @ V_t @ V_t.T).T  # (n, m): transposed


def returns_nan(dW_s, U_t, V_t):
    out = U_t @ U_t.T @ dW_s @ V_t @ V_t.T
    return out * float("nan")  # e.g. a 0/0 somewhere


def hangs(dW_s, U_t, V_t):
    while True:  # a pure-Python loop: the kit's timeout interrupts it
        time.sleep(0.001)


# ---------------------------------------------------------------------------------------------------
# The lists
# ---------------------------------------------------------------------------------------------------

WRONG: list[Entry] = [
    Entry("plan_base_singular_values", "Layer transfer", plan_base_singular_values,
          "original plan, mistake 1: ΔΣ_s := diag(S_s) of the base weight",
          "The adapter never enters: it transfers the rank-r part of the source base weight itself.",
          ("value", "source-is-target", "linear", "golden")),
    Entry("plan_pinv_of_cross_product", "§4.2.2 alignment maps", plan_pinv_of_cross_product,
          "original plan, mistake 2: P = U_t (U_sᵀU_t)⁺ U_sᵀ",
          "U_sᵀU_t cannot be formed when m_s ≠ m_t — the only case the branch exists for — and even at equal "
          "sizes it is not the least-squares P̂ = U_t U_s⁺.",
          ("value", "value-same-shape", "exact-fit")),
    Entry("plan_ill_typed_alignment", "§4.2.2", plan_ill_typed_alignment,
          "original plan, mistake 3: U_s_alignedᵀ @ ΔW_s",
          "Multiplies a target-space basis by a source-space matrix: raises for different shapes and silently "
          "computes Eq. (3) for equal shapes.",
          ("value", "value-same-shape")),
    Entry("vh_columns_as_v", "Layer transfer", vh_columns_as_v,
          "Vh used for V: V_t = Vh_t[:, :r]",
          "Columns of Vh are not right singular vectors; on square layers nothing raises.",
          ("value", "source-is-target")),
    Entry("no_truncation", "Layer transfer", no_truncation,
          "no truncation: r = min(m, n)",
          "With all singular directions the projector is the identity on the short side; on square layers the "
          "update comes back unchanged.",
          ("value",)),
    Entry("similarity_over_rs_rt", "Eq. (4)", similarity_over_rs_rt,
          "Φ normalised by r_s·r_t",
          "‖U_aᵀU_b‖²_F / (r_s·r_t) gives Φ(U, U) = 1/r instead of 1.",
          ("value", "self")),
    Entry("pad_or_crop", "§4.2.2", pad_or_crop,
          "padding or cropping ΔW_s to the target shape",
          "Row i of a source layer has nothing to do with row i of a target layer of another size; §4.2.2 "
          "maps through the bases.",
          ("value", "value-same-shape")),
    Entry("eq3_pads_other_shapes", "Eq. (3)", eq3_pads_other_shapes,
          "Eq. (3) that pads or crops instead of refusing another shape",
          "Equal shapes are fine; a different shape is papered over instead of raising.",
          ("refuses-other-shapes", "golden")),
    Entry("forgot_alpha_over_r", "Layer transfer", forgot_alpha_over_r,
          "a forgotten α/r when merging a PEFT LoRA",
          "PEFT's ΔW is (α/r)·B·A; merging B·A alone scales the whole update by r/α.",
          ("value", "source-is-target"), convention=Convention(call=as_peft_factors)),
    Entry("copy_without_rotation", "Eq. (3) rotation form", copy_without_rotation,
          "no rotation: ΔΣ_t←s := ΔΣ_s",
          "Pairs the i-th source direction with the i-th target direction whatever their angle (the paper's "
          "Table 5 ablation, not Eq. (3)).",
          ("value", "forms-agree")),
    Entry("pads_lora_factors", "Eq. (3) low-rank form", pads_lora_factors,
          "LoRA factors padded or cropped instead of projected",
          "B and A are zero-padded or cropped to the target shape and never projected onto the target's "
          "subspaces: at equal shapes the LoRA comes back unchanged, at other shapes rows and columns of "
          "unrelated layers are paired.",
          ("golden", "value", "product", "refuses-other-shapes")),
    Entry("gate_on_phi_over_rs_rt", "Layer transfer", gate_on_phi_over_rs_rt,
          "a layer gate on Φ/(r_s·r_t) < 0.3",
          "Φ normalised by r_s·r_t is at most 1/r: the 0.3 gate zeroes layers whose subspaces agree (even "
          "W_t = W_s once r ≥ 4): the report says 'the candidate returned zeros'.",
          ("value", "source-is-target")),
    Entry("similarity_crops_rows", "Eq. (4)", similarity_crops_rows,
          "a similarity that crops rows when heights differ",
          "Right for bases of equal height; for layers of different sizes it compares the first rows of "
          "unrelated spaces and returns a number where it must raise.",
          ("refuses-other-heights",)),
]

CONVENTION: list[Entry] = [
    Entry("written_for_vh", "Eq. (3)", written_for_vh,
          "right formula, written for Vh (r, n)",
          "Correct when given Vh; with V it raises on rectangular layers and is silently wrong on none — the "
          "kit finds that every check passes with bases='Vh'.",
          ("value",), expected_diagnosis="convention mismatch", fixed_by=Convention(bases="Vh")),
    Entry("written_for_numpy", "Eq. (3) rotation form", written_for_numpy,
          "right formula, written for numpy arrays",
          "Correct for numpy arrays; torch tensors have no 2-D .dot.",
          ("value",), expected_diagnosis="convention mismatch", fixed_by=Convention(framework="numpy")),
]

PRECISION: list[Entry] = [
    Entry("eq3_float32_projectors", "Eq. (3)", eq3_float32_projectors,
          "Eq. (3) that only runs in float32",
          "Casts the bases to float32 but not ΔW_s: float64 inputs raise a dtype error. The formula is right "
          "at float32 precision.",
          ("golden", "value"), expected_diagnosis="lower precision", fixed_by=Convention(dtype="float32")),
    *(Entry(f.__name__, label, f, f"right formula computed in {dtype}",
            f"{label} with every input cast to {dtype}: right, with errors of a few {dtype} roundoffs.",
            caught, expected_diagnosis="lower precision", fixed_by=Convention(dtype=dtype))
      for label, caught, fs in (("Eq. (1)", ("golden", "value-diag", "value-full"), (eq1_in_float32, eq1_in_float16, eq1_in_bfloat16)),
                                ("Eq. (3)", ("golden", "value"), (eq3_in_float32, eq3_in_float16, eq3_in_bfloat16)),
                                ("Eq. (4)", ("golden", "value"), (eq4_in_float32, eq4_in_float16, eq4_in_bfloat16)))
      for f, dtype in zip(fs, ("float32", "float16", "bfloat16"))),
    Entry("layer_in_float32", "Layer transfer", layer_in_float32, "Layer transfer with its SVD in float32",
          "The top-r SVD bases of W_t with Eq. (3) (§4.2.2 for other shapes), all in float32.",
          ("golden", "value"), expected_diagnosis="lower precision", fixed_by=Convention(dtype="float32")),
]

BROKEN: list[Entry] = [
    Entry("raises", "Eq. (3)", raises, "raises NotImplementedError", "A stub.", ("value", "golden"),
          expected_diagnosis="does not run"),
    Entry("wrong_shape", "Eq. (3)", wrong_shape, "returns the transpose", "Returns (n, m) for an (m, n) layer.",
          ("value",)),
    Entry("returns_nan", "Eq. (3)", returns_nan, "returns NaN", "Divides 0 by 0.", ("value",),
          expected_diagnosis="does not run"),
    Entry("hangs", "Eq. (3)", hangs, "never returns", "An endless loop.", ("golden",),
          expected_diagnosis="does not run"),
]

ALL: list[Entry] = WRONG + CONVENTION + PRECISION + BROKEN


def entry(name: str) -> Entry:
    for e in ALL:
        if e.name == name:
            return e
    raise KeyError(f"no gallery entry {name!r}; entries: {[e.name for e in ALL]}")
