r"""Certified top-r bases of same-shaped weights, batched: float32 Gram ``eigh``, one float64 Newton step,
float64 Rayleigh–Ritz and a certificate (the algorithm is described in :mod:`lorax_ref.fast`)."""
from __future__ import annotations

import contextlib
import math

import torch

from .. import checks
from ..errors import LoraxInputError
from ..linalg import sign_convention, svd_topk
from .certificate import Bases, Certificate, _certificates

TOL = 1e-6  # certified bound on ‖ΔŴ_t − ΔW_t‖_F / ‖ΔW_t‖_F the fast path must meet (else: reference SVD)
BASIS_METHODS = ("auto", "mixed", "gram64", "svd")  # how top_r_bases computes (transfer rules: core.METHODS)

_U64 = torch.finfo(torch.float64).eps / 2  # unit roundoff, float64
_U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff, float32
# Allowance for the error of a float32 eigenvalue (backward error of eigh + rounding of the Gram matrix),
# relative to λ_1. A bound on the top of the complement's spectrum is λ_{k+1} + this.
_EIG32_SLACK = 1e-5
_EIG64_SLACK = 1e-12


def default_oversample(r: int) -> int:
    """p = max(16, r/4): buys a gap λ_r − λ_{k+1} of a few % of λ_1 on realistic spectra (k = r + p)."""
    return max(16, -(-r // 4))


@contextlib.contextmanager
def _no_tf32():
    """TF32 off for the duration (CUDA matmul would otherwise round float32 inputs to 10 bits)."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

# ---------------------------------------------------------------------------------------------------
# The algorithm (batched over same-shaped layers: W is (B, m, n) with m <= n)
# ---------------------------------------------------------------------------------------------------


def _eigh_desc(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition, largest eigenvalue first."""
    lam, X = torch.linalg.eigh(A)  # ascending
    return lam.flip(-1), X.flip(-1)


def _newton_step(R: torch.Tensor, X: torch.Tensor, lam: torch.Tensor, r: int, k: int) -> torch.Tensor:
    r"""Correction :math:`\Delta X_k = X_\perp E`, :math:`E_{ji} = (X_\perp^\top R)_{ji}/(\lambda_i-\lambda_j)`.

    ``R (B, m, k)`` is the float64 residual :math:`AX_k - X_k\Lambda_k`; ``X (B, m, m)`` the float32
    eigenvectors. R is small (~1e-6 ‖A‖), so the two products run in float32 without harm. Pairs closer
    than a quarter of the gap λ_r − λ_{k+1} (only Ritz columns beyond r can have them) are skipped.
    """
    X_perp = X[..., k:]  # (B, m, m-k)
    C = X_perp.mT @ R.to(X.dtype)  # (B, m-k, m) @ (B, m, k) -> (B, m-k, k)
    gap = lam[:, None, :k] - lam[:, k:, None]  # (B, m-k, k)  λ_i − λ_j
    tau = (0.25 * (lam[:, r - 1] - lam[:, k])).clamp_min(1e-6 * lam[:, 0].abs())  # (B,)
    E = torch.where(gap > tau[:, None, None], C.double() / gap.clamp_min(1e-300), 0.0)  # (B, m-k, k)
    return X_perp @ E.to(X.dtype)  # (B, m, m-k) @ (B, m-k, k) -> (B, m, k)


def _rayleigh_ritz(U1, Y, Z, r):
    r"""Rayleigh–Ritz of :math:`A = WW^\top` on span(U1), given Y = WᵀU1 and Z = A U1 (all float64).

    Orthonormalises by Cholesky-QR (U1 is orthonormal to ~1e-6, so ``U1ᵀU1`` is well conditioned) and
    folds :math:`L^{-\top}` and the k×k eigenvectors into one k×k matrix S, so that no product with W is
    needed: :math:`Y_{ritz} = U_1S`, :math:`AY_{ritz} = ZS`, :math:`W^\top Y_{ritz} = YS`.
    """
    k = U1.shape[-1]
    M = U1.mT @ U1  # (B, k, k)
    L = torch.linalg.cholesky(M)  # (B, k, k)
    eye = torch.eye(k, dtype=U1.dtype, device=U1.device).expand_as(M)
    T = torch.linalg.solve_triangular(L, eye, upper=False).mT  # (B, k, k)  L^{-T}
    K = T.mT @ (Y.mT @ Y) @ T  # (B, k, k)  QᵀAQ with Q = U1 T
    K = 0.5 * (K + K.mT)
    theta2, C = _eigh_desc(K)  # (B, k), (B, k, k)
    S = T @ C  # (B, k, k)
    Yr = U1 @ S  # (B, m, k) Ritz vectors
    AY = Z @ S  # (B, m, k)
    WtY = Y @ S[..., :r]  # (B, n, r)
    R = AY - Yr * theta2[:, None, :]  # (B, m, k) residual
    R_in = Yr.mT @ R  # (B, k, k) rounding level
    return theta2, Yr, WtY, R, R_in


def _bases_batched(W: torch.Tensor, r: int, k: int, method: str) -> list[Bases]:
    """Top-r bases of each ``W[b] (m, n)``, m <= n, by ``"mixed"`` or ``"gram64"`` (float64 in/out)."""
    B, m, n = W.shape
    if method == "mixed":
        W_lo = W.float()  # (B, m, n)
        lam, X = _eigh_desc(W_lo @ W_lo.mT)  # (B, m), (B, m, m)  float32
        slack = _EIG32_SLACK
    else:
        lam, X = _eigh_desc(W @ W.mT)  # float64
        slack = _EIG64_SLACK
    lam = lam.double()  # (B, m)
    U1 = X[..., :k].double()  # (B, m, k)
    Y = W.mT @ U1  # (B, n, m) @ (B, m, k) -> (B, n, k)   float64 pass 1
    Z = W @ Y  # (B, m, n) @ (B, n, k) -> (B, m, k)       float64 pass 2: A U1
    lam1 = lam[:, 0].abs()  # (B,)
    dU_norm = torch.zeros(B, k, dtype=torch.float64, device=W.device)
    corrected = method == "mixed" and k < m
    if corrected:
        dU = _newton_step(Z - U1 * lam[:, None, :k], X, lam, r, k)  # (B, m, k) float32
        WtdU = W_lo.mT @ dU  # (B, n, k) float32: small, so float32 is enough
        U1 = U1 + dU.double()
        Y = Y + WtdU.double()
        Z = Z + (W_lo @ WtdU).double()  # A (U1 + dU)
        dU_norm = dU.double().norm(dim=-2)  # (B, k)
    theta2, Yr, WtY, R, R_in = _rayleigh_ritz(U1, Y, Z, r)
    # Rounding allowances for the computed residual, in the usual probabilistic model (a product over n
    # terms is off by ~√n·u relative): float64 for W(WᵀU1), float32 for the correction products, which
    # only carry ‖dU_j‖ ~ 1e-6. (Measured on 1280-wide layers: the residual recomputed from scratch in
    # float64 differs from this one by ~1e-13 λ₁, 20x below the float32 allowance.)
    scale = theta2[:, :1].abs()  # (B, 1) λ_1
    res = R.norm(dim=-2) + scale * math.sqrt(n) * (4 * _U64 + _U32 * dU_norm)  # (B, k)
    # R_in is 0 for an exact Rayleigh–Ritz: what is computed *is* rounding (of AY and of the k×k eigh);
    # its own uncertainty is of the same size, hence the factor 2, plus a floor for a lucky cancellation.
    # (R_in is symmetric in exact arithmetic; the bound uses its rows, take the larger of row and column)
    res_in = 2 * torch.maximum(R_in.norm(dim=-2), R_in.norm(dim=-1)) + scale * (4 * math.sqrt(k) * _U64)  # (B, k)
    mu = None
    if k < m:
        mu = lam[:, k] + lam1 * slack + lam1 * dU_norm.pow(2).sum(-1)  # (B,) top of the complement
    certs = _certificates(method, k, theta2, res, res_in, mu, r, corrected)
    theta = theta2[:, :r].clamp_min(0).sqrt()  # (B, r)
    U = Yr[..., :r]  # (B, m, r)
    V = WtY / theta.clamp_min(torch.finfo(torch.float64).tiny)[:, None, :]  # (B, n, r)
    out = []
    for b in range(B):
        U_b, V_b = sign_convention(U[b], V[b])  # same signs as the reference svd_topk
        out.append(Bases(U_b.contiguous(), theta[b].contiguous(), V_b.contiguous(), certs[b]))
    return out


def _reference_bases(W: torch.Tensor, r: int) -> Bases:
    """The reference computation (full float64 SVD); its certificate is trivially exact."""
    U, S, V = svd_topk(W.double(), r)  # (m, r), (r,), (n, r)
    return Bases(U, S, V, Certificate.reference(r))


def _choose(method: str, m_small: int, n_large: int, k: int) -> str:
    """``auto``: which method is fastest for this shape (measured with scripts/benchmark.py, 1 thread).

    * the reference SVD when the Ritz space is the whole space (k = min(m, n), e.g. r = 320 on a 320-wide
      SD-1.5 layer): the smallest singular values are needed too, a Gram matrix squares their ratio to σ₁
      (~1e-4 on real spectra → 1e-8) and its vectors lose the digits the certificate asks for;
    * the reference SVD too when k is more than about half of a near-square layer (640×640 at r = 320):
      the k×k Rayleigh–Ritz then costs as much as the SVD it replaces;
    * float64 Gram for small layers (m ≤ 384), where the float32 saving is small; else ``"mixed"``.
    """
    if method != "auto":
        return method
    if k >= m_small or (k >= 0.55 * m_small and n_large < 2 * m_small):
        return "svd"
    if m_small <= 384:
        return "gram64"
    return "mixed"


def _check_group(Ws: torch.Tensor, r: int) -> None:
    if Ws.ndim != 3:
        raise LoraxInputError(f"a group of layers must be (B, m, n) or a list of (m, n), got shape {tuple(Ws.shape)}")
    if not Ws.is_floating_point():
        raise LoraxInputError(f"weights must have a floating dtype, got {Ws.dtype}")
    checks.finite("W", Ws)
    checks.rank(r, Ws.shape[1], Ws.shape[2])


def _stack(Ws) -> torch.Tensor:
    if isinstance(Ws, torch.Tensor):
        return Ws if Ws.ndim == 3 else (checks.matrix("W", Ws)[None])
    Ws = list(Ws)
    if not Ws:
        raise LoraxInputError("empty group of layers")
    shapes = {tuple(w.shape) for w in Ws}
    if len(shapes) != 1:
        raise LoraxInputError(f"a group must hold layers of one shape, got {sorted(shapes)}")
    for i, w in enumerate(Ws):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise LoraxInputError(f"W[{i}] must be a floating-point torch.Tensor, got {type(w).__name__}")
    checks.same_device(**{f"W[{i}]": w for i, w in enumerate(Ws)})
    out = torch.empty((len(Ws), *shapes.pop()), dtype=torch.float64, device=Ws[0].device)  # (B, m, n)
    for i, w in enumerate(Ws):
        out[i].copy_(w.detach())  # one float64 copy, the inputs are never written to
    return out


def _run_batched(W: torch.Tensor, r: int, k: int, method: str, workers: int | None) -> list[Bases]:
    """:func:`_bases_batched`, on CPU split over ``workers`` threads of one intra-op thread each.

    LAPACK's ``eigh`` is dominated by a memory-bound tridiagonal reduction that gains little from a
    second thread; two layers reduced side by side, one per core, use the cores better. On CUDA the batch
    goes to the device in one call.
    """
    B = W.shape[0]
    threads = torch.get_num_threads()
    if workers is None:
        workers = min(B, threads) if W.device.type == "cpu" else 1
    workers = max(1, min(int(workers), B))
    if workers == 1:
        return _bases_batched(W, r, k, method)
    from concurrent.futures import ThreadPoolExecutor

    parts = [list(range(B))[i::workers] for i in range(workers)]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda idx: _bases_batched(W[idx], r, k, method), parts))
    finally:
        torch.set_num_threads(threads)
    out: list = [None] * B
    for idx, res in zip(parts, results):
        for i, b in zip(idx, res):
            out[i] = b
    return out


