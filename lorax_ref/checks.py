"""Input checks shared by every equation.

Each check raises :class:`~lorax_ref.errors.LoraxInputError` with a message that names the argument
and the offending shape, dtype or value. The equations run them first, so a mistake surfaces as one
readable line instead of a broadcast that silently succeeds or a deep torch traceback.

Inputs are checked once, where they enter the package: :func:`checked` runs a function's checks before its
body, and the body alone (``f.unchecked``) is what other equations call with inputs already checked, so a
tensor is scanned for NaN or tested for orthonormality once however deep the call goes. The last section
holds the argument check of each equation of :mod:`lorax_ref.core` (``delta_args`` for Eq. (1), ...).
"""
from __future__ import annotations

import functools
import inspect
import numbers
import os
from typing import Callable

import torch

from .errors import LoraxInputError

# Largest tolerated entry of |UᵀU − I| for a "column-orthonormal" basis, by dtype. Loose enough for
# bases computed in float32 and cast up, tight enough to catch a Vh passed as V or an unnormalised B.
ORTHO_TOL = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 6e-2,
}


def checked(validate: Callable) -> Callable:
    """Decorator: ``validate`` checks the arguments, then the decorated body runs on them.

    ``validate`` is called with the arguments in the body's order (defaults filled in) and raises
    :class:`LoraxInputError`; it may return a dict of normalised arguments (e.g. a threshold as a float),
    which replace the given ones. The body stays reachable as ``f.unchecked``, for callers inside the
    package whose inputs are already checked.
    """

    def decorate(body: Callable) -> Callable:
        signature = inspect.signature(body)

        @functools.wraps(body)
        def public(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            normalised = validate(*bound.args)
            if normalised:
                bound.arguments.update(normalised)
            return body(*bound.args)

        public.unchecked = body
        return public

    return decorate


def _shape(x: torch.Tensor) -> str:
    return str(tuple(x.shape))


def dense(name: str, x: torch.Tensor) -> torch.Tensor:
    """A tensor that holds its values: not a meta tensor (shape only), not sparse or nested."""
    if x.is_meta:
        raise LoraxInputError(f"{name} is a meta tensor (shape {_shape(x)}, no values); load its values first")
    if x.layout != torch.strided:
        raise LoraxInputError(f"{name} has layout {x.layout}; pass a dense tensor ({name}.to_dense())")
    return x


def matrix(name: str, x, check_finite: bool = True) -> torch.Tensor:
    """A finite, floating-point, 2-D tensor (``check_finite=False``: everything but the NaN/Inf scan,
    for callers that first check that the work fits in memory)."""
    if not isinstance(x, torch.Tensor):
        raise LoraxInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    dense(name, x)
    if x.ndim != 2:
        raise LoraxInputError(f"{name} must be 2-D (a matrix), got shape {_shape(x)}")
    if not x.is_floating_point():
        raise LoraxInputError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.numel() == 0:
        raise LoraxInputError(f"{name} is empty, shape {_shape(x)}")
    if check_finite:
        finite(name, x)
    return x


def finite(name: str, x: torch.Tensor) -> None:
    """No NaN or Inf anywhere in ``x``."""
    # One reduction first (15x cheaper than an element-wise test): a NaN or Inf anywhere makes the sum
    # non-finite. Only then count them, which also clears a sum that merely overflowed.
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(bad.sum()) - n_nan
        raise LoraxInputError(f"{name} contains {n_nan} NaN and {n_inf} Inf entries (shape {_shape(x)})")


def rank(r, m: int, n: int, name: str = "r") -> int:
    """An integer rank ``1 <= r <= min(m, n)``."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise LoraxInputError(f"{name} must be an int, got {type(r).__name__} {r!r}")
    if not 1 <= r <= min(m, n):
        raise LoraxInputError(f"{name}={r} is out of range: need 1 <= {name} <= min(m, n) = {min(m, n)} for a {m}x{n} matrix")
    return r


def threshold(tau, name: str = "threshold") -> float | None:
    """The Eq. (4) gate threshold: None (no gate) or a real number in [0, 1] (Φ lies in [0, 1])."""
    if tau is None:
        return None
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise LoraxInputError(f"{name} must be None or a number in [0, 1], got {type(tau).__name__} {tau!r}")
    value = float(tau)
    if not 0.0 <= value <= 1.0:  # also refuses NaN, which would silently disable the gate
        raise LoraxInputError(f"{name}={value!r} is out of range: Φ lies in [0, 1], so the gate needs 0 <= {name} <= 1")
    return value


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: the driver's count; CPU: MemAvailable, capped by a cgroup limit)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # a container's limit is lower than what the host reports
        with open("/sys/fs/cgroup/memory.max") as fh_max, open("/sys/fs/cgroup/memory.current") as fh_cur:
            limit = fh_max.read().strip()
            if limit != "max":
                left = int(limit) - int(fh_cur.read().strip())
                free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def fits_in_memory(what: str, nbytes: int, device: torch.device) -> None:
    """Refuse work whose buffers cannot fit in the free memory of ``device``, before allocating them."""
    free = _available_bytes(torch.device(device))
    if free is not None and nbytes > free:
        raise LoraxInputError(
            f"{what} needs about {_gb(nbytes)} of memory, but only {_gb(free)} is free on {device}")


def _gb(nbytes: int | float) -> str:
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3g} MB"


def basis(name: str, U, rows: int | None = None) -> torch.Tensor:
    """A column-orthonormal basis ``U (m, r)``: ``UᵀU = I_r`` to :data:`ORTHO_TOL`."""
    matrix(name, U)
    m, r = U.shape
    if r > m:
        raise LoraxInputError(f"{name} has more columns than rows, shape {_shape(U)}: a basis is (m, r) with r <= m; was Vh passed for V?")
    if rows is not None and m != rows:
        raise LoraxInputError(f"{name} has {m} rows, expected {rows} (shape {_shape(U)})")
    work = U.to(torch.promote_types(U.dtype, torch.float32))  # fp16 Gram matrices lose the check itself
    err = (work.T @ work - torch.eye(r, dtype=work.dtype, device=work.device)).abs().max().item()  # (r, r)
    tol = ORTHO_TOL.get(U.dtype, 1e-4)
    if err > tol:
        raise LoraxInputError(
            f"{name} (shape {_shape(U)}) is not column-orthonormal: max |{name}ᵀ{name} - I| = {err:.3g} > {tol:g}; "
            f"pass the top-r left/right singular vectors as columns (V, not Vh)"
        )
    return U


def same_device(**tensors: torch.Tensor) -> torch.device | None:
    """All tensors on one device; data is never moved between devices behind the user's back.

    Called before the value checks, so a mixed-device call fails here rather than inside torch.
    Arguments that are not tensors are skipped: the type checks report them.
    """
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if not devices:
        return None
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise LoraxInputError(f"inputs are on different devices ({listing}); move them to one device first")
    return next(iter(devices.values()))


def same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    """All tensors of one dtype; mixed precision is a choice the caller makes explicitly."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{k} {v}" for k, v in dtypes.items())
        raise LoraxInputError(f"inputs have different dtypes ({listing}); cast them to one dtype first")
    return next(iter(dtypes.values()))


