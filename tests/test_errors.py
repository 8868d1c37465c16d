"""Every bad input gets a LoraxInputError whose message names the problem and the offending values
(docs/identities.md §10)."""
import math
import re

import numpy as np
import pytest
import torch

import lorax_ref as L
from lorax_ref import LoraxInputError
from lorax_ref.testing.oracles import t64 as T

RNG = np.random.default_rng(0)


W_s = T(RNG.standard_normal((8, 6)))
W_t = T(RNG.standard_normal((8, 6)))
W_big = T(RNG.standard_normal((10, 6)))
U_s, S_s, V_s = L.svd_topk(W_s, 3)
U_t, S_t, V_t = L.svd_topk(W_t, 3)
U_b, S_b, V_b = L.svd_topk(W_big, 3)
dSigma = T(RNG.standard_normal(3))
dW_s = L.lorax_delta(U_s, dSigma, V_s)


def raises(match, func, *args, **kwargs):
    with pytest.raises(LoraxInputError, match=match) as info:
        func(*args, **kwargs)
    assert "Traceback" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(5, dtype=torch.float64), r"W must be 2-D .* shape \(5,\)"),
        (torch.randn(2, 3, 4, dtype=torch.float64), r"W must be 2-D .* shape \(2, 3, 4\)"),
        (np.ones((3, 3)), r"W must be a torch.Tensor, got ndarray"),
        (torch.ones(3, 3, dtype=torch.int64), r"W must have a floating dtype, got torch.int64"),
        (torch.empty(0, 3, dtype=torch.float64), r"W is empty"),
    ],
)
def test_non_matrix_input(bad, match):
    raises(match, L.svd_topk, bad, 1)


@pytest.mark.parametrize("r", [0, -1, 7, 100])
def test_rank_out_of_range(r):
    raises(rf"r={r} is out of range: need 1 <= r <= min\(m, n\) = 6 for a 8x6 matrix", L.svd_topk, W_s, r)


@pytest.mark.parametrize("r", [2.0, "3", True])
def test_rank_not_an_int(r):
    raises(r"r must be an int", L.svd_topk, W_s, r)


@pytest.mark.parametrize("value, count", [(float("nan"), "1 NaN and 0 Inf"), (float("inf"), "0 NaN and 1 Inf")])
def test_nan_and_inf(value, count):
    bad = W_s.clone()
    bad[2, 3] = value
    raises(rf"W contains {count} entries", L.svd_topk, bad, 2)
    raises(rf"dW_s contains {count} entries", L.transfer_same_dim, bad, U_s, V_s)
    bad_sigma = dSigma.clone()
    bad_sigma[0] = value
    raises(rf"dSigma_s contains {count} entries", L.lorax_delta, U_s, bad_sigma, V_s)
    assert torch.isnan(bad).any() or torch.isinf(bad).any()  # the input was not "repaired"


def test_finite_entries_whose_sum_overflows_are_accepted():
    """The NaN/Inf check starts from one sum; a sum that overflows on finite entries must not fail it."""
    from lorax_ref import checks

    big = torch.full((4, 4), 6e4, dtype=torch.float16)  # the sum (9.6e5) overflows float16, the entries do not
    assert not torch.isfinite(big.sum())
    checks.finite("W", big)  # no error
    big[1, 1] = float("-inf")
    raises(r"W contains 0 NaN and 1 Inf entries", checks.finite, "W", big)
    mixed = torch.tensor([[float("inf"), float("-inf")], [1.0, float("nan")]])  # inf − inf: the sum is NaN
    raises(r"W contains 1 NaN and 2 Inf entries", checks.finite, "W", mixed)


def test_same_dimension_transfer_refuses_other_shapes():
    msg = raises(r"dW_s is 8x6 but U_t, V_t describe a 10x6 layer", L.transfer_same_dim, dW_s, U_b, V_b)
    assert "transfer_mismatch" in msg
    raises(r"V_t has 8 rows, expected 6 \(shape \(8, 3\)\)", L.transferred_sigma, U_t, U_s, dSigma, V_s, L.svd_topk(W_s.T, 3)[2])
    raises(r"method='lorax' \(Eq. \(3\)\) needs equal shapes", L.transfer_layer, dW_s, W_s, W_big, 3, method="lorax")


