r"""Independent numpy/scipy oracles (float64), the numpy ↔ torch converters and one relative error.

One set, shared by the test suite, the conformance kit and the notebooks. Nothing here calls a
function of :mod:`lorax_ref`: every expected value is written again with numpy (explicit projector
matrices, ``lstsq`` maps, scipy's principal angles), so a check against these is never a number
verified against itself. Needs numpy, scipy and torch only (no hypothesis): the plain random samplers
(:func:`orthonormal`, :func:`near_identity_rotation`) live here and the hypothesis strategies of
:mod:`lorax_ref.testing.strategies` build on them.
"""
from __future__ import annotations

import os

import numpy as np
import scipy.linalg
import torch

# ---- numpy ↔ torch ---------------------------------------------------------------------------------


def t64(x, device: torch.device | str | None = None) -> torch.Tensor:
    """numpy (or a number) → a float64 tensor on ``device``.

    ``None``: the device ``LORAX_DEVICE`` names (:func:`lorax_ref.default_device`) when it is set, else
    the CPU — the device the notebooks run on.
    """
    if device is None:
        from ..device import default_device  # the package root imports nothing from here: no cycle
        device = default_device() if os.environ.get("LORAX_DEVICE") else "cpu"
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64, device=device)


def np64(x) -> np.ndarray:
    """A tensor (any device, any dtype), array or number → numpy float64, for the independent checks."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel(a, b, scale: float | None = None) -> float:
    """Relative Frobenius distance ``‖a − b‖_F / scale``, ``scale = ‖b‖_F`` by default (tensors are
    converted with :func:`np64`; a zero scale counts as the smallest positive float, so ``a = b = 0`` gives 0)."""
    a, b = np64(a), np64(b)
    scale = np.linalg.norm(b) if scale is None else scale
    return float(np.linalg.norm(a - b) / max(scale, 1e-300))


# ---- random matrices -----------------------------------------------------------------------------------


def orthonormal(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    """``(m, k)`` with orthonormal columns, Haar-distributed (QR of a Gaussian, signs fixed by R)."""
    Q, R = np.linalg.qr(rng.standard_normal((m, k)))  # (m, k), (k, k)
    return Q * np.sign(np.diag(R))  # (m, k)


def near_identity_rotation(rng: np.random.Generator, m: int, eps: float) -> np.ndarray:
    """An ``(m, m)`` orthogonal matrix within O(eps) of the identity."""
    Q, R = np.linalg.qr(np.eye(m) + eps * rng.standard_normal((m, m)))  # (m, m), (m, m)
    return Q * np.sign(np.diag(R))  # (m, m); the sign fix keeps Q close to I


def base_layer(rng: np.random.Generator, m: int, n: int, decay: float = 0.9) -> np.ndarray:
    """A base weight ``(m, n)`` with the geometric spectrum 1, decay, decay², …: a well-separated top-r subspace."""
    k = min(m, n)
    return (orthonormal(rng, m, k) * decay ** np.arange(k)) @ orthonormal(rng, n, k).T  # (m, k)·diag(k) @ (k, n)


# ---- singular bases -------------------------------------------------------------------------------------


def np_bases(W, r: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's own top-r ``U (m, r)``, ``V (n, r)`` of ``W``, with numpy's signs."""
    U, _, Vh = np.linalg.svd(np.asarray(W, dtype=np.float64), full_matrices=False)  # (m, k), (k,), (k, n)
    return U[:, :r], Vh[:r].T  # (m, r), (n, r)


def np_top_r_bases(W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's top-r ``U (m, r)``, ``V (n, r)``: the independent oracle for :func:`lorax_ref.svd_topk`.

    Applies the documented sign convention (largest-|·| entry of each u_i positive, v_i flipped with it),
    written here in numpy independently of :func:`lorax_ref.linalg.sign_convention`.
    """
    U, _, Vh = np.linalg.svd(W, full_matrices=False)  # (m, k), (k,), (k, n)
    U, V = U[:, :r], Vh[:r].T  # (m, r), (n, r)
    signs = np.sign(U[np.abs(U).argmax(axis=0), np.arange(r)])  # (r,)
    signs[signs == 0] = 1.0
    return U * signs, V * signs


# ---- the equations, written again ---------------------------------------------------------------------


def sigma_matrix(dSigma: np.ndarray) -> np.ndarray:
    """``ΔΣ`` as an ``(r, r)`` matrix: a diagonal ``(r,)`` is spread out, a full ``(r, r)`` is kept."""
    return np.diag(dSigma) if dSigma.ndim == 1 else dSigma  # (r, r)


def np_project(dW: np.ndarray, U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Eq. (2)/(3) with explicit projector matrices: ``(U Uᵀ) ΔW (V Vᵀ)``."""
    return (U @ U.T) @ dW @ (V @ V.T)  # (m, m) @ (m, n) @ (n, n)


def np_lstsq_map(B_s: np.ndarray, B_t: np.ndarray) -> np.ndarray:
    """Minimum-norm least squares of ``P B_s = B_t``: solve ``B_sᵀ Pᵀ = B_tᵀ`` with lstsq."""
    return np.linalg.lstsq(B_s.T, B_t.T, rcond=None)[0].T  # (m_t, m_s)


def np_mismatch(dW_s, U_s, V_s, U_t, V_t) -> np.ndarray:
    """§4.2.2 written out with lstsq maps."""
    P, Q = np_lstsq_map(U_s, U_t), np_lstsq_map(V_s, V_t)  # (m_t, m_s), (n_t, n_s)
    U_al, V_al = P @ U_s, Q @ V_s  # (m_t, r), (n_t, r)
    C_s = U_s.T @ dW_s @ V_s  # (r, r)
    return U_t @ (U_t.T @ U_al @ C_s @ V_al.T @ V_t) @ V_t.T  # (m_t, n_t)


def np_phi(U_a, U_b) -> float:
    """Eq. (4) as the mean squared cosine of scipy's principal angles."""
    return float(np.mean(np.cos(scipy.linalg.subspace_angles(U_a, U_b)) ** 2))