def top_r_bases_group(
    Ws, r: int, *, method: str = "auto", oversample: int | None = None, fallback: bool = True,
    tol: float = TOL, workers: int | None = None,
) -> list[Bases]:
    r"""Certified top-r bases of several same-shaped weights at once (batched GEMMs and ``eigh``).

    Args:
        Ws: ``(B, m, n)`` tensor or a list of ``(m, n)`` tensors, any float dtype (computed in float64,
            the float32 stage of ``"mixed"`` excepted); never modified.
        r: rank, ``1 <= r <= min(m, n)``.
        method: ``"auto"``, ``"mixed"``, ``"gram64"`` or ``"svd"`` (the reference, per layer).
        oversample: p, the Ritz space has k = min(r + p, min(m, n)) columns (default :func:`default_oversample`).
        fallback: recompute with the reference SVD any layer whose bases' adapter-independent bound
            (:func:`_too_loose`) exceeds ``tol / 2``.
        workers: CPU threads working on different layers at once, each with one intra-op thread
            (default: ``min(B, torch.get_num_threads())`` on CPU, 1 on CUDA).

    Returns:
        One :class:`Bases` per layer, float64, on the input's device.
    """
    if method not in BASIS_METHODS:
        raise LoraxInputError(f"method={method!r} is not one of {BASIS_METHODS}")
    W = _stack(Ws)
    _check_group(W, r)
    W = W.detach().to(torch.float64)  # (B, m, n) a copy when the input was not float64; never written to
    B, m, n = W.shape
    if method == "svd":
        return [_reference_bases(W[b], r) for b in range(B)]
    transposed = m > n
    Wg = W.mT if transposed else W  # (B, m', n') with m' <= n'
    m_small = Wg.shape[1]
    p = default_oversample(r) if oversample is None else int(oversample)
    k = min(r + max(p, 0), m_small)
    chosen = _choose(method, m_small, Wg.shape[2], k)
    if chosen == "svd":
        return [_reference_bases(W[b], r) for b in range(B)]
    with _no_tf32():
        out = _run_batched(Wg, r, k, chosen, workers)
    if transposed:  # bases of Wᵀ: swap the roles of U and V
        out = [Bases(*_swap(b)) for b in out]
    if fallback:
        out = [_reference_bases(W[i], r) if _too_loose(b.cert, tol / 2) else b for i, b in enumerate(out)]
    return out


