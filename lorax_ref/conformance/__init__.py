r"""Conformance kit: check anyone's LoRA-X implementation, equation by equation.

Point it at your own function and an equation label of :data:`lorax_ref.EQUATIONS`::

    from lorax_ref.conformance import check
    result = check(my_transfer, equation="Eq. (3)")     # or its slug "eq3", or "transfer_same_dim"
    print(result)                                       # one row per check; result.passed, result.rows
    check("my_lorax.py:my_transfer", "eq3")             # the same, the candidate in its own process

or from a shell: ``python -m lorax_ref verify my_module.py:my_transfer --equation eq3``.

**The calling convention.** The candidate is called like the reference function of that equation
(same positional arguments, same order; :func:`signatures` lists them) with float64 inputs: torch
tensors on the CPU by default. :class:`Convention` changes that: ``framework="numpy"`` passes numpy arrays,
``bases="Vh"`` passes every right basis transposed, ``(r, n)`` as ``torch.linalg.svd`` returns it,
``dtype="float32"`` (``"float16"``, ``"bfloat16"``) passes inputs in that precision and judges with that
precision's tolerances, ``device="cuda"`` moves tensors, and ``call(func, inputs)`` wires any other
signature (``inputs`` maps the reference's argument names to converted values). Outputs may be torch
tensors, numpy arrays or Python numbers; a candidate of ``Layer transfer`` may return ``dW_t`` or
``(dW_t, anything)``.

**What is checked.** Per equation: the golden cases of ``data/golden/lorax_golden_v1.json`` (generated
from the reference by ``scripts/make_golden.py``), then properties on hypothesis-generated layers
(:mod:`lorax_ref.testing.strategies`) whose expected values are computed independently with
numpy/scipy in float64 (:mod:`lorax_ref.testing.oracles`) — never by calling lorax_ref's own function. A failing property is shrunk to
the smallest failing input hypothesis finds; the row shows it with the observed and expected values and,
where it recognises one, the likely mistake (a constant factor such as a forgotten α/r, a transpose, a
no-op). The report is reproducible: hypothesis runs derandomized and without the literals of the
modules loaded in the process (:func:`_without_local_constants`), and shrinking is bounded by a number
of examples (``shrink_steps``), not by time, so every machine checks the same examples and shows the
same smallest failing inputs (a time limit, ``shrink_budget``, only guards against slow candidates; a
row it cut short says so). When checks fail, the kit re-runs them under the other conventions
(numpy ↔ torch, V ↔ Vh) and at the lower precisions, and says whether it found a *convention mismatch*
(some convention passes everything), a formula that is *right at a lower precision* (float32 inputs and
tolerances pass everything: "use --dtype float32"), or a *wrong formula* (nothing does).

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

**Modules.** :mod:`.kit` (:func:`check`: search, shrinking, diagnosis), :mod:`.specs` (the property
checks of each equation label, :data:`SPECS`), :mod:`.golden` (the golden cases), :mod:`.compare`
(examples, comparison, messages, and the runner that judges one candidate), :mod:`.calling`
(:class:`Convention`, :class:`Spec`, input conversion, what a call returned), :mod:`.runner` (worker
thread or child process, time limits), :mod:`.precision` (tolerances), :mod:`.results` (:class:`Result`,
:class:`Row`), :mod:`.loader` and :mod:`.command` (targets and the ``verify`` command line),
:mod:`.gallery` (wrong implementations the kit must catch).
"""
from __future__ import annotations

from .calling import CallError, Check, Convention, Spec
from .command import VERIFY_HELP, add_verify_parser, main, run_verify
from .golden import GOLDEN_PATH, load_golden
from .kit import check
from .loader import load_candidate
from .precision import (
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_SHRINK_BUDGET,
    DEFAULT_SHRINK_STEPS,
    DEFAULT_TIMEOUT,
    LOAD_TIMEOUT,
    LOW_PRECISION_FACTOR,
    MAX_DIM,
    MIN_DIM,
    PRECISIONS,
    TOL,
    TOL_SVD,
    Precision,
)
from .results import Result, Row
from .specs import SPECS, signatures

__all__ = [
    "CallError", "Check", "Convention", "DEFAULT_MAX_EXAMPLES", "DEFAULT_SHRINK_BUDGET", "DEFAULT_SHRINK_STEPS",
    "DEFAULT_TIMEOUT", "GOLDEN_PATH", "LOAD_TIMEOUT", "LOW_PRECISION_FACTOR", "MAX_DIM", "MIN_DIM", "PRECISIONS",
    "Precision", "Result", "Row", "SPECS", "Spec", "TOL", "TOL_SVD", "VERIFY_HELP", "add_verify_parser", "check",
    "load_candidate", "load_golden", "main", "run_verify", "signatures",
]
