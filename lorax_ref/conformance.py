r"""Conformance kit: check anyone's LoRA-X implementation, equation by equation.

Point it at your own function and an equation label of :data:`lorax_ref.EQUATIONS`::

    from lorax_ref.conformance import check
    result = check(my_transfer, equation="Eq. (3)")     # or its slug "eq3", or "transfer_same_dim"
    print(result)                                       # one row per check; result.passed, result.rows
    check("my_lorax.py:my_transfer", "eq3")             # the same, the candidate in its own process

or from a shell: ``python -m lorax_ref verify my_module.py:my_transfer --equation eq3``.

**The calling convention.** The candidate is called like the reference function of that equation
(same positional arguments, same order; :func:`signatures` lists them) with float64 inputs: torch
tensors on the CPU by default. :class:`Adapter` changes that: ``framework="numpy"`` passes numpy arrays,
``bases="Vh"`` passes every right basis transposed, ``(r, n)`` as ``torch.linalg.svd`` returns it,
``dtype="float32"`` (``"float16"``, ``"bfloat16"``) passes inputs in that precision and judges with that
precision's tolerances, ``device="cuda"`` moves tensors, and ``call(func, inputs)`` wires any other
signature (``inputs`` maps the reference's argument names to converted values). Outputs may be torch
tensors, numpy arrays or Python numbers; a candidate of ``Layer transfer`` may return ``dW_t`` or
``(dW_t, anything)``.

**What is checked.** Per equation: the golden cases of ``data/golden/lorax_golden_v1.json`` (generated
from the reference by ``scripts/make_golden.py``), then properties on hypothesis-generated layers
(:mod:`lorax_ref.testing.strategies`) whose expected values are computed independently here with
numpy/scipy in float64 — never by calling lorax_ref's own function. A failing property is shrunk to
the smallest failing input hypothesis finds; the row shows it with the observed and expected values and,
where it recognises one, the likely mistake (a constant factor such as a forgotten α/r, a transpose, a
no-op). When checks fail, the kit re-runs them under the other conventions (numpy ↔ torch, V ↔ Vh) and
at the lower precisions, and says whether it found a *convention mismatch* (some convention passes
everything), a formula that is *right at a lower precision* (float32 inputs and tolerances pass
everything: "use --dtype float32"), or a *wrong formula* (nothing does).

**Tolerances** (:class:`Precision`). A check compares ``max |observed − expected|`` with
``rtol · scale``, where ``scale`` is the size of the expected value or of the update the equation acts
on, whichever is larger. In float64 (the default) ``rtol = 1e-9``, and ``1e-6`` for a candidate that
computes its own SVD (``Layer transfer``): far above float64 rounding, and ``1e-9`` is 60× below float32's
unit roundoff, so a float32 computation fails the default run. In a lower precision with unit roundoff
``u`` (``u₃₂ = 2⁻²⁴``, ``u₁₆ = 2⁻¹¹``, ``u_bf16 = 2⁻⁸``), ``rtol = 16 · u · κ``; the conditioning ``κ`` of
a case is ``√k`` for a case whose largest dimension is ``k`` (rounding errors of length-k sums), times
``√k · σ₁ / (σ_r − σ_{r+1})`` of the worse of ``W_s`` and ``W_t`` when the candidate computes its own SVD
(the SVD's backward error grows with the size, and the top-r subspace moves by it over the relative
spectral gap; between layers of different shapes, where §4.2.2 pairs singular vectors one by one, the
smallest gap ``σ_i − σ_{i+1}``, ``i ≤ r``, replaces ``σ_r − σ_{r+1}``). Right implementations of every
equation computed in float32, float16 and bfloat16 stay below 5·u·κ on the kit's cases (measured on 300
cases per equation and format), a third of the tolerance.

**Where the candidate runs.** A function object (``check(fn, ...)``: closures, lambdas, functions
holding CUDA tensors — no pickling) is called in one persistent daemon thread of this process, and the
kit waits ``timeout`` seconds for each call. A thread cannot be killed: on a timeout the kit raises an
exception inside it (this stops pure-Python loops), reports the candidate as hung and calls it no more; a
hang inside C code keeps the thread until the process exits. A target string ``"file.py:function"`` or
``"module:function"`` (and every ``python -m lorax_ref verify``) runs the candidate in a child Python
process instead: a hang is ended by killing that process, ``sys.exit`` or ``os._exit`` in the candidate
cannot end the kit or fake its exit code, and the candidate's own prints go to stderr, never into the
report or its JSON. While checking, torch runs single-threaded (restored afterwards): the kit's matrices
are at most 16×16.
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
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
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
LOAD_TIMEOUT = 120.0  # seconds for a child process to start and import the candidate (torch alone takes seconds)
MAX_DIM = 16  # largest m, n of a generated layer: mistakes show on small layers, and draws cost ~ size
MIN_DIM = 2  # smallest m, n: on a 1×1 layer every wrong value is "a constant factor" off, which explains nothing
TOL = 1e-9  # float64, relative to the size of the expected value (or of the update)
TOL_SVD = 1e-6  # float64, for candidates that compute their own SVD (Layer transfer): spectra gaps are >= 5%
LOW_PRECISION_FACTOR = 16  # lower precisions: rtol = 16 · u · κ (measured worst case of correct code: see Precision)


# ---------------------------------------------------------------------------------------------------
# Precision: the dtype a candidate computes in, and the tolerance that follows from it
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    r"""A floating-point format, its unit roundoff ``u`` and the kit's tolerance rule for it.

    .. math:: \text{rtol} = \begin{cases} 10^{-9} \; (10^{-6} \text{ with the candidate's own SVD}) & \text{float64} \\
              16 \cdot u \cdot \kappa & \text{float32, float16, bfloat16} \end{cases}

    with :math:`\kappa = \sqrt{k}` for a case whose largest dimension is ``k``, times
    :math:`\sqrt{k}\,\max_{W \in \{W_s, W_t\}} \sigma_1(W) / (\sigma_r(W) - \sigma_{r+1}(W))` where the candidate
    computes the SVD itself (at different shapes the smallest gap :math:`\sigma_i - \sigma_{i+1}, i \le r`;
    :func:`_kappa`). Right implementations computed in that precision stay below
    ``5·u·κ`` on the kit's cases; ``tests/test_conformance.py`` asserts below ``LOW_PRECISION_FACTOR / 2``.
    """

    name: str
    u: float  # unit roundoff: 2^-p for a p-bit significand (half the gap between 1 and the next number)
    symbol: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.name)

    def rtol(self, kappa: float, own_svd: bool) -> float:
        if self.name == "float64":
            return TOL_SVD if own_svd else TOL
        return LOW_PRECISION_FACTOR * self.u * kappa

    def rule(self, own_svd: bool = False) -> str:
        """The tolerance rule in words, for reports."""
        if self.name == "float64":
            return f"float64: rtol = {TOL_SVD if own_svd else TOL:g}"
        return f"{self.name}: rtol = {LOW_PRECISION_FACTOR}·{self.symbol}·κ ({self.symbol} = {self.u:.3g})"


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("float64", 2.0**-53, "u₆₄"),
    Precision("float32", 2.0**-24, "u₃₂"),
    Precision("float16", 2.0**-11, "u₁₆"),
    Precision("bfloat16", 2.0**-8, "u_bf16"),
)}  # ordered from the most to the least precise


def _lower(precision: Precision) -> list[Precision]:
    """The precisions less precise than ``precision`` (a diagnosis tries them in this order)."""
    names = list(PRECISIONS)
    return [PRECISIONS[n] for n in names[names.index(precision.name) + 1:]]


def _sci(x: float) -> str:
    """``2.2e-7`` rather than Python's ``2.2e-07``."""
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), f"{x:.2g}")


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
    kind: str = ""  # why it failed: "value" (a wrong number) or a CallError kind ("raised", "shape", ...)

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
    diagnosis: str  # "pass", "convention mismatch", "lower precision", "wrong formula" or "does not run"
    diagnosis_message: str
    seconds: float = 0.0
    suggestion: "Adapter | None" = None  # for "convention mismatch" / "lower precision": the adapter that passes
    largest_error: tuple[float, float] = (0.0, 0.0)  # (relative error, the same in units of u·κ) of the worst comparison

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
            "dtype": self.adapter.dtype,
            "tolerance": PRECISIONS[self.adapter.dtype].rule(SPECS[self.equation].own_svd),
            "passed": self.passed,
            "diagnosis": self.diagnosis,
            "diagnosis_message": self.diagnosis_message,
            "suggestion": self.suggestion.describe() if self.suggestion else None,
            "largest_relative_error": self.largest_error[0],
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
            f"  tolerance: {PRECISIONS[self.adapter.dtype].rule(spec.own_svd)}",
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

    ``framework``: ``"torch"`` (tensors, default) or ``"numpy"`` (arrays).
    ``bases``: ``"V"`` — right bases as columns ``V (n, r)``, the paper's and lorax_ref's convention —
    or ``"Vh"`` — transposed, ``(r, n)``, as ``torch.linalg.svd``/``np.linalg.svd`` return them.
    ``dtype``: ``"float64"`` (default), ``"float32"``, ``"float16"`` or ``"bfloat16"`` (torch only): the
    inputs are rounded to it and the tolerances follow its unit roundoff (:class:`Precision`).
    ``device``: torch device for the inputs (outputs are brought back to the CPU for comparison).
    ``call``: optional ``call(func, inputs) -> output`` for a candidate with another signature;
    ``inputs`` is a dict keyed by the reference's argument names, already converted.
    """

    framework: str = "torch"
    bases: str = "V"
    device: str = "cpu"
    call: Callable | None = None
    dtype: str = "float64"

    def __post_init__(self):
        if self.framework not in ("torch", "numpy"):
            raise LoraxInputError(f"Adapter framework={self.framework!r}: expected 'torch' or 'numpy'")
        if self.bases not in ("V", "Vh"):
            raise LoraxInputError(f"Adapter bases={self.bases!r}: expected 'V' (n, r) or 'Vh' (r, n)")
        if self.dtype not in PRECISIONS:
            raise LoraxInputError(f"Adapter dtype={self.dtype!r}: expected one of {', '.join(map(repr, PRECISIONS))}")
        if self.dtype == "bfloat16" and self.framework == "numpy":
            raise LoraxInputError("Adapter dtype='bfloat16' needs framework='torch': numpy has no bfloat16")
        if self.call is not None and not callable(self.call):
            raise LoraxInputError(f"Adapter call must be callable, got {type(self.call).__name__}")

    def with_(self, **changes) -> "Adapter":
        return Adapter(**{**self.__dict__, **changes})

    def describe(self) -> str:
        if self.framework == "torch":
            kind = f"torch {self.dtype} tensors" + (f" on {self.device}" if self.device != "cpu" else "")
        else:
            kind = f"numpy {self.dtype} arrays"
        bases = "right bases as V (n, r)" if self.bases == "V" else "right bases as Vh (r, n)"
        hook = f", through {getattr(self.call, '__name__', 'a call hook')}()" if self.call else ""
        return f"{kind}, {bases}{hook}"

    def fields(self) -> dict:
        """Everything but the call hook: what a child process needs to convert inputs the same way."""
        return dict(framework=self.framework, bases=self.bases, device=self.device, dtype=self.dtype)


# ---------------------------------------------------------------------------------------------------
# Calling a candidate once: conversion, outputs, input mutation
# ---------------------------------------------------------------------------------------------------


class _CandidateTimeout(BaseException):
    """Raised inside a hung candidate's thread to stop a pure-Python loop."""


