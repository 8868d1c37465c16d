"""Running the checks: hypothesis search and shrinking, the diagnosis of a failure, and :func:`check`."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from hypothesis import HealthCheck, Phase, Verbosity, find, settings
from hypothesis.errors import NoSuchExample

from ..errors import LoraxInputError
from ..registry import lookup
from .calling import Check, Convention, Spec, _one_line
from .compare import Example, Failure, _Runner
from .golden import GOLDEN_PATH, _golden_row, load_golden
from .loader import _parse_target
from .precision import (DEFAULT_MAX_EXAMPLES, DEFAULT_SHRINK_BUDGET, DEFAULT_SHRINK_STEPS, DEFAULT_TIMEOUT,
                        LOAD_TIMEOUT, LOW_PRECISION_FACTOR, _lower, _sci)
from .results import Result, Row
from .runner import _InProcess, _single_threaded_torch, _Subprocess
from .specs import SPECS


def _accepts(parameters: tuple[tuple[str, ...], bool] | None, name: str) -> bool:
    """Whether a candidate with these parameters (:func:`_parameters`) takes the keyword ``name``."""
    if parameters is None:
        return False
    names, var_kw = parameters
    return name in names or var_kw


class _StopShrinking(BaseException):
    """Ends hypothesis' shrinking when the budget is spent (a BaseException: hypothesis lets it through)."""


class _Budget(NamedTuple):
    """How far a failing property is shrunk: ``steps`` new examples (deterministic), ``seconds`` at most."""

    steps: int
    seconds: float


_constants_lock = threading.Lock()
_constants_state: dict[str, Any] = {"users": 0, "saved": None}  # searches running, hypothesis' own pool function


@contextlib.contextmanager
def _without_local_constants():
    """Hypothesis' examples without the literals of the modules loaded in this process.

    Recent hypothesis versions draw about one number in twenty from the literal constants of every
    *local* module in ``sys.modules`` (any file outside site-packages and the standard library). The
    kit's examples, and so its verdicts, would depend on what else the process has imported — the
    user's own modules, a notebook's helpers, a test harness — and on whether lorax_ref itself is
    installed from a wheel or from a checkout (seen: a check that fails on one and passes on the other).
    While the kit searches, that pool is empty (hypothesis' built-in constants stay): the same
    candidate gets the same examples everywhere, and no constants cache is written into the current
    directory. A hypothesis without the feature is left as it is.
    """
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import Constants
    except ImportError:  # pragma: no cover — a hypothesis without local constants
        yield
        return
    if not (callable(getattr(providers, "_get_local_constants", None)) and hasattr(providers, "CONSTANTS_CACHE")):
        yield  # pragma: no cover
        return
    state = _constants_state
    with _constants_lock:  # checks may run in several threads: the first in switches the pool off, the last out on
        if state["users"] == 0:
            state["saved"] = providers._get_local_constants
            providers._get_local_constants = Constants  # an empty pool
            providers.CONSTANTS_CACHE.cache.clear()  # it caches the pool's values per kind of draw
        state["users"] += 1
    try:
        yield
    finally:
        with _constants_lock:
            state["users"] -= 1
            if state["users"] == 0:
                providers._get_local_constants = state["saved"]
                providers.CONSTANTS_CACHE.cache.clear()


def _search(check: Check, call: _Runner, max_examples: int, shrink: bool, budget: _Budget):
    """The smallest example (hypothesis ``find``) on which ``check.verify`` fails, its Failure, and whether
    shrinking was cut short by ``budget.seconds`` (then another machine may end on another example).

    Hypothesis runs derandomized and without the constants of the modules loaded here
    (:func:`_without_local_constants`). Shrinking stops after ``budget.steps`` new examples — a count,
    not a time, so that a slower or busier machine shrinks to the same example — or, as a safety net for
    slow candidates, after ``budget.seconds``; the smallest failing example found by then is returned
    (each example hypothesis' shrinker accepts is smaller than the one before).
    """
    cache: dict[str, Failure | None] = {}
    first: list[float] = []  # when the first failing example was found
    steps = [0]  # new examples checked since then
    timed_out = [False]
    best: list[Example] = []

    def failing(ex: Example) -> bool:
        key = ex.key()
        if key in cache:  # also makes hypothesis' final replay agree with the search
            return cache[key] is not None
        if call.hung:
            raise _StopShrinking
        if first:
            if steps[0] >= budget.steps:
                raise _StopShrinking
            if time.perf_counter() - first[0] > budget.seconds:
                timed_out[0] = True
                raise _StopShrinking
            steps[0] += 1
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
        with _without_local_constants():
            ex = find(check.examples, failing, settings=config)
    except NoSuchExample:
        return None, None, False
    except _StopShrinking:
        if not best:
            return None, None, False
        ex = best[0]
    return ex, cache[ex.key()], timed_out[0]


