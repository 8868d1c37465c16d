r"""Eq. (3) for one (source, target) layer pair from certified bases, reusable across adapters."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import checks
from ..errors import LoraxInputError
from .certificate import Bases
from .solver import TOL, _reference_bases, _stack, top_r_bases_group

# ---------------------------------------------------------------------------------------------------
# Transfer: one layer pair, its cache, and a certified bound
# ---------------------------------------------------------------------------------------------------


@dataclass
class LayerPair:
    r"""Everything Eq. (3) needs from one (source, target) layer pair, reusable across adapters.

    ``R_u`` = :math:`U_t^\top\bar U_s` and ``R_v`` = :math:`\bar V_s^\top V_t` (r×r) turn a new
    :math:`\Delta\Sigma_s` into :math:`\Delta\Sigma_{t\leftarrow s} = R_U\,\Delta\Sigma_s\,R_V` in O(r³).
    ``U_rot`` = :math:`U_tR_U = U_tU_t^\top\bar U_s` and ``V_rot`` = :math:`V_tR_V^\top = V_tV_t^\top\bar V_s`
    are the source singular vectors projected on the target subspaces, so that Eq. (3) reads
    :math:`\Delta W_{t\leftarrow s} = U_{rot}\,\Delta\Sigma_s\,V_{rot}^\top`: a LoRA pair
    (:meth:`factors`) in O((m+n)r) for a diagonal ΔΣ_s, and the dense matrix in one m×r×n product.
    """

    source: Bases
    target: Bases
    R_u: torch.Tensor = field(init=False)  # (r, r)
    R_v: torch.Tensor = field(init=False)  # (r, r)
    U_rot: torch.Tensor = field(init=False)  # (m, r)
    V_rot: torch.Tensor = field(init=False)  # (n, r)

    def __post_init__(self):
        self.R_u = self.target.U.T @ self.source.U  # (r, m) @ (m, r) -> (r, r)
        self.R_v = self.source.V.T @ self.target.V  # (r, n) @ (n, r) -> (r, r)
        self.U_rot = self.target.U @ self.R_u  # (m, r) @ (r, r) -> (m, r)
        self.V_rot = self.target.V @ self.R_v.T  # (n, r) @ (r, r) -> (n, r)

    @property
    def r(self) -> int:
        """The rank r of both layers' bases."""
        return self.source.r

    def _check_sigma(self, dSigma_s: torch.Tensor) -> torch.Tensor:
        checks.sigma("dSigma_s", dSigma_s, self.r)
        return dSigma_s.to(device=self.R_u.device, dtype=torch.float64)

    def dsigma_ts(self, dSigma_s: torch.Tensor) -> torch.Tensor:
        r"""Eq. (3) rotation form: :math:`\Delta\Sigma_{t\leftarrow s} = U_t^\top\bar U_s\,\Delta\Sigma_s\,\bar V_s^\top V_t` (r, r)."""
        d = self._check_sigma(dSigma_s)
        if d.ndim == 1:
            return (self.R_u * d) @ self.R_v  # (r, r)·diag(r) @ (r, r) -> (r, r)
        return self.R_u @ d @ self.R_v  # (r, r)

    def factors(self, dSigma_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""LoRA factors ``B (m, r)``, ``A (r, n)`` with :math:`BA = \Delta W_{t\leftarrow s} = U_{rot}\,\Delta\Sigma_s\,V_{rot}^\top`.

        What an adapter file stores (``lora_B``, ``lora_A``); float64, O((m+n)r) for a diagonal ΔΣ_s. Both
        are new tensors: writing into them cannot corrupt the cached bases.
        """
        d = self._check_sigma(dSigma_s)
        B = self.U_rot * d if d.ndim == 1 else self.U_rot @ d  # (m, r)·diag(r) or (m, r) @ (r, r) -> (m, r)
        return B, self.V_rot.T.clone(memory_format=torch.contiguous_format)  # (m, r), (r, n)

    def delta_w(self, dSigma_s: torch.Tensor) -> torch.Tensor:
        r"""Dense :math:`\Delta W_{t\leftarrow s} = U_{rot}\,\Delta\Sigma_s\,V_{rot}^\top` (m, n), float64: one m×r×n product."""
        B, A = self.factors(dSigma_s)  # (m, r), (r, n)
        return B @ A  # (m, n)

    def bound(self, dSigma_s: torch.Tensor, dSigma_ts: torch.Tensor | None = None) -> float:
        r"""Certified bound on :math:`\lVert\Delta\hat W_{t\leftarrow s} - \Delta W_{t\leftarrow s}\rVert_F/\lVert\Delta W_{t\leftarrow s}\rVert_F`.

        .. math:: \lVert \hat P\Delta\hat W_s\hat Q - P\Delta W_sQ\rVert_F \le
                  \lVert\Delta\hat W_s-\Delta W_s\rVert_F + \lVert\Delta W_s\rVert_F
                  (\lVert\hat P-P\rVert_2+\lVert\hat Q-Q\rVert_2)

        with P, Q the target projectors; ‖ΔW_s‖_F = ‖ΔΣ_s‖_F and ‖ΔŴ_t‖_F = ‖ΔΣ_{t←s}‖_F (orthonormal bases).
        """
        d = self._check_sigma(dSigma_s)
        if self.source.cert.method == "svd" and self.target.cert.method == "svd":
            return 0.0
        ts = self.dsigma_ts(d) if dSigma_ts is None else dSigma_ts
        norm_s = float(d.norm())
        e_s = self.source.cert.triplet_error(d)
        e_t = e_s + norm_s * (self.target.cert.subspace_u + self.target.cert.subspace_v)
        norm_t = float(ts.norm())
        if norm_t == 0.0 and e_t == 0.0:
            return 0.0
        return e_t / max(norm_t - e_t, 0.0) if norm_t > e_t else math.inf

    def to_reference(self, side: str = "both", W_s: torch.Tensor | None = None, W_t: torch.Tensor | None = None):
        """Replace the source and/or target bases by the reference SVD (needs the weights)."""
        src = _reference_bases(W_s, self.r) if side in ("both", "source") else self.source
        tgt = _reference_bases(W_t, self.r) if side in ("both", "target") else self.target
        return LayerPair(src, tgt)


def pair_bases_group(Ws_s, Ws_t, r: int, **kwargs) -> list[LayerPair]:
    """Bases of same-shaped source and target layers, batched; see :func:`top_r_bases_group`.

    Source and target layers are independent problems of one shape, so they go into one batch (and
    share the CPU workers).
    """
    list_s = list(Ws_s) if not isinstance(Ws_s, torch.Tensor) or Ws_s.ndim == 3 else [Ws_s]
    list_t = list(Ws_t) if not isinstance(Ws_t, torch.Tensor) or Ws_t.ndim == 3 else [Ws_t]
    shapes_s = {tuple(w.shape) for w in list_s}
    shapes_t = {tuple(w.shape) for w in list_t}
    if shapes_s != shapes_t or len(list_s) != len(list_t):
        raise LoraxInputError(
            f"same-dimension transfer (Eq. (3)) needs equal shapes: source layers {sorted(shapes_s)} "
            f"(x{len(list_s)}), target layers {sorted(shapes_t)} (x{len(list_t)})")
    both = top_r_bases_group(_stack(list_s + list_t), r, **kwargs)  # (2B, m, n), one float64 copy
    B = len(list_s)
    return [LayerPair(s, t) for s, t in zip(both[:B], both[B:])]


def pair_bases(W_s: torch.Tensor, W_t: torch.Tensor, r: int, **kwargs) -> LayerPair:
    """:func:`pair_bases_group` for one layer pair."""
    checks.matrix("W_s", W_s)
    checks.matrix("W_t", W_t)
    return pair_bases_group(W_s[None], W_t[None], r, **kwargs)[0]


def transfer_fast(
    W_s: torch.Tensor, W_t: torch.Tensor, dSigma_s: torch.Tensor, r: int | None = None, *,
    pair: LayerPair | None = None, tol: float = TOL, dense: bool = True, **kwargs,
):
    r"""Eq. (1) + Eq. (3) for one LoRA-X layer, fast and certified.

    :math:`\Delta W_{t\leftarrow s} = U_t U_t^\top (\bar U_s\Delta\Sigma_s\bar V_s^\top) V_t V_t^\top`, equal to
    ``transfer_same_dim(lorax_delta(*svd_topk(W_s, r)...), *svd_topk(W_t, r)...)`` within ``tol``
    (relative Frobenius), guaranteed by :meth:`LayerPair.bound`; a layer that cannot be certified is
    recomputed with the reference SVD.

    Args:
        W_s, W_t: base weights ``(m, n)`` (any float dtype; never modified).
        dSigma_s: the LoRA-X parameters, ``(r,)`` (diagonal) or ``(r, r)``.
        r: rank (default: taken from ``dSigma_s``).
        pair: a :class:`LayerPair` from an earlier call (second adapter on the same bases): skips the bases.
        dense: return the dense ``ΔW_{t←s} (m, n)`` (float64); else the compact ``ΔΣ_{t←s} (r, r)``.

    Returns:
        ``(result, pair, bound)``.
    """
    checks.same_device(W_s=W_s, W_t=W_t, dSigma_s=dSigma_s)
    if r is None:
        r = int(dSigma_s.shape[0]) if isinstance(dSigma_s, torch.Tensor) and dSigma_s.ndim >= 1 else 0
    if pair is None:
        pair = pair_bases(W_s, W_t, r, tol=tol, **kwargs)
    ts = pair.dsigma_ts(dSigma_s)  # (r, r)
    bound = pair.bound(dSigma_s, ts)
    if not bound <= tol:  # NaN-safe: anything not certified goes to the reference
        pair = pair.to_reference("both", W_s, W_t)
        ts, bound = pair.dsigma_ts(dSigma_s), 0.0
    result = pair.delta_w(dSigma_s) if dense else ts  # (m, n) or (r, r)
    return result, pair, bound

