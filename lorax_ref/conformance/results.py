"""What :func:`~lorax_ref.conformance.check` returns: one :class:`Row` per check, gathered in a :class:`Result`."""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import slug
from .calling import Convention
from .precision import PRECISIONS
from .specs import SPECS


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
    convention: "Convention"
    rows: list[Row]
    diagnosis: str  # "pass", "convention mismatch", "lower precision", "wrong formula" or "does not run"
    diagnosis_message: str
    seconds: float = 0.0
    suggestion: "Convention | None" = None  # for "convention mismatch" / "lower precision": the convention that passes
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
            "adapter": self.convention.describe(),
            "dtype": self.convention.dtype,
            "tolerance": PRECISIONS[self.convention.dtype].rule(SPECS[self.equation].own_svd),
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
            f"  adapter: {self.convention.describe()}",
            f"  calls candidate{spec.signature}",
            f"  tolerance: {PRECISIONS[self.convention.dtype].rule(spec.own_svd)}",
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
