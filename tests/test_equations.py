"""Property tests for every identity of docs/identities.md §1-§10, with independent oracles.

Expected values come from numpy/scipy computed separately (np.linalg.svd bases, explicit projectors,
scipy.linalg.subspace_angles / pinv / orthogonal_procrustes, np.linalg.lstsq), never from lorax_ref.
Each identity has a counter-test showing that the check can fail.
"""
import numpy as np
import pytest
import scipy.linalg as sla
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import lorax_ref as L
from lorax_ref.testing.oracles import np64 as N
from lorax_ref.testing.oracles import np_phi as oracle_phi
from lorax_ref.testing.oracles import np_project as oracle_project
from lorax_ref.testing.oracles import rel, sigma_matrix
from lorax_ref.testing.oracles import t64 as T
from lorax_ref.testing.strategies import cases, matrices, orthonormal, shapes, np_top_r_bases

TOL = 1e-7  # float64, relative to the input's norm; subspaces of the strategies have gaps >= 5%


def oracle_delta(case):
    """ΔW_s = Ū_s ΔΣ_s V̄_sᵀ with numpy's bases."""
    U_s, V_s = np_top_r_bases(case.W_s, case.r)
    return U_s @ sigma_matrix(case.dSigma_s) @ V_s.T  # (m, n)


def bases(W, r, device):
    U, _, V = L.svd_topk(T(W, device), r)
    return U, V


# ------------------------------------------------------------------------------------------ svd_topk


@given(shapes(), st.data())
def test_svd_topk_matches_numpy(shape, data):
    m, n = shape
    W = data.draw(matrices(m, n))
    r = data.draw(st.integers(1, min(m, n)))
    U, S, V = L.svd_topk(T(W), r)
    assert U.shape == (m, r) and S.shape == (r,) and V.shape == (n, r)
    U_np, V_np = np_top_r_bases(W, r)
    s_np = np.linalg.svd(W, compute_uv=False)
    assert rel(N(S), s_np[:r]) < TOL
    assert rel(N(U) @ N(U).T, U_np @ U_np.T, np.sqrt(r)) < TOL  # same subspaces (vectors only up to sign)
    assert rel(N(V) @ N(V).T, V_np @ V_np.T, np.sqrt(r)) < TOL
    # Eckart–Young: the rank-r reconstruction error is the tail of the spectrum
    err = np.linalg.norm(W - N(U) @ np.diag(N(S)) @ N(V).T)
    assert abs(err - np.linalg.norm(s_np[r:])) <= TOL * np.linalg.norm(W)
    # the sign convention: the largest-|·| entry of each u_i is positive
    Un = N(U)
    assert (Un[np.abs(Un).argmax(0), np.arange(r)] > 0).all()