@dataclass
class CallError:
    """Why a call gave no usable value: raised, hung, exited, mutated, type, shape or nonfinite."""

    kind: str
    message: str


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


def _convert(spec: "Spec", adapter: Adapter, name: str, value):
    """One float64 numpy input in the candidate's convention (framework, V/Vh, dtype, device)."""
    if not isinstance(value, np.ndarray):
        return value  # ranks, thresholds, strings
    if adapter.bases == "Vh" and name in spec.v_args:
        value = value.T  # (n, r) -> (r, n)
    if adapter.framework == "numpy":
        return np.array(value, dtype=adapter.dtype, copy=True)  # rounded to nearest
    t = torch.tensor(np.ascontiguousarray(value), dtype=torch.float64)
    return t.to(device=adapter.device, dtype=PRECISIONS[adapter.dtype].torch_dtype)


def _outputs(spec: "Spec", value, inputs: dict) -> list[np.ndarray] | CallError:
    """The candidate's return value as float64 arrays of the expected shapes, or why not."""
    names = spec.outputs
    if len(names) == 1:
        if isinstance(value, (tuple, list)) and len(value) >= 1:
            value = value[0]  # Layer transfer: (dW_t, report)
        value = [value]
    elif not isinstance(value, (tuple, list)) or len(value) != len(names):
        what = f"a {type(value).__name__}" + (f" of length {len(value)}" if isinstance(value, (tuple, list)) else "")
        return CallError("type", f"returned {what}; expected a tuple ({', '.join(names)})")
    shapes = spec.out_shapes(inputs)
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


def _call_once(func: Callable, spec: "Spec", adapter: Adapter, inputs: dict, kw: dict) -> list[np.ndarray] | CallError:
    """Convert ``inputs`` (float64 numpy, reference names), call ``func``, check and convert its output."""
    try:
        converted = {name: _convert(spec, adapter, name, v) for name, v in {**inputs, **kw}.items()}
    except Exception as exc:  # noqa: BLE001 — e.g. a device that is not there: the kit's problem, not the candidate's
        return CallError("kit", f"was not called: the kit could not convert the inputs ({type(exc).__name__}: {_one_line(exc)})")
    snapshot = {k: (v.clone() if isinstance(v, torch.Tensor) else v.copy()) for k, v in converted.items()
                if isinstance(v, (torch.Tensor, np.ndarray))}
    try:
        if adapter.call is not None:
            value = adapter.call(func, dict(converted))
        else:
            value = func(*[converted[a] for a in spec.args], **{k: converted[k] for k in kw})
    except _CandidateTimeout:
        raise
    except BaseException as exc:  # noqa: BLE001 — anything the candidate raises (SystemExit too) is a finding
        return CallError("raised", f"raised {type(exc).__name__}: {_one_line(exc)}")
    for k, before in snapshot.items():
        after = converted[k]
        same = torch.equal(before, after) if isinstance(before, torch.Tensor) else np.array_equal(before, after)
        if not same:
            return CallError("mutated", f"modified its input {k} in place (a function must not change its arguments)")
    return _outputs(spec, value, inputs)