def same_rank(**bases: torch.Tensor) -> int:
    """Bases with the same number of columns r."""
    ranks = {name: b.shape[1] for name, b in bases.items()}
    if len(set(ranks.values())) > 1:
        listing = ", ".join(f"{k} has r={v}" for k, v in ranks.items())
        raise LoraxInputError(f"bases must share the rank r ({listing})")
    return next(iter(ranks.values()))


def sigma(name: str, dSigma, r: int) -> torch.Tensor:
    """``ΔΣ`` given as a diagonal ``(r,)`` or a full ``(r, r)`` matrix."""
    if not isinstance(dSigma, torch.Tensor):
        raise LoraxInputError(f"{name} must be a torch.Tensor, got {type(dSigma).__name__}")
    dense(name, dSigma)
    if not dSigma.is_floating_point():
        raise LoraxInputError(f"{name} must have a floating dtype, got {dSigma.dtype}")
    if tuple(dSigma.shape) not in {(r,), (r, r)}:
        raise LoraxInputError(f"{name} has shape {_shape(dSigma)}, expected ({r},) (diagonal) or ({r}, {r}) for rank r={r}")
    finite(name, dSigma)
    return dSigma


def as_full_sigma(dSigma: torch.Tensor) -> torch.Tensor:
    """A diagonal ``(r,)`` becomes ``diag(dSigma) (r, r)``; a full matrix is returned as is."""
    return torch.diag(dSigma) if dSigma.ndim == 1 else dSigma


# ---------------------------------------------------------------------------------------------------
# The arguments of each equation of lorax_ref.core (run by @checked before the equation's body)
# ---------------------------------------------------------------------------------------------------


def bases(U: torch.Tensor, V: torch.Tensor, suffix: str, m: int | None = None, n: int | None = None) -> int:
    """Check a pair of bases ``U (m, r)``, ``V (n, r)`` of one layer; returns r."""
    basis("U" + suffix, U, rows=m)
    basis("V" + suffix, V, rows=n)
    return same_rank(**{"U" + suffix: U, "V" + suffix: V})


