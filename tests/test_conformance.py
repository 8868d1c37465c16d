"""The conformance kit (lorax_ref.conformance) and its gallery of wrong implementations.

The kit is run with ``max_examples=MAX`` (fewer than its default) to keep this file fast; the slow test
at the end runs the defaults and checks the time budget (< 20 s per equation).
"""
import functools
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.linalg as sla
import torch

import lorax_ref as L
from lorax_ref import conformance as C
from lorax_ref import gallery
from lorax_ref.cli import main as cli_main
from lorax_ref.registry import slug
from lorax_ref.testing.strategies import top_r_bases

MAX = 6


def run(func, equation, adapter=None, **kw):
    kw.setdefault("max_examples", MAX)
    return C.check(func, equation, adapter, **kw)


@functools.lru_cache(maxsize=None)
def gallery_result(name: str) -> C.Result:
    """Each gallery entry is checked once per test session; several tests read the same result."""
    e = gallery.entry(name)
    return run(e.func, e.equation, e.adapter, timeout=0.3 if name == "hangs" else C.DEFAULT_TIMEOUT)


# ------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("label", list(L.EQUATIONS), ids=slug)
def test_reference_passes_every_check(label):
    result = run(L.EQUATIONS[label], label)
    assert result.passed, str(result)
    assert result.diagnosis == "pass"
    assert "golden" in {r.id for r in result.rows} and any(r.id.startswith("value") for r in result.rows)
    assert all(r.passed is True for r in result.rows if r.id != "gate"), str(result)


def test_every_label_has_a_spec_with_the_reference_signature():
    import inspect

    assert set(C.SPECS) == set(L.EQUATIONS)
    for label, spec in C.SPECS.items():
        params = list(inspect.signature(L.EQUATIONS[label]).parameters)
        assert list(spec.args) == params[: len(spec.args)], label
        assert len(spec.checks) >= 2, label


# ------------------------------------------------------------------------------------------ gallery


@pytest.mark.parametrize("entry", gallery.ALL, ids=lambda e: e.name)
def test_gallery_entry_is_caught_by_the_right_checks(entry):
    result = gallery_result(entry.name)
    failed = {r.id for r in result.failed}
    assert not result.passed
    assert set(entry.caught_by) <= failed, f"{entry.name}: expected {entry.caught_by} among the failures\n{result}"
    assert result.diagnosis == entry.expected_diagnosis, str(result)
    for row in result.failed:  # readable: a message, and for properties the smallest failing input
        assert row.message
        if row.id != "golden" and not row.message.startswith("not run"):
            assert row.example and row.inputs


@pytest.mark.parametrize("entry", gallery.CONVENTION, ids=lambda e: e.name)
def test_convention_entries_pass_under_their_convention(entry):
    result = run(entry.func, entry.equation, entry.fixed_by)
    assert result.passed, str(result)
    hint = "bases='Vh'" if entry.fixed_by.bases == "Vh" else "framework='numpy'"
    assert hint in gallery_result(entry.name).diagnosis_message


def test_gallery_messages_name_the_mistake():
    alpha = gallery_result("forgot_alpha_over_r")
    assert "observed = 0.5 × expected" in alpha.row("golden").message
    no_trunc = gallery_result("no_truncation")
    assert "truncated to r" in no_trunc.row("golden").message
    phi = gallery_result("similarity_over_rs_rt")
    row = phi.row("self")
    assert row.expected == "1" and float(row.observed) == pytest.approx(1 / row.inputs["U_a"].shape[1], abs=1e-4)
    pads = gallery_result("eq3_pads_other_shapes")
    assert "must raise" in pads.row("golden").message
    assert "did not raise" in pads.row("refuses-other-shapes").message


