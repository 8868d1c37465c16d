r"""Conformance kit: check anyone's LoRA-X implementation, equation by equation.

Point it at your own function and an equation label of :data:`lorax_ref.EQUATIONS`::

    from lorax_ref.conformance import check
    result = check(my_transfer, equation="Eq. (3)")     # or its slug "eq3", or "transfer_same_dim"
    print(result)                                       # one row per check; result.passed, result.rows

or from a shell: ``python -m lorax_ref verify my_module.py:my_transfer --equation eq3``.

**The calling convention.** The candidate is called like the reference function of that equation
(same positional arguments, same order; :func:`signatures` lists them) with float64 inputs: torch
tensors on the CPU by default. :class:`Adapter` changes that: ``framework="numpy"`` passes numpy arrays,
``bases="Vh"`` passes every right basis transposed, ``(r, n)`` as ``torch.linalg.svd`` returns it,
``device="cuda"`` moves tensors, and ``call(func, inputs)`` wires any other signature (``inputs`` maps
the reference's argument names to converted values). Outputs may be torch tensors, numpy arrays or
Python numbers; a candidate of ``Layer transfer`` may return ``dW_t`` or ``(dW_t, anything)``.

**What is checked.** Per equation: the golden cases of ``data/golden/lorax_golden_v1.json`` (generated
from the reference by ``scripts/make_golden.py``), then properties on hypothesis-generated layers
(:mod:`lorax_ref.testing.strategies`) whose expected values are computed independently here with
numpy/scipy in float64 — never by calling lorax_ref's own function. A failing property is shrunk to
the smallest failing input hypothesis finds; the row shows it with the observed and expected values and,
where it recognises one, the likely mistake (a constant factor such as a forgotten α/r, a transpose, a
no-op). When checks fail, the kit re-runs them under the other conventions (numpy ↔ torch, V ↔ Vh)
and says whether it found a *convention mismatch* (some convention passes everything) or a *wrong
formula* (none does).

**Time limit per call: a worker thread, not a subprocess.** Calls run in one persistent daemon thread
and the kit waits ``timeout`` seconds for each. A thread keeps every candidate callable as it is —
closures and lambdas from a notebook, functions holding CUDA tensors — without pickling, and costs well
under a millisecond per call (hypothesis makes hundreds); a subprocess per call would cost far more, and
forking a process that has initialised torch/OpenMP/CUDA is unsafe. The price: a thread cannot be
killed. On a timeout the kit raises an exception inside the thread (this stops pure-Python loops),
reports the candidate as hung and calls it no more; a hang inside C code (a huge SVD, a blocking wait)
keeps its daemon thread until the process exits. While checking, torch runs single-threaded (restored
afterwards): the kit's matrices are at most 16×16.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.linalg
import torch
from hypothesis import HealthCheck, Phase, Verbosity, assume, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from .errors import LoraxInputError
from .registry import EQUATIONS, lookup, slug
from .testing.strategies import cases, matrices, orthonormal, top_r_bases

GOLDEN_PATH = Path(__file__).parent / "data" / "golden" / "lorax_golden_v1.json"
DEFAULT_MAX_EXAMPLES = 25  # per property; hypothesis then shrinks a failure
DEFAULT_TIMEOUT = 5.0  # seconds per call; every call of the kit is on matrices of at most 16×16
DEFAULT_SHRINK_BUDGET = 1.0  # seconds of shrinking per failing property
MAX_DIM = 16  # largest m, n of a generated layer: mistakes show on small layers, and draws cost ~ size
MIN_DIM = 2  # smallest m, n: on a 1×1 layer every wrong value is "a constant factor" off, which explains nothing
TOL = 1e-9  # float64, relative to the size of the expected value (or of the update)
TOL_SVD = 1e-6  # for candidates that compute their own SVD (Layer transfer): spectra gaps are >= 5%


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One check: ``passed`` is True, False, or None (skipped, with the reason in ``message``)."""

    id: str
    name: str
    passed: bool | None
    message: str = ""
    example: str | None = None  # the smallest failing input, described
    observed: str | None = None
    expected: str | None = None
    inputs: dict | None = None  # that input as numpy arrays (reference names, V convention)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("id", "name", "passed", "message", "example", "observed", "expected")}
        d["status"] = self.status
        return d


@dataclass
class Result:
    """Everything :func:`check` found; ``str(result)`` is the report, one row per check."""

    equation: str
    candidate: str
    adapter: "Adapter"
    rows: list[Row]
    diagnosis: str  # "pass", "convention mismatch", "wrong formula" or "does not run"
    diagnosis_message: str
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(row.passed is not False for row in self.rows)

    @property
    def failed(self) -> list[Row]:
        return [row for row in self.rows if row.passed is False]

    def row(self, id: str) -> Row:
        for r in self.rows:
            if r.id == id:
                return r
        raise KeyError(f"no check {id!r}; checks: {[r.id for r in self.rows]}")

    def as_dict(self) -> dict:
        return {
            "equation": self.equation,
            "slug": slug(self.equation),
            "candidate": self.candidate,
            "adapter": self.adapter.describe(),
            "passed": self.passed,
            "diagnosis": self.diagnosis,
            "diagnosis_message": self.diagnosis_message,
            "rows": [r.as_dict() for r in self.rows],
        }

    def summary(self) -> str:
        """One line: the verdict and the ids of the failing checks."""
        if self.passed:
            return f"PASS  {len(self.rows)} checks"
        return f"FAIL  {', '.join(r.id for r in self.failed)} — {self.diagnosis}"

    def __str__(self) -> str:
        spec = SPECS[self.equation]
        lines = [
            f"{self.equation} [{slug(self.equation)}] — candidate {self.candidate}",
            f"  adapter: {self.adapter.describe()}",
            f"  calls candidate{spec.signature}",
        ]
        width = max(len(r.id) for r in self.rows) if self.rows else 0
        for r in self.rows:
            lines.append(f"  {r.status}  {r.id:<{width}}  {r.name}")
            pad = " " * (8 + width)
            if r.passed is not True and r.message:
                lines += [pad + line for line in r.message.splitlines()]
            if r.example:
                lead = "failing input: " if r.id == "golden" else "smallest failing input: "
                lines.append(pad + lead + r.example.splitlines()[0])
                lines += [pad + "  " + line for line in r.example.splitlines()[1:]]
            if r.observed is not None:
                lines.append(pad + "observed: " + r.observed)
            if r.expected is not None:
                lines.append(pad + "expected: " + r.expected)
        n_fail = len(self.failed)
        if self.passed:
            lines.append(f"  verdict: PASS — {self.diagnosis_message}")
        else:
            lines.append(f"  verdict: FAIL ({n_fail} of {len(self.rows)} checks failed) — {self.diagnosis}: {self.diagnosis_message}")
        return "\n".join(lines)

    __repr__ = __str__


# ---------------------------------------------------------------------------------------------------
# Adapter: how the candidate wants its inputs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """The calling convention of a candidate.

    ``framework``: ``"torch"`` (float64 tensors, default) or ``"numpy"`` (float64 arrays).
    ``bases``: ``"V"`` — right bases as columns ``V (n, r)``, the paper's and lorax_ref's convention —
    or ``"Vh"`` — transposed, ``(r, n)``, as ``torch.linalg.svd``/``np.linalg.svd`` return them.
    ``device``: torch device for the inputs (outputs are brought back to the CPU for comparison).
    ``call``: optional ``call(func, inputs) -> output`` for a candidate with another signature;
    ``inputs`` is a dict keyed by the reference's argument names, already converted.
    """

    framework: str = "torch"
    bases: str = "V"
    device: str = "cpu"
    call: Callable | None = None

    def __post_init__(self):
        if self.framework not in ("torch", "numpy"):
            raise LoraxInputError(f"Adapter framework={self.framework!r}: expected 'torch' or 'numpy'")
        if self.bases not in ("V", "Vh"):
            raise LoraxInputError(f"Adapter bases={self.bases!r}: expected 'V' (n, r) or 'Vh' (r, n)")
        if self.call is not None and not callable(self.call):
            raise LoraxInputError(f"Adapter call must be callable, got {type(self.call).__name__}")

    def with_(self, **changes) -> "Adapter":
        return Adapter(**{**self.__dict__, **changes})

    def describe(self) -> str:
        kind = "torch float64 tensors" + (f" on {self.device}" if self.device != "cpu" else "") if self.framework == "torch" else "numpy float64 arrays"
        bases = "right bases as V (n, r)" if self.bases == "V" else "right bases as Vh (r, n)"
        hook = f", through {getattr(self.call, '__name__', 'a call hook')}()" if self.call else ""
        return f"{kind}, {bases}{hook}"


# ---------------------------------------------------------------------------------------------------
# Calling a candidate: conversion, time limit, output checks
# ---------------------------------------------------------------------------------------------------


class _CandidateTimeout(BaseException):
    """Raised inside a hung candidate's thread to stop a pure-Python loop."""


