"""lorax_ref.related (ProLoRA, Cross-LoRA) against independent numpy oracles (docs/identities.md §11).

The oracles build the (m, m) and (n, n) projectors explicitly from numpy's own SVD
(:func:`lorax_ref.testing.strategies.top_r_bases`) and compute each rule as written in its paper's
summary; the module under test never forms those projectors. Minimum-norm alignment comes from
``numpy.linalg.lstsq``. Tolerances are relative to ‖ΔW‖ and allow for subspaces of matrices with
condition numbers up to 1e6 (strategies.MAX_COND) and 5 % spectral gaps.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lorax_ref import LoraxInputError, lorax_delta, svd_topk, transfer_mismatch, transfer_same_dim
from lorax_ref.related import (
    cross_lora_alignment,
    cross_lora_transfer,
    cross_term_energy,
    null_project,
    prolora_transfer,
    subspace_split,
)
from lorax_ref.testing.oracles import np64 as np_
from lorax_ref.testing.oracles import t64
from lorax_ref.testing.strategies import Case, cases, np_top_r_bases

RTOL = 1e-7  # on ‖·‖_F relative to ‖ΔW‖_F, float64


# ----------------------------------------------------------------------------- helpers and oracles


def plain_lora(case: Case, rank: int = 3) -> np.ndarray:
    """A generic low-rank update B A for the source layer of ``case`` (not in any SVD subspace)."""
    rng = np.random.default_rng(case.seed + 1)
    m, n = case.W_s.shape
    k = min(rank, m, n)
    return rng.standard_normal((m, k)) @ rng.standard_normal((k, n))  # (m, n)


def projectors(W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Explicit P_∥ = U Uᵀ (m, m) and Q_∥ = V Vᵀ (n, n) from numpy's SVD."""
    U, V = np_top_r_bases(W, r)
    return U @ U.T, V @ V.T


def oracle_blocks(dW: np.ndarray, P: np.ndarray, Q: np.ndarray) -> list[np.ndarray]:
    Pn, Qn = np.eye(P.shape[0]) - P, np.eye(Q.shape[0]) - Q
    return [P @ dW @ Q, P @ dW @ Qn, Pn @ dW @ Q, Pn @ dW @ Qn]


def oracle_prolora(dW: np.ndarray, W_s: np.ndarray, W_t: np.ndarray, r: int) -> np.ndarray:
    Ps, Qs = projectors(W_s, r)
    Pt, Qt = projectors(W_t, r)
    I_m, I_n = np.eye(dW.shape[0]), np.eye(dW.shape[1])
    par = Pt @ (Ps @ dW @ Qs) @ Qt
    null = (I_m - Pt) @ ((I_m - Ps) @ dW @ (I_n - Qs)) @ (I_n - Qt)
    return par + null


