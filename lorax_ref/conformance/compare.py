"""Examples, comparison of observed with expected values, the messages that name a mistake, and
:class:`_Runner`, which calls one candidate under one convention and judges it with one tolerance."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
import numpy as np

from .calling import CallError, Convention, Spec
from .precision import PRECISIONS, Precision


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


class _Runner:
    """Calls one candidate under one convention (inputs in ``convention.dtype``) and judges with the tolerance
    of ``precision`` (by default that dtype's); counts what happened."""

    def __init__(self, session, spec: "Spec", convention: Convention, timeout: float, precision: Precision | None = None):
        self.session, self.spec, self.convention, self.timeout = session, spec, convention, timeout
        self.precision = precision or PRECISIONS[convention.dtype]
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
        out = self.session.call(self.spec, self.convention, inputs, kw, self.timeout)
        if isinstance(out, CallError):
            if out.kind == "hung":
                self.stopped = "hung"
            elif out.kind == "exited":
                self.stopped = "ended its process"
        else:
            self.n_ok += 1
        return out