def _parameters(func: Callable) -> tuple[tuple[str, ...], bool] | None:
    """The candidate's parameter names and whether it takes ``**kwargs`` (None: no signature)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return None
    return tuple(p.name for p in params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _candidate_name(func) -> str:
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or type(func).__name__
    return f"{module}.{name}" if module and module != "__main__" else name


# ---------------------------------------------------------------------------------------------------
# Where the candidate runs: a worker thread (a function object) or a child process (a target string)
# ---------------------------------------------------------------------------------------------------


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


def _hung(timeout: float, how: str) -> CallError:
    return CallError("hung", f"hung: no result within {timeout:g} s (timeout); {how}, and calls it no more")


class _InProcess:
    """A function object, called in a :class:`_Worker` thread of this process."""

    def __init__(self, func: Callable):
        self.func, self.worker = func, _Worker()
        self.name = _candidate_name(func)
        self.parameters = _parameters(func)

    def call(self, spec: "Spec", adapter: Adapter, inputs: dict, kw: dict, timeout: float) -> list[np.ndarray] | CallError:
        status, value = self.worker.run(lambda: _call_once(self.func, spec, adapter, inputs, kw), timeout)
        if status == "hung":
            return _hung(timeout, "the kit interrupted it where Python allows")
        if status == "raised":  # _call_once reports the candidate's own exceptions: this is the kit's interrupt
            return _hung(timeout, "stopped by the kit's timeout") if isinstance(value, _CandidateTimeout) else \
                CallError("raised", f"raised {type(value).__name__}: {_one_line(value)}")
        return value

    def close(self):
        self.worker.close()


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # the folder that holds lorax_ref/
_CHILD = "import sys; from lorax_ref.conformance import _serve; _serve()"


class _Subprocess:
    """A target ``"file.py:function"`` or ``"module:function"``, loaded and called in a child process.

    The child (:func:`_serve`) gets requests and sends replies over two pipes of its own; its standard
    output is this process's standard error, so nothing the candidate prints reaches the report or its
    JSON. A timeout kills the child; an exit of the child (``os._exit``, a crash, a signal) is a finding
    about the candidate. A later call, under another convention, starts a fresh child.
    """

    def __init__(self, target: str, load_timeout: float = LOAD_TIMEOUT):
        self.target, self.load_timeout = target, load_timeout
        self.proc: subprocess.Popen | None = None
        self._start()

    def _start(self):
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), _PACKAGE_ROOT) if p)  # after the user's
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, self.target, str(req_r), str(rep_w)],
                                         stdin=subprocess.DEVNULL, stdout=2, env=env,
                                         pass_fds=(req_r, rep_w))
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.requests, self.replies = Connection(req_w, readable=False), Connection(rep_r, writable=False)
        reply = self._receive(self.load_timeout)
        if reply is None:
            self._end()
            raise LoraxInputError(f"{self.target}: loading the candidate took more than {self.load_timeout:g} s")
        if reply[0] == "ended":
            raise LoraxInputError(f"{self.target}: the candidate's process ended while loading it, with exit code "
                                  f"{self._end()} (an os._exit or a crash at import)")
        if reply[0] == "load-error":
            self._end()
            raise LoraxInputError(reply[1])
        _, self.name, self.parameters = reply

    def _receive(self, timeout: float):
        """The child's reply; None on timeout; ``("ended",)`` when the child is gone."""
        try:
            if not self.replies.poll(timeout):
                return None
            return self.replies.recv()
        except Exception:  # noqa: BLE001 — EOF (the child is gone) or a reply that does not unpickle
            return ("ended",)

    def _end(self) -> int | None:
        """Kill the child if it still runs; its exit code (None if it would not die)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        for conn in (self.requests, self.replies):
            conn.close()
        self.proc = None
        return code

    def call(self, spec: "Spec", adapter: Adapter, inputs: dict, kw: dict, timeout: float) -> list[np.ndarray] | CallError:
        if self.proc is None:  # the last child hung or ended: a fresh one for another convention
            try:
                self._start()
            except LoraxInputError as exc:
                return CallError("exited", f"could not be loaded again: {exc}")
        try:
            self.requests.send(("call", spec.label, adapter.fields(), inputs, kw))
            reply = self._receive(timeout)
        except (OSError, ValueError):
            reply = ("ended",)
        if reply is None:
            self._end()
            return _hung(timeout, "the kit ended its process")
        if reply[0] == "ended":
            code = self._end()
            return CallError("exited", f"ended its process during the call (exit code {code}: os._exit, a crash or a "
                                       f"signal); the kit calls it no more")
        if reply[0] == "ok":
            return list(reply[1])
        return CallError(reply[1], reply[2])

    def close(self):
        if self.proc is not None:
            with contextlib.suppress(OSError, ValueError):
                self.requests.send(("quit",))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
            self._end()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so a hung candidate never outlives the kit."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def _serve() -> None:
    """The child process of :class:`_Subprocess`: load the candidate, then answer calls until told to quit.

    ``argv``: target, request fd, reply fd. Ctrl-C is left to the parent (which kills this process).
    """
    target = sys.argv[1]
    requests, replies = Connection(int(sys.argv[2]), writable=False), Connection(int(sys.argv[3]), readable=False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    torch.set_num_threads(1)  # matrices of at most 16×16; see _single_threaded_torch
    try:
        func = load_candidate(target)
    except BaseException as exc:  # noqa: BLE001 — a load problem, reported by the parent as one line
        message = str(exc) if isinstance(exc, LoraxInputError) else f"{target}: {type(exc).__name__}: {_one_line(exc)}"
        replies.send(("load-error", message))
        os._exit(1)
    replies.send(("ready", _candidate_name(func), _parameters(func)))
    while True:
        try:
            request = requests.recv()
        except (EOFError, OSError):
            break
        if request[0] != "call":
            break
        _, label, fields, inputs, kw = request
        out = _call_once(func, SPECS[label], Adapter(**fields), inputs, kw)
        replies.send(("error", out.kind, out.message) if isinstance(out, CallError) else ("ok", out))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no waiting for threads the candidate may have left running


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


class _Runner:
    """Calls one candidate under one adapter (inputs in ``adapter.dtype``) and judges with the tolerance
    of ``precision`` (by default that dtype's); counts what happened."""

    def __init__(self, session, spec: "Spec", adapter: Adapter, timeout: float, precision: Precision | None = None):
        self.session, self.spec, self.adapter, self.timeout = session, spec, adapter, timeout
        self.precision = precision or PRECISIONS[adapter.dtype]
        self.stopped: str | None = None  # why the candidate is called no more (it hung or ended its process)
        self.n_ok = 0
        self.n_calls = 0
        self.worst: tuple[float, float] = (0.0, 0.0)  # (relative error / (u·κ), relative error) of the worst comparison

    @property
    def hung(self) -> bool:
        return self.stopped is not None

    def kappa(self, ex: "Example") -> float:
        if ex.kappa is None:
            ex.kappa = _kappa(self.spec, ex.inputs)
        return ex.kappa

    def rtol(self, ex: "Example") -> float:
        return self.precision.rtol(self.kappa(ex), self.spec.own_svd)

    def record(self, rel_err: float, ex: "Example") -> None:
        """Keep the worst relative error, measured in units of u·κ of this runner's precision."""
        ratio = rel_err / (self.precision.u * self.kappa(ex))
        if ratio > self.worst[0]:
            self.worst = (ratio, rel_err)

    def __call__(self, inputs: dict, **kw) -> list[np.ndarray] | CallError:
        if self.stopped:
            return CallError("hung", f"not called: the candidate {self.stopped} in an earlier call")
        self.n_calls += 1
        out = self.session.call(self.spec, self.adapter, inputs, kw, self.timeout)
        if isinstance(out, CallError):
            if out.kind == "hung":
                self.stopped = "hung"
            elif out.kind == "exited":
                self.stopped = "ended its process"
        else:
            self.n_ok += 1
        return out


# ---------------------------------------------------------------------------------------------------
# Examples, comparison and messages
# ---------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Example:
    """One generated input: ``inputs`` in the reference's names (V convention), plus check-private ``aux``."""

    inputs: dict
    meta: str
    aux: dict = field(default_factory=dict)
    kappa: float | None = None  # conditioning of the case (computed once, by the runner)

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
    kind: str = "value"  # "value": a wrong number; otherwise the CallError kind that stopped the check


def _call_failure(err: CallError, what: str = "") -> Failure:
    return Failure(what + err.message, kind=err.kind)


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


def _mismatch(O: np.ndarray, E: np.ndarray, name: str, bound: float, ex: Example, what: str = "",
              hints: bool = True) -> Failure | None:
    """None when ``max |O − E| <= bound``; otherwise a Failure with the error, the bound and a hint."""
    if O.shape != E.shape:
        return Failure(f"{what}{name} has shape {O.shape}, expected {E.shape}", _fmt(O), _fmt(E))
    err = float(np.max(np.abs(O - E))) if E.size else 0.0
    if err <= bound:
        return None
    hint = _hint(O, E, ex, bound) if hints else ""
    msg = f"{what}{name}: max |observed − expected| = {err:.3g} (tolerance {bound:.2g})"
    return Failure(msg + (f"\n{hint}" if hint else ""), _fmt(O), _fmt(E))


def _compare(call: "_Runner", out: list[np.ndarray], expected: list[np.ndarray], names: tuple[str, ...], ex: Example,
             what: str = "", hints: bool = True, scale: float | None = None) -> Failure | None:
    """None when every output matches at the runner's tolerance; otherwise the first output that does not.

    The bound is ``rtol · scale`` with ``scale`` the larger of ``max |expected|`` and the size of the
    update the equation acts on (:attr:`Spec.scale`, or ``scale``): an error relative to the inputs, as
    rounding makes it.
    """
    sizes = call.spec.scale(ex.inputs) if scale is None else scale
    sizes = sizes if isinstance(sizes, tuple) else (sizes,) * len(out)
    for O, E, name, size in zip(out, expected, names, sizes):
        E = np.asarray(E, dtype=np.float64)
        size = max(float(np.max(np.abs(E))) if E.size else 0.0, size) or 1.0
        if O.shape == E.shape and E.size:
            call.record(float(np.max(np.abs(O - E))) / size, ex)
        fail = _mismatch(O, E, name, call.rtol(ex) * size, ex, what, hints)
        if fail:
            return fail
    return None


def _expect(call: "_Runner", ex: Example, expected: list, what: str = "", **kw) -> Failure | None:
    out = call(ex.inputs, **kw)
    if isinstance(out, CallError):
        return _call_failure(out, what)
    return _compare(call, out, expected, call.spec.outputs, ex, what)


def _kappa(spec: "Spec", inputs: dict) -> float:
    """The conditioning κ of a case (see :class:`Precision`): √k for the largest dimension k; for a candidate
    that computes the SVD of ``W_s``, ``W_t`` itself, times √k · σ₁ / gap of the worse of the two.

    The gap is σ_r − σ_{r+1} at equal shapes (Eq. (3) needs the top-r subspace only) and the smallest of
    σ_i − σ_{i+1}, i ≤ r, at different shapes (§4.2.2 pairs the i-th singular vectors one by one).
    """
    k = max((max(v.shape) for v in inputs.values() if isinstance(v, np.ndarray) and v.ndim), default=1)
    kappa = float(np.sqrt(k))
    if spec.own_svd:
        r, worst = int(inputs["r"]), 1.0
        same_shape = inputs["W_s"].shape == inputs["W_t"].shape
        for W in (inputs["W_s"], inputs["W_t"]):
            s = np.append(np.linalg.svd(W, compute_uv=False), 0.0)  # (min(m, n) + 1,) descending, σ past the end = 0
            gaps = s[:r] - s[1:r + 1]  # σ_i − σ_{i+1}, i = 1..r
            gap = gaps[-1] if same_shape else gaps.min()
            worst = max(worst, float(s[0] / max(gap, np.finfo(np.float64).tiny)))
        kappa *= float(np.sqrt(k)) * worst  # the SVD's backward error grows with k; vectors move by it over the gap
    return kappa


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


def _ex(inputs: dict, meta: str, **aux) -> Example:
    return Example(inputs=inputs, meta=meta, aux=aux)


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
    scale: Callable[[dict], float | tuple[float, ...]]  # size of the update acted on (per output, if a tuple)
    checks: tuple[Check, ...]
    own_svd: bool = False  # the candidate computes an SVD itself (its tolerance includes the spectral gap)


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
        return _ex(dict(U_s=U_s, dSigma_s=c.dSigma_s, V_s=V_s), f"{_layer(c)}, {_sig(c.dSigma_s)}")
    return strat()


def _eq1_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [i["U_s"] @ _full(i["dSigma_s"]) @ i["V_s"].T])