def _run_checks(spec: Spec, call: _Runner, max_examples: int, shrink: bool, budget: _Budget, golden: dict | None,
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
            ex, fail, timed_out = _search(check, call, max_examples, shrink, budget)
        except Exception as exc:  # noqa: BLE001 — a kit or hypothesis problem must not hide the other rows
            rows.append(Row(check.id, check.name, False, f"the kit could not run this check: {type(exc).__name__}: {_one_line(exc)}",
                            kind="kit"))
            continue
        if fail is None:
            rows.append(Row(check.id, check.name, True, seconds=time.perf_counter() - t0))
        else:
            message = fail.message + (f"\n(shrinking stopped at its time limit of {budget.seconds:g} s: a smaller failing "
                                      f"input may exist, and another machine may show another one)" if timed_out else "")
            rows.append(Row(check.id, check.name, False, message, ex.describe(), fail.observed, fail.expected,
                            inputs=dict(ex.inputs), seconds=time.perf_counter() - t0, kind=fail.kind))
    return rows


def _alternatives(spec: Spec, convention: Convention) -> list[Convention]:
    """The other conventions, most common mix-up first: V ↔ Vh, then numpy ↔ torch, then both."""
    flip_b = {"V": "Vh", "Vh": "V"}[convention.bases]
    flip_f = {"torch": "numpy", "numpy": "torch"}[convention.framework]
    changes = ([dict(bases=flip_b)] if spec.v_args else []) + [dict(framework=flip_f)]
    changes += [dict(framework=flip_f, bases=flip_b)] if spec.v_args else []
    out = []
    for change in changes:
        with contextlib.suppress(LoraxInputError):  # numpy has no bfloat16
            out.append(convention.with_(**change))
    return out


def _fix_hint(alt: Convention, convention: Convention) -> tuple[str, str]:
    """``Convention(...)`` arguments and CLI flags that switch from ``convention`` to ``alt``."""
    args, flags = [], []
    if alt.framework != convention.framework:
        args.append(f"framework={alt.framework!r}")
        flags.append(f"--framework {alt.framework}")
    if alt.bases != convention.bases:
        args.append(f"bases={alt.bases!r}")
        flags.append(f"--bases {alt.bases}")
    if alt.dtype != convention.dtype:
        args.append(f"dtype={alt.dtype!r}")
        flags.append(f"--dtype {alt.dtype}")
    return ", ".join(args), " ".join(flags)


def _largest_error(runner: _Runner) -> str:
    """``largest relative error 2.2e-7 ≈ 3.7·u₃₂·κ``: the worst comparison of a run, in units of its precision."""
    ratio, err = runner.worst
    if err == 0:
        return "no rounding error on any case"
    return f"largest relative error {_sci(err)} ≈ {ratio:.2g}·{runner.precision.symbol}·κ"


def _diagnose(spec: Spec, session, convention: Convention, rows: list[Row], runner: _Runner, max_examples: int,
              timeout: float, golden, golden_name) -> tuple[str, str, Convention | None]:
    """``(diagnosis, message, convention that passes)``: re-run the failing checks under the other conventions,
    then with inputs and tolerances of each lower precision (under every convention).

    An alternative is tried on the checks that failed first (a wrong formula fails them again on the
    first examples, so this is quick); only if they all pass are the other checks run to confirm. A
    precision is only ever *suggested*: the verdict of the run itself stays FAIL.
    """
    # ~70 lines in one function: the stages share `attempt` and its counters, and the order in which the
    # alternatives are tried decides which one is suggested; kept together so that order stays visible.
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

    def attempt(alt: Convention) -> tuple[set, _Runner]:
        """The kinds of the first failure under ``alt`` (empty: every check passes), and its runner."""
        alt_runner = _Runner(session, spec, alt, timeout)
        no_shrink = _Budget(0, 0.0)
        first = _run_checks(spec, alt_runner, quick, False, no_shrink, golden if "golden" in failed else None, golden_name,
                            only=set(failed), first_failure=True)
        bad = [r for r in first if r.passed is False]
        if not bad:
            rest = _run_checks(spec, alt_runner, quick, False, no_shrink, golden if "golden" not in failed else None,
                               golden_name, skip=set(failed), first_failure=True)
            bad = [r for r in rest if r.passed is False]
        nonlocal ran_anywhere
        ran_anywhere |= alt_runner.n_ok > 0
        return {r.kind for r in bad}, alt_runner

    conventions = [convention, *_alternatives(spec, convention)]
    kinds = {convention: {r.kind for r in rows if r.passed is False}}
    for alt in conventions[1:]:
        kinds[alt], alt_runner = attempt(alt)
        if not kinds[alt]:
            args, flags = _fix_hint(alt, convention)
            return ("convention mismatch", f"the formula is right but the candidate expects {alt.describe()}; every check "
                    f"passes with Convention({args}) (CLI: {flags})", alt)
    raised = next((r for r in rows if r.passed is False and r.kind == "raised"), None)

    def lower_precision(alt: Convention, alt_runner: _Runner) -> tuple[str, str, Convention]:
        args, flags = _fix_hint(alt, convention)
        lead = f"it does not run on {convention.dtype} inputs ({raised.message.splitlines()[0]}); " if raised else ""
        return ("lower precision", f"{lead}formula right at {alt.dtype} precision ({_largest_error(alt_runner)}); "
                f"use {flags} (Convention({args})) to check it at that precision", alt)

    fallback = None  # a precision passed, but with errors above half its tolerance
    for p in _lower(precision):
        for tried in conventions:
            if not kinds[tried] <= {"value", "raised"}:
                continue  # a shape, type, NaN or refusal failure does not go away in a lower precision
            try:
                alt = tried.with_(dtype=p.name)
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
    tried = "; ".join(a.describe() for a in _alternatives(spec, convention))
    lower = ", ".join(p.name for p in _lower(precision))
    return ("wrong formula", f"no other input convention or lower precision makes every check pass (tried: {tried}"
            + (f"; inputs and tolerances in {lower}" if lower else "") + ")", None)


def _checked_arguments(target: str | None, convention: Convention | None, dtype: str | None, max_examples, timeout,
                       shrink_steps) -> Convention:
    """The settings of :func:`check`, each checked once, here; returns the convention to call with."""
    convention = convention or Convention()
    if not isinstance(convention, Convention):
        raise LoraxInputError(f"convention must be a lorax_ref.conformance.Convention, got {type(convention).__name__}")
    if dtype is not None:
        convention = convention.with_(dtype=dtype)
    if target is not None and convention.call is not None:
        raise LoraxInputError("a call hook needs the candidate as a function object, not a target string")
    if convention.framework == "torch":
        try:
            torch.empty(0, device=convention.device)
        except (RuntimeError, AssertionError) as exc:
            raise LoraxInputError(f"device {convention.device!r} is not available here: {_one_line(exc)}") from None
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise LoraxInputError(f"max_examples must be a positive int, got {max_examples!r}")
    if not timeout > 0:
        raise LoraxInputError(f"timeout must be > 0 seconds, got {timeout!r}")
    if isinstance(shrink_steps, bool) or not isinstance(shrink_steps, int) or shrink_steps < 0:
        raise LoraxInputError(f"shrink_steps must be an int >= 0, got {shrink_steps!r}")
    return convention


def check(
    func: Callable | str,
    equation: str,
    convention: Convention | None = None,
    *,
    dtype: str | None = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    timeout: float = DEFAULT_TIMEOUT,
    golden: bool | str | os.PathLike = True,
    diagnose: bool = True,
    shrink_steps: int = DEFAULT_SHRINK_STEPS,
    shrink_budget: float = DEFAULT_SHRINK_BUDGET,
) -> Result:
    """Check ``func`` against one equation; returns a :class:`Result` (``str()`` it for the report).

    Args:
        func: the candidate, called like the reference function of ``equation`` (see :func:`signatures`),
            or a target ``"file.py:function"`` / ``"module:function"`` to load and call in a child process
            (isolated: its exits, crashes and output cannot disturb the kit; a hang is killed).
        equation: a label of :data:`lorax_ref.EQUATIONS` (``"Eq. (3)"``), its slug (``"eq3"``) or the
            reference function's name (``"transfer_same_dim"``).
        convention: the candidate's convention (numpy/torch, V/Vh, dtype, device, call hook); default torch + V + float64.
        dtype: shorthand for ``convention.with_(dtype=...)``: ``"float32"``, ``"float16"`` or ``"bfloat16"``
            inputs, judged with that precision's tolerances.
        max_examples: hypothesis examples per property (a failure is then shrunk).
        timeout: seconds per call before the candidate is reported as hung.
        golden: True for the packaged golden file, a path for another one, False to skip it.
        diagnose: on failure, re-run under the other conventions and lower precisions to tell a convention
            mismatch or a lower-precision implementation from a wrong formula.
        shrink_steps: new examples tried while shrinking each failing property (a count: the report is the
            same on every machine).
        shrink_budget: at most this many seconds of shrinking per failing property (a safety net for slow
            candidates; a row whose shrinking it cut short says so).
    """
    target = os.fspath(func) if isinstance(func, (str, os.PathLike)) else None
    if target is None and not callable(func):
        raise LoraxInputError(f"the candidate must be callable or a 'file.py:function' string, got {type(func).__name__}")
    label, _ = lookup(equation)
    spec = SPECS[label]
    convention = _checked_arguments(target, convention, dtype, max_examples, timeout, shrink_steps)
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
        runner = _Runner(session, spec, convention, timeout)
        with _single_threaded_torch():
            rows = _run_checks(spec, runner, max_examples, True, _Budget(shrink_steps, shrink_budget), gold, golden_name)
            if diagnose or all(r.passed is not False for r in rows):
                diagnosis, message, suggestion = _diagnose(spec, session, convention, rows, runner, max_examples, timeout,
                                                           gold, golden_name)
            else:
                diagnosis, message = "not diagnosed", "diagnose=False"
    finally:
        session.close()
    return Result(label, session.name, convention, rows, diagnosis, message, time.perf_counter() - t0, suggestion,
                  (runner.worst[1], runner.worst[0]))