@dataclass
class CallError:
    """Why a call gave no usable value: raised, hung, mutated, type, shape or nonfinite."""

    kind: str
    message: str


def _interrupt(thread: threading.Thread) -> None:
    """Best effort: raise _CandidateTimeout in ``thread`` (works between bytecodes, not inside C)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_CandidateTimeout))


class _Worker:
    """One persistent daemon thread that runs the candidate's calls, each with a time limit.

    Persistent because a thread per call costs a millisecond (torch sets up its thread state for each
    new thread) and hypothesis makes hundreds of calls. After a timeout the thread is abandoned.
    """

    def __init__(self):
        self._tasks: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _loop(tasks: queue.Queue):
        while True:
            task = tasks.get()
            if task is None:
                return
            fn, box, done = task
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 — anything the candidate raises is a finding
                box["error"] = exc
            done.set()

    def run(self, fn: Callable[[], Any], timeout: float) -> tuple[str, Any]:
        """``("ok", value)``, ``("raised", exc)`` or ``("hung", None)``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(self._tasks,), name="lorax-conformance-candidate",
                                            daemon=True)
            self._thread.start()
        box: dict[str, Any] = {}
        done = threading.Event()
        self._tasks.put((fn, box, done))
        if not done.wait(timeout):
            _interrupt(self._thread)  # stops a pure-Python loop; a hang inside C code keeps the thread
            done.wait(0.2)
            self._tasks.put(None)  # if it ever comes back, it exits
            self._tasks, self._thread = queue.Queue(), None  # abandoned: a later run() starts a fresh one
            return "hung", None
        if "error" in box:
            return "raised", box["error"]
        return "ok", box.get("value")

    def close(self):
        if self._thread is not None:
            self._tasks.put(None)
            # Wait for it to finish: a thread still tearing down torch state while the interpreter exits
            # aborts the process ("terminate called without an active exception", ~3 % of runs under load).
            self._thread.join(timeout=10)
            self._thread = None


@contextlib.contextmanager
def _single_threaded_torch():
    """torch intra-op threads = 1 while checking, restored afterwards.

    Every matrix of the kit is at most 16×16: parallel kernels only add synchronisation, and on a busy
    machine a parallel region waiting for a descheduled thread made one 32×32 call take ~0.9 s
    instead of 1 ms (measured on 2 shared cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _to_numpy(x) -> np.ndarray:
    """A candidate's output as a float64 numpy array; TypeError for anything that is not numeric."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"a complex tensor ({x.dtype})")
        return x.detach().to("cpu", torch.float64).numpy()
    if isinstance(x, (np.ndarray, np.generic, float, int)) and not isinstance(x, bool):
        arr = np.asarray(x)
        if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"an array of dtype {arr.dtype}")
        return arr.astype(np.float64)
    raise TypeError(f"a {type(x).__name__}")


class _Runner:
    """Calls one candidate under one adapter; counts what happened."""

    def __init__(self, func: Callable, spec: "Spec", adapter: Adapter, timeout: float):
        self.func, self.spec, self.adapter, self.timeout = func, spec, adapter, timeout
        self.hung = False
        self.n_ok = 0
        self.n_calls = 0
        self.worker = _Worker()

    def _convert(self, name: str, value):
        if not isinstance(value, np.ndarray):
            return value  # ranks, thresholds, strings
        if self.adapter.bases == "Vh" and name in self.spec.v_args:
            value = value.T  # (n, r) -> (r, n)
        if self.adapter.framework == "numpy":
            return np.array(value, dtype=np.float64, copy=True)
        return torch.tensor(np.ascontiguousarray(value), dtype=torch.float64, device=self.adapter.device)

    def _invoke(self, converted: dict, kwargs: tuple[str, ...]):
        if self.adapter.call is not None:
            return self.adapter.call(self.func, dict(converted))
        positional = [converted[a] for a in self.spec.args]
        return self.func(*positional, **{k: converted[k] for k in kwargs})

    def __call__(self, inputs: dict, **kw) -> list[np.ndarray] | CallError:
        if self.hung:
            return CallError("hung", "not called: the candidate hung in an earlier call")
        self.n_calls += 1
        everything = {**inputs, **kw}
        converted = {name: self._convert(name, v) for name, v in everything.items()}
        snapshot = {k: (v.clone() if isinstance(v, torch.Tensor) else v.copy()) for k, v in converted.items()
                    if isinstance(v, (torch.Tensor, np.ndarray))}
        status, value = self.worker.run(lambda: self._invoke(converted, tuple(kw)), self.timeout)
        if status == "hung":
            self.hung = True
            return CallError("hung", f"hung: no result within {self.timeout:g} s (timeout); the kit calls it no more")
        if status == "raised":
            if isinstance(value, _CandidateTimeout):
                return CallError("hung", "stopped by the kit's timeout")
            return CallError("raised", f"raised {type(value).__name__}: {_one_line(value)}")
        for k, before in snapshot.items():
            after = converted[k]
            same = torch.equal(before, after) if isinstance(before, torch.Tensor) else np.array_equal(before, after)
            if not same:
                return CallError("mutated", f"modified its input {k} in place (a function must not change its arguments)")
        out = self._outputs(value, inputs)
        if not isinstance(out, CallError):
            self.n_ok += 1
        return out

    def _outputs(self, value, inputs: dict) -> list[np.ndarray] | CallError:
        names = self.spec.outputs
        if len(names) == 1:
            if isinstance(value, (tuple, list)) and len(value) >= 1:
                value = value[0]  # Layer transfer: (dW_t, report)
            value = [value]
        elif not isinstance(value, (tuple, list)) or len(value) != len(names):
            what = f"a {type(value).__name__}" + (f" of length {len(value)}" if isinstance(value, (tuple, list)) else "")
            return CallError("type", f"returned {what}; expected a tuple ({', '.join(names)})")
        shapes = self.spec.out_shapes(inputs)
        arrays = []
        for name, v, shape in zip(names, value, shapes):
            try:
                a = _to_numpy(v)
            except TypeError as exc:
                return CallError("type", f"returned {exc} for {name}; expected a torch tensor, numpy array or number")
            if shape == ():
                if a.size != 1:
                    return CallError("shape", f"returned {name} of shape {a.shape}; expected a scalar")
                a = a.reshape(())
            elif a.shape != shape:
                hint = " (transposed: (in, out) layout, or Vh/V mixed up?)" if a.shape == shape[::-1] else ""
                return CallError("shape", f"returned {name} of shape {a.shape}; expected {shape}{hint}")
            if not np.all(np.isfinite(a)):
                n_nan = int(np.isnan(a).sum())
                return CallError("nonfinite", f"returned {name} with {n_nan} NaN and {int((~np.isfinite(a)).sum()) - n_nan} Inf entries")
            arrays.append(a)
        return arrays


# ---------------------------------------------------------------------------------------------------
# Examples, comparison and messages
# ---------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Example:
    """One generated input: ``inputs`` in the reference's names (V convention), plus check-private ``aux``."""

    inputs: dict
    meta: str
    scale: float = 0.0  # size of the update the equation acts on (for tolerances)
    aux: dict = field(default_factory=dict)

    def key(self) -> str:
        h = hashlib.sha1()
        for d in (self.inputs, self.aux):
            for k in sorted(d):
                v = d[k]
                h.update(k.encode())
                h.update(np.ascontiguousarray(v).tobytes() if isinstance(v, np.ndarray) else repr(v).encode())
        return h.hexdigest()

    def describe(self) -> str:
        lines = [self.meta]
        for k, v in self.inputs.items():
            lines.append(f"{k} {v.shape} = {_fmt(v)}" if isinstance(v, np.ndarray) else f"{k} = {v!r}")
        for k, v in self.aux.items():
            if not isinstance(v, np.ndarray):
                lines.append(f"{k} = {v!r}")
        return "\n".join(lines)


