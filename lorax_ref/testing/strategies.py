"""Hypothesis strategies that build well-posed LoRA-X test cases from a chosen spectrum.

Raw random arrays make ill-conditioned matrices whose top-r subspace is barely defined. Every matrix
here is ``W = U diag(s) Vᵀ`` with orthonormal ``U, V`` and singular values ``s`` chosen directly:
condition number up to ``max_cond`` (1e6 by default) and a minimum relative gap between consecutive
values, so the top-r subspace is well separated and an independent SVD (numpy) finds the same one.

Everything is returned as float64 numpy arrays: tests and the conformance kit convert them to the
device, dtype and framework under test. Used by ``tests/`` and by :mod:`lorax_ref.conformance`; the
plain samplers and oracles they build on (no hypothesis needed) are in :mod:`lorax_ref.testing.oracles`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from .oracles import near_identity_rotation, orthonormal, np_top_r_bases  # noqa: F401 — plain samplers and the SVD oracle, re-exported

MAX_DIM = 32
MAX_COND = 1e6
MIN_GAP = 0.05  # s_{i+1} <= (1 - MIN_GAP) · s_i


@st.composite
def spectra(draw, k: int, max_cond: float = MAX_COND, min_gap: float = MIN_GAP) -> np.ndarray:
    """``k`` descending singular values in ``[1/cond, 1]`` with relative gaps of at least ``min_gap``."""
    log_cond = draw(st.floats(0.0, float(np.log(max_cond))))
    steps = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=max(k - 1, 0), max_size=max(k - 1, 0))))  # (k-1,)
    min_step = -np.log1p(-min_gap)
    extra = max(log_cond - (k - 1) * min_step, 0.0)  # what is left after the mandatory gaps
    weights = steps / steps.sum() if steps.size and steps.sum() > 0 else np.full(steps.size, 1.0 / max(steps.size, 1))
    logs = np.concatenate([[0.0], np.cumsum(min_step + extra * weights)])  # (k,)
    return np.exp(-logs)  # (k,) descending, s_0 = 1


def compose(rng: np.random.Generator, s: np.ndarray, m: int, n: int) -> np.ndarray:
    """``U diag(s) Vᵀ (m, n)`` with Haar-random orthonormal ``U (m, k)``, ``V (n, k)``, k = len(s)."""
    k = len(s)
    return (orthonormal(rng, m, k) * s) @ orthonormal(rng, n, k).T  # (m, k)·diag(k) @ (k, n) -> (m, n)


@st.composite
def matrices(draw, m: int, n: int, max_cond: float = MAX_COND, min_gap: float = MIN_GAP, stream: int = 0) -> np.ndarray:
    """An ``(m, n)`` float64 matrix with a controlled spectrum (scaled to a random overall size).

    ``stream`` separates random streams, so two matrices drawn with the same (e.g. shrunk) seed differ.
    """
    s = draw(spectra(min(m, n), max_cond, min_gap))  # (k,)
    rng = np.random.default_rng([draw(st.integers(0, 2**32 - 1)), stream])
    scale = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    return scale * compose(rng, s, m, n)  # (m, n)


@st.composite
def shapes(draw, max_dim: int = MAX_DIM, square: bool | None = None) -> tuple[int, int]:
    """``(m, n)`` with 1 <= m, n <= max_dim; square, rectangular or either (``square=None``)."""
    m = draw(st.integers(1, max_dim))
    if square is None:
        square = draw(st.booleans())
    n = m if square else draw(st.integers(1, max_dim))
    return m, n


@dataclass(frozen=True)
class Case:
    """One LoRA-X layer: source and target bases' matrices, a rank and an adapter."""

    W_s: np.ndarray  # (m_s, n_s)
    W_t: np.ndarray  # (m_t, n_t)
    r: int
    dSigma_s: np.ndarray  # (r,) or (r, r)
    target: str  # "independent", "near", "same", "rotated-in-span", "embedded"
    seed: int


@st.composite
def cases(
    draw,
    same_shape: bool = True,
    targets: tuple[str, ...] = ("independent", "near", "same"),
    full_sigma: bool | None = None,
    max_dim: int = MAX_DIM,
    min_dim: int = 1,
) -> Case:
    """A source layer, a target layer and a LoRA-X adapter.

    ``targets``: ``independent`` (unrelated target), ``near`` (source bases rotated by a small random
    rotation and a perturbed spectrum: a fine-tuned target), ``same`` (target = source). With
    ``same_shape=False`` the target has its own, generally different, shape.
    """
    m, n = draw(shapes(max_dim))
    m, n = max(m, min_dim), max(n, min_dim)
    r = draw(st.integers(1, min(m, n)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    W_s = draw(matrices(m, n))  # (m, n)
    target = draw(st.sampled_from(targets))
    if not same_shape:
        m_t = max(draw(st.integers(r, max(r, max_dim))), min_dim)
        n_t = max(draw(st.integers(r, max(r, max_dim))), min_dim)
        W_t = draw(matrices(m_t, n_t, stream=1))  # (m_t, n_t)
        target = "independent"
    elif target == "same":
        W_t = W_s.copy()
    elif target == "near":
        eps = draw(st.sampled_from([1e-3, 1e-2, 1e-1]))
        k = min(m, n)
        U, s, Vh = np.linalg.svd(W_s, full_matrices=False)  # (m, k), (k,), (k, n)
        s_t = np.sort(s * (1 + 0.2 * eps * rng.uniform(-1, 1, k)))[::-1]  # ±2% at most: gaps stay open
        U_t = near_identity_rotation(rng, m, eps) @ U  # (m, k)
        V_t = near_identity_rotation(rng, n, eps) @ Vh.T  # (n, k)
        W_t = (U_t * s_t) @ V_t.T  # (m, n)
    else:
        W_t = draw(matrices(m, n, stream=1))  # (m, n)
    if full_sigma is None:
        full_sigma = draw(st.booleans())
    dSigma_s = rng.standard_normal((r, r) if full_sigma else r)  # (r, r) or (r,)
    return Case(W_s=W_s, W_t=W_t, r=r, dSigma_s=dSigma_s, target=target, seed=seed)
