"""Seeded synthetic layers for the tests' checkpoints: exact singular values, reproducible from a seed.

Torch float64, generated with a ``torch.Generator`` so that a seed gives the same matrix on every machine
(QR of a Gaussian matrix is exact up to round-off; the tests compare subspaces, never raw digits).
"""
from __future__ import annotations

import math

import torch


def orth(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    """An (n, k) matrix with orthonormal columns: the Q of a Gaussian matrix drawn from ``g``."""
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]  # (n, k)


def spectral(m: int, n: int, seed: int, decay: float = 0.8) -> torch.Tensor:
    r"""An (m, n) layer :math:`Q_1\,\mathrm{diag}(10\,d^i)\,Q_2^\top` with separated singular values
    (decay ``d`` < 1), so its top-r bases are well defined for every r."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    Q1, Q2 = orth(g, m, k), orth(g, n, k)  # (m, k), (n, k)
    return (Q1 * (10.0 * decay ** torch.arange(k, dtype=torch.float64))) @ Q2.T  # (m, n)


def near(W: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """``W`` plus seeded Gaussian noise of relative size ``eps`` per entry (a nearby target layer)."""
    g = torch.Generator().manual_seed(seed)
    return W + eps * W.norm() / math.sqrt(W.numel()) * torch.randn(W.shape, generator=g, dtype=W.dtype)


def rotation(n: int, seed: int) -> torch.Tensor:
    """A seeded (n, n) orthogonal matrix (a change of coordinates of a layer's input or output)."""
    return orth(torch.Generator().manual_seed(seed), n, n)  # (n, n)