def _fmt(x, limit: int = 16) -> str:
    """Small arrays in full (4 decimals, one line), larger ones by shape and norm."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        return f"{float(x):.6g}"
    if x.size <= limit:
        text = np.array2string(np.round(x, 4) + 0.0, precision=4, separator=", ", suppress_small=True,
                               max_line_width=10**6, floatmode="maxprec")
        return re.sub(r"\s+", " ", text).replace("[ ", "[")
    return f"array {x.shape}, ‖·‖_F = {np.linalg.norm(x):.4g}, max |·| = {np.abs(x).max():.4g}"


@dataclass
class Failure:
    message: str
    observed: str | None = None
    expected: str | None = None


def _close(a: np.ndarray, b: np.ndarray, bound: float) -> bool:
    return a.shape == b.shape and (a.size == 0 or float(np.max(np.abs(a - b))) <= bound)


def _informative(E: np.ndarray, bound: float) -> bool:
    """Whether "observed is c × expected" would say something: never for a scalar or a rank-1 matrix
    (any two rank-1 updates on the same pair of directions are proportional)."""
    if E.ndim == 2 and min(E.shape) > 1:
        return int(np.linalg.matrix_rank(E, tol=bound)) >= 2
    return np.count_nonzero(np.abs(E) > bound) >= 2


def _hint(O: np.ndarray, E: np.ndarray, ex: Example, bound: float) -> str:
    """Name the mistake when the observed value has a recognisable relation to the expected one."""
    if O.shape != E.shape or O.size == 0:
        return ""
    if float(np.max(np.abs(O))) <= bound and float(np.max(np.abs(E))) > bound:
        return "the candidate returned zeros"
    e2 = float(np.sum(E * E))
    if e2 > 0 and _informative(E, bound):
        c = float(np.sum(O * E)) / e2
        if abs(c - 1) > 1e-6 and _close(O, c * E, bound * max(1.0, abs(c))):
            what = "the sign is wrong" if c < 0 else "a wrong overall scale (a forgotten or extra factor such as α/r?)"
            return f"observed = {c:.6g} × expected: {what}"
    if O.ndim == 2 and O.shape[0] == O.shape[1] and O.shape[0] > 1 and _close(O, E.T, bound):
        return "observed is the transpose of expected ((in, out) layout, or V and Vh mixed up?)"
    for name, x in ex.inputs.items():
        if isinstance(x, np.ndarray) and not _close(x, E, bound) and _close(O, x, bound):
            extra = " (a projector with r = min(m, n) is the identity: were the bases truncated to r?)" if name.startswith("dW") else ""
            return f"observed equals the input {name} unchanged{extra}"
    return ""


def _compare(out: list[np.ndarray], expected: list[np.ndarray], names: tuple[str, ...], ex: Example, tol: float,
             what: str = "", hints: bool = True) -> Failure | None:
    """None when every output matches; otherwise a Failure naming the first output that does not."""
    for O, E, name in zip(out, expected, names):
        E = np.asarray(E, dtype=np.float64)
        scale = max(float(np.max(np.abs(E))) if E.size else 0.0, ex.scale) or 1.0
        bound = tol * scale
        if O.shape != E.shape:
            return Failure(f"{what}{name} has shape {O.shape}, expected {E.shape}", _fmt(O), _fmt(E))
        err = float(np.max(np.abs(O - E))) if E.size else 0.0
        if err > bound:
            hint = _hint(O, E, ex, bound) if hints else ""
            msg = f"{what}{name}: max |observed − expected| = {err:.3g} (tolerance {bound:.2g})"
            return Failure(msg + (f"\n{hint}" if hint else ""), _fmt(O), _fmt(E))
    return None


def _expect(call, ex: Example, expected: list, tol: float, what: str = "", **kw) -> Failure | None:
    out = call(ex.inputs, **kw)
    if isinstance(out, CallError):
        return Failure(what + out.message)
    return _compare(out, expected, call.spec.outputs, ex, tol, what)


# ---------------------------------------------------------------------------------------------------
# Independent numpy oracles (float64)
# ---------------------------------------------------------------------------------------------------


def _signed(U: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip pairs (u_i, v_i) so the largest-|·| entry of u_i is positive (reproducible printouts)."""
    s = np.sign(U[np.abs(U).argmax(0), np.arange(U.shape[1])])
    s[s == 0] = 1
    return U * s, V * s


def _top_r(W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    return _signed(*top_r_bases(W, r))  # numpy's SVD, (m, r), (n, r)


def _full(dSigma: np.ndarray) -> np.ndarray:
    return np.diag(dSigma) if dSigma.ndim == 1 else dSigma  # (r, r)


def _np_project(dW, U, V):
    return (U @ U.T) @ dW @ (V @ V.T)  # explicit (m, m) and (n, n) projectors


def _np_lstsq_map(B_s: np.ndarray, B_t: np.ndarray) -> np.ndarray:
    """Minimum-norm least squares of ``P B_s = B_t``: solve ``B_sᵀ Pᵀ = B_tᵀ`` with lstsq."""
    return np.linalg.lstsq(B_s.T, B_t.T, rcond=None)[0].T  # (m_t, m_s)


def _np_mismatch(dW_s, U_s, V_s, U_t, V_t):
    """§4.2.2 written out with lstsq maps."""
    P, Q = _np_lstsq_map(U_s, U_t), _np_lstsq_map(V_s, V_t)
    U_al, V_al = P @ U_s, Q @ V_s
    C_s = U_s.T @ dW_s @ V_s
    return U_t @ (U_t.T @ U_al @ C_s @ V_al.T @ V_t) @ V_t.T


def _np_phi(U_a, U_b) -> float:
    """Eq. (4) as the mean squared cosine of scipy's principal angles."""
    return float(np.mean(np.cos(scipy.linalg.subspace_angles(U_a, U_b)) ** 2))


# ---------------------------------------------------------------------------------------------------
# Example strategies (all built on lorax_ref.testing.strategies)
# ---------------------------------------------------------------------------------------------------


def _layer(c) -> str:
    return f"{c.W_s.shape[0]}×{c.W_s.shape[1]} layer, r={c.r}"


def _sig(d) -> str:
    return "ΔΣ_s full (r, r)" if d.ndim == 2 else "ΔΣ_s diagonal (r,)"


@st.composite
def _update_case(draw, same_shape=True, targets=("independent", "near", "same"), full_sigma=None, generic=True):
    """A case plus numpy bases and an update ``dW_s``: a LoRA-X update (Eq. (1)) or a generic matrix."""
    c = draw(cases(same_shape=same_shape, targets=targets, full_sigma=full_sigma, max_dim=MAX_DIM, min_dim=MIN_DIM))
    if not same_shape:
        assume(c.W_s.shape != c.W_t.shape)  # "different shapes" checks: equal ones are other checks' business
    U_s, V_s = _top_r(c.W_s, c.r)
    U_t, V_t = _top_r(c.W_t, c.r)
    if generic and draw(st.booleans()):
        dW_s, kind = draw(matrices(*c.W_s.shape)), "generic ΔW_s"
    else:
        dW_s, kind = U_s @ _full(c.dSigma_s) @ V_s.T, f"LoRA-X ΔW_s ({_sig(c.dSigma_s)})"
    shapes = f"{_layer(c)}" if same_shape else f"{c.W_s.shape[0]}×{c.W_s.shape[1]} → {c.W_t.shape[0]}×{c.W_t.shape[1]}, r={c.r}"
    return c, dict(U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t, dW_s=dW_s), f"{shapes}, target {c.target}, {kind}"


def _ex(inputs: dict, meta: str, scale: float = 0.0, **aux) -> Example:
    return Example(inputs=inputs, meta=meta, scale=float(scale), aux=aux)


def _amax(x) -> float:
    return float(np.max(np.abs(x)))


# ---------------------------------------------------------------------------------------------------
# Specs: one per equation label
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    id: str
    name: str
    examples: Any  # a hypothesis strategy of Example
    verify: Callable  # verify(call, example) -> Failure | None
    requires: str | None = None  # a keyword argument the candidate must accept, else the check is skipped


@dataclass(frozen=True)
class Spec:
    label: str
    args: tuple[str, ...]
    v_args: frozenset
    outputs: tuple[str, ...]
    out_shapes: Callable[[dict], list[tuple]]
    signature: str
    tol: float
    checks: tuple[Check, ...]


def _flip(rng_seed: int, r: int) -> np.ndarray:
    """Signs ±1 (at least one −1) for a joint flip of basis pairs."""
    d = np.where(np.random.default_rng(rng_seed).random(r) < 0.5, -1.0, 1.0)
    d[0] = -1.0
    return d


# ---- Eq. (1) ----------------------------------------------------------------------------------------


def _eq1_examples(full: bool):
    @st.composite
    def strat(draw):
        c = draw(cases(full_sigma=full, targets=("independent",), max_dim=MAX_DIM, min_dim=MIN_DIM))
        U_s, V_s = _top_r(c.W_s, c.r)
        return _ex(dict(U_s=U_s, dSigma_s=c.dSigma_s, V_s=V_s), f"{_layer(c)}, {_sig(c.dSigma_s)}", _amax(c.dSigma_s))
    return strat()


def _eq1_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [i["U_s"] @ _full(i["dSigma_s"]) @ i["V_s"].T], TOL)


