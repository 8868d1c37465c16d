r"""On-disk cache of the truncated bases :math:`W \approx \bar U \,\mathrm{diag}(\bar S)\, \bar V^\top`.

Transferring an adapter needs the top-r SVD of every adapted base layer, source and target. That is the
expensive part (a full SVD per layer); the adapter itself is cheap. The bases depend only on the base
weight and on r, so they are cached on disk, keyed by

    sha256 of the checkpoint file  ×  weight name  ×  r  ×  compute dtype

and a second adapter transferred onto the same pair of checkpoints reads them back instead of recomputing.

Safety, because a wrong basis silently gives a wrong adapter:

* the key is the checkpoint's *content* hash, never its path, so an edited or replaced file misses;
* every entry stores its key fields and a sha256 of its tensor bytes in the safetensors metadata; an entry
  whose fields or digest do not match (a truncated write, a bit flip, a hash-prefix clash) is ignored and
  recomputed, never trusted;
* entries are written to a temporary name and renamed, so a crash never leaves half an entry; a write
  that fails (read-only directory, full disk: ``OSError`` or safetensors' ``SafetensorError``) is skipped,
  so a full disk only costs speed;
* the bases come from :func:`lorax_ref.svd_topk` (the reference), or with ``fast=True`` from
  :func:`lorax_ref.fast.top_r_bases` (certified within 5e-7 of it, same sign convention); the two kinds
  are stored under different names and never stand in for each other.

Layout: ``<root>/<sha256[:2]>/<sha256>/<readable name>-<name hash>.r<r>.<dtype>[.fast].safetensors``.
The root is ``--cache-dir``, else ``$LORAX_CACHE_DIR/bases``, else ``~/.cache/lorax_ref/bases``.
``$LORAX_CACHE_DIR`` (:func:`cache_root`) is the one variable for everything regenerable this package keeps:
the bases here, the fine-tuned model of the real-task experiment under ``models/``.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .. import checks
from ..linalg import svd_topk

__all__ = ["BasisCache", "cache_root", "default_cache_dir", "CACHE_FORMAT"]

CACHE_FORMAT = "lorax-bases-2"  # bump when svd_topk's conventions change: old entries then miss (2: + σ_{r+1})
ENV_VAR = "LORAX_CACHE_DIR"

_DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32"}


def cache_root() -> Path:
    """``$LORAX_CACHE_DIR`` if set, else ``~/.cache/lorax_ref`` (``$XDG_CACHE_HOME`` respected)."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lorax_ref"


def default_cache_dir() -> Path:
    """Where the basis cache lives when ``--cache-dir`` is not given: ``cache_root() / "bases"``."""
    return cache_root() / "bases"