@pytest.mark.parametrize("bad", [torch.ones(4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)])
def test_dsigma_of_the_wrong_size(bad):
    shape = re.escape(str(tuple(bad.shape)))
    raises(rf"dSigma_s has shape {shape}, expected \(3,\) \(diagonal\) or \(3, 3\)", L.lorax_delta, U_s, bad, V_s)
    raises(r"dSigma_s has shape", L.copy_sigma_transfer, U_t, bad, V_t)
    raises(r"dSigma_s has shape", L.transferred_sigma, U_t, U_s, bad, V_s, V_t)


def test_bases_that_are_not_orthonormal():
    raises(r"U_s \(shape \(8, 3\)\) is not column-orthonormal: max \|U_sᵀU_s - I\| = ", L.lorax_delta, 2 * U_s, dSigma, V_s)
    raises(r"V \(shape \(6, 3\)\) is not column-orthonormal", L.project, dW_s, U_s, V_s + 0.01)
    raises(r"U_a \(shape \(8, 3\)\) is not column-orthonormal", L.subspace_similarity, W_s[:, :3], U_t)
    # Vh passed where V is meant: too many columns for a basis
    Vh = torch.linalg.svd(W_s, full_matrices=False)[2][:3]  # (3, 6)
    raises(r"V_t has more columns than rows, shape \(3, 6\).*was Vh passed for V\?", L.transfer_lora, dW_s[:, :2], dW_s[:2], U_t, Vh)


def test_square_vh_for_v_cannot_be_caught_by_a_check():
    """Why no public signature takes Vh: on a square layer the columns of Vh are orthonormal too, so the
    mix-up passes every check and is silently wrong. Only the convention (svd_topk returns V) prevents it."""
    W = T(RNG.standard_normal((6, 6)))
    U, _, V = L.svd_topk(W, 3)
    wrong_V = torch.linalg.svd(W)[2][:, :3]  # (6, 3): columns of Vh, orthonormal, but not right singular vectors
    dW = L.lorax_delta(U, T(np.ones(3)), V)
    assert not torch.allclose(L.project(dW, U, wrong_V), dW, atol=1e-3)  # no error, wrong answer


def test_mixed_devices():
    meta = torch.empty(8, 6, dtype=torch.float64, device="meta")
    msg = raises(r"inputs are on different devices \(dW on meta, U on cpu, V on cpu\)", L.project, meta, U_s, V_s)
    assert "move them to one device first" in msg
    raises(r"different devices", L.transfer_same_dim, meta, U_t, V_t)
    raises(r"different devices", L.transfer_layer, meta, W_s, W_t, 2)
    raises(r"different devices", L.lorax_delta, U_s, dSigma.to("meta"), V_s)
    raises(r"different devices", L.subspace_similarity, U_s, U_t.to("meta"))
    raises(r"different devices", L.transfer_lora, meta[:, :2], dW_s[:2], U_t, V_t)
    raises(r"different devices", L.alignment_maps, U_s, V_s, U_t.to("meta"), V_t)
    raises(r"different devices", L.transfer_mismatch, meta, U_s, V_s, U_t, V_t)
    raises(r"different devices", L.transferred_sigma, U_t, U_s, dSigma.to("meta"), V_s, V_t)
    raises(r"different devices", L.copy_sigma_transfer, U_t, dSigma.to("meta"), V_t)


def test_mixed_dtypes():
    raises(r"different dtypes \(dW torch.float32, U torch.float64, V torch.float64\)", L.project, dW_s.float(), U_s, V_s)


