r"""LoRA-X, equation by equation (Farhadzadeh et al., ICLR 2025, arXiv 2501.16559).

One small function per equation; the registry in :mod:`lorax_ref.registry` maps each label to its
function. The paper's PDF could not be read when this module was written: equations (1)-(4) follow the
numbering that independent summaries agree on, and the exact LaTeX of Eq. (1) and Eq. (4) is a
reconstruction (README § Provenance); a correction is a one-line change in the registry.

Notation (one linear layer, ``nn.Linear.weight`` layout ``(out, in)``; README § Notation has the full
table). A bar marks a basis truncated to the top r directions, source and target alike; code drops it:

=====================  ======================================================  ==============
symbol                 meaning                                                 shape
=====================  ======================================================  ==============
``W_s``, ``W_t``       frozen source / target base weight                      ``(m, n)``
``U_s``, ``V_s``       top-r source bases :math:`\bar U_s, \bar V_s`             ``(m, r)``, ``(n, r)``
``U_t``, ``V_t``       top-r target bases :math:`\bar U_t, \bar V_t`             ``(m, r)``, ``(n, r)``
``dSigma_s``           trainable LoRA-X parameters :math:`\Delta\Sigma_s`       ``(r,)`` or ``(r, r)``
``dW_s``               source update :math:`\Delta W_s`                         ``(m, n)``
``dSigma_ts``          target coordinates :math:`\Delta\Sigma_{t\leftarrow s}`  ``(r, r)``
=====================  ======================================================  ==============

Every function works on any device and float dtype, checks its inputs (shape, NaN/Inf, rank,
orthonormal bases, one device, one dtype) and raises :class:`~lorax_ref.errors.LoraxInputError`
naming the problem. Nothing is broadcast, padded or cropped. The checks are kept out of the formulas:
each equation is decorated with its argument check (:func:`lorax_ref.checks.checked`), so its body is the
formula alone, and an equation that uses another calls that one's body (``project.unchecked``) on inputs
it has already checked.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from . import checks
from .checks import as_full_sigma, checked
from .errors import LoraxInputError
from .linalg import energy_ratio, spectrum_warnings, svd_fits, svd_topk


# ---------------------------------------------------------------------------------------------------
# Eq. (1) and Eq. (2): the adapter lives in the source subspace
# ---------------------------------------------------------------------------------------------------


@checked(checks.delta_args)
def lorax_delta(U_s: torch.Tensor, dSigma_s: torch.Tensor, V_s: torch.Tensor) -> torch.Tensor:
    r"""Eq. (1) — the LoRA-X update of a source layer.

    .. math:: W_s' = W_s + \Delta W_s, \qquad \Delta W_s = \bar U_s\, \Delta\Sigma_s\, \bar V_s^\top

    Only :math:`\Delta\Sigma_s` is trained; a diagonal ``dSigma_s (r,)`` fine-tunes the top-r singular
    values (r parameters per layer, against ``r_lora·(m+n)`` for a LoRA).
    """
    return U_s @ as_full_sigma(dSigma_s) @ V_s.T  # (m, r) @ (r, r) @ (r, n) -> (m, n)


@checked(checks.projection_args)
def project(dW: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    r"""Eq. (2) — a LoRA-X update is a fixed point of the source's two-sided projection (computed here).

    Returns :math:`U U^\top\, \Delta W\, V V^\top`, the projection of ``dW`` onto the spans of ``U``
    (left) and ``V`` (right). Eq. (2) is the statement that, with the source bases,

    .. math:: \bar U_s \bar U_s^\top\, \Delta W_s\, \bar V_s \bar V_s^\top = \Delta W_s

    for every LoRA-X update (Eq. (1)); a plain LoRA :math:`BA` does not satisfy it, and the energy
    it has outside the subspace is what a transfer loses. Computed as ``U (Uᵀ dW V) Vᵀ`` so the
    ``(m, m)`` and ``(n, n)`` projectors are never formed.
    """
    C = U.T @ dW @ V  # (r, m) @ (m, n) @ (n, r) -> (r, r)
    return U @ C @ V.T  # (m, r) @ (r, r) @ (r, n) -> (m, n)


# ---------------------------------------------------------------------------------------------------
# Eq. (3): same-dimension transfer, and its ablation
# ---------------------------------------------------------------------------------------------------


@checked(checks.same_dim_args)
def transfer_same_dim(dW_s: torch.Tensor, U_t: torch.Tensor, V_t: torch.Tensor) -> torch.Tensor:
    r"""Eq. (3) — projection form: transfer onto a target layer of the same shape.

    .. math:: \Delta W_{t\leftarrow s} = \bar U_t \bar U_t^\top\, \Delta W_s\, \bar V_t \bar V_t^\top = \bar U_t\, \Delta\Sigma_{t\leftarrow s}\, \bar V_t^\top

    The source bases enter only through ``dW_s`` (Eq. (1)). Needs ``m_s = m_t`` and ``n_s = n_t``;
    other shapes raise (use :func:`transfer_mismatch`), they are never broadcast, padded or cropped.
    """
    dSigma_ts = U_t.T @ dW_s @ V_t  # (r, m) @ (m, n) @ (n, r) -> (r, r)
    return U_t @ dSigma_ts @ V_t.T  # (m, r) @ (r, r) @ (r, n) -> (m, n)


@checked(checks.rotation_args)
def transferred_sigma(
    U_t: torch.Tensor, U_s: torch.Tensor, dSigma_s: torch.Tensor, V_s: torch.Tensor, V_t: torch.Tensor
) -> torch.Tensor:
    r"""Eq. (3) rotation form — the target coordinates of the transferred update.

    .. math:: \Delta\Sigma_{t\leftarrow s} = \bar U_t^\top \bar U_s\, \Delta\Sigma_s\, \bar V_s^\top \bar V_t

    :math:`\bar U_t^\top \bar U_s` and :math:`\bar V_s^\top \bar V_t` are r×r; their singular values are the cosines
    of the principal angles between the subspaces, so they rotate (and shrink) the source coordinates.
    The result is a full r×r matrix even when ``dSigma_s`` is diagonal; ``U_t @ dSigma_ts @ V_t.T``
    equals :func:`transfer_same_dim` of the Eq. (1) update.
    """
    R_u = U_t.T @ U_s  # (r_t, m) @ (m, r_s) -> (r_t, r_s)
    R_v = V_s.T @ V_t  # (r_s, n) @ (n, r_t) -> (r_s, r_t)
    return R_u @ as_full_sigma(dSigma_s) @ R_v  # (r_t, r_s) @ (r_s, r_s) @ (r_s, r_t) -> (r_t, r_t)


@checked(checks.copy_args)
def copy_sigma_transfer(U_t: torch.Tensor, dSigma_s: torch.Tensor, V_t: torch.Tensor) -> torch.Tensor:
    r"""Table 5 ablation — copy :math:`\Delta\Sigma_s` into the target bases without rotating it.

    .. math:: \Delta W_{\text{copy}} = \bar U_t\, \Delta\Sigma_s\, \bar V_t^\top

    Pairs the i-th source direction with the i-th target direction, whatever their angle. The paper
    reports a large quality drop against Eq. (3). For a full ``dSigma_s`` the result depends on the sign
    convention of the bases (see :func:`lorax_ref.linalg.sign_convention`).
    """
    return U_t @ as_full_sigma(dSigma_s) @ V_t.T  # (m_t, r) @ (r, r) @ (r, n_t) -> (m_t, n_t)


# ---------------------------------------------------------------------------------------------------
# §4.2.2: different dimensions (the pseudo-inverse case)
# ---------------------------------------------------------------------------------------------------


@checked(checks.alignment_args)
def alignment_maps(
    U_s: torch.Tensor, V_s: torch.Tensor, U_t: torch.Tensor, V_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""§4.2.2 alignment maps — least-squares maps from the source to the target spaces.

    .. math:: \hat P = \arg\min_P \lVert P \bar U_s - \bar U_t \rVert_F^2 = \bar U_t \bar U_s^{+} = \bar U_t \bar U_s^\top,
              \qquad \hat Q = \arg\min_Q \lVert Q \bar V_s - \bar V_t \rVert_F^2 = \bar V_t \bar V_s^\top

    ``P Ū_s = U_t`` has m_t·m_s unknowns and m_t·r equations, so it is under-determined: the fit is
    exact and the solution is not unique (``P̂ + Z(I − Ū_sŪ_sᵀ)`` fits as well). The minimum-norm
    solution is the one ``pinv`` and ``lstsq`` return, and for a column-orthonormal ``Ū_s`` its
    pseudo-inverse is ``Ū_sᵀ``. (A printed form with ``(Ū_sŪ_sᵀ)⁻¹`` is undefined: that matrix has rank r.)

    Returns:
        ``P (m_t, m_s)``, ``Q (n_t, n_s)``.
    """
    P = U_t @ U_s.T  # (m_t, r) @ (r, m_s) -> (m_t, m_s);  Ū_s⁺ = Ū_sᵀ for orthonormal columns
    Q = V_t @ V_s.T  # (n_t, r) @ (r, n_s) -> (n_t, n_s)
    return P, Q


