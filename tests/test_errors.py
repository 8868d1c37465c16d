"""Every bad input gets a LoraxInputError whose message names the problem and the offending values."""
import re

import numpy as np
import pytest
import torch

import lorax_ref as L
from lorax_ref import LoraxInputError

RNG = np.random.default_rng(0)


def T(a):
    return torch.as_tensor(a, dtype=torch.float64)


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