def test_other_bad_arguments():
    raises(r"bases must share the rank r \(U_s has r=3, U_t has r=2\)", L.alignment_maps, U_s, V_s, U_t[:, :2], V_t[:, :2])
    raises(r"LoRA factors do not chain: B is \(8, 2\) and A is \(3, 6\)", L.transfer_lora, dW_s[:, :2], dW_s[:3], U_t, V_t)
    raises(r"side='x' is not one of", L.transfer_layer, dW_s, W_s, W_t, 2, side="x")
    raises(r"method='svd' is not one of", L.transfer_layer, dW_s, W_s, W_t, 2, method="svd")
    raises(r"dW_s \(8, 5\) does not match its base weight W_s \(8, 6\)", L.transfer_layer, dW_s[:, :5], W_s, W_t, 2)
    raises(r"r \(target\)=4 is out of range", L.transfer_layer, dW_s, W_s, W_t[:3], 4)
    W_other = T(RNG.standard_normal((10, 7)))
    raises(r"cannot gate with side='both'", L.transfer_layer, dW_s, W_s, W_other, 2, threshold=0.5)


def test_device_env_var(monkeypatch):
    monkeypatch.setenv("LORAX_DEVICE", "cpu")
    assert L.default_device() == torch.device("cpu")
    monkeypatch.setenv("LORAX_DEVICE", "banana")
    raises(r"LORAX_DEVICE='banana' is not a torch device name", L.default_device)
    if not torch.cuda.is_available():
        monkeypatch.setenv("LORAX_DEVICE", "cuda")
        raises(r"asks for CUDA, but torch sees no CUDA device", L.default_device)
    monkeypatch.delenv("LORAX_DEVICE")
    assert L.default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_inputs_are_not_modified():
    before = [t.clone() for t in (dW_s, W_s, W_t, dSigma, U_s, V_s)]
    L.transfer_layer(dW_s, W_s, W_t, 3, threshold=0.1)
    L.lorax_delta(U_s, dSigma, V_s)
    L.transfer_mismatch(dW_s, U_s, V_s, U_b, V_b)
    for a, b in zip(before, (dW_s, W_s, W_t, dSigma, U_s, V_s)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Inputs that once slipped through: a silently wrong number or a raw torch error instead of one clear line
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau, match", [
    (float("nan"), r"threshold=nan is out of range: Φ lies in \[0, 1\]"),  # NaN used to disable the gate
    (1.5, r"threshold=1.5 is out of range"),  # used to gate every layer
    (-0.1, r"threshold=-0.1 is out of range"),
    (True, r"threshold must be None or a number in \[0, 1\], got bool True"),  # used to gate every layer
    ("0.5", r"threshold must be None or a number in \[0, 1\], got str '0.5'"),  # used to raise a raw TypeError
    (torch.tensor(0.5), r"threshold must be None or a number in \[0, 1\], got Tensor"),
])
def test_threshold_is_validated_in_the_api(tau, match):
    raises(match, L.transfer_layer, dW_s, W_s, W_t, 3, threshold=tau)
    raises(match, L.transfer_layer_from_bases, dW_s, U_s, V_s, U_t, V_t, threshold=tau)


def test_threshold_accepts_numbers_in_range():
    for tau in (0, 1, 0.25, np.float64(0.25), np.float32(1.0)):
        _, rep = L.transfer_layer(dW_s, W_s, W_t, 3, threshold=tau)
        assert rep.threshold == float(tau) and rep.gated == (rep.phi < float(tau))


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300, 1e-300])
def test_kept_energy_is_scale_free(scale):
    """‖·‖² of an update at 1e200 overflows float64 and at 1e-200 underflows; the ratio must not care."""
    _, rep = L.transfer_layer(dW_s * scale, W_s, W_t, 3)
    # oracle: numpy at scale 1 (every transfer rule is linear in ΔW_s, so the ratio does not depend on it)
    Ut, Vt = (np.linalg.svd(W_t.numpy())[0][:, :3], np.linalg.svd(W_t.numpy())[2][:3].T)
    dW = dW_s.numpy()
    expect = np.linalg.norm(Ut @ Ut.T @ dW @ Vt @ Vt.T) ** 2 / np.linalg.norm(dW) ** 2
    assert rep.kept_energy == pytest.approx(expect, rel=1e-12)
    assert math.isnan(L.transfer_layer(0 * dW_s, W_s, W_t, 3)[1].kept_energy)  # ΔW_s = 0: documented NaN