@checked(checks.mismatch_args)
def transfer_mismatch(
    dW_s: torch.Tensor, U_s: torch.Tensor, V_s: torch.Tensor, U_t: torch.Tensor, V_t: torch.Tensor
) -> torch.Tensor:
    r"""§4.2.2 — transfer between layers of different shapes through the aligned bases.

    .. math:: \tilde U_s = \hat P \bar U_s, \quad \tilde V_s = \hat Q \bar V_s, \quad
              C_s = \bar U_s^\top \Delta W_s \bar V_s, \quad
              \Delta\Sigma_{t\leftarrow s} = U_t^\top \tilde U_s\, C_s\, \tilde V_s^\top V_t, \quad
              \Delta W_{t\leftarrow s} = U_t\, \Delta\Sigma_{t\leftarrow s}\, V_t^\top

    Because the least-squares fit is exact (``P̂Ū_s = U_t``), ``ΔΣ_{t←s} = C_s`` and the rule equals the
    copy baseline :func:`copy_sigma_transfer` with ``C_s``: it does **not** reduce to Eq. (3) when the
    shapes happen to match. It is meaningful when the target is (close to) an isometric embedding of the
    source with separated singular values. Written out in full, not simplified, so each step can be read.
    """
    P, Q = alignment_maps.unchecked(U_s, V_s, U_t, V_t)  # (m_t, m_s), (n_t, n_s)
    U_al = P @ U_s  # (m_t, m_s) @ (m_s, r) -> (m_t, r)   aligned Ũ_s
    V_al = Q @ V_s  # (n_t, n_s) @ (n_s, r) -> (n_t, r)   aligned Ṽ_s
    C_s = U_s.T @ dW_s @ V_s  # (r, m_s) @ (m_s, n_s) @ (n_s, r) -> (r, r)
    dSigma_ts = U_t.T @ U_al @ C_s @ V_al.T @ V_t  # (r, m_t)(m_t, r)(r, r)(r, n_t)(n_t, r) -> (r, r)
    return U_t @ dSigma_ts @ V_t.T  # (m_t, r) @ (r, r) @ (r, n_t) -> (m_t, n_t)


