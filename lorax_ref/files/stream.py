r"""Transfer a LoRA-X adapter between two checkpoint files with the certified fast path (:mod:`lorax_ref.fast`),
a few weights in memory at a time."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from ..fast.pair import pair_bases_group, transfer_fast
from ..fast.solver import TOL

# ---------------------------------------------------------------------------------------------------
# Streaming over checkpoints
# ---------------------------------------------------------------------------------------------------


def stream_transfer(
    source, target, adapter: Mapping[str, torch.Tensor], r: int | None = None, *, group: int = 1,
    method: str = "auto", tol: float = TOL, dense: bool = False, device: str | torch.device = "cpu",
) -> Iterator[tuple[str, torch.Tensor, float, str]]:
    r"""Transfer a LoRA-X adapter between two checkpoints, reading a few weights at a time.

    ``adapter`` maps weight names (``"...to_q.weight"``) to :math:`\Delta\Sigma_s`. Consecutive layers of
    one shape are batched ``group`` at a time (1 suits a CPU: the source and target weights of a layer
    already make a batch of two; raise it on CUDA); at most ``2·group`` base weights are in memory at
    once, so peak memory does not grow with the checkpoint. Paths to ``.safetensors`` files are read with
    :func:`lorax_ref.files.checkpoints.open_checkpoint` with ``stream=True`` (no memory map), or pass opened
    checkpoints.

    Yields:
        ``(name, result, bound, method)`` with ``result`` the compact ``ΔΣ_{t←s} (r, r)`` (or the dense
        ``ΔW_{t←s}`` with ``dense=True``), the certified relative bound, and the method that produced it.
    """
    own_s = not hasattr(source, "get")
    own_t = not hasattr(target, "get")
    ck_s = _open(source) if own_s else source
    ck_t = _open(target) if own_t else target
    try:
        names = list(adapter)
        for batch in _shape_runs(names, ck_s, group):
            shape = tuple(ck_s.shape(batch[0]))
            Ws_s = [ck_s.get(nm).to(device) for nm in batch]  # one layer at a time from disk
            Ws_t = [ck_t.get(nm, shape=shape).to(device) for nm in batch]
            rr = r if r is not None else int(adapter[batch[0]].shape[0])
            pairs = pair_bases_group(Ws_s, Ws_t, rr, method=method, tol=tol)
            _trim_heap()
            for nm, pair, w_s, w_t in zip(batch, pairs, Ws_s, Ws_t):
                res, pair, bound = transfer_fast(w_s, w_t, adapter[nm].to(device), rr, pair=pair, tol=tol, dense=dense)
                yield nm, res, bound, pair.source.cert.method + "/" + pair.target.cert.method
            del Ws_s, Ws_t, pairs
    finally:
        if own_s:
            ck_s.close()
        if own_t:
            ck_t.close()


def _open(spec):
    """A path or packaged alias → a checkpoint; ``.safetensors`` files are read without a memory map."""
    from .checkpoints import open_checkpoint

    return open_checkpoint(spec, stream=True)


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps large freed blocks otherwise; no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _shape_runs(names: Sequence[str], ck, group: int) -> Iterable[list[str]]:
    """Consecutive names of one shape, in chunks of at most ``group``."""
    run: list[str] = []
    shape = None
    for nm in names:
        s = tuple(ck.shape(nm))
        if run and (s != shape or len(run) >= group):
            yield run
            run = []
        run.append(nm)
        shape = s
    if run:
        yield run

