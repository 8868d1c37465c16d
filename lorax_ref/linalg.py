r"""The one SVD-truncation helper of the package.

Every basis in lorax_ref comes from :func:`svd_topk`, so the conventions live in one place:

* column bases ``U (m, r)`` and ``V (n, r)`` — ``torch.linalg.svd`` returns ``Vh (k, n)`` and the top-r
  ``V`` is ``Vh[:r].T``; passing ``Vh`` where ``V`` is meant raises nothing on a square layer and is
  silently wrong, which is why no public signature takes ``Vh``;
* a deterministic sign: singular vectors are unique only up to a joint flip ``(u_i, v_i) → (−u_i, −v_i)``,
  and LAPACK builds differ in the sign they return. We flip each pair so that the largest-magnitude
  entry of ``u_i`` is positive. Projections (Eq. (2), Eq. (3)) do not depend on it; the copy baseline with
  a full ``ΔΣ`` and the §4.2.2 rule do, and reproducible notebooks need one answer;
* half precision is decomposed in float32 (LAPACK has no fp16/bf16 SVD, and rounding the input to
  bf16 already costs ~3 significant digits); results are returned in the input dtype.
"""
from __future__ import annotations

import torch

from . import checks


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32/float64."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def frob2(x: torch.Tensor) -> float:
    """‖x‖_F² accumulated in float64 (energy ratios must not underflow in half precision)."""
    return float(x.double().pow(2).sum())


def sign_convention(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair ``(u_i, v_i)`` so that the largest-|·| entry of ``u_i`` is positive."""
    idx = U.abs().argmax(dim=0, keepdim=True)  # (1, r)
    signs = torch.sign(torch.gather(U, 0, idx))  # (1, r)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)  # an all-zero column keeps its sign
    return U * signs, V * signs  # (m, r), (n, r)


def svd_topk(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Top-r thin SVD: :math:`W \approx \bar U \,\mathrm{diag}(\bar S)\, \bar V^\top`.

    Notation §1: the truncated bases :math:`\bar U_s = U[:, :r]`, :math:`\bar V_s = V[:, :r]` of a base
    weight :math:`W = U \Sigma V^\top` (largest singular values first).

    Args:
        W: ``(m, n)`` base weight in ``nn.Linear.weight`` layout (out, in); any float dtype and device.
        r: rank, ``1 <= r <= min(m, n)``.

    Returns:
        ``U (m, r)``, ``S (r,)`` descending, ``V (n, r)`` — column-orthonormal bases in ``W``'s dtype.
    """
    checks.matrix("W", W)
    m, n = W.shape
    checks.rank(r, m, n)
    work = W.to(_compute_dtype(W.dtype))  # (m, n)
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)  # (m, k), (k,), (k, n)
    U_r, V_r = sign_convention(U[:, :r], Vh[:r].T)  # (m, r), (n, r)
    return (
        U_r.contiguous().to(W.dtype),
        S[:r].contiguous().to(W.dtype),
        V_r.contiguous().to(W.dtype),
    )
