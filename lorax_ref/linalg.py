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
  bf16 already costs ~3 significant digits); results are returned in the input dtype. A singular value
  beyond that dtype's range (fp16: 65504, reached by an 8×6 block of 6e4) is refused, never returned as
  Inf: decompose ``W.float()`` to get it;
* work that cannot fit in free memory is refused before anything is allocated.
"""
from __future__ import annotations

import math

import torch

from . import checks
from .checks import checked
from .errors import LoraxInputError


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32/float64."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def frob2(x: torch.Tensor) -> float:
    """‖x‖_F² accumulated in float64 (energy ratios must not underflow in half precision)."""
    return float(x.double().pow(2).sum())


def energy_ratio(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x‖_F² / ‖ref‖_F², NaN when ``ref`` = 0.

    Both are divided by max|ref| first: squares of entries near 1e200 overflow float64 and those near
    1e-200 underflow to 0, while the ratio itself is an ordinary number.
    """
    scale = float(ref.detach().abs().max().double())  # a max, never overflows
    if scale == 0.0:
        return math.nan
    return frob2(x.double() / scale) / frob2(ref.double() / scale)


def svd_memory(m: int, n: int, dtype: torch.dtype) -> int:
    """Bytes a thin SVD of an ``(m, n)`` matrix allocates: the working copy, ``U``, ``Vh`` and the LAPACK
    workspace (gesdd: about 4k² + 8·max(m, n) for k = min(m, n))."""
    k = min(m, n)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return itemsize * (m * n + m * k + k * n + 4 * k * k + 8 * max(m, n) + k)


def spectrum_warnings(name: str, S: torch.Tensor, sigma_next: float | None, shape: tuple[int, int],
                      dtype: torch.dtype) -> list[str]:
    r"""Why the top-r subspace of a weight is not well defined, as sentences for a transfer report.

    Three inputs are legal but ill-posed: a zero weight (every subspace is a top-r subspace), a weight of
    numerical rank k < r (the last r − k directions are arbitrary) and a tie
    :math:`\sigma_r = \sigma_{r+1}` (which of the tied directions is kept is decided by rounding).
    The last two are judged relative to :math:`\sigma_1` at the accuracy of ``dtype``: a value or a gap
    :math:`\sigma_r - \sigma_{r+1}` below ``max(m, n)·eps·σ_1`` (numpy's rank tolerance, the SVD's own
    accuracy) is zero; a gap below ``√eps·σ_1`` is reported as a near tie (a change of W of that relative
    size can rotate the subspace; a 1e-12 change of a tied target moves Φ between 1 and 2/3).

    Args:
        S: the top-r singular values ``(r,)``, descending; ``sigma_next``: :math:`\sigma_{r+1}`, or None
            when r = min(m, n) or it is unknown.
    """
    r = int(S.shape[0])
    sigma = [float(x) for x in S.double()]
    s1 = sigma[0]
    if s1 == 0.0:
        return [f"{name} is zero: every {r}-dimensional subspace is a top-{r} subspace, so its bases are arbitrary"]
    eps = torch.finfo(dtype).eps
    tol = max(shape) * eps * s1  # numpy/LAPACK's rank tolerance
    out = []
    rank = sum(x > tol for x in sigma)
    if rank < r:
        out.append(f"{name} has numerical rank {rank} < r={r} (σ_{rank + 1}/σ_1 = {sigma[rank] / s1:.1e}): "
                   f"its last {r - rank} basis directions are arbitrary")
    elif sigma_next is not None:
        gap = sigma[-1] - sigma_next
        if gap <= tol:
            out.append(f"{name} has σ_{r} = σ_{r + 1} (tied to {gap / s1:.1e}·σ_1): its top-{r} subspace is not "
                       "unique and Φ and the transfer depend on rounding")
        elif gap <= math.sqrt(eps) * s1:
            out.append(f"{name} has σ_{r} ≈ σ_{r + 1} (gap {gap / s1:.1e}·σ_1): a change of the weight that small "
                       f"can rotate its top-{r} subspace")
    return out


def sign_convention(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair ``(u_i, v_i)`` so that the largest-|·| entry of ``u_i`` is positive."""
    idx = U.abs().argmax(dim=0, keepdim=True)  # (1, r)
    signs = torch.sign(torch.gather(U, 0, idx))  # (1, r)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)  # an all-zero column keeps its sign
    return U * signs, V * signs  # (m, r), (n, r)


def svd_fits(name: str, W: torch.Tensor) -> None:
    """Refuse the SVD of ``W`` before anything is allocated when its buffers exceed the free memory."""
    m, n = W.shape
    work_dtype = _compute_dtype(W.dtype)
    checks.fits_in_memory(f"the SVD of a {m}x{n} {str(work_dtype).replace('torch.', '')} matrix {name}",
                          svd_memory(m, n, work_dtype), W.device)


def _check_svd(W, r) -> None:
    checks.matrix("W", W, check_finite=False)
    checks.rank(r, *W.shape)
    svd_fits("W", W)  # before the NaN scan: a 1e10-entry view is refused at once
    checks.finite("W", W)


@checked(_check_svd)
def svd_topk(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Top-r thin SVD: :math:`W \approx \bar U \,\mathrm{diag}(\bar S)\, \bar V^\top`.

    README § Notation: the truncated bases :math:`\bar U_s = U[:, :r]`, :math:`\bar V_s = V[:, :r]` of a base
    weight :math:`W = U \Sigma V^\top` (largest singular values first).

    Args:
        W: ``(m, n)`` base weight in ``nn.Linear.weight`` layout (out, in); any float dtype and device.
        r: rank, ``1 <= r <= min(m, n)``.

    Returns:
        ``U (m, r)``, ``S (r,)`` descending, ``V (n, r)`` — column-orthonormal bases in ``W``'s dtype.
    """
    work = W.to(_compute_dtype(W.dtype))  # (m, n)
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)  # (m, k), (k,), (k, n)
    U_r, V_r = sign_convention(U[:, :r], Vh[:r].T)  # (m, r), (n, r)
    S_r = S[:r].contiguous().to(W.dtype)  # (r,)
    if not bool(torch.isfinite(S_r).all()):  # an Inf σ_1 would be a silently wrong answer
        name = str(W.dtype).replace("torch.", "")
        raise LoraxInputError(
            f"the top singular value of W ({float(S[0]):.4g}) is beyond the {name} range "
            f"(max {torch.finfo(W.dtype).max:.4g}); decompose W in a wider dtype (W.float() or W.double())")
    return U_r.contiguous().to(W.dtype), S_r, V_r.contiguous().to(W.dtype)