def _eq1_in_subspace(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return _call_failure(out)
    i = ex.inputs
    return _compare(call, out, [_np_project(out[0], i["U_s"], i["V_s"])], ("U_sU_sᵀ·ΔW_s·V_sV_sᵀ vs ΔW_s",), ex)


# ---- Eq. (2) ----------------------------------------------------------------------------------------


@st.composite
def _eq2_examples(draw, lorax: bool):
    c, b, meta = draw(_update_case(targets=("independent",), generic=False))
    dW = b["dW_s"] if lorax else draw(matrices(*c.W_s.shape))  # (m, n)
    kind = "LoRA-X update" if lorax else "generic ΔW"
    return _ex(dict(dW=dW, U=b["U_s"], V=b["V_s"]), f"{_layer(c)}, {kind}")


def _eq2_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [_np_project(i["dW"], i["U"], i["V"])])


def _eq2_fixed_point(call, ex):
    return _expect(call, ex, [ex.inputs["dW"]], "a LoRA-X update must come back unchanged: ")


def _eq2_idempotent(call, ex):
    once = call(ex.inputs)
    if isinstance(once, CallError):
        return _call_failure(once)
    twice = call({**ex.inputs, "dW": once[0]})
    if isinstance(twice, CallError):
        return _call_failure(twice, "second call: ")
    return _compare(call, twice, once, ("project(project(ΔW)) vs project(ΔW)",), ex, hints=False)


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
        return _ex(dict(dW_s=b["dW_s"], U_t=b["U_t"], V_t=b["V_t"]), meta, **aux)
    return strat()


def _eq3_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [_np_project(i["dW_s"], i["U_t"], i["V_t"])])


def _eq3_identity(call, ex):
    return _expect(call, ex, [ex.inputs["dW_s"]], "target = source must give ΔW_s back: ")


def _linear(call, ex, name: str):
    """f(α·X + Y) = α·f(X) + f(Y) in the argument ``name``."""
    X, Y, a = ex.inputs[name], ex.aux["other"], ex.aux["alpha"]
    outs = []
    for arg in (X, Y, a * X + Y):
        out = call({**ex.inputs, name: arg})
        if isinstance(out, CallError):
            return _call_failure(out)
        outs.append(out[0])
    fX, fY, fXY = outs
    size = max(abs(a) * _amax(X), _amax(Y), _amax(a * X + Y))  # three calls: rounding follows the largest input
    return _compare(call, [fXY], [a * fX + fY], (f"f(α·{name} + Y) vs α·f({name}) + f(Y)",), ex,
                    f"not linear in {name} (α = {a:.4g}): ", hints=False, scale=size)


def _eq3_linear(call, ex):
    return _linear(call, ex, "dW_s")


def _eq3_contraction(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return _call_failure(out)
    n_out, n_in = np.linalg.norm(out[0]), np.linalg.norm(ex.inputs["dW_s"])
    call.record(max(n_out / max(n_in, 1e-300) - 1, 0.0), ex)
    if n_out > n_in * (1 + call.rtol(ex)) + 1e-300:
        return Failure(f"‖ΔW_t←s‖_F = {n_out:.6g} > ‖ΔW_s‖_F = {n_in:.6g}: a projection never increases the norm",
                       f"{n_out:.6g}", f"≤ {n_in:.6g}")
    return None


def _call_with_flipped_targets(call, ex):
    """``(D, result, result with (u_i, v_i) of the target multiplied by D_ii = ±1)`` or a Failure."""
    i = ex.inputs
    D = _flip(ex.aux["flip_seed"], i["U_t"].shape[1])
    base = call(i)
    if isinstance(base, CallError):
        return _call_failure(base)
    flipped = call({**i, "U_t": i["U_t"] * D, "V_t": i["V_t"] * D})
    if isinstance(flipped, CallError):
        return _call_failure(flipped, "with flipped bases: ")
    return D, base, flipped


def _eq3_sign_flips(call, ex):
    got = _call_with_flipped_targets(call, ex)
    if isinstance(got, Failure):
        return got
    D, base, flipped = got
    return _compare(call, flipped, base, ("ΔW_t←s",), ex,
                    f"flipping the signs {D.astype(int).tolist()} of the pairs (u_i, v_i) changed the result: ", hints=False)


@st.composite
def _other_shape_examples(draw):
    c, b, meta = draw(_update_case(same_shape=False, generic=False))
    return _ex(dict(dW_s=b["dW_s"], U_t=b["U_t"], V_t=b["V_t"]), meta)


def _outputs_in_words(names, out) -> str:
    return ", ".join(f"{n} = {float(o):.4g}" if o.ndim == 0 else f"a {o.shape} {n}" for n, o in zip(names, out))


def _refuses(call, ex, mismatch: str, rule: str) -> Failure | None:
    """The call must raise: ``mismatch`` describes the input, ``rule`` says why no result is right."""
    out = call(ex.inputs)
    if isinstance(out, CallError):
        if out.kind == "raised":
            return None
        return _call_failure(out, f"did not raise for {mismatch}; " if out.kind == "shape" else "")
    return Failure(f"returned {_outputs_in_words(call.spec.outputs, out)} for {mismatch} instead of raising: {rule}",
                   _fmt(out[0]), "an exception", kind="no-raise")


def _eq3_refuses(call, ex):
    i = ex.inputs
    if i["dW_s"].shape == (i["U_t"].shape[0], i["V_t"].shape[0]):
        return None  # the drawn shapes happen to agree: nothing to refuse
    return _refuses(call, ex, f"ΔW_s {i['dW_s'].shape} and target bases of a {i['U_t'].shape[0]}×{i['V_t'].shape[0]} layer",
                    "Eq. (3) needs equal shapes (never pad, crop or broadcast; §4.2.2 is the rule for other shapes)")


# ---- Eq. (3), rotation form -------------------------------------------------------------------------


def _rot_examples(targets=("independent", "near", "same"), flip=False):
    @st.composite
    def strat(draw):
        c, b, meta = draw(_update_case(targets=targets, generic=False))
        aux = dict(flip_seed=draw(st.integers(0, 2**16))) if flip else {}
        inputs = dict(U_t=b["U_t"], U_s=b["U_s"], dSigma_s=c.dSigma_s, V_s=b["V_s"], V_t=b["V_t"])
        return _ex(inputs, f"{_layer(c)}, target {c.target}, {_sig(c.dSigma_s)}", **aux)
    return strat()


def _rot_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [i["U_t"].T @ i["U_s"] @ _full(i["dSigma_s"]) @ i["V_s"].T @ i["V_t"]])


def _rot_forms_agree(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return _call_failure(out)
    i = ex.inputs
    dW_s = i["U_s"] @ _full(i["dSigma_s"]) @ i["V_s"].T
    return _compare(call, [i["U_t"] @ out[0] @ i["V_t"].T], [_np_project(dW_s, i["U_t"], i["V_t"])],
                    ("U_t·ΔΣ_t←s·V_tᵀ vs U_tU_tᵀ·ΔW_s·V_tV_tᵀ",), ex)


def _rot_identity(call, ex):
    return _expect(call, ex, [_full(ex.inputs["dSigma_s"])], "target = source must give ΔΣ_s back: ")


def _rot_sign_covariant(call, ex):
    got = _call_with_flipped_targets(call, ex)
    if isinstance(got, Failure):
        return got
    D, base, flipped = got
    return _compare(call, flipped, [D[:, None] * base[0] * D[None, :]], ("ΔΣ_t←s",), ex,
                    f"flipping target pairs by D = diag({D.astype(int).tolist()}) must give D·ΔΣ_t←s·D: ")


# ---- Eq. (3), low-rank form -------------------------------------------------------------------------


@st.composite
def _lowrank_examples(draw):
    c, b, meta = draw(_update_case(targets=("independent", "near", "same"), generic=False))
    m, n = c.W_s.shape
    k = draw(st.integers(1, 4))
    B, A = draw(matrices(m, k)), draw(matrices(k, n))
    return _ex(dict(B=B, A=A, U_t=b["U_t"], V_t=b["V_t"]), f"{_layer(c)}, LoRA rank k={k}, target {c.target}")


@st.composite
def _lowrank_other_shape_examples(draw):
    c, b, meta = draw(_update_case(same_shape=False, generic=False))
    m, n = c.W_s.shape
    k = draw(st.integers(1, 4))
    B, A = draw(matrices(m, k)), draw(matrices(k, n))
    return _ex(dict(B=B, A=A, U_t=b["U_t"], V_t=b["V_t"]), f"{meta.split(', target')[0]}, LoRA rank k={k}")


def _lowrank_refuses(call, ex):
    i = ex.inputs
    (m, n), (m_t, n_t) = (i["B"].shape[0], i["A"].shape[1]), (i["U_t"].shape[0], i["V_t"].shape[0])
    if (m, n) == (m_t, n_t):
        return None
    return _refuses(call, ex, f"LoRA factors of a {m}×{n} layer and target bases of a {m_t}×{n_t} layer",
                    "the transfer needs equal shapes (padding or cropping B and A moves the update onto unrelated "
                    "rows and columns; §4.2.2 is the rule for other shapes)")


def _lowrank_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [i["U_t"] @ i["U_t"].T @ i["B"], i["A"] @ i["V_t"] @ i["V_t"].T])