def _eq1_in_subspace(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return Failure(out.message)
    i = ex.inputs
    return _compare(out, [_np_project(out[0], i["U_s"], i["V_s"])], ("U_sU_sᵀ·ΔW_s·V_sV_sᵀ vs ΔW_s",), ex, TOL)


# ---- Eq. (2) ----------------------------------------------------------------------------------------


@st.composite
def _eq2_examples(draw, lorax: bool):
    c, b, meta = draw(_update_case(targets=("independent",), generic=False))
    dW = b["dW_s"] if lorax else draw(matrices(*c.W_s.shape))  # (m, n)
    kind = "LoRA-X update" if lorax else "generic ΔW"
    return _ex(dict(dW=dW, U=b["U_s"], V=b["V_s"]), f"{_layer(c)}, {kind}", _amax(dW))


def _eq2_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [_np_project(i["dW"], i["U"], i["V"])], TOL)


def _eq2_fixed_point(call, ex):
    return _expect(call, ex, [ex.inputs["dW"]], TOL, "a LoRA-X update must come back unchanged: ")


def _eq2_idempotent(call, ex):
    once = call(ex.inputs)
    if isinstance(once, CallError):
        return Failure(once.message)
    twice = call({**ex.inputs, "dW": once[0]})
    if isinstance(twice, CallError):
        return Failure("second call: " + twice.message)
    return _compare(twice, once, ("project(project(ΔW)) vs project(ΔW)",), ex, TOL, hints=False)


# ---- Eq. (3), projection form ----------------------------------------------------------------------


def _alpha():
    """A coefficient for linearity checks, away from 0 (α = 0 would test nothing)."""
    return st.tuples(st.sampled_from([1.0, -1.0]), st.floats(0.5, 2.0)).map(lambda t: t[0] * t[1])


def _eq3_examples(targets=("independent", "near", "same"), generic=True, extra=None):
    @st.composite
    def strat(draw):
        c, b, meta = draw(_update_case(targets=targets, generic=generic))
        aux = {}
        if extra == "linear":
            aux = dict(alpha=draw(_alpha()), other=draw(matrices(*c.W_s.shape)))
        elif extra == "flip":
            aux = dict(flip_seed=draw(st.integers(0, 2**16)))
        return _ex(dict(dW_s=b["dW_s"], U_t=b["U_t"], V_t=b["V_t"]), meta, _amax(b["dW_s"]), **aux)
    return strat()


def _eq3_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [_np_project(i["dW_s"], i["U_t"], i["V_t"])], TOL)


def _eq3_identity(call, ex):
    return _expect(call, ex, [ex.inputs["dW_s"]], TOL, "target = source must give ΔW_s back: ")


def _linear(call, ex, name: str, tol: float):
    """f(α·X + Y) = α·f(X) + f(Y) in the argument ``name``."""
    X, Y, a = ex.inputs[name], ex.aux["other"], ex.aux["alpha"]
    outs = []
    for arg in (X, Y, a * X + Y):
        out = call({**ex.inputs, name: arg})
        if isinstance(out, CallError):
            return Failure(out.message)
        outs.append(out[0])
    fX, fY, fXY = outs
    return _compare([fXY], [a * fX + fY], (f"f(α·{name} + Y) vs α·f({name}) + f(Y)",), ex, tol,
                    f"not linear in {name} (α = {a:.4g}): ", hints=False)


def _eq3_linear(call, ex):
    return _linear(call, ex, "dW_s", TOL)


def _eq3_contraction(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return Failure(out.message)
    n_out, n_in = np.linalg.norm(out[0]), np.linalg.norm(ex.inputs["dW_s"])
    if n_out > n_in * (1 + 1e-9) + 1e-300:
        return Failure(f"‖ΔW_t←s‖_F = {n_out:.6g} > ‖ΔW_s‖_F = {n_in:.6g}: a projection never increases the norm",
                       f"{n_out:.6g}", f"≤ {n_in:.6g}")
    return None


def _call_with_flipped_targets(call, ex):
    """``(D, result, result with (u_i, v_i) of the target multiplied by D_ii = ±1)`` or a Failure."""
    i = ex.inputs
    D = _flip(ex.aux["flip_seed"], i["U_t"].shape[1])
    base = call(i)
    if isinstance(base, CallError):
        return Failure(base.message)
    flipped = call({**i, "U_t": i["U_t"] * D, "V_t": i["V_t"] * D})
    if isinstance(flipped, CallError):
        return Failure("with flipped bases: " + flipped.message)
    return D, base, flipped


def _eq3_sign_flips(call, ex):
    got = _call_with_flipped_targets(call, ex)
    if isinstance(got, Failure):
        return got
    D, base, flipped = got
    return _compare(flipped, base, ("ΔW_t←s",), ex, TOL,
                    f"flipping the signs {D.astype(int).tolist()} of the pairs (u_i, v_i) changed the result: ", hints=False)


@st.composite
def _other_shape_examples(draw):
    c, b, meta = draw(_update_case(same_shape=False, generic=False))
    return _ex(dict(dW_s=b["dW_s"], U_t=b["U_t"], V_t=b["V_t"]), meta, _amax(b["dW_s"]))


def _eq3_refuses(call, ex):
    i = ex.inputs
    if i["dW_s"].shape == (i["U_t"].shape[0], i["V_t"].shape[0]):
        return None  # the drawn shapes happen to agree: nothing to refuse
    out = call(i)
    if isinstance(out, CallError) and out.kind == "raised":
        return None
    if isinstance(out, CallError) and out.kind == "shape":
        return Failure("did not raise for a target of another shape; " + out.message)
    if isinstance(out, CallError):
        return Failure(out.message)
    return Failure(f"returned a {out[0].shape} result for ΔW_s {i['dW_s'].shape} and target bases of a "
                   f"{i['U_t'].shape[0]}×{i['V_t'].shape[0]} layer instead of raising: Eq. (3) needs equal shapes "
                   f"(never pad, crop or broadcast; §4.2.2 is the rule for other shapes)", _fmt(out[0]), "an exception")


# ---- Eq. (3), rotation form -------------------------------------------------------------------------


def _rot_examples(targets=("independent", "near", "same"), flip=False):
    @st.composite
    def strat(draw):
        c, b, meta = draw(_update_case(targets=targets, generic=False))
        aux = dict(flip_seed=draw(st.integers(0, 2**16))) if flip else {}
        inputs = dict(U_t=b["U_t"], U_s=b["U_s"], dSigma_s=c.dSigma_s, V_s=b["V_s"], V_t=b["V_t"])
        return _ex(inputs, f"{_layer(c)}, target {c.target}, {_sig(c.dSigma_s)}", _amax(c.dSigma_s), **aux)
    return strat()


def _rot_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [i["U_t"].T @ i["U_s"] @ _full(i["dSigma_s"]) @ i["V_s"].T @ i["V_t"]], TOL)


def _rot_forms_agree(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return Failure(out.message)
    i = ex.inputs
    dW_s = i["U_s"] @ _full(i["dSigma_s"]) @ i["V_s"].T
    return _compare([i["U_t"] @ out[0] @ i["V_t"].T], [_np_project(dW_s, i["U_t"], i["V_t"])],
                    ("U_t·ΔΣ_t←s·V_tᵀ vs U_tU_tᵀ·ΔW_s·V_tV_tᵀ",), ex, TOL)


def _rot_identity(call, ex):
    return _expect(call, ex, [_full(ex.inputs["dSigma_s"])], TOL, "target = source must give ΔΣ_s back: ")


def _rot_sign_covariant(call, ex):
    got = _call_with_flipped_targets(call, ex)
    if isinstance(got, Failure):
        return got
    D, base, flipped = got
    return _compare(flipped, [D[:, None] * base[0] * D[None, :]], ("ΔΣ_t←s",), ex, TOL,
                    f"flipping target pairs by D = diag({D.astype(int).tolist()}) must give D·ΔΣ_t←s·D: ")


# ---- Eq. (3), low-rank form -------------------------------------------------------------------------


@st.composite
def _lowrank_examples(draw):
    c, b, meta = draw(_update_case(targets=("independent", "near", "same"), generic=False))
    m, n = c.W_s.shape
    k = draw(st.integers(1, 4))
    B, A = draw(matrices(m, k)), draw(matrices(k, n))
    return _ex(dict(B=B, A=A, U_t=b["U_t"], V_t=b["V_t"]), f"{_layer(c)}, LoRA rank k={k}, target {c.target}",
               max(_amax(B), _amax(A)) ** 2)


def _lowrank_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [i["U_t"] @ i["U_t"].T @ i["B"], i["A"] @ i["V_t"] @ i["V_t"].T], TOL)