def test_svd_topk_refuses_singular_values_beyond_the_dtype_range():
    """fp16 ends at 65504: an 8×6 block of 6e4 has σ_1 = 6e4·√48 ≈ 4.2e5, which used to come back as Inf."""
    W = torch.full((8, 6), 6e4, dtype=torch.float16)
    msg = raises(r"top singular value of W \(4.157e\+05\) is beyond the float16 range \(max 6.55e\+04\)", L.svd_topk, W, 2)
    assert "W.float()" in msg
    S = L.svd_topk(W.float(), 1)[1]  # the way out the message gives (W has rank 1)
    assert float(S[0]) == pytest.approx(np.linalg.svd(W.double().numpy(), compute_uv=False)[0], rel=1e-6)
    small = torch.full((8, 6), 1e3, dtype=torch.float16)  # σ_1 ≈ 6928 fits: still returned in float16
    assert L.svd_topk(small, 2)[1].dtype == torch.float16


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("make, match", [
    (lambda: torch.empty(8, 6, dtype=torch.float64, device="meta"), r"W is a meta tensor \(shape \(8, 6\), no values\)"),
    (lambda: W_s.to_sparse(), r"W has layout torch.sparse_coo; pass a dense tensor \(W.to_dense\(\)\)"),
    (lambda: W_s.to_sparse_csr(), r"W has layout torch.sparse_csr"),
])
def test_meta_and_sparse_tensors(make, match):
    raises(match, L.svd_topk, make(), 2)  # used to be "Tensor.item() cannot be called on meta tensors" / NotImplementedError


def test_meta_and_sparse_tensors_in_every_argument():
    meta = {k: v.to("meta") for k, v in dict(U_s=U_s, dSigma=dSigma, V_s=V_s).items()}
    raises(r"U_s is a meta tensor", L.lorax_delta, meta["U_s"], meta["dSigma"], meta["V_s"])
    raises(r"dSigma_s has layout torch.sparse_coo", L.lorax_delta, U_s, dSigma.to_sparse(), V_s)
    raises(r"dW has layout torch.sparse_coo", L.project, dW_s.to_sparse(), U_s, V_s)


def test_size_guard_refuses_before_allocating():
    """A 100000×100000 view of one element is 4 bytes; its SVD needs ~280 GB: refused at once, naming the size."""
    import resource
    import time

    W = torch.ones(1, 1).expand(100000, 100000)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    msg = raises(r"the SVD of a 100000x100000 float32 matrix W needs about 280 GB of memory, but only .* is free on cpu",
                 L.svd_topk, W, 8)
    assert time.perf_counter() - t0 < 2.0, msg  # not even the NaN scan of 1e10 entries ran (3 s)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000  # kB: nothing big was allocated


def test_memory_estimate_of_the_guard():
    from lorax_ref.linalg import svd_memory

    # working copy + U + Vh + 4k² + 8·max(m, n) + k, in bytes of the compute dtype
    assert svd_memory(100000, 100000, torch.float32) == 4 * (3 * 10**10 + 4 * 10**10 + 8 * 10**5 + 10**5)
    assert svd_memory(64, 48, torch.float64) == 8 * (64 * 48 + 64 * 48 + 48 * 48 + 4 * 48 * 48 + 8 * 64 + 48)


