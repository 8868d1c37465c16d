r"""Two related closed-form transfer methods, kept apart from the paper's equations for comparison.

* **ProLoRA** (Farhadzadeh et al., ICML 2025, arXiv 2506.04244) transfers *any* LoRA by splitting the
  source update into a part inside the top-r source subspace and a part in its orthogonal complement
  (the "null space"), and projecting each onto the matching target space. The two cross terms are dropped.
* **Cross-LoRA** (Xia et al., arXiv 2508.05232) aligns the source bases to the target ones with the same
  least-squares maps as LoRA-X §4.2.2 and then projects the update onto the aligned bases.

Neither paper released code; both rules are rebuilt from the papers' own descriptions (README §
Provenance) and checked against independent numpy oracles in ``tests/test_related.py``. None of these functions is in :data:`lorax_ref.EQUATIONS`: they are not LoRA-X.

Notation as in :mod:`lorax_ref.core`: column-orthonormal bases ``U (m, r)``, ``V (n, r)``;
:math:`P_\parallel = UU^\top`, :math:`P_\perp = I - UU^\top` on the left, :math:`Q_\parallel = VV^\top`,
:math:`Q_\perp = I - VV^\top` on the right. The ``(m, m)`` and ``(n, n)`` projectors are never formed.
"""
from __future__ import annotations

import torch

from . import checks
from .checks import checked
from .core import alignment_maps, project
from .errors import LoraxInputError
from .linalg import frob2


def _layer(dW: torch.Tensor, U: torch.Tensor, V: torch.Tensor, suffix: str) -> None:
    """Check one layer: an update ``dW (m, n)`` and bases ``U (m, r)``, ``V (n, r)`` of that layer."""
    checks.same_device(**{"dW" + suffix: dW, "U" + suffix: U, "V" + suffix: V})
    checks.matrix("dW" + suffix, dW)
    checks.bases(U, V, suffix, *dW.shape)
    checks.same_dtype(**{"dW" + suffix: dW, "U" + suffix: U, "V" + suffix: V})


def _target(U_t: torch.Tensor, V_t: torch.Tensor, dW_s: torch.Tensor) -> None:
    """Target bases ``U_t (m_t, r)``, ``V_t (n_t, r)`` on ``dW_s``'s device and dtype."""
    checks.same_device(dW_s=dW_s, U_t=U_t, V_t=V_t)
    checks.bases(U_t, V_t, "_t")
    checks.same_dtype(dW_s=dW_s, U_t=U_t, V_t=V_t)


def _check_split(dW, U, V) -> None:
    _layer(dW, U, V, "")


def _check_prolora(dW_s, U_s, V_s, U_t, V_t) -> None:
    """A source layer, and target bases of a layer with ``dW_s``'s shape (ProLoRA is a same-dimension rule)."""
    _layer(dW_s, U_s, V_s, "_s")
    _target(U_t, V_t, dW_s)
    m_s, n_s = dW_s.shape
    m_t, n_t = U_t.shape[0], V_t.shape[0]
    if (m_s, n_s) != (m_t, n_t):
        raise LoraxInputError(
            f"ProLoRA needs the target layer to have the source shape: dW_s is {m_s}x{n_s} but U_t, V_t describe "
            f"a {m_t}x{n_t} layer"
        )


def _check_cross_lora(dW_s, U_s, V_s, U_t, V_t) -> None:
    _layer(dW_s, U_s, V_s, "_s")
    _target(U_t, V_t, dW_s)
    checks.same_rank(U_s=U_s, U_t=U_t)
    m_s, n_s = dW_s.shape
    m_t, n_t = U_t.shape[0], V_t.shape[0]
    if (m_t, n_t) != (m_s, n_s):
        raise LoraxInputError(
            f"Cross-LoRA's projection is ill-typed across shapes: the aligned bases live in the {m_t}x"
            f"{n_t} target layer but dW_s is {m_s}x{n_s}, so Ũ_sᵀ ΔW_s cannot be formed; use "
            f"lorax_ref.transfer_mismatch (§4.2.2), which is what P̂ ΔW_s Q̂ᵀ computes"
        )