def _lowrank_product(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return Failure(out.message)
    i = ex.inputs
    return _compare([out[0] @ out[1]], [_np_project(i["B"] @ i["A"], i["U_t"], i["V_t"])],
                    ("B'A' vs U_tU_tᵀ(BA)V_tV_tᵀ",), ex, TOL)


# ---- Table 5 ablation ---------------------------------------------------------------------------------


def _copy_examples(full: bool):
    @st.composite
    def strat(draw):
        c, b, meta = draw(_update_case(targets=("independent",), full_sigma=full, generic=False))
        return _ex(dict(U_t=b["U_t"], dSigma_s=c.dSigma_s, V_t=b["V_t"]), f"{_layer(c)}, {_sig(c.dSigma_s)}", _amax(c.dSigma_s))
    return strat()


def _copy_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [i["U_t"] @ _full(i["dSigma_s"]) @ i["V_t"].T], TOL)


# ---- §4.2.2 alignment maps ------------------------------------------------------------------------------


def _align_examples(same_shape: bool):
    @st.composite
    def strat(draw):
        c, b, meta = draw(_update_case(same_shape=same_shape, targets=("independent",), generic=False))
        shapes = meta.split(", target")[0]
        return _ex(dict(U_s=b["U_s"], V_s=b["V_s"], U_t=b["U_t"], V_t=b["V_t"]), shapes, 1.0)
    return strat()


def _align_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [_np_lstsq_map(i["U_s"], i["U_t"]), _np_lstsq_map(i["V_s"], i["V_t"])], TOL)


def _align_exact_fit(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return Failure(out.message)
    i = ex.inputs
    return _compare([out[0] @ i["U_s"], out[1] @ i["V_s"]], [i["U_t"], i["V_t"]], ("P·U_s vs U_t", "Q·V_s vs V_t"), ex, TOL,
                    "the least-squares fit is exact (P U_s = U_t is under-determined): ")


def _align_min_norm(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return Failure(out.message)
    i = ex.inputs
    P, Q = out
    comp_P = P - P @ i["U_s"] @ i["U_s"].T  # the part of P outside span(U_s)
    comp_Q = Q - Q @ i["V_s"] @ i["V_s"].T
    return _compare([comp_P, comp_Q], [np.zeros_like(comp_P), np.zeros_like(comp_Q)],
                    ("P·(I − U_sU_sᵀ)", "Q·(I − V_sV_sᵀ)"), ex, TOL,
                    "not the minimum-norm solution (what pinv and lstsq return): ")


# ---- §4.2.2 transfer ------------------------------------------------------------------------------------


def _mismatch_examples(same_shape: bool, second=False):
    @st.composite
    def strat(draw):
        c, b, meta = draw(_update_case(same_shape=same_shape, targets=("independent",)))
        aux = dict(alpha=draw(_alpha()), other=draw(matrices(*c.W_s.shape))) if second else {}
        inputs = dict(dW_s=b["dW_s"], U_s=b["U_s"], V_s=b["V_s"], U_t=b["U_t"], V_t=b["V_t"])
        return _ex(inputs, meta, _amax(b["dW_s"]), **aux)
    return strat()


def _mismatch_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [_np_mismatch(i["dW_s"], i["U_s"], i["V_s"], i["U_t"], i["V_t"])], TOL)


def _mismatch_linear(call, ex):
    return _linear(call, ex, "dW_s", TOL)


# ---- Eq. (4) ---------------------------------------------------------------------------------------------


def _phi_examples(rotate=False):
    @st.composite
    def strat(draw):
        c = draw(cases(targets=("independent", "near", "same"), max_dim=MAX_DIM, min_dim=MIN_DIM))
        U_a, _ = _top_r(c.W_s, c.r)
        U_b, _ = _top_r(c.W_t, c.r)
        aux = dict(rot_seed=draw(st.integers(0, 2**16))) if rotate else {}
        return _ex(dict(U_a=U_a, U_b=U_b), f"m={c.W_s.shape[0]}, r={c.r}, target {c.target}", 1.0, **aux)
    return strat()


def _phi_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [np.array(_np_phi(i["U_a"], i["U_b"]))], TOL, "Φ = mean cos² of the principal angles (scipy): ")


def _phi_self(call, ex):
    return _expect(call, Example({"U_a": ex.inputs["U_a"], "U_b": ex.inputs["U_a"]}, ex.meta, 1.0), [np.array(1.0)], TOL,
                   "Φ(U, U) must be 1: ")


def _phi_range_symmetric(call, ex):
    i = ex.inputs
    ab = call(i)
    if isinstance(ab, CallError):
        return Failure(ab.message)
    ba = call({"U_a": i["U_b"], "U_b": i["U_a"]})
    if isinstance(ba, CallError):
        return Failure("with the arguments swapped: " + ba.message)
    phi = float(ab[0])
    if not -TOL <= phi <= 1 + TOL:
        return Failure(f"Φ = {phi:.6g} is outside [0, 1]", f"{phi:.6g}", "a value in [0, 1]")
    return _compare(ba, ab, ("Φ(U_b, U_a) vs Φ(U_a, U_b)",), ex, TOL, "not symmetric: ", hints=False)


def _phi_basis_invariant(call, ex):
    i = ex.inputs
    R = orthonormal(np.random.default_rng(ex.aux["rot_seed"]), i["U_a"].shape[1], i["U_a"].shape[1])  # (r, r)
    base = call(i)
    if isinstance(base, CallError):
        return Failure(base.message)
    rotated = call({**i, "U_a": i["U_a"] @ R})
    if isinstance(rotated, CallError):
        return Failure("with a rotated basis: " + rotated.message)
    return _compare(rotated, base, ("Φ(U_a R, U_b) vs Φ(U_a, U_b)",), ex, TOL,
                    "Φ must depend on the subspaces only, not on the basis chosen in them: ", hints=False)


# ---- Layer transfer -----------------------------------------------------------------------------------------


def _layer_examples(same_shape=True, targets=("independent", "near"), second=False, diagonal=False):
    @st.composite
    def strat(draw):
        c, b, meta = draw(_update_case(same_shape=same_shape, targets=targets, full_sigma=False if diagonal else None,
                                       generic=not diagonal))
        aux = dict(alpha=draw(_alpha()), other=draw(matrices(*c.W_s.shape))) if second else {}
        aux.update(U_s=b["U_s"], V_s=b["V_s"], U_t=b["U_t"], V_t=b["V_t"])
        return _ex(dict(dW_s=b["dW_s"], W_s=c.W_s, W_t=c.W_t, r=c.r), meta, _amax(b["dW_s"]), **aux)
    return strat()


def _layer_value(call, ex):
    a = ex.aux
    return _expect(call, ex, [_np_project(ex.inputs["dW_s"], a["U_t"], a["V_t"])], TOL_SVD)


def _layer_value_other_shape(call, ex):
    a = ex.aux
    if ex.inputs["W_s"].shape == ex.inputs["W_t"].shape:
        return None  # the drawn shapes happen to agree: that is the "value" check's case
    expected = _np_mismatch(ex.inputs["dW_s"], a["U_s"], a["V_s"], a["U_t"], a["V_t"])  # sign-free: ΔΣ_s is diagonal
    return _expect(call, ex, [expected], TOL_SVD)


def _layer_identity(call, ex):
    return _expect(call, ex, [ex.inputs["dW_s"]], TOL_SVD, "target = source must give a LoRA-X ΔW_s back: ")


def _layer_linear(call, ex):
    return _linear(call, ex, "dW_s", TOL_SVD)


def _layer_gate(call, ex):
    a = ex.aux
    phis = [_np_phi(X_s, X_t) for X_s, X_t in ((a["U_s"], a["U_t"]), (a["V_s"], a["V_t"])) if X_s.shape == X_t.shape]
    if not phis or min(phis) > 1 - 1e-6:  # Φ = 1 (identical subspaces, r = m): no threshold in [0, 1] gates it
        return None
    return _expect(call, ex, [np.zeros_like(ex.inputs["W_t"])], TOL_SVD,
                   "threshold=1 exceeds this layer's Φ, so the layer must be gated to zero: ", threshold=1.0)