# ---------------------------------------------------------------------------------------------------
# Eq. (4): subspace similarity
# ---------------------------------------------------------------------------------------------------


@checked(checks.similarity_args)
def subspace_similarity(U_a: torch.Tensor, U_b: torch.Tensor) -> float:
    r"""Eq. (4) — how much two r-dimensional subspaces overlap.

    .. math:: \Phi(W_s, W_t) = \frac{\lVert \bar U_s^\top \bar U_t \rVert_F^2}{r} = \frac1r \sum_{i=1}^r \cos^2\theta_i

    with :math:`\theta_i` the principal angles. Φ = 1 for identical subspaces, about r/m for random ones,
    and identically 1 when r = m (so truncation is mandatory). Apply it to left (U) or right (V) bases.
    If the ranks differ, r = min(r_a, r_b), which keeps Φ in [0, 1] and symmetric.
    """
    r = min(U_a.shape[1], U_b.shape[1])
    cross = (U_a.T @ U_b).double()  # (r_a, m) @ (m, r_b) -> (r_a, r_b), summed in float64
    return float(cross.pow(2).sum()) / r


# ---------------------------------------------------------------------------------------------------
# Plain LoRA in low-rank form, and one layer end to end
# ---------------------------------------------------------------------------------------------------


@checked(checks.lora_args)
def transfer_lora(
    B: torch.Tensor, A: torch.Tensor, U_t: torch.Tensor, V_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Eq. (3) low-rank form — the transfer of a plain LoRA :math:`\Delta W_s = B A`.

    .. math:: B' = \bar U_t \bar U_t^\top B, \qquad A' = A\, \bar V_t \bar V_t^\top, \qquad B'A' = \bar U_t \bar U_t^\top (BA) \bar V_t \bar V_t^\top

    The LoRA rank is kept and no ``(m, n)`` matrix is formed. Any LoRA scaling (α/r) stays with the
    caller: apply it to ``B`` or to the product.
    """
    B_t = U_t @ (U_t.T @ B)  # (m, r) @ ((r, m) @ (m, k)) -> (m, k)
    A_t = (A @ V_t) @ V_t.T  # ((k, n) @ (n, r)) @ (r, n) -> (k, n)
    return B_t, A_t


@dataclass(frozen=True)
class TransferReport:
    """What :func:`transfer_layer` did to one layer."""

    case: str  # "same_dim" (Eq. (3)), "mismatch" (§4.2.2) or "copy" (Table 5 ablation)
    r: int
    shape_s: tuple[int, int]
    shape_t: tuple[int, int]
    phi_u: float | None  # Eq. (4) on the left bases; None when m_s != m_t
    phi_v: float | None  # Eq. (4) on the right bases; None when n_s != n_t
    phi: float | None  # the value the gate compares with the threshold (see ``side``)
    side: str
    threshold: float | None
    gated: bool  # True: Φ fell below the threshold and the layer got no update
    kept_energy: float  # ‖ΔW_{t←s}‖²_F / ‖ΔW_s‖²_F (NaN when ΔW_s = 0)
    # legal but ill-posed inputs: a zero W, rank(W) < r, σ_r = σ_{r+1} (the bases, Φ and the result are
    # then decided by rounding); see lorax_ref.linalg.spectrum_warnings
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        """The report as a plain dict (JSON-ready)."""
        return asdict(self)


#: The gate's sides (:func:`transfer_layer`'s ``side``) and the transfer rules (its ``method``).
SIDES = ("u", "v", "both", "mean")
METHODS = ("auto", "lorax", "copy", "mismatch")


def transfer_case(method: str, shape_s: tuple, shape_t: tuple) -> str:
    """The rule a ``method`` applies to a layer pair: ``"same_dim"`` (Eq. (3)), ``"mismatch"`` (§4.2.2) or
    ``"copy"`` (Table 5); ``"auto"`` picks Eq. (3) for equal shapes and §4.2.2 otherwise."""
    auto = "same_dim" if tuple(shape_s) == tuple(shape_t) else "mismatch"
    return {"auto": auto, "lorax": "same_dim"}.get(method, method)


def _gate_phi(phi_u: float | None, phi_v: float | None, side: str) -> float | None:
    """The similarity the gate uses: one side, the min of both ("both"), or their mean."""
    if side == "u":
        return phi_u
    if side == "v":
        return phi_v
    present = [p for p in (phi_u, phi_v) if p is not None]
    if not present:
        return None
    return min(present) if side == "both" else sum(present) / len(present)


def _check_options(side: str, method: str, shape_s: tuple, shape_t: tuple) -> None:
    if side not in SIDES:
        raise LoraxInputError(f"side={side!r} is not one of {SIDES}")
    if method not in METHODS:
        raise LoraxInputError(f"method={method!r} is not one of {METHODS}")
    if method == "lorax" and shape_s != shape_t:
        raise LoraxInputError(
            f"method='lorax' (Eq. (3)) needs equal shapes, got source {shape_s} and target "
            f"{shape_t}; use method='auto' or 'mismatch' (§4.2.2)"
        )


def _check_gate(threshold: float | None, side: str, shape_s: tuple, shape_t: tuple) -> None:
    """A gate needs Φ on its side, and Eq. (4) exists only on a side where the dimensions agree."""
    same = (shape_s[0] == shape_t[0], shape_s[1] == shape_t[1])
    has_phi = {"u": same[0], "v": same[1]}.get(side, any(same))
    if threshold is not None and not has_phi:
        raise LoraxInputError(
            f"cannot gate with side={side!r}: Eq. (4) needs equal dimensions on that side, but the source is "
            f"{shape_s} and the target {shape_t}"
        )


def _check_from_bases(dW_s, U_s, V_s, U_t, V_t, threshold, side, method) -> dict:
    checks.same_device(dW_s=dW_s, U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t)
    checks.matrix("dW_s", dW_s)
    checks.bases(U_s, V_s, "_s", *dW_s.shape)
    checks.bases(U_t, V_t, "_t")
    checks.same_rank(U_s=U_s, U_t=U_t)
    checks.same_dtype(dW_s=dW_s, U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t)
    threshold = checks.threshold(threshold)
    shape_s, shape_t = (U_s.shape[0], V_s.shape[0]), (U_t.shape[0], V_t.shape[0])
    _check_options(side, method, shape_s, shape_t)
    _check_gate(threshold, side, shape_s, shape_t)
    return {"threshold": threshold}


def _check_layer(dW_s, W_s, W_t, r, threshold, side, method) -> dict:
    checks.same_device(dW_s=dW_s, W_s=W_s, W_t=W_t)
    for name, x in (("dW_s", dW_s), ("W_s", W_s), ("W_t", W_t)):
        checks.matrix(name, x, check_finite=False)
    checks.same_dtype(dW_s=dW_s, W_s=W_s, W_t=W_t)
    if dW_s.shape != W_s.shape:
        raise LoraxInputError(f"dW_s {tuple(dW_s.shape)} does not match its base weight W_s {tuple(W_s.shape)}")
    _check_options(side, method, tuple(W_s.shape), tuple(W_t.shape))
    checks.rank(r, *W_s.shape, name="r (source)")
    checks.rank(r, *W_t.shape, name="r (target)")
    threshold = checks.threshold(threshold)  # before the SVDs
    _check_gate(threshold, side, tuple(W_s.shape), tuple(W_t.shape))
    for name, W in (("W_s", W_s), ("W_t", W_t)):
        svd_fits(name, W)  # refused before any NaN scan or allocation
    for name, x in (("dW_s", dW_s), ("W_s", W_s), ("W_t", W_t)):
        checks.finite(name, x)
    return {"threshold": threshold}


@checked(_check_layer)
def transfer_layer(
    dW_s: torch.Tensor,
    W_s: torch.Tensor,
    W_t: torch.Tensor,
    r: int,
    threshold: float | None = None,
    side: str = "both",
    method: str = "auto",
) -> tuple[torch.Tensor, TransferReport]:
    r"""Layer transfer — one layer end to end: top-r bases, the right case, the Eq. (4) gate.

    1. :math:`\bar U_s, \bar V_s` = ``svd_topk(W_s, r)`` and :math:`\bar U_t, \bar V_t` = ``svd_topk(W_t, r)``;
    2. Φ_U, Φ_V by Eq. (4) wherever the two sides have the same dimension;
    3. if ``threshold`` is given and the gate's Φ (``side``: ``"u"``, ``"v"``, ``"both"`` = min, ``"mean"``)
       is below it, the layer gets a zero update (``gated=True``);
    4. otherwise ``method``: ``"auto"`` = Eq. (3) for equal shapes, §4.2.2 for different shapes;
       ``"lorax"`` = Eq. (3) (raises on different shapes); ``"copy"`` = the Table 5 ablation
       ``U_t C_s V_tᵀ`` with ``C_s = Ū_sᵀ ΔW_s V̄_s``; ``"mismatch"`` = the §4.2.2 rule at any shapes.

    Steps 2-4 are :func:`transfer_layer_from_bases`, for callers that already have the bases (a cache).
    A zero ``W``, a ``W`` of rank < r or a tie σ_r = σ_{r+1} is legal, but its top-r bases are not unique:
    the report's ``warnings`` then say so (Φ and ``dW_t`` are decided by rounding).

    Returns:
        ``dW_t (m_t, n_t)`` in ``dW_s``'s dtype and a :class:`TransferReport`.
    """
    warnings, bases = [], []
    for name, W in (("W_s", W_s), ("W_t", W_t)):
        k = min(r + 1, *W.shape)  # one more value than kept: σ_{r+1} tells whether the top-r subspace is unique
        U, S, V = svd_topk.unchecked(W, k)  # (m, k), (k,), (n, k); the first r columns are svd_topk(W, r)
        warnings += spectrum_warnings(name, S[:r], float(S[r]) if k > r else None, tuple(W.shape), W.dtype)
        bases += [U[:, :r].contiguous(), V[:, :r].contiguous()]  # (m, r), (n, r)
    dW_t, report = transfer_layer_from_bases.unchecked(dW_s, *bases, threshold, side, method)
    return dW_t, replace(report, warnings=tuple(warnings))


@checked(_check_from_bases)
def transfer_layer_from_bases(
    dW_s: torch.Tensor,
    U_s: torch.Tensor,
    V_s: torch.Tensor,
    U_t: torch.Tensor,
    V_t: torch.Tensor,
    threshold: float | None = None,
    side: str = "both",
    method: str = "auto",
) -> tuple[torch.Tensor, TransferReport]:
    """:func:`transfer_layer` with the top-r bases given (e.g. from an on-disk cache): steps 2-4."""
    shape_s, shape_t = (U_s.shape[0], V_s.shape[0]), (U_t.shape[0], V_t.shape[0])
    phi_u = subspace_similarity.unchecked(U_s, U_t) if shape_s[0] == shape_t[0] else None  # Eq. (4), left
    phi_v = subspace_similarity.unchecked(V_s, V_t) if shape_s[1] == shape_t[1] else None  # Eq. (4), right
    phi = _gate_phi(phi_u, phi_v, side)
    gated = threshold is not None and phi < threshold
    case = transfer_case(method, shape_s, shape_t)
    if gated:
        dW_t = torch.zeros(shape_t, dtype=dW_s.dtype, device=dW_s.device)  # (m_t, n_t)
    elif case == "same_dim":
        dW_t = transfer_same_dim.unchecked(dW_s, U_t, V_t)  # (m, n)  Eq. (3)
    elif case == "mismatch":
        dW_t = transfer_mismatch.unchecked(dW_s, U_s, V_s, U_t, V_t)  # (m_t, n_t)  §4.2.2
    else:
        C_s = U_s.T @ dW_s @ V_s  # (r, m_s) @ (m_s, n_s) @ (n_s, r) -> (r, r)
        dW_t = copy_sigma_transfer.unchecked(U_t, C_s, V_t)  # (m_t, n_t)  Table 5 ablation
    report = TransferReport(
        case=case, r=U_s.shape[1], shape_s=shape_s, shape_t=shape_t, phi_u=phi_u, phi_v=phi_v, phi=phi,
        side=side, threshold=threshold, gated=bool(gated),
        kept_energy=energy_ratio(dW_t, dW_s),  # scale-safe: ‖1e200·x‖² overflows float64
    )
    return dW_t, report