def test_gallery_candidates_are_really_wrong_by_an_independent_computation():
    """The gallery is not wrong by accident of the kit: compare two entries with numpy directly."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 5))
    U, V = top_r_bases(W, 2)
    dW = U @ np.diag([1.0, -2.0]) @ V.T
    T = lambda a: torch.tensor(a)  # noqa: E731
    out = gallery.no_truncation(T(dW), T(W), T(W + 0.5 * rng.standard_normal((5, 5))), 2).numpy()
    assert np.allclose(out, dW)  # the full projector is the identity: the update is not transferred at all
    Ua, Ub = top_r_bases(W, 3)[0], top_r_bases(rng.standard_normal((5, 5)), 3)[0]
    phi = np.mean(np.cos(sla.subspace_angles(Ua, Ub)) ** 2)
    assert gallery.similarity_over_rs_rt(T(Ua), T(Ub)) == pytest.approx(phi / 3)


# ----------------------------------------------------------------------------- robustness: reported, not crashed


def test_raising_candidate_is_reported():
    result = gallery_result("raises")
    assert result.diagnosis == "does not run"
    assert "raised NotImplementedError: TODO: implement Eq. (3)" in result.row("value").message


def test_wrong_shape_candidate_is_reported():
    result = gallery_result("wrong_shape")
    assert "transpose" in result.row("value").message  # a shape error or, on a square layer, a transposed value
    assert "returned dW_t of shape (3, 4); expected (4, 3)" in result.row("golden").message


def test_nan_candidate_is_reported():
    result = gallery_result("returns_nan")
    assert "NaN" in result.row("value").message
    assert result.diagnosis == "does not run"


def test_hanging_candidate_is_reported_within_the_timeout():
    t0 = time.perf_counter()
    result = run(gallery.hangs, "eq3", timeout=0.3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, elapsed  # one timeout, then the candidate is called no more
    assert result.diagnosis_message.startswith("the candidate hung")
    assert "hung" in result.row("golden").message
    assert all(r.passed is False for r in result.rows)
    assert result.diagnosis == "does not run"


def test_a_candidate_that_mutates_its_input_is_reported():
    def mutates(dW_s, U_t, V_t):
        dW_s.mul_(2)
        return U_t @ U_t.T @ (dW_s / 2) @ V_t @ V_t.T

    result = run(mutates, "eq3", diagnose=False)
    assert "modified its input dW_s in place" in result.row("value").message


def test_a_candidate_returning_garbage_is_reported():
    result = run(lambda U_a, U_b: "high", "eq4", diagnose=False)
    assert "returned a str" in result.row("value").message


def test_kit_arguments_are_validated():
    with pytest.raises(L.LoraxInputError, match="unknown equation"):
        C.check(L.transfer_same_dim, "eq99")
    with pytest.raises(L.LoraxInputError, match="framework"):
        C.Adapter(framework="jax")
    with pytest.raises(L.LoraxInputError, match="bases"):
        C.Adapter(bases="U")
    with pytest.raises(L.LoraxInputError, match="callable"):
        C.check("not a function", "eq3")
    with pytest.raises(L.LoraxInputError, match="max_examples"):
        C.check(L.transfer_same_dim, "eq3", max_examples=0)


# ----------------------------------------------------------------------------------- conventions


def numpy_eq3(dW_s, U_t, V_t):
    return U_t.dot(U_t.T).dot(dW_s).dot(V_t).dot(V_t.T)  # ndarray.dot; torch's .dot is 1-D only


def test_numpy_candidate_passes_with_the_numpy_adapter():
    assert run(numpy_eq3, "eq3", C.Adapter(framework="numpy")).passed


def test_torch_candidate_given_numpy_arrays_is_a_convention_mismatch():
    result = run(L.transfer_same_dim, "eq3", C.Adapter(framework="numpy"))
    assert result.diagnosis == "convention mismatch"
    assert "framework='torch'" in result.diagnosis_message and "--framework torch" in result.diagnosis_message


def test_vh_candidate_is_told_apart_from_a_wrong_formula():
    vh = gallery_result("written_for_vh")
    assert vh.diagnosis == "convention mismatch" and "bases='Vh'" in vh.diagnosis_message
    wrong = gallery_result("vh_columns_as_v")  # Vh misused inside: no convention fixes it
    assert wrong.diagnosis == "wrong formula"


def test_reference_given_vh_is_a_convention_mismatch_even_on_square_layers():
    result = run(L.transfer_same_dim, "eq3", C.Adapter(bases="Vh"))
    assert result.diagnosis == "convention mismatch" and "bases='V'" in result.diagnosis_message


def test_call_hook_wires_another_signature():
    def my_transfer(*, target_bases, update):
        U_t, V_t = target_bases
        return U_t @ U_t.T @ update @ V_t @ V_t.T

    hook = lambda f, i: f(target_bases=(i["U_t"], i["V_t"]), update=i["dW_s"])  # noqa: E731
    assert run(my_transfer, "eq3", C.Adapter(call=hook)).passed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs():
    assert run(L.transfer_same_dim, "eq3", C.Adapter(device="cuda")).passed


# --------------------------------------------------------------------------------------- golden file


def test_golden_file_is_what_the_script_writes():
    sys.path.insert(0, str(C.GOLDEN_PATH.parents[3] / "scripts"))
    try:
        import make_golden
    finally:
        sys.path.pop(0)
    committed = json.loads(C.GOLDEN_PATH.read_text())
    assert make_golden.compare(committed, make_golden._jsonable(make_golden.build())) == []
    assert committed["version"] == 1 and committed["dtype"] == "float64"
    for label, spec in C.SPECS.items():
        entry = committed["equations"][label]
        assert entry["args"] == list(spec.args) and entry["outputs"] == list(spec.outputs)
        assert len(entry["cases"]) >= 2
        for case in entry["cases"]:
            assert set(case["inputs"]) == set(spec.args), (label, case["name"])
            assert ("raises" in case) != ("outputs" in case)


def _numpy_expected(label, i):
    """Independent numpy/scipy values for a golden case (never lorax_ref)."""
    A = {k: np.asarray(v, dtype=float) if isinstance(v, list) else v for k, v in i.items()}
    full = lambda d: np.diag(d) if d.ndim == 1 else d  # noqa: E731
    proj = lambda X, U, V: U @ U.T @ X @ V @ V.T  # noqa: E731
    lstsq = lambda B_s, B_t: np.linalg.lstsq(B_s.T, B_t.T, rcond=None)[0].T  # noqa: E731

    def mismatch(dW, U_s, V_s, U_t, V_t):
        P, Q = lstsq(U_s, U_t), lstsq(V_s, V_t)
        return U_t @ (U_t.T @ P @ U_s @ (U_s.T @ dW @ V_s) @ (Q @ V_s).T @ V_t) @ V_t.T

    if label == "Eq. (1)":
        return [A["U_s"] @ full(A["dSigma_s"]) @ A["V_s"].T]
    if label == "Eq. (2)":
        return [proj(A["dW"], A["U"], A["V"])]
    if label == "Eq. (3)":
        return [proj(A["dW_s"], A["U_t"], A["V_t"])]
    if label == "Eq. (3) rotation form":
        return [A["U_t"].T @ A["U_s"] @ full(A["dSigma_s"]) @ A["V_s"].T @ A["V_t"]]
    if label == "Eq. (3) low-rank form":
        return [A["U_t"] @ A["U_t"].T @ A["B"], A["A"] @ A["V_t"] @ A["V_t"].T]
    if label == "Table 5 ablation":
        return [A["U_t"] @ full(A["dSigma_s"]) @ A["V_t"].T]
    if label == "§4.2.2 alignment maps":
        return [A["U_t"] @ sla.pinv(A["U_s"]), A["V_t"] @ sla.pinv(A["V_s"])]  # P̂ = U_t U_s⁺ (scipy pinv)
    if label == "§4.2.2":
        return [mismatch(A["dW_s"], A["U_s"], A["V_s"], A["U_t"], A["V_t"])]
    if label == "Eq. (4)":
        return [np.mean(np.cos(sla.subspace_angles(A["U_a"], A["U_b"])) ** 2)]
    if label == "Layer transfer":
        r = A["r"]
        U_s, V_s = top_r_bases(A["W_s"], r)
        U_t, V_t = top_r_bases(A["W_t"], r)
        if A["W_s"].shape == A["W_t"].shape:
            return [proj(A["dW_s"], U_t, V_t)]
        return [mismatch(A["dW_s"], U_s, V_s, U_t, V_t)]
    raise AssertionError(label)


def test_golden_outputs_agree_with_an_independent_numpy_computation():
    golden = C.load_golden()
    n = 0
    for label, entry in golden["equations"].items():
        for case in entry["cases"]:
            if "raises" in case:
                continue
            for E, name in zip(_numpy_expected(label, case["inputs"]), entry["outputs"]):
                stored = np.asarray(case["outputs"][name], dtype=float)
                assert np.max(np.abs(stored - E)) <= 1e-9 * max(1.0, np.max(np.abs(E))), (label, case["name"], name)
                n += 1
    assert n >= 28


def test_golden_check_catches_a_tampered_file(tmp_path):
    data = json.loads(C.GOLDEN_PATH.read_text())
    data["equations"]["Eq. (3)"]["cases"][0]["outputs"]["dW_t"][0][0] += 1e-3
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(data))
    result = run(L.transfer_same_dim, "eq3", golden=path, max_examples=2, diagnose=False)
    assert result.row("golden").passed is False and "case 'independent-4x3-r2-lorax'" in result.row("golden").message
    assert all(r.passed for r in result.rows if r.id != "golden")
    assert "golden" not in {r.id for r in run(L.transfer_same_dim, "eq3", golden=False, max_examples=2).rows}


# ----------------------------------------------------------------------------------------------- CLI


CANDIDATES = '''
import torch

def good(dW_s, U_t, V_t):
    return U_t @ U_t.T @ dW_s @ V_t @ V_t.T

def wrong(dW_s, U_t, V_t):
    return dW_s

def for_vh(dW_s, U_t, Vh_t):
    return U_t @ U_t.T @ dW_s @ Vh_t.T @ Vh_t
'''


@pytest.fixture
def candidates(tmp_path):
    path = tmp_path / "my_lorax.py"
    path.write_text(CANDIDATES)
    return path


def test_cli_verify_exit_codes(candidates, capsys):
    base = ["verify", "--max-examples", "5", "--equation", "eq3"]
    assert cli_main(base + [f"{candidates}:good"]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and out.count("  PASS  ") == 7
    assert cli_main(base + ["--no-golden", f"{candidates}:wrong"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  value" in out and "wrong formula" in out and "smallest failing input" in out
    assert cli_main(base + ["--no-golden", f"{candidates}:for_vh"]) == 1
    assert "--bases Vh" in capsys.readouterr().out
    assert cli_main(base + ["--bases", "Vh", "--no-golden", f"{candidates}:for_vh"]) == 0
    capsys.readouterr()
    assert cli_main(base + [f"{candidates}:missing"]) == 1
    assert "has no attribute 'missing'" in capsys.readouterr().err
    assert cli_main(["verify", "--list"]) == 0
    assert "sec422-alignment-maps" in capsys.readouterr().out
    assert cli_main(base + ["--json", "--no-golden", f"{candidates}:good"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True


def test_python_dash_m_verify(candidates):
    """The documented command, in a subprocess: output rows and exit code."""
    cmd = [sys.executable, "-m", "lorax_ref", "verify", f"{candidates}:wrong", "--equation", "Eq. (3)",
           "--max-examples", "3", "--no-diagnose", "--no-golden"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "FAIL  value" in proc.stdout and "PASS  refuses-other-shapes" not in proc.stdout


# ---------------------------------------------------------------------------------------------- budget


@pytest.mark.slow
@pytest.mark.parametrize("label", list(L.EQUATIONS), ids=slug)
def test_default_settings_take_under_20_seconds(label):
    t0 = time.perf_counter()
    assert C.check(L.EQUATIONS[label], label).passed
    assert time.perf_counter() - t0 < 20


@pytest.mark.slow
@pytest.mark.parametrize("entry", gallery.ALL, ids=lambda e: e.name)
def test_default_settings_on_the_gallery_take_under_20_seconds(entry):
    t0 = time.perf_counter()
    C.check(entry.func, entry.equation, entry.adapter)
    assert time.perf_counter() - t0 < 20 + (5 if entry.name == "hangs" else 0)