def _mk(label, args, v_args, outputs, out_shapes, signature, checks, tol=TOL) -> Spec:
    assert label in EQUATIONS, label
    return Spec(label, tuple(args), frozenset(v_args), tuple(outputs), out_shapes, signature, tol, tuple(checks))


def _shape(i, a, b):
    return (i[a].shape[0], i[b].shape[0])


SPECS: dict[str, Spec] = {s.label: s for s in [
    _mk("Eq. (1)", ["U_s", "dSigma_s", "V_s"], ["V_s"], ["dW_s"], lambda i: [_shape(i, "U_s", "V_s")],
        "(U_s (m, r), dSigma_s (r,) or (r, r), V_s (n, r)) -> dW_s (m, n)", [
            Check("value-diag", "ΔW_s = U_s·diag(ΔΣ_s)·V_sᵀ for a diagonal ΔΣ_s (r,)", _eq1_examples(False), _eq1_value),
            Check("value-full", "ΔW_s = U_s·ΔΣ_s·V_sᵀ for a full ΔΣ_s (r, r)", _eq1_examples(True), _eq1_value),
            Check("in-subspace", "ΔW_s is unchanged by the source projector (Eq. (2))", _eq1_examples(None), _eq1_in_subspace),
        ]),
    _mk("Eq. (2)", ["dW", "U", "V"], ["V"], ["dW"], lambda i: [i["dW"].shape],
        "(dW (m, n), U (m, r), V (n, r)) -> (m, n)", [
            Check("value", "U·Uᵀ·ΔW·V·Vᵀ for a generic ΔW", _eq2_examples(False), _eq2_value),
            Check("fixed-point", "a LoRA-X update U·ΔΣ·Vᵀ is returned unchanged (Eq. (2))", _eq2_examples(True), _eq2_fixed_point),
            Check("idempotent", "projecting twice equals projecting once", _eq2_examples(False), _eq2_idempotent),
        ]),
    _mk("Eq. (3)", ["dW_s", "U_t", "V_t"], ["V_t"], ["dW_t"], lambda i: [i["dW_s"].shape],
        "(dW_s (m, n), U_t (m, r), V_t (n, r)) -> dW_t (m, n)", [
            Check("value", "ΔW_t←s = U_t·U_tᵀ·ΔW_s·V_t·V_tᵀ", _eq3_examples(), _eq3_value),
            Check("source-is-target", "target = source gives a LoRA-X ΔW_s back", _eq3_examples(("same",), generic=False), _eq3_identity),
            Check("linear", "linear in ΔW_s", _eq3_examples(extra="linear"), _eq3_linear),
            Check("contraction", "‖ΔW_t←s‖_F ≤ ‖ΔW_s‖_F", _eq3_examples(), _eq3_contraction),
            Check("sign-flips", "sign flips of target pairs (u_i, v_i) leave ΔW_t←s unchanged", _eq3_examples(extra="flip"), _eq3_sign_flips),
            Check("refuses-other-shapes", "raises for a target of another shape (no padding, cropping, broadcasting)",
                  _other_shape_examples(), _eq3_refuses),
        ]),
    _mk("Eq. (3) rotation form", ["U_t", "U_s", "dSigma_s", "V_s", "V_t"], ["V_s", "V_t"], ["dSigma_ts"],
        lambda i: [(i["U_t"].shape[1], i["V_t"].shape[1])],
        "(U_t (m, r), U_s (m, r), dSigma_s (r,) or (r, r), V_s (n, r), V_t (n, r)) -> dSigma_ts (r, r)", [
            Check("value", "ΔΣ_t←s = U_tᵀ·U_s·ΔΣ_s·V_sᵀ·V_t", _rot_examples(), _rot_value),
            Check("forms-agree", "U_t·ΔΣ_t←s·V_tᵀ equals the projection form U_tU_tᵀ·ΔW_s·V_tV_tᵀ", _rot_examples(), _rot_forms_agree),
            Check("source-is-target", "target = source gives ΔΣ_s back", _rot_examples(("same",)), _rot_identity),
            Check("sign-covariant", "flipping target pairs by D gives D·ΔΣ_t←s·D", _rot_examples(flip=True), _rot_sign_covariant),
        ]),
    _mk("Eq. (3) low-rank form", ["B", "A", "U_t", "V_t"], ["V_t"], ["B_t", "A_t"],
        lambda i: [i["B"].shape, i["A"].shape],
        "(B (m, k), A (k, n), U_t (m, r), V_t (n, r)) -> (B_t (m, k), A_t (k, n))", [
            Check("value", "B' = U_t·U_tᵀ·B and A' = A·V_t·V_tᵀ", _lowrank_examples(), _lowrank_value),
            Check("product", "B'·A' equals the merged form U_tU_tᵀ·(BA)·V_tV_tᵀ", _lowrank_examples(), _lowrank_product),
        ]),
    _mk("Table 5 ablation", ["U_t", "dSigma_s", "V_t"], ["V_t"], ["dW_copy"], lambda i: [_shape(i, "U_t", "V_t")],
        "(U_t (m, r), dSigma_s (r,) or (r, r), V_t (n, r)) -> (m, n)", [
            Check("value-diag", "U_t·diag(ΔΣ_s)·V_tᵀ for a diagonal ΔΣ_s", _copy_examples(False), _copy_value),
            Check("value-full", "U_t·ΔΣ_s·V_tᵀ for a full ΔΣ_s", _copy_examples(True), _copy_value),
        ]),
    _mk("§4.2.2 alignment maps", ["U_s", "V_s", "U_t", "V_t"], ["V_s", "V_t"], ["P", "Q"],
        lambda i: [_shape(i, "U_t", "U_s"), _shape(i, "V_t", "V_s")],
        "(U_s (m_s, r), V_s (n_s, r), U_t (m_t, r), V_t (n_t, r)) -> (P (m_t, m_s), Q (n_t, n_s))", [
            Check("value", "P, Q = the minimum-norm least-squares solutions (numpy lstsq), different shapes",
                  _align_examples(False), _align_value),
            Check("value-same-shape", "the same at equal shapes", _align_examples(True), _align_value),
            Check("exact-fit", "P·U_s = U_t and Q·V_s = V_t", _align_examples(False), _align_exact_fit),
            Check("min-norm", "P, Q vanish outside span(U_s), span(V_s)", _align_examples(False), _align_min_norm),
        ]),
    _mk("§4.2.2", ["dW_s", "U_s", "V_s", "U_t", "V_t"], ["V_s", "V_t"], ["dW_t"], lambda i: [_shape(i, "U_t", "V_t")],
        "(dW_s (m_s, n_s), U_s (m_s, r), V_s (n_s, r), U_t (m_t, r), V_t (n_t, r)) -> dW_t (m_t, n_t)", [
            Check("value", "U_t·(U_tᵀ·P̂U_s·C_s·(Q̂V_s)ᵀ·V_t)·V_tᵀ with lstsq P̂, Q̂, different shapes",
                  _mismatch_examples(False), _mismatch_value),
            Check("value-same-shape", "the same rule at equal shapes (it is not Eq. (3))", _mismatch_examples(True), _mismatch_value),
            Check("linear", "linear in ΔW_s", _mismatch_examples(True, second=True), _mismatch_linear),
        ]),
    _mk("Eq. (4)", ["U_a", "U_b"], [], ["phi"], lambda i: [()],
        "(U_a (m, r), U_b (m, r)) -> phi (a number)", [
            Check("value", "Φ = ‖U_aᵀU_b‖_F² / r = mean cos² of the principal angles", _phi_examples(), _phi_value),
            Check("self", "Φ(U, U) = 1", _phi_examples(), _phi_self),
            Check("range-symmetric", "0 ≤ Φ ≤ 1 and Φ(U_a, U_b) = Φ(U_b, U_a)", _phi_examples(), _phi_range_symmetric),
            Check("basis-invariant", "Φ(U_a·R, U_b) = Φ(U_a, U_b) for a rotation R", _phi_examples(rotate=True), _phi_basis_invariant),
        ]),
    _mk("Layer transfer", ["dW_s", "W_s", "W_t", "r"], [], ["dW_t"], lambda i: [i["W_t"].shape],
        "(dW_s (m_s, n_s), W_s (m_s, n_s), W_t (m_t, n_t), r) -> dW_t (m_t, n_t) or (dW_t, report)", [
            Check("value", "equal shapes: Eq. (3) with the top-r SVD bases of W_t", _layer_examples(), _layer_value),
            Check("value-other-shape", "different shapes: §4.2.2 (LoRA-X ΔW_s with diagonal ΔΣ_s)",
                  _layer_examples(same_shape=False, diagonal=True), _layer_value_other_shape),
            Check("source-is-target", "W_t = W_s gives a LoRA-X ΔW_s back", _layer_examples(targets=("same",), diagonal=True),
                  _layer_identity),
            Check("linear", "linear in ΔW_s", _layer_examples(second=True), _layer_linear),
            Check("gate", "threshold 1 gives a zero update wherever Φ < 1", _layer_examples(), _layer_gate, requires="threshold"),
        ], tol=TOL_SVD),
]}