def test_svd_topk_returns_V_not_Vh():
    """On a square matrix Vh passed as V raises nothing; check the columns are right singular vectors."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 6))
    U, S, V = L.svd_topk(T(W), 3)
    assert np.allclose(W @ N(V), N(U) * N(S), atol=1e-12)  # W v_i = s_i u_i
    Vh = np.linalg.svd(W)[2]  # (6, 6): rows are the right singular vectors
    wrong_V = Vh[:, :3]  # the square-layer mix-up: shapes fit, nothing raises
    assert not np.allclose(np.abs(W @ wrong_V), np.abs(N(U) * N(S)), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_svd_topk_low_precision_is_decomposed_in_float32(dtype):
    rng = np.random.default_rng(1)
    W64 = orthonormal(rng, 24, 12) * np.linspace(1, 0.1, 12) @ orthonormal(rng, 16, 12).T  # (24, 16)
    W = torch.as_tensor(W64).to(dtype)
    U, S, V = L.svd_topk(W, 4)
    assert U.dtype == S.dtype == V.dtype == dtype
    # reference: the SVD of the *rounded* input, in float64 — a float32 decomposition matches it to ~1e-6,
    # far below half-precision rounding of the result
    U_ref, V_ref = np_top_r_bases(W.double().numpy(), 4)
    eps = torch.finfo(dtype).eps
    assert rel(U.double().numpy() @ U.double().numpy().T, U_ref @ U_ref.T, 2.0) < 20 * eps
    assert rel(V.double().numpy() @ V.double().numpy().T, V_ref @ V_ref.T, 2.0) < 20 * eps


# ------------------------------------------------------------------------------- Eq. (1), Eq. (2)


@given(cases())
def test_eq1_lorax_delta_matches_numpy(case):
    U_s, V_s = bases(case.W_s, case.r, "cpu")
    dW = L.lorax_delta(U_s, T(case.dSigma_s), V_s)
    assert rel(N(dW), oracle_delta(case), np.linalg.norm(case.dSigma_s)) < TOL


@given(cases())
def test_eq2_lorax_update_is_a_fixed_point_of_the_source_projector(case):
    """docs/identities.md §1: ŪŪᵀ ΔW_s V̄V̄ᵀ = ΔW_s for every LoRA-X update (oracle: numpy's projectors)."""
    U_s, V_s = bases(case.W_s, case.r, "cpu")
    dW = L.lorax_delta(U_s, T(case.dSigma_s), V_s)
    U_np, V_np = np_top_r_bases(case.W_s, case.r)
    assert rel(oracle_project(N(dW), U_np, V_np), N(dW)) < TOL
    assert rel(N(L.project(dW, U_s, V_s)), N(dW)) < TOL


@given(cases(min_dim=2), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_eq2_counter_plain_lora_is_not_a_fixed_point(case, k, seed):
    """Counter-test: a generic B A has energy outside the top-r subspace whenever r < min(m, n)."""
    m, n = case.W_s.shape
    assume(case.r < min(m, n))
    rng = np.random.default_rng(seed)
    BA = rng.standard_normal((m, k)) @ rng.standard_normal((k, n))  # (m, n)
    U_s, V_s = bases(case.W_s, case.r, "cpu")
    outside = rel(N(L.project(T(BA), U_s, V_s)), BA)
    U_np, V_np = np_top_r_bases(case.W_s, case.r)
    assert outside > 1e-3
    assert abs(outside - rel(oracle_project(BA, U_np, V_np), BA)) < TOL


# ------------------------------------------------------------------------------------------ Eq. (3)


@given(cases())
def test_eq3_both_forms_agree_and_match_numpy(device, case):
    """docs/identities.md §2: U_tU_tᵀΔW_sV_tV_tᵀ = U_t ΔΣ_{t←s} V_tᵀ, and both equal numpy's explicit projection."""
    U_s, V_s = bases(case.W_s, case.r, device)
    U_t, V_t = bases(case.W_t, case.r, device)
    dSigma_s = T(case.dSigma_s, device)
    dW_s = L.lorax_delta(U_s, dSigma_s, V_s)
    projection = L.transfer_same_dim(dW_s, U_t, V_t)
    dSigma_ts = L.transferred_sigma(U_t, U_s, dSigma_s, V_s, V_t)
    assert dSigma_ts.shape == (case.r, case.r)
    rotation = U_t @ dSigma_ts @ V_t.T
    scale = np.linalg.norm(case.dSigma_s)
    assert rel(N(projection), N(rotation), scale) < TOL
    U_np, V_np = np_top_r_bases(case.W_t, case.r)
    assert rel(N(projection), oracle_project(oracle_delta(case), U_np, V_np), scale) < TOL


@given(cases(targets=("independent",), full_sigma=False, min_dim=3))
def test_eq3_transferred_sigma_is_not_diagonal(case):
    """docs/identities.md §2: a diagonal ΔΣ_s generally becomes a full ΔΣ_{t←s} (counter-test for 'just copy it')."""
    assume(case.r >= 2 and case.r < min(case.W_s.shape))
    U_s, V_s = bases(case.W_s, case.r, "cpu")
    U_t, V_t = bases(case.W_t, case.r, "cpu")
    dSigma_ts = N(L.transferred_sigma(U_t, U_s, T(case.dSigma_s), V_s, V_t))
    off_diagonal = dSigma_ts - np.diag(np.diag(dSigma_ts))
    assert np.linalg.norm(off_diagonal) > 1e-6 * np.linalg.norm(case.dSigma_s)


@given(cases(targets=("same",)))
def test_eq3_target_equal_to_source_is_the_identity(case):
    """docs/identities.md §3: ΔW_{s←s} = ΔW_s."""
    U_s, V_s = bases(case.W_s, case.r, "cpu")
    dW_s = L.lorax_delta(U_s, T(case.dSigma_s), V_s)
    U_t, V_t = bases(case.W_t, case.r, "cpu")
    assert rel(N(L.transfer_same_dim(dW_s, U_t, V_t)), N(dW_s)) < TOL


@given(cases(), st.floats(-3, 3), st.integers(0, 2**32 - 1))
def test_eq3_idempotent_and_linear(case, alpha, seed):
    """docs/identities.md §4: T(T(x)) = T(x) and T(a x + y) = a T(x) + T(y), for any x (not only LoRA-X updates)."""
    m, n = case.W_s.shape
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((m, n)), rng.standard_normal((m, n))
    U_t, V_t = bases(case.W_t, case.r, "cpu")
    Tx = L.transfer_same_dim(T(x), U_t, V_t)
    assert rel(N(L.transfer_same_dim(Tx, U_t, V_t)), N(Tx), np.linalg.norm(x)) < TOL
    lhs = L.transfer_same_dim(T(alpha * x + y), U_t, V_t)
    rhs = alpha * Tx + L.transfer_same_dim(T(y), U_t, V_t)
    assert rel(N(lhs), N(rhs), np.linalg.norm(x) + np.linalg.norm(y)) < TOL


@given(cases(), st.integers(0, 2**32 - 1))
def test_eq3_never_increases_the_norm(case, seed):
    """docs/identities.md §5: ‖ΔW_{t←s}‖_F ≤ ‖ΔW_s‖_F (orthogonal projections), with equality only inside the span."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.W_s.shape)
    U_t, V_t = bases(case.W_t, case.r, "cpu")
    assert np.linalg.norm(N(L.transfer_same_dim(T(x), U_t, V_t))) <= np.linalg.norm(x) * (1 + 1e-12)


@given(cases(), st.integers(0, 2**32 - 1))
def test_eq3_invariant_to_sign_flips_and_rotations_in_the_target_span(case, seed):
    """docs/identities.md §6: ΔW_{t←s} is unchanged; ΔΣ_{t←s} changes as R_uᵀ ΔΣ R_v (D ΔΣ D for sign flips).

    The rotations are recovered from the rotated bases by scipy's orthogonal_procrustes (the oracle).
    """
    rng = np.random.default_rng(seed)
    r = case.r
    U_s, V_s = bases(case.W_s, r, "cpu")
    U_t, V_t = bases(case.W_t, r, "cpu")
    dSigma_s = T(case.dSigma_s)
    dW_s = L.lorax_delta(U_s, dSigma_s, V_s)
    D = np.diag(rng.choice([-1.0, 1.0], r))
    G_u, G_v = orthonormal(rng, r, r), orthonormal(rng, r, r)
    for R_u, R_v in ((D, D), (G_u, G_v)):
        U_rot, V_rot = T(N(U_t) @ R_u), T(N(V_t) @ R_v)
        scale = np.linalg.norm(case.dSigma_s)
        assert rel(N(L.transfer_same_dim(dW_s, U_rot, V_rot)), N(L.transfer_same_dim(dW_s, U_t, V_t)), scale) < TOL
        R_u_hat, _ = sla.orthogonal_procrustes(N(U_t), N(U_rot))
        R_v_hat, _ = sla.orthogonal_procrustes(N(V_t), N(V_rot))
        expected = R_u_hat.T @ N(L.transferred_sigma(U_t, U_s, dSigma_s, V_s, V_t)) @ R_v_hat
        assert rel(N(L.transferred_sigma(U_rot, U_s, dSigma_s, V_s, V_rot)), expected, scale) < TOL


@given(cases(), st.integers(0, 2**32 - 1))
def test_eq3_full_rank_side_is_the_identity(case, seed):
    """docs/identities.md §7: with r = n (n <= m) V_tV_tᵀ = I, so only the left projector acts (and vice versa)."""
    m, n = case.W_t.shape
    r = min(m, n)
    x = np.random.default_rng(seed).standard_normal((m, n))
    U_t, V_t = bases(case.W_t, r, "cpu")
    U_np, V_np = np_top_r_bases(case.W_t, r)
    expected = U_np @ U_np.T @ x if r == n else x @ V_np @ V_np.T
    assert rel(N(L.transfer_same_dim(T(x), U_t, V_t)), expected, np.linalg.norm(x)) < TOL


@given(cases(), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_eq3_low_rank_form_equals_the_merged_form(case, k, seed):
    """transfer_lora keeps the rank: B'A' = U_tU_tᵀ (BA) V_tV_tᵀ (oracle: numpy projectors)."""
    m, n = case.W_t.shape
    rng = np.random.default_rng(seed)
    B, A = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    U_t, V_t = bases(case.W_t, case.r, "cpu")
    B_t, A_t = L.transfer_lora(T(B), T(A), U_t, V_t)
    assert B_t.shape == (m, k) and A_t.shape == (k, n)
    U_np, V_np = np_top_r_bases(case.W_t, case.r)
    assert rel(N(B_t @ A_t), oracle_project(B @ A, U_np, V_np), np.linalg.norm(B) * np.linalg.norm(A)) < TOL


# ----------------------------------------------------------------- Table 5 ablation and §4.2.2


@given(cases())
def test_copy_baseline_matches_numpy(case):
    U_t, V_t = bases(case.W_t, case.r, "cpu")
    U_np, V_np = np_top_r_bases(case.W_t, case.r)
    got = N(L.copy_sigma_transfer(U_t, T(case.dSigma_s), V_t))
    expected = U_np @ sigma_matrix(case.dSigma_s) @ V_np.T  # a full ΔΣ depends on the sign convention
    assert rel(got, expected, np.linalg.norm(case.dSigma_s)) < TOL


@given(cases(same_shape=False))
def test_sec422_alignment_maps_against_pinv_and_lstsq(case):
    """docs/identities.md §8: P̂ is m_t×m_s, fits exactly (P̂Ū_s = U_t) and equals U_t·pinv(Ū_s) and numpy's lstsq."""
    U_s, V_s = bases(case.W_s, case.r, "cpu")
    U_t, V_t = bases(case.W_t, case.r, "cpu")
    P, Q = L.alignment_maps(U_s, V_s, U_t, V_t)
    (m_s, n_s), (m_t, n_t) = case.W_s.shape, case.W_t.shape
    assert P.shape == (m_t, m_s) and Q.shape == (n_t, n_s)
    for M, B_s, B_t in ((P, U_s, U_t), (Q, V_s, V_t)):
        M, B_s, B_t = N(M), N(B_s), N(B_t)
        assert rel(M @ B_s, B_t, np.sqrt(case.r)) < TOL  # exact fit
        assert rel(M, B_t @ sla.pinv(B_s), np.sqrt(case.r)) < TOL
        # min ‖M B_s − B_t‖: transpose to B_sᵀ Mᵀ = B_tᵀ; lstsq returns the minimum-norm solution
        M_lstsq = np.linalg.lstsq(B_s.T, B_t.T, rcond=None)[0].T
        assert rel(M, M_lstsq, np.sqrt(case.r)) < TOL


@given(cases(same_shape=False), st.integers(0, 2**32 - 1))
def test_sec422_mismatch_rule_equals_the_copy_baseline(case, seed):
    """docs/identities.md §8: with the exact fit, ΔΣ_{t←s} = C_s = Ū_sᵀ ΔW_s V̄_s, so the rule is U_t C_s V_tᵀ."""
    x = np.random.default_rng(seed).standard_normal(case.W_s.shape)  # any update, not only LoRA-X
    U_s, V_s = bases(case.W_s, case.r, "cpu")
    U_t, V_t = bases(case.W_t, case.r, "cpu")
    got = N(L.transfer_mismatch(T(x), U_s, V_s, U_t, V_t))
    assert got.shape == case.W_t.shape
    Us, Vs, Ut, Vt = N(U_s), N(V_s), N(U_t), N(V_t)
    assert rel(got, Ut @ (Us.T @ x @ Vs) @ Vt.T, np.linalg.norm(x)) < TOL


@given(cases(targets=("independent",), min_dim=3), st.integers(0, 2**32 - 1))
def test_sec422_counter_mismatch_rule_differs_from_eq3_at_equal_shapes(case, seed):
    """Counter-test: at equal shapes the §4.2.2 rule is not Eq. (3) (on unrelated layers)."""
    assume(case.r < min(case.W_s.shape))
    U_s, V_s = bases(case.W_s, case.r, "cpu")
    U_t, V_t = bases(case.W_t, case.r, "cpu")
    dW_s = L.lorax_delta(U_s, T(case.dSigma_s), V_s)
    mismatch = N(L.transfer_mismatch(dW_s, U_s, V_s, U_t, V_t))
    eq3 = N(L.transfer_same_dim(dW_s, U_t, V_t))
    assert rel(mismatch, eq3, np.linalg.norm(case.dSigma_s)) > 1e-3


# ------------------------------------------------------------------------------------------ Eq. (4)


@given(cases())
def test_eq4_similarity_matches_scipy_principal_angles(case):
    """docs/identities.md §9: Φ = mean cos²θ, in [0, 1], symmetric; Φ(W, W) = 1."""
    U_s, V_s = bases(case.W_s, case.r, "cpu")
    U_t, V_t = bases(case.W_t, case.r, "cpu")
    for A, B in ((U_s, U_t), (V_s, V_t)):
        phi = L.subspace_similarity(A, B)
        assert abs(phi - oracle_phi(N(A), N(B))) < 1e-9
        assert -1e-12 <= phi <= 1 + 1e-12
        assert abs(phi - L.subspace_similarity(B, A)) < 1e-12
        assert abs(L.subspace_similarity(A, A) - 1) < 1e-12


@given(cases(), st.integers(0, 2**32 - 1))
def test_eq4_basis_invariant(case, seed):
    rng = np.random.default_rng(seed)
    U_s, _ = bases(case.W_s, case.r, "cpu")
    U_t, _ = bases(case.W_t, case.r, "cpu")
    R = T(orthonormal(rng, case.r, case.r))
    assert abs(L.subspace_similarity(U_s @ R, U_t) - L.subspace_similarity(U_s, U_t)) < 1e-9


def test_eq4_random_level_and_full_rank():
    """Φ ≈ r/m for random subspaces, and ≡ 1 when r = m (why truncation is mandatory)."""
    rng = np.random.default_rng(0)
    m, r = 400, 20
    phis = [L.subspace_similarity(T(orthonormal(rng, m, r)), T(orthonormal(rng, m, r))) for _ in range(20)]
    assert abs(np.mean(phis) - r / m) < 0.2 * r / m
    assert abs(L.subspace_similarity(T(orthonormal(rng, 8, 8)), T(orthonormal(rng, 8, 8))) - 1) < 1e-12


@given(cases(targets=("independent", "near")))
def test_eq4_counter_wrong_normalisation_is_caught(case):
    """Counter-test: ‖UᵀU'‖²/r² (or no normalisation) disagrees with the principal angles for r >= 2."""
    assume(case.r >= 2)
    U_s, _ = bases(case.W_s, case.r, "cpu")
    U_t, _ = bases(case.W_t, case.r, "cpu")
    wrong = float(np.sum((N(U_s).T @ N(U_t)) ** 2)) / case.r**2
    assert abs(wrong - oracle_phi(N(U_s), N(U_t))) > 1e-6


# ---------------------------------------------------------------------------------- Layer transfer


@given(cases(), st.floats(0.0, 1.0), st.sampled_from(["u", "v", "both", "mean"]))
def test_layer_transfer_report_and_gate(case, threshold, side):
    U_np, V_np = np_top_r_bases(case.W_s, case.r)
    dW_s = U_np @ sigma_matrix(case.dSigma_s) @ V_np.T  # (m, n) numpy's Eq. (1)
    dW_t, report = L.transfer_layer(T(dW_s), T(case.W_s), T(case.W_t), case.r, threshold=threshold, side=side)
    Ut_np, Vt_np = np_top_r_bases(case.W_t, case.r)
    phi_u, phi_v = oracle_phi(U_np, Ut_np), oracle_phi(V_np, Vt_np)
    phi = {"u": phi_u, "v": phi_v, "both": min(phi_u, phi_v), "mean": (phi_u + phi_v) / 2}[side]
    assert abs(report.phi_u - phi_u) < 1e-9 and abs(report.phi_v - phi_v) < 1e-9 and abs(report.phi - phi) < 1e-9
    assert report.case == "same_dim"
    assume(abs(phi - threshold) > 1e-9)  # the gate's side of a tie is a rounding question
    expected = np.zeros_like(dW_s) if phi < threshold else oracle_project(dW_s, Ut_np, Vt_np)
    assert report.gated == (phi < threshold)
    scale = np.linalg.norm(dW_s)
    assert rel(N(dW_t), expected, scale) < TOL
    kept = np.linalg.norm(expected) ** 2 / scale**2
    assert abs(report.kept_energy - kept) < 1e-6


@given(cases(same_shape=False))
def test_layer_transfer_picks_the_mismatch_case_for_different_shapes(case):
    U_np, V_np = np_top_r_bases(case.W_s, case.r)
    Ut_np, Vt_np = np_top_r_bases(case.W_t, case.r)
    dW_s = U_np @ sigma_matrix(case.dSigma_s) @ V_np.T
    dW_t, report = L.transfer_layer(T(dW_s), T(case.W_s), T(case.W_t), case.r)
    same_m, same_n = case.W_s.shape[0] == case.W_t.shape[0], case.W_s.shape[1] == case.W_t.shape[1]
    assert report.case == ("same_dim" if same_m and same_n else "mismatch")
    assert (report.phi_u is None) == (not same_m) and (report.phi_v is None) == (not same_n)
    assert dW_t.shape == case.W_t.shape
    if report.case == "mismatch":  # U_t C_s V_tᵀ, with the signs of our bases
        U_s, V_s = bases(case.W_s, case.r, "cpu")
        U_t, V_t = bases(case.W_t, case.r, "cpu")
        expected = N(U_t) @ (N(U_s).T @ dW_s @ N(V_s)) @ N(V_t).T
        assert rel(N(dW_t), expected, np.linalg.norm(dW_s)) < TOL


@given(cases())
def test_layer_transfer_copy_method_is_the_ablation(case):
    U_s, V_s = bases(case.W_s, case.r, "cpu")
    U_t, V_t = bases(case.W_t, case.r, "cpu")
    dW_s = L.lorax_delta(U_s, T(case.dSigma_s), V_s)
    dW_t, report = L.transfer_layer(dW_s, T(case.W_s), T(case.W_t), case.r, method="copy")
    assert report.case == "copy"
    expected = N(U_t) @ sigma_matrix(case.dSigma_s) @ N(V_t).T
    assert rel(N(dW_t), expected, np.linalg.norm(case.dSigma_s)) < TOL


def test_layer_transfer_zero_update_reports_nan_energy():
    rng = np.random.default_rng(0)
    W = T(rng.standard_normal((5, 4)))
    dW_t, report = L.transfer_layer(torch.zeros_like(W), W, W, 2)
    assert torch.count_nonzero(dW_t) == 0 and np.isnan(report.kept_energy)
    assert report.as_dict()["case"] == "same_dim"