def _lowrank_product(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return _call_failure(out)
    i = ex.inputs
    return _compare(call, [out[0] @ out[1]], [_np_project(i["B"] @ i["A"], i["U_t"], i["V_t"])],
                    ("B'A' vs U_tU_tᵀ(BA)V_tV_tᵀ",), ex, scale=_amax(i["B"]) * _amax(i["A"]))


# ---- Table 5 ablation ---------------------------------------------------------------------------------


def _copy_examples(full: bool):
    @st.composite
    def strat(draw):
        c, b, meta = draw(_update_case(targets=("independent",), full_sigma=full, generic=False))
        return _ex(dict(U_t=b["U_t"], dSigma_s=c.dSigma_s, V_t=b["V_t"]), f"{_layer(c)}, {_sig(c.dSigma_s)}")
    return strat()


def _copy_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [i["U_t"] @ _full(i["dSigma_s"]) @ i["V_t"].T])


# ---- §4.2.2 alignment maps ------------------------------------------------------------------------------


def _align_examples(same_shape: bool):
    @st.composite
    def strat(draw):
        c, b, meta = draw(_update_case(same_shape=same_shape, targets=("independent",), generic=False))
        shapes = meta.split(", target")[0]
        return _ex(dict(U_s=b["U_s"], V_s=b["V_s"], U_t=b["U_t"], V_t=b["V_t"]), shapes)
    return strat()


def _align_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [_np_lstsq_map(i["U_s"], i["U_t"]), _np_lstsq_map(i["V_s"], i["V_t"])])


def _align_exact_fit(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return _call_failure(out)
    i = ex.inputs
    return _compare(call, [out[0] @ i["U_s"], out[1] @ i["V_s"]], [i["U_t"], i["V_t"]], ("P·U_s vs U_t", "Q·V_s vs V_t"), ex,
                    "the least-squares fit is exact (P U_s = U_t is under-determined): ")


def _align_min_norm(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return _call_failure(out)
    i = ex.inputs
    P, Q = out
    comp_P = P - P @ i["U_s"] @ i["U_s"].T  # the part of P outside span(U_s)
    comp_Q = Q - Q @ i["V_s"] @ i["V_s"].T
    return _compare(call, [comp_P, comp_Q], [np.zeros_like(comp_P), np.zeros_like(comp_Q)],
                    ("P·(I − U_sU_sᵀ)", "Q·(I − V_sV_sᵀ)"), ex,
                    "not the minimum-norm solution (what pinv and lstsq return): ")


# ---- §4.2.2 transfer ------------------------------------------------------------------------------------


def _mismatch_examples(same_shape: bool, second=False):
    @st.composite
    def strat(draw):
        c, b, meta = draw(_update_case(same_shape=same_shape, targets=("independent",)))
        aux = dict(alpha=draw(_alpha()), other=draw(matrices(*c.W_s.shape))) if second else {}
        inputs = dict(dW_s=b["dW_s"], U_s=b["U_s"], V_s=b["V_s"], U_t=b["U_t"], V_t=b["V_t"])
        return _ex(inputs, meta, **aux)
    return strat()


def _mismatch_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [_np_mismatch(i["dW_s"], i["U_s"], i["V_s"], i["U_t"], i["V_t"])])


def _mismatch_linear(call, ex):
    return _linear(call, ex, "dW_s")


# ---- Eq. (4) ---------------------------------------------------------------------------------------------


def _phi_examples(rotate=False):
    @st.composite
    def strat(draw):
        c = draw(cases(targets=("independent", "near", "same"), max_dim=MAX_DIM, min_dim=MIN_DIM))
        U_a, _ = _top_r(c.W_s, c.r)
        U_b, _ = _top_r(c.W_t, c.r)
        aux = dict(rot_seed=draw(st.integers(0, 2**16))) if rotate else {}
        return _ex(dict(U_a=U_a, U_b=U_b), f"m={c.W_s.shape[0]}, r={c.r}, target {c.target}", **aux)
    return strat()


def _phi_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [np.array(_np_phi(i["U_a"], i["U_b"]))], "Φ = mean cos² of the principal angles (scipy): ")


def _phi_self(call, ex):
    return _expect(call, Example({"U_a": ex.inputs["U_a"], "U_b": ex.inputs["U_a"]}, ex.meta), [np.array(1.0)],
                   "Φ(U, U) must be 1: ")


def _phi_range_symmetric(call, ex):
    i = ex.inputs
    ab = call(i)
    if isinstance(ab, CallError):
        return _call_failure(ab)
    ba = call({"U_a": i["U_b"], "U_b": i["U_a"]})
    if isinstance(ba, CallError):
        return _call_failure(ba, "with the arguments swapped: ")
    phi, tol = float(ab[0]), call.rtol(ex)
    call.record(max(-phi, phi - 1, 0.0), ex)
    if not -tol <= phi <= 1 + tol:
        return Failure(f"Φ = {phi:.6g} is outside [0, 1]", f"{phi:.6g}", "a value in [0, 1]")
    return _compare(call, ba, ab, ("Φ(U_b, U_a) vs Φ(U_a, U_b)",), ex, "not symmetric: ", hints=False)


def _phi_basis_invariant(call, ex):
    i = ex.inputs
    R = orthonormal(np.random.default_rng(ex.aux["rot_seed"]), i["U_a"].shape[1], i["U_a"].shape[1])  # (r, r)
    base = call(i)
    if isinstance(base, CallError):
        return _call_failure(base)
    rotated = call({**i, "U_a": i["U_a"] @ R})
    if isinstance(rotated, CallError):
        return _call_failure(rotated, "with a rotated basis: ")
    return _compare(call, rotated, base, ("Φ(U_a R, U_b) vs Φ(U_a, U_b)",), ex,
                    "Φ must depend on the subspaces only, not on the basis chosen in them: ", hints=False)


@st.composite
def _phi_other_height_examples(draw):
    c = draw(cases(same_shape=False, max_dim=MAX_DIM, min_dim=MIN_DIM))
    assume(c.W_s.shape[0] != c.W_t.shape[0])
    U_a, _ = _top_r(c.W_s, c.r)  # (m_a, r)
    U_b, _ = _top_r(c.W_t, c.r)  # (m_b, r)
    return _ex(dict(U_a=U_a, U_b=U_b), f"U_a of height m={U_a.shape[0]}, U_b of height m={U_b.shape[0]}, r={c.r}")


def _phi_refuses(call, ex):
    i = ex.inputs
    return _refuses(call, ex, f"U_a {i['U_a'].shape} and U_b {i['U_b'].shape}",
                    "Φ compares two subspaces of one space; cropping rows compares unrelated coordinates")


# ---- Layer transfer -----------------------------------------------------------------------------------------


def _layer_examples(same_shape=True, targets=("independent", "near"), second=False, diagonal=False):
    @st.composite
    def strat(draw):
        c, b, meta = draw(_update_case(same_shape=same_shape, targets=targets, full_sigma=False if diagonal else None,
                                       generic=not diagonal))
        aux = dict(alpha=draw(_alpha()), other=draw(matrices(*c.W_s.shape))) if second else {}
        aux.update(U_s=b["U_s"], V_s=b["V_s"], U_t=b["U_t"], V_t=b["V_t"])
        return _ex(dict(dW_s=b["dW_s"], W_s=c.W_s, W_t=c.W_t, r=c.r), meta, **aux)
    return strat()


def _layer_value(call, ex):
    a = ex.aux
    return _expect(call, ex, [_np_project(ex.inputs["dW_s"], a["U_t"], a["V_t"])])


def _layer_value_other_shape(call, ex):
    a = ex.aux
    if ex.inputs["W_s"].shape == ex.inputs["W_t"].shape:
        return None  # the drawn shapes happen to agree: that is the "value" check's case
    expected = _np_mismatch(ex.inputs["dW_s"], a["U_s"], a["V_s"], a["U_t"], a["V_t"])  # sign-free: ΔΣ_s is diagonal
    return _expect(call, ex, [expected])


def _layer_identity(call, ex):
    return _expect(call, ex, [ex.inputs["dW_s"]], "target = source must give a LoRA-X ΔW_s back: ")


def _layer_linear(call, ex):
    return _linear(call, ex, "dW_s")


def _layer_gate(call, ex):
    a = ex.aux
    phis = [_np_phi(X_s, X_t) for X_s, X_t in ((a["U_s"], a["U_t"]), (a["V_s"], a["V_t"])) if X_s.shape == X_t.shape]
    if not phis or min(phis) > 1 - 1e-6:  # Φ = 1 (identical subspaces, r = m): no threshold in [0, 1] gates it
        return None
    return _expect(call, ex, [np.zeros_like(ex.inputs["W_t"])],
                   "threshold=1 exceeds this layer's Φ, so the layer must be gated to zero: ", threshold=1.0)


def _mk(label, args, v_args, outputs, out_shapes, signature, checks, scale, own_svd=False) -> Spec:
    assert label in EQUATIONS, label
    return Spec(label, tuple(args), frozenset(v_args), tuple(outputs), out_shapes, signature, scale, tuple(checks), own_svd)


def _shape(i, a, b):
    return (i[a].shape[0], i[b].shape[0])


