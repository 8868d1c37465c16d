"""The golden cases: small float64 inputs with the reference's outputs, in a JSON file any port can read."""
from __future__ import annotations

import json
import os
from pathlib import Path
import numpy as np

from ..errors import LoraxInputError
from .calling import CallError, Spec
from .compare import Example, _fmt, _mismatch, _Runner
from .precision import TOL
from .results import Row

GOLDEN_PATH = Path(__file__).resolve().parents[1] / "data" / "golden" / "lorax_golden_v1.json"


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