def delta_args(U_s, dSigma_s, V_s) -> None:
    """Eq. (1): source bases and ``dSigma_s`` of their rank."""
    same_device(U_s=U_s, dSigma_s=dSigma_s, V_s=V_s)
    sigma("dSigma_s", dSigma_s, bases(U_s, V_s, "_s"))
    same_dtype(U_s=U_s, dSigma_s=dSigma_s, V_s=V_s)


def projection_args(dW, U, V) -> None:
    """Eq. (2): an update ``dW (m, n)`` and bases of its two sides."""
    same_device(dW=dW, U=U, V=V)
    matrix("dW", dW)
    bases(U, V, "", *dW.shape)
    same_dtype(dW=dW, U=U, V=V)


def same_dim_args(dW_s, U_t, V_t) -> None:
    """Eq. (3): an update and target bases of a layer of the same shape."""
    same_device(dW_s=dW_s, U_t=U_t, V_t=V_t)
    matrix("dW_s", dW_s)
    bases(U_t, V_t, "_t")  # a Vh passed as V is named as such before shapes are compared
    same_dtype(dW_s=dW_s, U_t=U_t, V_t=V_t)
    m, n = dW_s.shape
    m_t, n_t = U_t.shape[0], V_t.shape[0]
    if (m, n) != (m_t, n_t):
        raise LoraxInputError(
            f"same-dimension transfer (Eq. (3)) needs the target layer to have the source shape: dW_s is "
            f"{m}x{n} but U_t, V_t describe a {m_t}x{n_t} layer; use transfer_mismatch (§4.2.2) for different shapes"
        )


def rotation_args(U_t, U_s, dSigma_s, V_s, V_t) -> None:
    """Eq. (3) rotation form: source and target bases of layers of one shape, ``dSigma_s`` of the source rank."""
    same_device(U_t=U_t, U_s=U_s, dSigma_s=dSigma_s, V_s=V_s, V_t=V_t)
    r_s = bases(U_s, V_s, "_s")
    bases(U_t, V_t, "_t", U_s.shape[0], V_s.shape[0])
    sigma("dSigma_s", dSigma_s, r_s)
    same_dtype(U_t=U_t, U_s=U_s, dSigma_s=dSigma_s, V_s=V_s, V_t=V_t)


def copy_args(U_t, dSigma_s, V_t) -> None:
    """Table 5 ablation: target bases and ``dSigma_s`` of their rank."""
    same_device(U_t=U_t, dSigma_s=dSigma_s, V_t=V_t)
    sigma("dSigma_s", dSigma_s, bases(U_t, V_t, "_t"))
    same_dtype(U_t=U_t, dSigma_s=dSigma_s, V_t=V_t)


def alignment_args(U_s, V_s, U_t, V_t) -> None:
    """§4.2.2 alignment maps: source and target bases of one rank."""
    same_device(U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t)
    bases(U_s, V_s, "_s")
    bases(U_t, V_t, "_t")
    same_rank(U_s=U_s, U_t=U_t)
    same_dtype(U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t)


def mismatch_args(dW_s, U_s, V_s, U_t, V_t) -> None:
    """§4.2.2: a source update, its bases, and target bases of the same rank."""
    same_device(dW_s=dW_s, U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t)
    matrix("dW_s", dW_s)
    bases(U_s, V_s, "_s", *dW_s.shape)
    bases(U_t, V_t, "_t")
    same_rank(U_s=U_s, U_t=U_t)
    same_dtype(dW_s=dW_s, U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t)


def similarity_args(U_a, U_b) -> None:
    """Eq. (4): two bases of one space."""
    same_device(U_a=U_a, U_b=U_b)
    basis("U_a", U_a)
    basis("U_b", U_b, rows=U_a.shape[0])
    same_dtype(U_a=U_a, U_b=U_b)


def lora_args(B, A, U_t, V_t) -> None:
    """Eq. (3) low-rank form: LoRA factors ``B (m, k)``, ``A (k, n)`` and target bases of that layer."""
    same_device(B=B, A=A, U_t=U_t, V_t=V_t)
    matrix("B", B)
    matrix("A", A)
    if B.shape[1] != A.shape[0]:
        raise LoraxInputError(f"LoRA factors do not chain: B is {tuple(B.shape)} and A is {tuple(A.shape)} (need B (m, k), A (k, n))")
    bases(U_t, V_t, "_t", B.shape[0], A.shape[1])
    same_dtype(B=B, A=A, U_t=U_t, V_t=V_t)