def _digest(*tensors: torch.Tensor) -> str:
    """sha256 over the raw bytes of CPU tensors (detects truncated or corrupted entries)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class BasisCache:
    """Get-or-compute top-r bases of checkpoint weights, persisted on disk.

    ``BasisCache(None)`` (or ``enabled=False``) computes every time and stores nothing, so callers use one
    code path with or without a cache. ``hits`` / ``misses`` count what happened, ``methods`` how the
    computed ones were made (the CLI reports them). ``fast=True`` computes with the certified fast path
    (:func:`lorax_ref.fast.top_r_bases`: the reference SVD for any layer it cannot certify).
    ``read_only=True`` reads entries but never writes one (a dry run writes nothing).
    """

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True, fast: bool = False,
                 read_only: bool = False):
        self.enabled = enabled and root is not None
        self.root = Path(root).expanduser() if root is not None else None
        self.fast = bool(fast)
        self.read_only = bool(read_only)
        self.hits = 0
        self.misses = 0
        self.methods: dict[str, int] = {}

    # -- keys ------------------------------------------------------------------------------------------
    def path_for(self, sha256: str, name: str, r: int, dtype: torch.dtype) -> Path:
        """Where the entry of (checkpoint sha256, weight name, r, dtype) lives."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"cache key needs a hex sha256, got {sha256!r}")
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]
        name_hash = hashlib.sha256(name.encode()).hexdigest()[:12]  # names differing only in odd characters
        kind = ".fast" if self.fast else ""
        return self.root / sha256[:2] / sha256 / f"{readable}-{name_hash}.r{r}.{_DTYPE_NAMES[dtype]}{kind}.safetensors"

    def _fields(self, sha256: str, name: str, r: int, dtype: torch.dtype) -> dict[str, str]:
        fields = {"format": CACHE_FORMAT, "sha256": sha256, "name": name, "r": str(r), "dtype": _DTYPE_NAMES[dtype]}
        if self.fast:
            fields["bases"] = "fast"
        return fields

    # -- read / write -------------------------------------------------------------------------------------
    def load(self, sha256: str, name: str, r: int, dtype: torch.dtype = torch.float64):
        """The cached ``(U (m, r), S (r,), V (n, r))`` on CPU, or None when absent or not trustworthy."""
        if not self.enabled:
            return None
        path = self.path_for(sha256, name, r, dtype)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                U, S, V, S_next = (f.get_tensor(k) for k in ("U", "S", "V", "S_next"))
        except Exception:  # unreadable entry: recompute (and overwrite) rather than fail or trust it
            return None
        expected = self._fields(sha256, name, r, dtype)
        if any(meta.get(k) != v for k, v in expected.items()):
            return None
        if U.dtype != dtype or U.ndim != 2 or U.shape[1] != r or S.shape != (r,) or V.ndim != 2 or V.shape[1] != r:
            return None
        if S_next.ndim != 1 or S_next.shape[0] > 1:
            return None
        if meta.get("digest") != _digest(U, S, V, S_next):
            return None
        return U, S, V, (float(S_next[0]) if S_next.numel() else None)

    def store(self, sha256: str, name: str, r: int, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor,
              sigma_next: float | None = None) -> None:
        """Write one entry atomically (temporary file + rename); failures to write are not fatal."""
        if not self.enabled or self.read_only:
            return
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        U, S, V = (t.detach().cpu().contiguous().clone() for t in (U, S, V))
        S_next = torch.tensor([] if sigma_next is None else [sigma_next], dtype=S.dtype)  # (0,) or (1,)
        path = self.path_for(sha256, name, r, U.dtype)
        meta = dict(self._fields(sha256, name, r, U.dtype), digest=_digest(U, S, V, S_next))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
            os.close(fd)
            try:
                save_file({"U": U, "S": S, "V": V, "S_next": S_next}, tmp, metadata=meta)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except (OSError, SafetensorError):  # safetensors reports "No space left on device" as its own error
            pass  # a read-only or full disk only costs speed

    # -- the one call transfer code uses ------------------------------------------------------------------
    def bases(
        self,
        sha256: str,
        name: str,
        r: int,
        load_weight: Callable[[], torch.Tensor],
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-r bases of weight ``name``: from disk when cached, else ``svd_topk(load_weight(), r)``
        (``fast.top_r_bases`` with ``fast=True``).

        ``load_weight`` is only called on a miss, so a fully cached transfer never reads the base weights.
        Returns ``U (m, r)``, ``S (r,)``, ``V (n, r)`` in ``dtype`` on ``device``.
        """
        return self.bases_and_next(sha256, name, r, load_weight, dtype, device)[:3]

    def bases_and_next(
        self,
        sha256: str,
        name: str,
        r: int,
        load_weight: Callable[[], torch.Tensor],
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]:
        r""":meth:`bases` and :math:`\sigma_{r+1}`, which tells whether the top-r subspace is unique
        (:func:`lorax_ref.linalg.spectrum_warnings`); None when r = min(m, n) or with ``fast=True`` (the fast
        path does not compute it)."""
        hit = self.load(sha256, name, r, dtype)
        if hit is not None:
            self.hits += 1
            return (*(t.to(device) for t in hit[:3]), hit[3])
        self.misses += 1
        W = load_weight().to(device=device, dtype=dtype)  # (m, n)
        checks.rank(r, *W.shape)
        sigma_next = None
        if self.fast:
            from ..fast import top_r_bases

            b = top_r_bases(W, r)  # certified, else the reference SVD (b.cert.method == "svd")
            U, S, V, method = b.U.to(dtype), b.S.to(dtype), b.V.to(dtype), b.cert.method  # (m, r), (r,), (n, r)
        else:
            k = min(r + 1, *W.shape)  # one value more than kept; the first r columns are svd_topk(W, r)
            U, S, V = svd_topk(W, k)  # (m, k), (k,), (n, k)
            if k > r:
                sigma_next = float(S[r])
            U, S, V, method = U[:, :r].contiguous(), S[:r].contiguous(), V[:, :r].contiguous(), "svd"  # (m, r), (r,), (n, r)
        self.methods[method] = self.methods.get(method, 0) + 1
        self.store(sha256, name, r, U, S, V, sigma_next)
        return U, S, V, sigma_next