def signatures() -> dict[str, str]:
    """``{label: "(args) -> outputs"}``: how the kit calls a candidate of each equation."""
    return {label: spec.signature for label, spec in SPECS.items()}


# ---------------------------------------------------------------------------------------------------
# Golden cases
# ---------------------------------------------------------------------------------------------------

_GOLDEN_CACHE: dict[str, dict] = {}


def load_golden(path: str | os.PathLike | None = None) -> dict:
    """The golden file (format: ``data/golden/README.md``), parsed once per path."""
    p = Path(path) if path is not None else GOLDEN_PATH
    key = str(p.resolve())
    if key not in _GOLDEN_CACHE:
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise LoraxInputError(f"golden file {p} not found (regenerate it with scripts/make_golden.py)") from None
        except json.JSONDecodeError as exc:
            raise LoraxInputError(f"golden file {p} is not valid JSON: {exc}") from None
        if data.get("format") != "lorax_ref golden cases" or "equations" not in data:
            raise LoraxInputError(f"{p} is not a lorax_ref golden file (missing format/equations)")
        _GOLDEN_CACHE[key] = data
    return _GOLDEN_CACHE[key]


def _golden_value(v):
    if isinstance(v, list):
        return np.array(v, dtype=np.float64)
    return v


def _golden_row(call, spec: Spec, golden: dict, name: str) -> Row:
    entry = golden["equations"].get(spec.label)
    if not entry or not entry.get("cases"):
        return Row("golden", f"golden cases from {name}", None, f"skipped: no golden cases for {spec.label}")
    tol = {**golden.get("tolerance", {}), **entry.get("tolerance", {})}
    rtol, atol = float(tol.get("rtol", TOL)), float(tol.get("atol", 0.0))
    cases_ = entry["cases"]
    for case in cases_:
        inputs = {k: _golden_value(v) for k, v in case["inputs"].items()}
        ex = Example(inputs, f"golden case {case['name']!r}" + (f" — {case['note']}" if case.get("note") else ""))
        out = call(inputs)
        if case.get("raises"):
            if isinstance(out, CallError) and out.kind == "raised":
                continue
            got = out.message if isinstance(out, CallError) else f"returned {_fmt(out[0])}"
            return Row("golden", f"golden cases from {name} ({len(cases_)})", False,
                       f"case {case['name']!r} must raise ({case['raises']}); the candidate {got}", example=ex.describe())
        if isinstance(out, CallError):
            return Row("golden", f"golden cases from {name} ({len(cases_)})", False, f"case {case['name']!r}: {out.message}",
                       example=ex.describe())
        expected = [_golden_value(case["outputs"][o]) for o in spec.outputs]
        for O, E, o in zip(out, expected, spec.outputs):
            E = np.asarray(E, dtype=np.float64)
            bound = atol + rtol * (float(np.max(np.abs(E))) if E.size else 0.0)
            if O.shape != E.shape or float(np.max(np.abs(O - E), initial=0.0)) > bound:
                fail = _compare([O], [E], (o,), Example(inputs, "", 0.0), rtol)
                msg = fail.message if fail else f"{o} differs"
                return Row("golden", f"golden cases from {name} ({len(cases_)})", False, f"case {case['name']!r}: {msg}",
                           example=ex.describe(), observed=_fmt(O), expected=_fmt(E), inputs=inputs)
    return Row("golden", f"golden cases from {name} ({len(cases_)})", True)


# ---------------------------------------------------------------------------------------------------
# Running the checks
# ---------------------------------------------------------------------------------------------------