SPECS: dict[str, Spec] = {s.label: s for s in [
    _mk("Eq. (1)", ["U_s", "dSigma_s", "V_s"], ["V_s"], ["dW_s"], lambda i: [_shape(i, "U_s", "V_s")],
        "(U_s (m, r), dSigma_s (r,) or (r, r), V_s (n, r)) -> dW_s (m, n)", [
            Check("value-diag", "ΔW_s = U_s·diag(ΔΣ_s)·V_sᵀ for a diagonal ΔΣ_s (r,)", _eq1_examples(False), _eq1_value),
            Check("value-full", "ΔW_s = U_s·ΔΣ_s·V_sᵀ for a full ΔΣ_s (r, r)", _eq1_examples(True), _eq1_value),
            Check("in-subspace", "ΔW_s is unchanged by the source projector (Eq. (2))", _eq1_examples(None), _eq1_in_subspace),
        ], lambda i: _amax(i["dSigma_s"])),
    _mk("Eq. (2)", ["dW", "U", "V"], ["V"], ["dW"], lambda i: [i["dW"].shape],
        "(dW (m, n), U (m, r), V (n, r)) -> (m, n)", [
            Check("value", "U·Uᵀ·ΔW·V·Vᵀ for a generic ΔW", _eq2_examples(False), _eq2_value),
            Check("fixed-point", "a LoRA-X update U·ΔΣ·Vᵀ is returned unchanged (Eq. (2))", _eq2_examples(True), _eq2_fixed_point),
            Check("idempotent", "projecting twice equals projecting once", _eq2_examples(False), _eq2_idempotent),
        ], lambda i: _amax(i["dW"])),
    _mk("Eq. (3)", ["dW_s", "U_t", "V_t"], ["V_t"], ["dW_t"], lambda i: [i["dW_s"].shape],
        "(dW_s (m, n), U_t (m, r), V_t (n, r)) -> dW_t (m, n)", [
            Check("value", "ΔW_t←s = U_t·U_tᵀ·ΔW_s·V_t·V_tᵀ", _eq3_examples(), _eq3_value),
            Check("source-is-target", "target = source gives a LoRA-X ΔW_s back", _eq3_examples(("same",), generic=False), _eq3_identity),
            Check("linear", "linear in ΔW_s", _eq3_examples(extra="linear"), _eq3_linear),
            Check("contraction", "‖ΔW_t←s‖_F ≤ ‖ΔW_s‖_F", _eq3_examples(), _eq3_contraction),
            Check("sign-flips", "sign flips of target pairs (u_i, v_i) leave ΔW_t←s unchanged", _eq3_examples(extra="flip"), _eq3_sign_flips),
            Check("refuses-other-shapes", "raises for a target of another shape (no padding, cropping, broadcasting)",
                  _other_shape_examples(), _eq3_refuses),
        ], lambda i: _amax(i["dW_s"])),
    _mk("Eq. (3) rotation form", ["U_t", "U_s", "dSigma_s", "V_s", "V_t"], ["V_s", "V_t"], ["dSigma_ts"],
        lambda i: [(i["U_t"].shape[1], i["V_t"].shape[1])],
        "(U_t (m, r), U_s (m, r), dSigma_s (r,) or (r, r), V_s (n, r), V_t (n, r)) -> dSigma_ts (r, r)", [
            Check("value", "ΔΣ_t←s = U_tᵀ·U_s·ΔΣ_s·V_sᵀ·V_t", _rot_examples(), _rot_value),
            Check("forms-agree", "U_t·ΔΣ_t←s·V_tᵀ equals the projection form U_tU_tᵀ·ΔW_s·V_tV_tᵀ", _rot_examples(), _rot_forms_agree),
            Check("source-is-target", "target = source gives ΔΣ_s back", _rot_examples(("same",)), _rot_identity),
            Check("sign-covariant", "flipping target pairs by D gives D·ΔΣ_t←s·D", _rot_examples(flip=True), _rot_sign_covariant),
        ], lambda i: _amax(i["dSigma_s"])),
    _mk("Eq. (3) low-rank form", ["B", "A", "U_t", "V_t"], ["V_t"], ["B_t", "A_t"],
        lambda i: [i["B"].shape, i["A"].shape],
        "(B (m, k), A (k, n), U_t (m, r), V_t (n, r)) -> (B_t (m, k), A_t (k, n))", [
            Check("value", "B' = U_t·U_tᵀ·B and A' = A·V_t·V_tᵀ", _lowrank_examples(), _lowrank_value),
            Check("product", "B'·A' equals the merged form U_tU_tᵀ·(BA)·V_tV_tᵀ", _lowrank_examples(), _lowrank_product),
            Check("refuses-other-shapes", "raises for a target of another shape (no padding or cropping of B, A)",
                  _lowrank_other_shape_examples(), _lowrank_refuses),
        ], lambda i: (_amax(i["B"]), _amax(i["A"]))),
    _mk("Table 5 ablation", ["U_t", "dSigma_s", "V_t"], ["V_t"], ["dW_copy"], lambda i: [_shape(i, "U_t", "V_t")],
        "(U_t (m, r), dSigma_s (r,) or (r, r), V_t (n, r)) -> (m, n)", [
            Check("value-diag", "U_t·diag(ΔΣ_s)·V_tᵀ for a diagonal ΔΣ_s", _copy_examples(False), _copy_value),
            Check("value-full", "U_t·ΔΣ_s·V_tᵀ for a full ΔΣ_s", _copy_examples(True), _copy_value),
        ], lambda i: _amax(i["dSigma_s"])),
    _mk("§4.2.2 alignment maps", ["U_s", "V_s", "U_t", "V_t"], ["V_s", "V_t"], ["P", "Q"],
        lambda i: [_shape(i, "U_t", "U_s"), _shape(i, "V_t", "V_s")],
        "(U_s (m_s, r), V_s (n_s, r), U_t (m_t, r), V_t (n_t, r)) -> (P (m_t, m_s), Q (n_t, n_s))", [
            Check("value", "P, Q = the minimum-norm least-squares solutions (numpy lstsq), different shapes",
                  _align_examples(False), _align_value),
            Check("value-same-shape", "the same at equal shapes", _align_examples(True), _align_value),
            Check("exact-fit", "P·U_s = U_t and Q·V_s = V_t", _align_examples(False), _align_exact_fit),
            Check("min-norm", "P, Q vanish outside span(U_s), span(V_s)", _align_examples(False), _align_min_norm),
        ], lambda i: 1.0),
    _mk("§4.2.2", ["dW_s", "U_s", "V_s", "U_t", "V_t"], ["V_s", "V_t"], ["dW_t"], lambda i: [_shape(i, "U_t", "V_t")],
        "(dW_s (m_s, n_s), U_s (m_s, r), V_s (n_s, r), U_t (m_t, r), V_t (n_t, r)) -> dW_t (m_t, n_t)", [
            Check("value", "U_t·(U_tᵀ·P̂U_s·C_s·(Q̂V_s)ᵀ·V_t)·V_tᵀ with lstsq P̂, Q̂, different shapes",
                  _mismatch_examples(False), _mismatch_value),
            Check("value-same-shape", "the same rule at equal shapes (it is not Eq. (3))", _mismatch_examples(True), _mismatch_value),
            Check("linear", "linear in ΔW_s", _mismatch_examples(True, second=True), _mismatch_linear),
        ], lambda i: _amax(i["dW_s"])),
    _mk("Eq. (4)", ["U_a", "U_b"], [], ["phi"], lambda i: [()],
        "(U_a (m, r), U_b (m, r)) -> phi (a number)", [
            Check("value", "Φ = ‖U_aᵀU_b‖_F² / r = mean cos² of the principal angles", _phi_examples(), _phi_value),
            Check("self", "Φ(U, U) = 1", _phi_examples(), _phi_self),
            Check("range-symmetric", "0 ≤ Φ ≤ 1 and Φ(U_a, U_b) = Φ(U_b, U_a)", _phi_examples(), _phi_range_symmetric),
            Check("basis-invariant", "Φ(U_a·R, U_b) = Φ(U_a, U_b) for a rotation R", _phi_examples(rotate=True), _phi_basis_invariant),
            Check("refuses-other-heights", "raises for bases of different heights m (no cropping of rows)",
                  _phi_other_height_examples(), _phi_refuses),
        ], lambda i: 1.0),
    _mk("Layer transfer", ["dW_s", "W_s", "W_t", "r"], [], ["dW_t"], lambda i: [i["W_t"].shape],
        "(dW_s (m_s, n_s), W_s (m_s, n_s), W_t (m_t, n_t), r) -> dW_t (m_t, n_t) or (dW_t, report)", [
            Check("value", "equal shapes: Eq. (3) with the top-r SVD bases of W_t", _layer_examples(), _layer_value),
            Check("value-other-shape", "different shapes: §4.2.2 (LoRA-X ΔW_s with diagonal ΔΣ_s)",
                  _layer_examples(same_shape=False, diagonal=True), _layer_value_other_shape),
            Check("source-is-target", "W_t = W_s gives a LoRA-X ΔW_s back", _layer_examples(targets=("same",), diagonal=True),
                  _layer_identity),
            Check("linear", "linear in ΔW_s", _layer_examples(second=True), _layer_linear),
            Check("gate", "threshold 1 gives a zero update wherever Φ < 1", _layer_examples(), _layer_gate, requires="threshold"),
        ], lambda i: _amax(i["dW_s"]), own_svd=True),
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


def _golden_row(call: "_Runner", spec: Spec, golden: dict, name: str) -> Row:
    """Every golden case of ``spec.label``; the first failing one is reported.

    float64 uses the file's own rule, ``atol + rtol · max |E|``; a lower precision uses the kit's rule
    (:class:`Precision`) with the conditioning of the case, as the property checks do.
    """
    entry = golden["equations"].get(spec.label)
    title = f"golden cases from {name}"
    if not entry or not entry.get("cases"):
        return Row("golden", title, None, f"skipped: no golden cases for {spec.label}")
    tol = {**golden.get("tolerance", {}), **entry.get("tolerance", {})}
    rtol, atol = float(tol.get("rtol", TOL)), float(tol.get("atol", 0.0))
    cases_ = entry["cases"]
    title += f" ({len(cases_)})"
    for case in cases_:
        inputs = {k: _golden_value(v) for k, v in case["inputs"].items()}
        ex = Example(inputs, f"golden case {case['name']!r}" + (f" — {case['note']}" if case.get("note") else ""))
        out = call(inputs)
        if case.get("raises"):
            if isinstance(out, CallError) and out.kind == "raised":
                continue
            got = out.message if isinstance(out, CallError) else f"returned {_fmt(out[0])}"
            return Row("golden", title, False, f"case {case['name']!r} must raise ({case['raises']}); the candidate {got}",
                       example=ex.describe(), kind=out.kind if isinstance(out, CallError) else "no-raise")
        if isinstance(out, CallError):
            return Row("golden", title, False, f"case {case['name']!r}: {out.message}", example=ex.describe(), kind=out.kind)
        expected = [np.asarray(_golden_value(case["outputs"][o]), dtype=np.float64) for o in spec.outputs]
        sizes = spec.scale(inputs)
        sizes = sizes if isinstance(sizes, tuple) else (sizes,) * len(expected)
        for O, E, o, size in zip(out, expected, spec.outputs, sizes):
            e_max = float(np.max(np.abs(E))) if E.size else 0.0
            size = max(e_max, size) or 1.0
            if O.shape == E.shape and E.size:
                call.record(float(np.max(np.abs(O - E))) / size, ex)
            bound = atol + rtol * e_max if call.precision.name == "float64" else call.rtol(ex) * size
            fail = _mismatch(O, E, o, bound, ex)
            if fail:
                return Row("golden", title, False, f"case {case['name']!r}: {fail.message}", example=ex.describe(),
                           observed=fail.observed, expected=fail.expected, inputs=inputs, kind=fail.kind)
    return Row("golden", title, True)


# ---------------------------------------------------------------------------------------------------
# Running the checks
# ---------------------------------------------------------------------------------------------------


def _accepts(parameters: tuple[tuple[str, ...], bool] | None, name: str) -> bool:
    """Whether a candidate with these parameters (:func:`_parameters`) takes the keyword ``name``."""
    if parameters is None:
        return False
    names, var_kw = parameters
    return name in names or var_kw


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


def _run_checks(spec: Spec, call: _Runner, max_examples: int, shrink: bool, budget: float, golden: dict | None,
                golden_name: str, only: set | None = None, skip: set = frozenset(), first_failure: bool = False) -> list[Row]:
    """Golden cases (when ``golden`` is given), then every property check (or those in ``only``, less ``skip``);
    with ``first_failure``, nothing after the first failing row (a diagnosis needs no more)."""
    rows = []
    if golden is not None:
        t0 = time.perf_counter()
        row = _golden_row(call, spec, golden, golden_name)
        row.seconds = time.perf_counter() - t0
        rows.append(row)
    for check in spec.checks:
        if (only is not None and check.id not in only) or check.id in skip:
            continue
        if first_failure and any(r.passed is False for r in rows):
            break
        t0 = time.perf_counter()
        if check.requires and not _accepts(call.session.parameters, check.requires):
            rows.append(Row(check.id, check.name, None, f"skipped: the candidate takes no {check.requires!r} argument"))
            continue
        if call.stopped:
            rows.append(Row(check.id, check.name, False, f"not run: the candidate {call.stopped} in an earlier check",
                            kind="hung"))
            continue
        try:
            ex, fail = _search(check, call, max_examples, shrink, budget)
        except Exception as exc:  # noqa: BLE001 — a kit or hypothesis problem must not hide the other rows
            rows.append(Row(check.id, check.name, False, f"the kit could not run this check: {type(exc).__name__}: {_one_line(exc)}",
                            kind="kit"))
            continue
        if fail is None:
            rows.append(Row(check.id, check.name, True, seconds=time.perf_counter() - t0))
        else:
            rows.append(Row(check.id, check.name, False, fail.message, ex.describe(), fail.observed, fail.expected,
                            inputs=dict(ex.inputs), seconds=time.perf_counter() - t0, kind=fail.kind))
    return rows


def _alternatives(spec: Spec, adapter: Adapter) -> list[Adapter]:
    """The other conventions, most common mix-up first: V ↔ Vh, then numpy ↔ torch, then both."""
    flip_b = {"V": "Vh", "Vh": "V"}[adapter.bases]
    flip_f = {"torch": "numpy", "numpy": "torch"}[adapter.framework]
    changes = ([dict(bases=flip_b)] if spec.v_args else []) + [dict(framework=flip_f)]
    changes += [dict(framework=flip_f, bases=flip_b)] if spec.v_args else []
    out = []
    for change in changes:
        with contextlib.suppress(LoraxInputError):  # numpy has no bfloat16
            out.append(adapter.with_(**change))
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
    if alt.dtype != adapter.dtype:
        args.append(f"dtype={alt.dtype!r}")
        flags.append(f"--dtype {alt.dtype}")
    return ", ".join(args), " ".join(flags)


def _largest_error(runner: _Runner) -> str:
    """``largest relative error 2.2e-7 ≈ 3.7·u₃₂·κ``: the worst comparison of a run, in units of its precision."""
    ratio, err = runner.worst
    if err == 0:
        return "no rounding error on any case"
    return f"largest relative error {_sci(err)} ≈ {ratio:.2g}·{runner.precision.symbol}·κ"


def _diagnose(spec: Spec, session, adapter: Adapter, rows: list[Row], runner: _Runner, max_examples: int,
              timeout: float, golden, golden_name) -> tuple[str, str, Adapter | None]:
    """``(diagnosis, message, adapter that passes)``: re-run the failing checks under the other conventions,
    then with inputs and tolerances of each lower precision (under every convention).

    An alternative is tried on the checks that failed first (a wrong formula fails them again on the
    first examples, so this is quick); only if they all pass are the other checks run to confirm. A
    precision is only ever *suggested*: the verdict of the run itself stays FAIL.
    """
    failed = [r.id for r in rows if r.passed is False]
    precision = runner.precision
    if not failed:
        if precision.name == "float64":
            return "pass", "every check passed", None
        return "pass", f"every check passed at {precision.name} precision ({_largest_error(runner)})", None
    if runner.stopped == "hung":
        return "does not run", f"the candidate hung (no result within {timeout:g} s per call)", None
    if runner.stopped:
        return "does not run", f"the candidate {runner.stopped} during a call (see the messages above)", None
    ran_anywhere = runner.n_ok > 0
    quick = max(5, max_examples // 2)  # a diagnosis, not the verdict: the message says how to re-run in full

    def attempt(alt: Adapter) -> tuple[set, _Runner]:
        """The kinds of the first failure under ``alt`` (empty: every check passes), and its runner."""
        alt_runner = _Runner(session, spec, alt, timeout)
        first = _run_checks(spec, alt_runner, quick, False, 0.0, golden if "golden" in failed else None, golden_name,
                            only=set(failed), first_failure=True)
        bad = [r for r in first if r.passed is False]
        if not bad:
            rest = _run_checks(spec, alt_runner, quick, False, 0.0, golden if "golden" not in failed else None,
                               golden_name, skip=set(failed), first_failure=True)
            bad = [r for r in rest if r.passed is False]
        nonlocal ran_anywhere
        ran_anywhere |= alt_runner.n_ok > 0
        return {r.kind for r in bad}, alt_runner

    conventions = [adapter, *_alternatives(spec, adapter)]
    kinds = {adapter: {r.kind for r in rows if r.passed is False}}
    for alt in conventions[1:]:
        kinds[alt], alt_runner = attempt(alt)
        if not kinds[alt]:
            args, flags = _fix_hint(alt, adapter)
            return ("convention mismatch", f"the formula is right but the candidate expects {alt.describe()}; every check "
                    f"passes with Adapter({args}) (CLI: {flags})", alt)
    raised = next((r for r in rows if r.passed is False and r.kind == "raised"), None)

    def lower_precision(alt: Adapter, alt_runner: _Runner) -> tuple[str, str, Adapter]:
        args, flags = _fix_hint(alt, adapter)
        lead = f"it does not run on {adapter.dtype} inputs ({raised.message.splitlines()[0]}); " if raised else ""
        return ("lower precision", f"{lead}formula right at {alt.dtype} precision ({_largest_error(alt_runner)}); "
                f"use {flags} (Adapter({args})) to check it at that precision", alt)

    fallback = None  # a precision passed, but with errors above half its tolerance
    for p in _lower(precision):
        for convention in conventions:
            if not kinds[convention] <= {"value", "raised"}:
                continue  # a shape, type, NaN or refusal failure does not go away in a lower precision
            try:
                alt = convention.with_(dtype=p.name)
            except LoraxInputError:  # numpy has no bfloat16
                continue
            failures, alt_runner = attempt(alt)
            if failures:
                continue
            # Right code stays below a third of the tolerance; errors above half of it pass by luck on these
            # cases (bfloat16 rounding is 8 float16 roundoffs): then a lower precision with that margin wins.
            if alt_runner.worst[0] <= LOW_PRECISION_FACTOR / 2:
                return lower_precision(alt, alt_runner)
            fallback = fallback or (alt, alt_runner)
    if fallback:
        return lower_precision(*fallback)
    if not ran_anywhere:
        return "does not run", "no call returned a usable value under any input convention or precision (see the messages above)", None
    tried = "; ".join(a.describe() for a in _alternatives(spec, adapter))
    lower = ", ".join(p.name for p in _lower(precision))
    return ("wrong formula", f"no other input convention or lower precision makes every check pass (tried: {tried}"
            + (f"; inputs and tolerances in {lower}" if lower else "") + ")", None)


def check(
    func: Callable | str,
    equation: str,
    adapter: Adapter | None = None,
    *,
    dtype: str | None = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    timeout: float = DEFAULT_TIMEOUT,
    golden: bool | str | os.PathLike = True,
    diagnose: bool = True,
    shrink_budget: float = DEFAULT_SHRINK_BUDGET,
) -> Result:
    """Check ``func`` against one equation; returns a :class:`Result` (``str()`` it for the report).

    Args:
        func: the candidate, called like the reference function of ``equation`` (see :func:`signatures`),
            or a target ``"file.py:function"`` / ``"module:function"`` to load and call in a child process
            (isolated: its exits, crashes and output cannot disturb the kit; a hang is killed).
        equation: a label of :data:`lorax_ref.EQUATIONS` (``"Eq. (3)"``), its slug (``"eq3"``) or the
            reference function's name (``"transfer_same_dim"``).
        adapter: the candidate's convention (numpy/torch, V/Vh, dtype, device, call hook); default torch + V + float64.
        dtype: shorthand for ``adapter.with_(dtype=...)``: ``"float32"``, ``"float16"`` or ``"bfloat16"``
            inputs, judged with that precision's tolerances.
        max_examples: hypothesis examples per property (a failure is then shrunk).
        timeout: seconds per call before the candidate is reported as hung.
        golden: True for the packaged golden file, a path for another one, False to skip it.
        diagnose: on failure, re-run under the other conventions and lower precisions to tell a convention
            mismatch or a lower-precision implementation from a wrong formula.
        shrink_budget: seconds spent shrinking each failing property.
    """
    target = os.fspath(func) if isinstance(func, (str, os.PathLike)) else None
    if target is None and not callable(func):
        raise LoraxInputError(f"the candidate must be callable or a 'file.py:function' string, got {type(func).__name__}")
    label, _ = lookup(equation)
    spec = SPECS[label]
    adapter = adapter or Adapter()
    if not isinstance(adapter, Adapter):
        raise LoraxInputError(f"adapter must be a lorax_ref.conformance.Adapter, got {type(adapter).__name__}")
    if dtype is not None:
        adapter = adapter.with_(dtype=dtype)
    if target is not None and adapter.call is not None:
        raise LoraxInputError("a call hook needs the candidate as a function object, not a target string")
    if adapter.framework == "torch":
        try:
            torch.empty(0, device=adapter.device)
        except (RuntimeError, AssertionError) as exc:
            raise LoraxInputError(f"device {adapter.device!r} is not available here: {_one_line(exc)}") from None
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
    if target is not None:
        _parse_target(target)  # a typo is reported before a process is started
    session = _Subprocess(target, max(LOAD_TIMEOUT, timeout)) if target is not None else _InProcess(func)
    suggestion = None
    try:
        runner = _Runner(session, spec, adapter, timeout)
        with _single_threaded_torch():
            rows = _run_checks(spec, runner, max_examples, True, shrink_budget, gold, golden_name)
            if diagnose or all(r.passed is not False for r in rows):
                diagnosis, message, suggestion = _diagnose(spec, session, adapter, rows, runner, max_examples, timeout,
                                                           gold, golden_name)
            else:
                diagnosis, message = "not diagnosed", "diagnose=False"
    finally:
        session.close()
    return Result(label, session.name, adapter, rows, diagnosis, message, time.perf_counter() - t0, suggestion,
                  (runner.worst[1], runner.worst[0]))


# ---------------------------------------------------------------------------------------------------
# Command line: python -m lorax_ref verify module_or_file.py:function --equation LABEL
# ---------------------------------------------------------------------------------------------------


def _parse_target(target: str) -> tuple[str, str, bool]:
    """``(module or file, attribute, is_file)`` of ``"pkg.module:func"`` / ``"path/to/file.py:func"``."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise LoraxInputError(f"{target!r}: expected MODULE_OR_FILE:FUNCTION, e.g. my_lorax.py:transfer")
    path = Path(where)
    is_file = where.endswith(".py") or path.is_file()
    if is_file and not path.is_file():
        raise LoraxInputError(f"{where}: no such file")
    return where, attr, is_file


def _exec(load: Callable[[], Any], where: str):
    """Run an import; whatever it raises or exits with becomes one LoraxInputError line."""
    try:
        return load()
    except LoraxInputError:
        raise
    except SystemExit as exc:
        raise LoraxInputError(f"{where} called sys.exit({exc.code!r}) while being imported; a candidate's module must "
                              f"not end the process") from None
    except Exception as exc:  # noqa: BLE001 — the user's module failed to import: say so in one line
        raise LoraxInputError(f"importing {where} failed: {type(exc).__name__}: {_one_line(exc)}") from None


def load_candidate(target: str) -> Callable:
    """``"pkg.module:func"`` or ``"path/to/file.py:func"`` (``func`` may be dotted: ``Class.method``).

    Anything the module raises or a ``sys.exit`` at import is a :class:`LoraxInputError`.
    """
    where, attr, is_file = _parse_target(target)
    if is_file:
        path = Path(where)
        name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else (
            "_lorax_candidate_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12])
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
        sys.modules[name] = module
        try:
            _exec(lambda: spec.loader.exec_module(module), where)
        except LoraxInputError:
            sys.modules.pop(name, None)
            raise
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())

        def load():
            try:
                return importlib.import_module(where)
            except ModuleNotFoundError as exc:
                raise LoraxInputError(f"cannot import module {where!r}: {exc}") from None
        try:
            module = _exec(load, where)
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
convention mismatch (numpy vs torch, V vs Vh) or a formula that is right at a lower precision
(float32, float16, bfloat16) from a wrong formula. Exit code 0 when every check passes, 1 otherwise
(also for a file that cannot be loaded, a candidate that hangs or ends its process).

Your function is called like the reference function of the equation (--list shows the signatures),
with float64 torch tensors by default (--framework numpy for numpy arrays, --bases Vh for right
bases given as (r, n), --dtype float32 to check a float32 implementation at float32 tolerances).
It runs in a separate Python process: its output goes to stderr, never into the report or --json.
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
    p.add_argument("--dtype", choices=list(PRECISIONS), default="float64",
                   help="precision of the inputs and of the tolerances (default float64; bfloat16 needs torch)")
    p.add_argument("--device", default="cpu", help="torch device for the inputs (default cpu)")
    p.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES, metavar="N",
                   help=f"hypothesis examples per property (default {DEFAULT_MAX_EXAMPLES})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds per call before the candidate counts as hung (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--golden", metavar="FILE", default=None, help="another golden file (default: the packaged one)")
    p.add_argument("--no-golden", action="store_true", help="skip the golden cases")
    p.add_argument("--no-diagnose", action="store_true", help="do not re-run failures under other conventions and precisions")
    p.add_argument("--json", action="store_true", help="print the result as JSON (nothing else on stdout)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.set_defaults(func=run_verify)
    return p


def run_verify(args) -> int:
    """The ``verify`` subcommand: 0 when every check passes, 1 otherwise.

    The candidate runs in a child process (:class:`_Subprocess`), so nothing it does — print, exit,
    crash, hang — can reach this process's stdout or exit code: 0 comes only from a passing result.
    """
    if args.list:
        for label, sig in signatures().items():
            print(f"{slug(label):<24} {label}")
            print(f"{'':<24}   candidate{sig}")
        return 0
    if not args.target or not args.equation:
        raise LoraxInputError("verify needs MODULE_OR_FILE:FUNCTION and --equation LABEL (see --list)")
    adapter = Adapter(framework=args.framework, bases=args.bases, device=args.device, dtype=args.dtype)
    golden: bool | str = False if args.no_golden else (args.golden or True)
    result = check(args.target, args.equation, adapter, max_examples=args.max_examples, timeout=args.timeout,
                   golden=golden, diagnose=not args.no_diagnose)
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
