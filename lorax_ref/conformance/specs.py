"""One :class:`Spec` per equation label: the kit's example strategies and property checks.

Every expected value comes from :mod:`lorax_ref.testing.oracles` (numpy/scipy, float64), never from
lorax_ref's own function of the equation."""
from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from ..registry import EQUATIONS
from ..testing.oracles import np_lstsq_map, np_mismatch, np_phi, np_project, orthonormal, sigma_matrix, np_top_r_bases
from ..testing.strategies import cases, matrices
from .calling import CallError, Check, Spec
from .compare import Example, Failure, _call_failure, _compare, _expect, _fmt
from .precision import MAX_DIM, MIN_DIM


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
    U_s, V_s = np_top_r_bases(c.W_s, c.r)
    U_t, V_t = np_top_r_bases(c.W_t, c.r)
    if generic and draw(st.booleans()):
        dW_s, kind = draw(matrices(*c.W_s.shape)), "generic ΔW_s"
    else:
        dW_s, kind = U_s @ sigma_matrix(c.dSigma_s) @ V_s.T, f"LoRA-X ΔW_s ({_sig(c.dSigma_s)})"
    shapes = f"{_layer(c)}" if same_shape else f"{c.W_s.shape[0]}×{c.W_s.shape[1]} → {c.W_t.shape[0]}×{c.W_t.shape[1]}, r={c.r}"
    return c, dict(U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t, dW_s=dW_s), f"{shapes}, target {c.target}, {kind}"


def _ex(inputs: dict, meta: str, **aux) -> Example:
    return Example(inputs=inputs, meta=meta, aux=aux)


def _amax(x) -> float:
    return float(np.max(np.abs(x)))


# ---------------------------------------------------------------------------------------------------
# Specs: one per equation label
# ---------------------------------------------------------------------------------------------------


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
        U_s, V_s = np_top_r_bases(c.W_s, c.r)
        return _ex(dict(U_s=U_s, dSigma_s=c.dSigma_s, V_s=V_s), f"{_layer(c)}, {_sig(c.dSigma_s)}")
    return strat()


def _eq1_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [i["U_s"] @ sigma_matrix(i["dSigma_s"]) @ i["V_s"].T])


def _eq1_in_subspace(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return _call_failure(out)
    i = ex.inputs
    return _compare(call, out, [np_project(out[0], i["U_s"], i["V_s"])], ("U_sU_sᵀ·ΔW_s·V_sV_sᵀ vs ΔW_s",), ex)


# ---- Eq. (2) ----------------------------------------------------------------------------------------


@st.composite
def _eq2_examples(draw, lorax: bool):
    c, b, meta = draw(_update_case(targets=("independent",), generic=False))
    dW = b["dW_s"] if lorax else draw(matrices(*c.W_s.shape))  # (m, n)
    kind = "LoRA-X update" if lorax else "generic ΔW"
    return _ex(dict(dW=dW, U=b["U_s"], V=b["V_s"]), f"{_layer(c)}, {kind}")


def _eq2_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [np_project(i["dW"], i["U"], i["V"])])


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
    return _expect(call, ex, [np_project(i["dW_s"], i["U_t"], i["V_t"])])


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
    return _expect(call, ex, [i["U_t"].T @ i["U_s"] @ sigma_matrix(i["dSigma_s"]) @ i["V_s"].T @ i["V_t"]])


def _rot_forms_agree(call, ex):
    out = call(ex.inputs)
    if isinstance(out, CallError):
        return _call_failure(out)
    i = ex.inputs
    dW_s = i["U_s"] @ sigma_matrix(i["dSigma_s"]) @ i["V_s"].T
    return _compare(call, [i["U_t"] @ out[0] @ i["V_t"].T], [np_project(dW_s, i["U_t"], i["V_t"])],
                    ("U_t·ΔΣ_t←s·V_tᵀ vs U_tU_tᵀ·ΔW_s·V_tV_tᵀ",), ex)


def _rot_identity(call, ex):
    return _expect(call, ex, [sigma_matrix(ex.inputs["dSigma_s"])], "target = source must give ΔΣ_s back: ")


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
    return _compare(call, [out[0] @ out[1]], [np_project(i["B"] @ i["A"], i["U_t"], i["V_t"])],
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
    return _expect(call, ex, [i["U_t"] @ sigma_matrix(i["dSigma_s"]) @ i["V_t"].T])


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
    return _expect(call, ex, [np_lstsq_map(i["U_s"], i["U_t"]), np_lstsq_map(i["V_s"], i["V_t"])])


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
    return _expect(call, ex, [np_mismatch(i["dW_s"], i["U_s"], i["V_s"], i["U_t"], i["V_t"])])


def _mismatch_linear(call, ex):
    return _linear(call, ex, "dW_s")


# ---- Eq. (4) ---------------------------------------------------------------------------------------------


def _phi_examples(rotate=False):
    @st.composite
    def strat(draw):
        c = draw(cases(targets=("independent", "near", "same"), max_dim=MAX_DIM, min_dim=MIN_DIM))
        U_a, _ = np_top_r_bases(c.W_s, c.r)
        U_b, _ = np_top_r_bases(c.W_t, c.r)
        aux = dict(rot_seed=draw(st.integers(0, 2**16))) if rotate else {}
        return _ex(dict(U_a=U_a, U_b=U_b), f"m={c.W_s.shape[0]}, r={c.r}, target {c.target}", **aux)
    return strat()


def _phi_value(call, ex):
    i = ex.inputs
    return _expect(call, ex, [np.array(np_phi(i["U_a"], i["U_b"]))], "Φ = mean cos² of the principal angles (scipy): ")


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
    U_a, _ = np_top_r_bases(c.W_s, c.r)  # (m_a, r)
    U_b, _ = np_top_r_bases(c.W_t, c.r)  # (m_b, r)
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
    return _expect(call, ex, [np_project(ex.inputs["dW_s"], a["U_t"], a["V_t"])])


def _layer_value_other_shape(call, ex):
    a = ex.aux
    if ex.inputs["W_s"].shape == ex.inputs["W_t"].shape:
        return None  # the drawn shapes happen to agree: that is the "value" check's case
    expected = np_mismatch(ex.inputs["dW_s"], a["U_s"], a["V_s"], a["U_t"], a["V_t"])  # sign-free: ΔΣ_s is diagonal
    return _expect(call, ex, [expected])


def _layer_identity(call, ex):
    return _expect(call, ex, [ex.inputs["dW_s"]], "target = source must give a LoRA-X ΔW_s back: ")


def _layer_linear(call, ex):
    return _linear(call, ex, "dW_s")


def _layer_gate(call, ex):
    a = ex.aux
    phis = [np_phi(X_s, X_t) for X_s, X_t in ((a["U_s"], a["U_t"]), (a["V_s"], a["V_t"])) if X_s.shape == X_t.shape]
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