def _accepts(func: Callable, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class _StopShrinking(BaseException):
    """Ends hypothesis' shrinking when the budget is spent (a BaseException: hypothesis lets it through)."""


def _search(check: Check, call: _Runner, max_examples: int, shrink: bool, budget: float):
    """The smallest example (hypothesis ``find``) on which ``check.verify`` fails, and its Failure.

    Shrinking stops after ``budget`` seconds; the smallest failing example found by then is returned
    (each example hypothesis' shrinker accepts is smaller than the one before).
    """
    cache: dict[str, Failure | None] = {}
    first: list[float] = []
    best: list[Example] = []

    def failing(ex: Example) -> bool:
        key = ex.key()
        if key in cache:  # also makes hypothesis' final replay agree with the search
            return cache[key] is not None
        if (first and time.perf_counter() - first[0] > budget) or call.hung:
            raise _StopShrinking
        fail = check.verify(call, ex)
        cache[key] = fail
        if fail is not None:
            first[:] = first or [time.perf_counter()]
            best[:] = [ex]
        return fail is not None

    config = settings(
        database=None, max_examples=max_examples, derandomize=True, deadline=None, verbosity=Verbosity.quiet,
        phases=(Phase.generate, Phase.shrink) if shrink else (Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )
    try:
        ex = find(check.examples, failing, settings=config)
    except NoSuchExample:
        return None, None
    except _StopShrinking:
        if not best:
            return None, None
        ex = best[0]
    return ex, cache[ex.key()]


def _run_checks(spec: Spec, func: Callable, call: _Runner, max_examples: int, shrink: bool, budget: float,
                golden: dict | None, golden_name: str, only: set | None = None, skip: set = frozenset()) -> list[Row]:
    """Golden cases (when ``golden`` is given), then every property check (or those in ``only``, less ``skip``)."""
    rows = []
    if golden is not None:
        t0 = time.perf_counter()
        row = _golden_row(call, spec, golden, golden_name)
        row.seconds = time.perf_counter() - t0
        rows.append(row)
    for check in spec.checks:
        if (only is not None and check.id not in only) or check.id in skip:
            continue
        t0 = time.perf_counter()
        if check.requires and not _accepts(func, check.requires):
            rows.append(Row(check.id, check.name, None, f"skipped: the candidate takes no {check.requires!r} argument"))
            continue
        if call.hung:
            rows.append(Row(check.id, check.name, False, "not run: the candidate hung in an earlier check"))
            continue
        try:
            ex, fail = _search(check, call, max_examples, shrink, budget)
        except Exception as exc:  # noqa: BLE001 — a kit or hypothesis problem must not hide the other rows
            rows.append(Row(check.id, check.name, False, f"the kit could not run this check: {type(exc).__name__}: {_one_line(exc)}"))
            continue
        if fail is None:
            rows.append(Row(check.id, check.name, True, seconds=time.perf_counter() - t0))
        else:
            rows.append(Row(check.id, check.name, False, fail.message, ex.describe(), fail.observed, fail.expected,
                            inputs=dict(ex.inputs), seconds=time.perf_counter() - t0))
    return rows


def _alternatives(spec: Spec, adapter: Adapter) -> list[Adapter]:
    """The other conventions, most common mix-up first: V ↔ Vh, then numpy ↔ torch, then both."""
    flip_b = {"V": "Vh", "Vh": "V"}[adapter.bases]
    flip_f = {"torch": "numpy", "numpy": "torch"}[adapter.framework]
    out = [adapter.with_(bases=flip_b)] if spec.v_args else []
    out.append(adapter.with_(framework=flip_f))
    if spec.v_args:
        out.append(adapter.with_(framework=flip_f, bases=flip_b))
    return out


def _fix_hint(alt: Adapter, adapter: Adapter) -> tuple[str, str]:
    """``Adapter(...)`` arguments and CLI flags that switch from ``adapter`` to ``alt``."""
    args, flags = [], []
    if alt.framework != adapter.framework:
        args.append(f"framework={alt.framework!r}")
        flags.append(f"--framework {alt.framework}")
    if alt.bases != adapter.bases:
        args.append(f"bases={alt.bases!r}")
        flags.append(f"--bases {alt.bases}")
    return ", ".join(args), " ".join(flags)


def _diagnose(spec, func, adapter, rows, runner, max_examples, timeout, golden, golden_name) -> tuple[str, str]:
    """Convention mismatch or wrong formula: re-run the failing checks under the other conventions.

    An alternative is tried on the checks that failed first (a wrong formula fails them again on the
    first examples, so this is quick); only if they all pass are the other checks run to confirm.
    """
    failed = [r.id for r in rows if r.passed is False]
    if not failed:
        return "pass", "every check passed"
    if runner.hung:
        return "does not run", f"the candidate hung (no result within {timeout:g} s per call)"
    ran_anywhere = runner.n_ok > 0
    quick = max(5, max_examples // 2)  # a diagnosis, not the verdict: the message says how to re-run in full
    for alt in _alternatives(spec, adapter):
        alt_runner = _Runner(func, spec, alt, timeout)
        try:
            first = _run_checks(spec, func, alt_runner, quick, False, 0.0, golden if "golden" in failed else None,
                                golden_name, only=set(failed))
            still = [r.id for r in first if r.passed is False]
            if not still:
                rest = _run_checks(spec, func, alt_runner, quick, False, 0.0, golden if "golden" not in failed else None,
                                   golden_name, skip=set(failed))
                still = [r.id for r in rest if r.passed is False]
        finally:
            alt_runner.worker.close()
        ran_anywhere |= alt_runner.n_ok > 0
        if not still:
            args, flags = _fix_hint(alt, adapter)
            return ("convention mismatch",
                    f"the formula is right but the candidate expects {alt.describe()}; every check passes with "
                    f"Adapter({args}) (CLI: {flags})")
    if not ran_anywhere:
        return "does not run", "no call returned a usable value under any input convention (see the messages above)"
    tried = "; ".join(a.describe() for a in _alternatives(spec, adapter))
    return "wrong formula", f"no other input convention makes every check pass (tried: {tried})"


def _candidate_name(func) -> str:
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or type(func).__name__
    return f"{module}.{name}" if module and module != "__main__" else name


def check(
    func: Callable,
    equation: str,
    adapter: Adapter | None = None,
    *,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    timeout: float = DEFAULT_TIMEOUT,
    golden: bool | str | os.PathLike = True,
    diagnose: bool = True,
    shrink_budget: float = DEFAULT_SHRINK_BUDGET,
) -> Result:
    """Check ``func`` against one equation; returns a :class:`Result` (``str()`` it for the report).

    Args:
        func: the candidate, called like the reference function of ``equation`` (see :func:`signatures`).
        equation: a label of :data:`lorax_ref.EQUATIONS` (``"Eq. (3)"``), its slug (``"eq3"``) or the
            reference function's name (``"transfer_same_dim"``).
        adapter: the candidate's convention (numpy/torch, V/Vh, device, call hook); default torch + V.
        max_examples: hypothesis examples per property (a failure is then shrunk).
        timeout: seconds per call before the candidate is reported as hung.
        golden: True for the packaged golden file, a path for another one, False to skip it.
        diagnose: on failure, re-run under the other conventions to tell a convention mismatch from a
            wrong formula.
        shrink_budget: seconds spent shrinking each failing property.
    """
    if not callable(func):
        raise LoraxInputError(f"the candidate must be callable, got {type(func).__name__}")
    label, _ = lookup(equation)
    spec = SPECS[label]
    adapter = adapter or Adapter()
    if not isinstance(adapter, Adapter):
        raise LoraxInputError(f"adapter must be a lorax_ref.conformance.Adapter, got {type(adapter).__name__}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise LoraxInputError(f"max_examples must be a positive int, got {max_examples!r}")
    if not timeout > 0:
        raise LoraxInputError(f"timeout must be > 0 seconds, got {timeout!r}")
    gold = None
    golden_name = ""
    if golden is not False:
        gold = load_golden(None if golden is True else golden)
        golden_name = GOLDEN_PATH.name if golden is True else Path(golden).name
    t0 = time.perf_counter()
    runner = _Runner(func, spec, adapter, timeout)
    with _single_threaded_torch():
        try:
            rows = _run_checks(spec, func, runner, max_examples, True, shrink_budget, gold, golden_name)
        finally:
            runner.worker.close()
        if diagnose or all(r.passed is not False for r in rows):
            diagnosis, message = _diagnose(spec, func, adapter, rows, runner, max_examples, timeout, gold, golden_name)
        else:
            diagnosis, message = "not diagnosed", "diagnose=False"
    return Result(label, _candidate_name(func), adapter, rows, diagnosis, message, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------
# Command line: python -m lorax_ref verify module_or_file.py:function --equation LABEL
# ---------------------------------------------------------------------------------------------------


def load_candidate(target: str) -> Callable:
    """``"pkg.module:func"`` or ``"path/to/file.py:func"`` (``func`` may be dotted: ``Class.method``)."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise LoraxInputError(f"{target!r}: expected MODULE_OR_FILE:FUNCTION, e.g. my_lorax.py:transfer")
    path = Path(where)
    if where.endswith(".py") or path.is_file():
        if not path.is_file():
            raise LoraxInputError(f"{where}: no such file")
        name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else (
            "_lorax_candidate_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12])
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
        try:
            sys.modules[name] = module
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            raise LoraxInputError(f"cannot import module {where!r}: {exc}") from None
        finally:
            if added:
                sys.path.remove(os.getcwd())
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LoraxInputError(f"{where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LoraxInputError(f"{target} is a {type(obj).__name__}, not a function")
    return obj


VERIFY_HELP = """\
Check your own implementation of one LoRA-X equation against the reference: golden cases plus
hypothesis property checks with independent numpy expectations. Prints one row per check (for a
failure: the smallest failing input, observed and expected values) and a verdict that tells a
convention mismatch (numpy vs torch, V vs Vh) from a wrong formula. Exit code 0 when every check
passes, 1 otherwise (also for a file that cannot be loaded).

Your function is called like the reference function of the equation (--list shows the signatures),
with float64 torch tensors by default (--framework numpy for numpy arrays, --bases Vh for right
bases given as (r, n)).
"""


def add_verify_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``verify`` to the ``python -m lorax_ref`` subcommands (called by :mod:`lorax_ref.cli`)."""
    p = subparsers.add_parser("verify", help="check your own implementation of an equation (conformance kit)",
                              description=VERIFY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", metavar="MODULE_OR_FILE:FUNCTION",
                   help="e.g. my_lorax.py:transfer or my_package.lorax:transfer")
    p.add_argument("--equation", "-e", metavar="LABEL",
                   help="equation label, slug or reference function name (see --list), e.g. eq3, 'Eq. (4)'")
    p.add_argument("--list", action="store_true", help="list the equations and the signature each expects, then exit")
    p.add_argument("--framework", choices=["torch", "numpy"], default="torch", help="inputs as torch tensors (default) or numpy arrays")
    p.add_argument("--bases", choices=["V", "Vh"], default="V", help="right bases as V (n, r) (default) or Vh (r, n)")
    p.add_argument("--device", default="cpu", help="torch device for the inputs (default cpu)")
    p.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES, metavar="N",
                   help=f"hypothesis examples per property (default {DEFAULT_MAX_EXAMPLES})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds per call before the candidate counts as hung (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--golden", metavar="FILE", default=None, help="another golden file (default: the packaged one)")
    p.add_argument("--no-golden", action="store_true", help="skip the golden cases")
    p.add_argument("--no-diagnose", action="store_true", help="do not re-run failures under other conventions")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.set_defaults(func=run_verify)
    return p


def run_verify(args) -> int:
    """The ``verify`` subcommand: 0 when every check passes, 1 otherwise."""
    if args.list:
        for label, sig in signatures().items():
            print(f"{slug(label):<24} {label}")
            print(f"{'':<24}   candidate{sig}")
        return 0
    if not args.target or not args.equation:
        raise LoraxInputError("verify needs MODULE_OR_FILE:FUNCTION and --equation LABEL (see --list)")
    func = load_candidate(args.target)
    adapter = Adapter(framework=args.framework, bases=args.bases, device=args.device)
    golden: bool | str = False if args.no_golden else (args.golden or True)
    result = check(func, args.equation, adapter, max_examples=args.max_examples, timeout=args.timeout, golden=golden,
                   diagnose=not args.no_diagnose)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, ensure_ascii=False))
    else:
        print(str(result))
    sys.stdout.flush()
    return 0 if result.passed else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m lorax_ref.conformance ...`` — the same as ``python -m lorax_ref verify ...``."""
    parser = argparse.ArgumentParser(prog="python -m lorax_ref.conformance")
    sub = parser.add_subparsers(dest="command")
    add_verify_parser(sub)
    args = parser.parse_args(["verify", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_verify(args)
    except LoraxInputError as exc:
        if args.debug:
            raise
        print(f"lorax_ref: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