def _swap(b: Bases) -> tuple:
    """Bases of W from those of Wᵀ: U ↔ V, certificate sides swapped, signs re-normalised on the new U."""
    U, V = sign_convention(b.V, b.U)
    c = b.cert
    cert = Certificate(c.method, c.k, c.err_v, c.err_u, c.subspace_v, c.subspace_u, c.gap, c.corrected)
    return U, b.S, V, cert


def _too_loose(c: Certificate, tol: float) -> bool:
    """Adapter-independent test: ‖e_u + e_v‖₂ + subspace_u + subspace_v ≤ tol.

    By Cauchy–Schwarz Σ_i |δσ_i| e_i ≤ ‖ΔΣ_s‖_F ‖e‖₂, so this bounds the relative error of ΔW_s and of
    the target projectors for *every* diagonal adapter; :meth:`LayerPair.bound` checks the actual one.
    """
    vec = float((c.err_u + c.err_v).norm()) if c.err_u.numel() else 0.0
    total = vec + c.subspace_u + c.subspace_v
    return not total <= tol


def top_r_bases(W: torch.Tensor, r: int, **kwargs) -> Bases:
    """Certified top-r bases of one weight ``W (m, n)``; see :func:`top_r_bases_group` for the options."""
    checks.matrix("W", W)
    return top_r_bases_group(W[None], r, **kwargs)[0]

