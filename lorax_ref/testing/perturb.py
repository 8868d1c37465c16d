"""Seeded, tiny perturbations of every matrix decomposition: a stand-in for "another CPU".

Two machines running the same notebook differ in the last bits of their floating-point results (other
BLAS kernels, another summation order, another thread count). A stored output is portable only if
the digits it shows survive such differences. :func:`install` wraps the decompositions of torch,
numpy and scipy so that each input matrix ``A`` is replaced by

.. math:: A \\odot (1 + \\epsilon E), \\qquad E_{ij} \\sim \\mathcal N(0, 1) \\text{ (seeded)},
   \\quad \\epsilon = \\max(\\text{rel}, 2\\,u_{\\text{dtype}})

— a relative change of every entry at the rounding level of the input's dtype (:math:`u` is its unit
roundoff; ``rel = 1e-15`` is about 4.5 float64 ulps), the size of what another machine's kernels change.
A quantity whose printed digits change under it is printed with more digits than its conditioning
supports. (A much larger ``rel`` no longer models another machine: it changes the problem, and checks
whose tolerances are derived from float64 round-off, rightly, fail.)

The portability check of the test suite (``tests/test_portability.py``) runs every notebook with this
switch on, through an IPython start-up file, and compares the outputs strictly with the committed ones.
Nothing in :mod:`lorax_ref` calls this module.
"""
from __future__ import annotations

import functools
import hashlib
import itertools

import numpy as np

ENV_VAR = "LORAX_PERTURB"  # "<rel>[:<seed>]", e.g. "1e-15:1"

# (module path, function names): every decomposition the package, its notebooks and their oracles use
TORCH_TARGETS = ("torch.linalg", ("svd", "svdvals", "eigh", "eigvalsh", "qr", "pinv", "lstsq"))
NUMPY_TARGETS = ("numpy.linalg", ("svd", "eigh", "eigvalsh", "qr", "pinv", "lstsq"))
SCIPY_TARGETS = ("scipy.linalg", ("svd", "svdvals", "eigh", "qr", "pinv", "lstsq", "subspace_angles",
                                  "orth", "orthogonal_procrustes"))


def parse(spec: str) -> tuple[float, int]:
    """``"1e-15:3"`` → ``(1e-15, 3)``; the seed defaults to 0."""
    rel, _, seed = spec.partition(":")
    return float(rel), int(seed or 0)


class _Perturber:
    """Perturbs array arguments deterministically: the noise is seeded by ``seed`` and the input's bytes,
    so the same input is always perturbed the same way (a machine's kernels are deterministic too)."""

    def __init__(self, rel: float, seed: int):
        self.rel, self.seed, self.calls = rel, seed, itertools.count()

    def _noise(self, a: np.ndarray) -> np.ndarray:
        digest = hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=8, key=str(self.seed).encode())
        next(self.calls)
        return np.random.default_rng(int.from_bytes(digest.digest(), "little")).standard_normal(a.shape)  # (…)

    def numpy(self, A):
        if not (isinstance(A, np.ndarray) and A.dtype.kind == "f" and A.size):
            return A
        eps = max(self.rel, float(np.finfo(A.dtype).eps))  # machine epsilon = 2u
        return (A * (1 + eps * self._noise(A))).astype(A.dtype, copy=False)

    def torch(self, A):
        import torch

        if not (isinstance(A, torch.Tensor) and A.is_floating_point() and A.numel() and A.layout == torch.strided):
            return A
        eps = max(self.rel, torch.finfo(A.dtype).eps)
        E = torch.from_numpy(self._noise(A.detach().cpu().double().numpy())).to(A.device)  # (…) float64
        return (A.double() * (1 + eps * E)).to(A.dtype)  # (…) in the input's dtype


def _wrap(module, name: str, perturb) -> None:
    fn = getattr(module, name, None)
    if fn is None or getattr(fn, "_lorax_perturbed", False):
        return

    @functools.wraps(fn)
    def wrapped(A, *args, **kwargs):
        return fn(perturb(A), *args, **kwargs)

    wrapped._lorax_perturbed = True
    setattr(module, name, wrapped)


def install(rel: float = 1e-15, seed: int = 0) -> _Perturber:
    """Wrap the decompositions of torch, numpy and scipy (only the first argument is perturbed)."""
    import importlib

    p = _Perturber(rel, seed)
    for (path, names), perturb in ((TORCH_TARGETS, p.torch), (NUMPY_TARGETS, p.numpy), (SCIPY_TARGETS, p.numpy)):
        module = importlib.import_module(path)
        for name in names:
            _wrap(module, name, perturb)
    return p


def install_from_env(environ=None) -> _Perturber | None:
    """:func:`install` when ``$LORAX_PERTURB`` is set (the IPython start-up hook of the check calls this)."""
    import os

    spec = (environ if environ is not None else os.environ).get(ENV_VAR)
    return install(*parse(spec)) if spec else None