def test_ill_posed_but_legal_inputs_are_reported():
    """A tie σ_r = σ_{r+1}, rank < r or a zero W: the bases are decided by rounding, and the report says so.

    W_t = diag(3, 2, 1, 1, 0.5) with r = 3: a change of 1e-12 in one entry moves Φ_U from 1 to 2/3 (the third
    basis vector is e_3 or e_4), both correct answers for inputs that close.
    """
    W_src = torch.diag(T([3.0, 2.0, 1.0, 0.9, 0.5]))  # top-3 subspace: e1, e2, e3 (gap 0.1)
    W_tie = torch.diag(T([3.0, 2.0, 1.0, 1.0, 0.5]))
    dW = T(RNG.standard_normal((5, 5)))
    _, rep = L.transfer_layer(dW, W_src, W_src, 3)
    assert rep.warnings == ()  # well posed: no warning
    _, rep = L.transfer_layer(dW, W_src, W_tie, 3)
    assert len(rep.warnings) == 1 and rep.warnings[0].startswith("W_t has σ_3 = σ_4")
    for eps, phi in ((-1e-12, 1.0), (1e-12, 2 / 3)):  # oracle: the top-3 subspace of a diagonal matrix
        W_near = W_tie.clone()
        W_near[3, 3] += eps
        _, rep = L.transfer_layer(dW, W_src, W_near, 3)
        assert rep.phi_u == pytest.approx(phi, abs=1e-9)
        assert len(rep.warnings) == 1 and rep.warnings[0].startswith("W_t has σ_3 ≈ σ_4 (gap 3.3e-13·σ_1)")  # 1e-12 / σ_1
    _, rep = L.transfer_layer(dW, W_src, torch.zeros(5, 5, dtype=torch.float64), 3)
    assert rep.warnings == ("W_t is zero: every 3-dimensional subspace is a top-3 subspace, so its bases are arbitrary",)
    _, rep = L.transfer_layer(dW, torch.diag(T([3.0, 2.0, 0.0, 0.0, 0.0])), W_src, 3)
    assert len(rep.warnings) == 1 and rep.warnings[0].startswith("W_s has numerical rank 2 < r=3")
    _, rep = L.transfer_layer(dW, W_src, W_tie, 5)  # r = min(m, n): the subspace is everything, no tie to report
    assert rep.warnings == ()


def _count_checks(monkeypatch):
    """Count, per tensor, the NaN/Inf scans and the orthonormality tests that lorax_ref.checks runs."""
    from collections import Counter

    from lorax_ref import checks

    scans, ortho = Counter(), Counter()
    finite, basis = checks.finite, checks.basis

    def counted_finite(name, x):
        scans[id(x)] += 1
        return finite(name, x)

    def counted_basis(name, U, rows=None):
        ortho[id(U)] += 1
        return basis(name, U, rows=rows)

    monkeypatch.setattr(checks, "finite", counted_finite)
    monkeypatch.setattr(checks, "basis", counted_basis)
    return scans, ortho


def test_inputs_are_checked_once_at_the_boundary(monkeypatch):
    """A public function checks its arguments once; what it calls inside takes them as checked.

    transfer_layer scans each of dW_s, W_s, W_t for NaN/Inf once and never re-tests the bases its own SVD
    produced; transfer_layer_from_bases tests each given basis once (Eq. (4), Eq. (3) and §4.2.2 below it
    do not test them again); an error still names the argument (the counting wrappers call the real checks).
    """
    scans, ortho = _count_checks(monkeypatch)
    dW_t, _ = L.transfer_layer(dW_s, W_s, W_t, 3, threshold=0.0)
    assert [scans[id(x)] for x in (dW_s, W_s, W_t)] == [1, 1, 1] and not ortho, (scans, ortho)
    assert torch.allclose(dW_t, L.transfer_same_dim(dW_s, U_t, V_t), rtol=0, atol=1e-12)

    for method, target in (("auto", (U_t, V_t)), ("mismatch", (U_t, V_t)), ("copy", (U_t, V_t)), ("auto", (U_b, V_b))):
        scans.clear(), ortho.clear()
        L.transfer_layer_from_bases(dW_s, U_s, V_s, *target, threshold=None, method=method)
        assert scans[id(dW_s)] == 1 and [ortho[id(x)] for x in (U_s, V_s, *target)] == [1, 1, 1, 1], (method, scans, ortho)

    scans.clear(), ortho.clear()
    L.transfer_mismatch(dW_s, U_s, V_s, U_b, V_b)
    assert scans[id(dW_s)] == 1 and [ortho[id(x)] for x in (U_s, V_s, U_b, V_b)] == [1, 1, 1, 1], (scans, ortho)

    bad = W_t.clone()
    bad[0, 0] = math.nan
    raises(r"W_t contains 1 NaN and 0 Inf entries", L.transfer_layer, dW_s, W_s, bad, 3)
