"""How a candidate is called: its calling convention, input conversion, the checks on what it returns,
and :class:`Spec`, what the kit knows of an equation (its signature and its checks)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..errors import LoraxInputError
from .precision import PRECISIONS


# ---------------------------------------------------------------------------------------------------
# Convention: how the candidate wants its inputs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Convention:
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
            raise LoraxInputError(f"Convention framework={self.framework!r}: expected 'torch' or 'numpy'")
        if self.bases not in ("V", "Vh"):
            raise LoraxInputError(f"Convention bases={self.bases!r}: expected 'V' (n, r) or 'Vh' (r, n)")
        if self.dtype not in PRECISIONS:
            raise LoraxInputError(f"Convention dtype={self.dtype!r}: expected one of {', '.join(map(repr, PRECISIONS))}")
        if self.dtype == "bfloat16" and self.framework == "numpy":
            raise LoraxInputError("Convention dtype='bfloat16' needs framework='torch': numpy has no bfloat16")
        if self.call is not None and not callable(self.call):
            raise LoraxInputError(f"Convention call must be callable, got {type(self.call).__name__}")

    def with_(self, **changes) -> "Convention":
        return Convention(**{**self.__dict__, **changes})

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


def _convert(spec: "Spec", convention: Convention, name: str, value):
    """One float64 numpy input in the candidate's convention (framework, V/Vh, dtype, device)."""
    if not isinstance(value, np.ndarray):
        return value  # ranks, thresholds, strings
    if convention.bases == "Vh" and name in spec.v_args:
        value = value.T  # (n, r) -> (r, n)
    if convention.framework == "numpy":
        return np.array(value, dtype=convention.dtype, copy=True)  # rounded to nearest
    t = torch.tensor(np.ascontiguousarray(value), dtype=torch.float64)
    return t.to(device=convention.device, dtype=PRECISIONS[convention.dtype].torch_dtype)


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


def _call_once(func: Callable, spec: "Spec", convention: Convention, inputs: dict, kw: dict) -> list[np.ndarray] | CallError:
    """Convert ``inputs`` (float64 numpy, reference names), call ``func``, check and convert its output."""
    try:
        converted = {name: _convert(spec, convention, name, v) for name, v in {**inputs, **kw}.items()}
    except Exception as exc:  # noqa: BLE001 — e.g. a device that is not there: the kit's problem, not the candidate's
        return CallError("kit", f"was not called: the kit could not convert the inputs ({type(exc).__name__}: {_one_line(exc)})")
    snapshot = {k: (v.clone() if isinstance(v, torch.Tensor) else v.copy()) for k, v in converted.items()
                if isinstance(v, (torch.Tensor, np.ndarray))}
    try:
        if convention.call is not None:
            value = convention.call(func, dict(converted))
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
# What the kit knows of an equation: its signature and its checks (the instances are in specs.py)
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