def bases(W: np.ndarray, r: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    U, _, V = svd_topk(t64(W, device), r)
    return U, V


def close(actual: torch.Tensor, expected: np.ndarray, scale: float) -> None:
    err = np.linalg.norm(np_(actual) - expected)
    assert err <= RTOL * max(scale, 1e-300), f"‖actual − expected‖ = {err:.3g}, scale {scale:.3g}"


# ----------------------------------------------------------------------------- the four-block split


@given(cases(), st.booleans())
def test_split_matches_explicit_projectors_and_energies_add(case: Case, lorax_update: bool):
    r, W_s = case.r, case.W_s
    U_s, V_s = bases(W_s, r)
    dW = np_(lorax_delta(U_s, t64(case.dSigma_s), V_s)) if lorax_update else plain_lora(case)
    scale = np.linalg.norm(dW)
    blocks = subspace_split(t64(dW), U_s, V_s)
    expected = oracle_blocks(dW, *projectors(W_s, r))
    for got, want in zip(blocks, expected):
        close(got, want, scale)
    assert np.linalg.norm(sum(np_(b) for b in blocks) - dW) <= RTOL * scale
    energies = [np.linalg.norm(b) ** 2 for b in expected]
    assert abs(sum(energies) - scale**2) <= 1e-6 * scale**2  # Frobenius-orthogonal blocks (Pythagoras)
    close(null_project(t64(dW), U_s, V_s), expected[3], scale)
    assert cross_term_energy(t64(dW), U_s, V_s) == pytest.approx(energies[1] + energies[2], rel=1e-6, abs=1e-12 * scale**2)
    if lorax_update:  # Eq. (2): a LoRA-X update is all subspace block
        assert max(energies[1:]) <= 1e-12 * scale**2


def test_split_counter_test_plain_lora_has_cross_terms():
    """A generic B A at small r leaves energy in every block (so the split is not a no-op)."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((20, 16))
    dW = rng.standard_normal((20, 3)) @ rng.standard_normal((3, 16))
    U, V = bases(W, 4)
    energies = [np.linalg.norm(np_(b)) ** 2 for b in subspace_split(t64(dW), U, V)]
    assert min(energies) > 1e-3 * sum(energies)


# ----------------------------------------------------------------------------- ProLoRA


@given(cases(targets=("independent", "near", "same")), st.booleans())
def test_prolora_matches_oracle(case: Case, lorax_update: bool):
    r = case.r
    U_s, V_s = bases(case.W_s, r)
    U_t, V_t = bases(case.W_t, r)
    dW = np_(lorax_delta(U_s, t64(case.dSigma_s), V_s)) if lorax_update else plain_lora(case)
    scale = np.linalg.norm(dW)
    got = prolora_transfer(t64(dW), U_s, V_s, U_t, V_t)
    close(got, oracle_prolora(dW, case.W_s, case.W_t, r), scale)
    # the two transferred parts are Frobenius-orthogonal and each is a projection: norm never grows
    assert np.linalg.norm(np_(got)) <= np.linalg.norm(dW) * (1 + 1e-9)


@given(cases(targets=("independent", "near", "same")))
def test_prolora_is_eq3_for_a_lorax_update(case: Case):
    r = case.r
    U_s, V_s = bases(case.W_s, r)
    U_t, V_t = bases(case.W_t, r)
    dW = np_(lorax_delta(U_s, t64(case.dSigma_s), V_s))
    Pt, Qt = projectors(case.W_t, r)
    close(prolora_transfer(t64(dW), U_s, V_s, U_t, V_t), Pt @ dW @ Qt, np.linalg.norm(dW))


@given(cases(targets=("same",)))
def test_prolora_self_transfer_loses_exactly_the_cross_terms(case: Case):
    r, W = case.r, case.W_s
    U, V = bases(W, r)
    dW = plain_lora(case)
    got = np_(prolora_transfer(t64(dW), U, V, U, V))
    _, pn, np_blk, _ = oracle_blocks(dW, *projectors(W, r))
    lost = np.linalg.norm(dW - got) ** 2
    expected = np.linalg.norm(pn) ** 2 + np.linalg.norm(np_blk) ** 2
    assert lost == pytest.approx(expected, rel=1e-6, abs=1e-12 * np.linalg.norm(dW) ** 2)


@given(cases(), st.sampled_from([-2.0, 0.5, 3.0]))
def test_prolora_is_linear(case: Case, a: float):
    r = case.r
    U_s, V_s = bases(case.W_s, r)
    U_t, V_t = bases(case.W_t, r)
    X, Y = plain_lora(case), plain_lora(Case(case.W_s, case.W_t, r, case.dSigma_s, case.target, case.seed + 7))
    lhs = prolora_transfer(t64(a * X + Y), U_s, V_s, U_t, V_t)
    rhs = a * np_(prolora_transfer(t64(X), U_s, V_s, U_t, V_t)) + np_(prolora_transfer(t64(Y), U_s, V_s, U_t, V_t))
    close(lhs, rhs, np.linalg.norm(a * X) + np.linalg.norm(Y))


def test_prolora_keeps_more_than_eq3_when_target_is_source():
    """Counter-test: at target = source ProLoRA adds the null block that Eq. (3) drops."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((24, 18))
    dW = rng.standard_normal((24, 2)) @ rng.standard_normal((2, 18))
    U, V = bases(W, 4)
    pro = np.linalg.norm(np_(prolora_transfer(t64(dW), U, V, U, V)))
    eq3 = np.linalg.norm(np_(transfer_same_dim(t64(dW), U, V)))
    nn = np.linalg.norm(oracle_blocks(dW, *projectors(W, 4))[3])
    assert pro**2 == pytest.approx(eq3**2 + nn**2, rel=1e-9)
    assert pro > eq3 * 1.1


# ----------------------------------------------------------------------------- Cross-LoRA


@given(cases(same_shape=False))
def test_cross_lora_alignment_is_numpy_lstsq(case: Case):
    r = case.r
    U_s, V_s = bases(case.W_s, r)
    U_t, V_t = bases(case.W_t, r)
    U_al, V_al = cross_lora_alignment(U_s, V_s, U_t, V_t)
    # numpy oracle: P̂ᵀ = lstsq(Ū_sᵀ, U_tᵀ) (min-norm); then P̂ Ū_s
    Pt = np.linalg.lstsq(np_(U_s).T, np_(U_t).T, rcond=None)[0]  # (m_s, m_t)
    Qt = np.linalg.lstsq(np_(V_s).T, np_(V_t).T, rcond=None)[0]  # (n_s, n_t)
    assert np.allclose(np_(U_al), Pt.T @ np_(U_s), atol=1e-10)
    assert np.allclose(np_(V_al), Qt.T @ np_(V_s), atol=1e-10)
    assert np.allclose(np_(U_al), np_(U_t), atol=1e-10)  # the fit is exact
    assert np.allclose(np_(V_al), np_(V_t), atol=1e-10)


@given(cases(targets=("independent", "near", "same")), st.booleans())
def test_cross_lora_equals_eq3_for_equal_shapes(case: Case, lorax_update: bool):
    r = case.r
    U_s, V_s = bases(case.W_s, r)
    U_t, V_t = bases(case.W_t, r)
    dW = np_(lorax_delta(U_s, t64(case.dSigma_s), V_s)) if lorax_update else plain_lora(case)
    Pt, Qt = projectors(case.W_t, r)
    close(cross_lora_transfer(t64(dW), U_s, V_s, U_t, V_t), Pt @ dW @ Qt, np.linalg.norm(dW))


def test_cross_lora_refuses_different_shapes_and_the_typed_reading_is_sec422():
    rng = np.random.default_rng(2)
    W_s, W_t = rng.standard_normal((12, 10)), rng.standard_normal((16, 14))
    dW = rng.standard_normal((12, 2)) @ rng.standard_normal((2, 10))
    U_s, V_s = bases(W_s, 4)
    U_t, V_t = bases(W_t, 4)
    with pytest.raises(LoraxInputError, match="ill-typed"):
        cross_lora_transfer(t64(dW), U_s, V_s, U_t, V_t)
    # P̂ ΔW_s Q̂ᵀ with numpy's min-norm lstsq maps = the §4.2.2 rule (= U_t C_s V_tᵀ)
    P = np.linalg.lstsq(np_(U_s).T, np_(U_t).T, rcond=None)[0].T  # (16, 12)
    Q = np.linalg.lstsq(np_(V_s).T, np_(V_t).T, rcond=None)[0].T  # (14, 10)
    close(transfer_mismatch(t64(dW), U_s, V_s, U_t, V_t), P @ dW @ Q.T, np.linalg.norm(dW))


# ----------------------------------------------------------------------------- input checks, devices


def test_prolora_refuses_different_shapes():
    rng = np.random.default_rng(3)
    U_s, V_s = bases(rng.standard_normal((8, 6)), 2)
    U_t, V_t = bases(rng.standard_normal((9, 6)), 2)
    with pytest.raises(LoraxInputError, match="ProLoRA needs the target layer to have the source shape"):
        prolora_transfer(t64(rng.standard_normal((8, 6))), U_s, V_s, U_t, V_t)


def test_bad_inputs_are_named():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((8, 6))
    U, V = bases(W, 2)
    dW = t64(rng.standard_normal((8, 6)))
    with pytest.raises(LoraxInputError, match="not column-orthonormal"):
        subspace_split(dW, U, t64(np.ones((6, 2))))
    with pytest.raises(LoraxInputError, match="Vh passed"):
        prolora_transfer(dW, U, V, U, V.T.contiguous())
    with pytest.raises(LoraxInputError, match="NaN"):
        cross_term_energy(dW * float("nan"), U, V)
    with pytest.raises(LoraxInputError, match="dtypes"):
        cross_lora_transfer(dW.float(), U, V, U, V)
    with pytest.raises(LoraxInputError, match="share the rank"):
        cross_lora_transfer(dW, U, V, *bases(W, 3))


def test_inputs_are_not_modified():
    rng = np.random.default_rng(5)
    W_s, W_t = rng.standard_normal((10, 7)), rng.standard_normal((10, 7))
    U_s, V_s = bases(W_s, 3)
    U_t, V_t = bases(W_t, 3)
    dW = t64(rng.standard_normal((10, 7)))
    before = [x.clone() for x in (dW, U_s, V_s, U_t, V_t)]
    prolora_transfer(dW, U_s, V_s, U_t, V_t)
    cross_lora_transfer(dW, U_s, V_s, U_t, V_t)
    subspace_split(dW, U_s, V_s)
    for b, a in zip(before, (dW, U_s, V_s, U_t, V_t)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_devices_and_dtypes(device, dtype):
    """Every function runs where its inputs live, in their dtype, and agrees with the float64 oracle."""
    rng = np.random.default_rng(6)
    W_s = rng.standard_normal((24, 20))
    W_t = W_s + 0.05 * rng.standard_normal((24, 20))
    dW = rng.standard_normal((24, 3)) @ rng.standard_normal((3, 20))
    r = 5
    U_s, V_s = (x.to(dtype) for x in bases(W_s, r, device))
    U_t, V_t = (x.to(dtype) for x in bases(W_t, r, device))
    x = torch.as_tensor(dW, dtype=dtype, device=device)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    pro = prolora_transfer(x, U_s, V_s, U_t, V_t)
    cross = cross_lora_transfer(x, U_s, V_s, U_t, V_t)
    assert pro.device.type == device.type and pro.dtype == dtype
    assert cross.device.type == device.type and cross.dtype == dtype
    scale = np.linalg.norm(dW)
    assert np.linalg.norm(np_(pro).astype(np.float64) - oracle_prolora(dW, W_s, W_t, r)) <= tol * scale
    Pt, Qt = projectors(W_t, r)
    assert np.linalg.norm(np_(cross).astype(np.float64) - Pt @ dW @ Qt) <= tol * scale
    assert sum(np.linalg.norm(np_(b)) ** 2 for b in subspace_split(x, U_s, V_s)) == pytest.approx(scale**2, rel=tol * 10)