# ---------------------------------------------------------------------------------------------------
# ProLoRA: subspace + null-space split
# ---------------------------------------------------------------------------------------------------


@checked(_check_split)
def subspace_split(
    dW: torch.Tensor, U: torch.Tensor, V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The four blocks of an update relative to the subspaces of ``U`` and ``V``.

    .. math:: \Delta W = P_\parallel \Delta W Q_\parallel + (P_\parallel \Delta W Q_\perp + P_\perp \Delta W Q_\parallel)
              + P_\perp \Delta W Q_\perp

    — the subspace block, the two cross terms, and the null-space block.

    The blocks are mutually orthogonal in the Frobenius inner product, so their squared norms add up to
    :math:`\lVert\Delta W\rVert_F^2`. A LoRA-X update (Eq. (1)) is all subspace block (Eq. (2)).

    Returns:
        ``(dW_pp, dW_pn, dW_np, dW_nn)``, each ``(m, n)``: ∥∥, ∥⊥, ⊥∥, ⊥⊥ (left index first).
    """
    left = U @ (U.T @ dW)  # (m, r) @ ((r, m) @ (m, n)) -> (m, n)   P_∥ ΔW
    dW_pp = (left @ V) @ V.T  # ((m, n) @ (n, r)) @ (r, n) -> (m, n)   P_∥ ΔW Q_∥
    dW_pn = left - dW_pp  # (m, n)   P_∥ ΔW Q_⊥
    right = (dW @ V) @ V.T  # (m, n)   ΔW Q_∥
    dW_np = right - dW_pp  # (m, n)   P_⊥ ΔW Q_∥
    dW_nn = dW - left - right + dW_pp  # (m, n)   P_⊥ ΔW Q_⊥ = ΔW − P_∥ΔW − ΔWQ_∥ + P_∥ΔWQ_∥
    return dW_pp, dW_pn, dW_np, dW_nn


@checked(_check_split)
def null_project(dW: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    r"""Two-sided projection onto the orthogonal complements ("null spaces") of ``U`` and ``V``.

    .. math:: P_\perp \Delta W Q_\perp = (I - UU^\top)\, \Delta W\, (I - VV^\top)

    The complement of :func:`lorax_ref.project` (Eq. (2)); it is zero for a LoRA-X update.
    """
    return subspace_split.unchecked(dW, U, V)[3]  # (m, n)


@checked(_check_split)
def cross_term_energy(dW: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    r"""The energy of the two cross terms that ProLoRA's split drops.

    .. math:: \lVert P_\parallel \Delta W Q_\perp \rVert_F^2 + \lVert P_\perp \Delta W Q_\parallel \rVert_F^2
              = \lVert \Delta W \rVert_F^2 - \lVert P_\parallel \Delta W Q_\parallel \rVert_F^2
                - \lVert P_\perp \Delta W Q_\perp \rVert_F^2

    When the target equals the source, this is exactly :math:`\lVert \Delta W - \Delta W_{\text{ProLoRA}}\rVert_F^2`.
    """
    _, dW_pn, dW_np, _ = subspace_split.unchecked(dW, U, V)  # (m, n) each
    return frob2(dW_pn) + frob2(dW_np)


@checked(_check_prolora)
def prolora_transfer(
    dW_s: torch.Tensor, U_s: torch.Tensor, V_s: torch.Tensor, U_t: torch.Tensor, V_t: torch.Tensor
) -> torch.Tensor:
    r"""ProLoRA — transfer the subspace part and the null-space part of an update separately.

    .. math:: \Delta W_{t\leftarrow s} = P^t_\parallel \big(P^s_\parallel \Delta W_s Q^s_\parallel\big) Q^t_\parallel
              + P^t_\perp \big(P^s_\perp \Delta W_s Q^s_\perp\big) Q^t_\perp

    with :math:`P^s_\parallel = \bar U_s \bar U_s^\top`, :math:`P^t_\parallel = U_t U_t^\top` (and likewise for
    Q with V). The cross terms :math:`P^s_\parallel \Delta W_s Q^s_\perp` and :math:`P^s_\perp \Delta W_s
    Q^s_\parallel` are dropped (:func:`cross_term_energy`). For a LoRA-X update the null part is zero and the
    rule is Eq. (3). Same-dimension layers only; different shapes raise.
    """
    dW_pp, _, _, dW_nn = subspace_split.unchecked(dW_s, U_s, V_s)  # (m, n) each: source subspace and null parts
    par = project.unchecked(dW_pp, U_t, V_t)  # (m, n)   P^t_∥ (·) Q^t_∥
    null = null_project.unchecked(dW_nn, U_t, V_t)  # (m, n)   P^t_⊥ (·) Q^t_⊥
    return par + null  # (m, n)


# ---------------------------------------------------------------------------------------------------
# Cross-LoRA: least-squares alignment, then projection on the aligned bases
# ---------------------------------------------------------------------------------------------------


@checked(checks.alignment_args)
def cross_lora_alignment(
    U_s: torch.Tensor, V_s: torch.Tensor, U_t: torch.Tensor, V_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Cross-LoRA's "LoRA-Align" — the source bases carried into the target spaces.

    .. math:: \tilde U_s = \hat P \bar U_s, \quad \tilde V_s = \hat Q \bar V_s, \qquad
              \hat P = \arg\min_P \lVert P \bar U_s - U_t \rVert_F^2 = U_t \bar U_s^{+}

    The maps are those of LoRA-X §4.2.2 (:func:`lorax_ref.alignment_maps`; Cross-LoRA computes them with
    ``lstsq``, which returns the same minimum-norm solution). The fit is exact, so
    :math:`\tilde U_s = U_t` and :math:`\tilde V_s = V_t` up to rounding, whatever the source.

    Returns:
        ``U_al (m_t, r)``, ``V_al (n_t, r)``.
    """
    P, Q = alignment_maps.unchecked(U_s, V_s, U_t, V_t)  # (m_t, m_s), (n_t, n_s)
    return P @ U_s, Q @ V_s  # (m_t, m_s) @ (m_s, r) -> (m_t, r);  (n_t, r)


@checked(_check_cross_lora)
def cross_lora_transfer(
    dW_s: torch.Tensor, U_s: torch.Tensor, V_s: torch.Tensor, U_t: torch.Tensor, V_t: torch.Tensor
) -> torch.Tensor:
    r"""Cross-LoRA's "LoRA-Shift" — project the source update onto the aligned bases.

    .. math:: \Delta W_{t\leftarrow s} = \tilde U_s \big(\tilde U_s^\top \Delta W_s \tilde V_s\big) \tilde V_s^\top

    With the exact fit :math:`\tilde U_s = U_t`, :math:`\tilde V_s = V_t` this is Eq. (3) for layers of equal
    shape. For different shapes :math:`\tilde U_s^\top \Delta W_s` is ``(r, m_t) @ (m_s, n_s)``: ill-typed,
    so this raises. (The only well-typed reading, :math:`\hat P \Delta W_s \hat Q^\top = U_t C_s V_t^\top`, is
    the §4.2.2 rule :func:`lorax_ref.transfer_mismatch`.)
    """
    U_al, V_al = cross_lora_alignment.unchecked(U_s, V_s, U_t, V_t)  # (m_t, r), (n_t, r)
    core = U_al.T @ dW_s @ V_al  # (r, m) @ (m, n) @ (n, r) -> (r, r)
    return U_al @ core @ V_al.T  # (m, r) @ (r, r) @ (r, n) -> (m, n)
