"""Device and dtype agnosticism: float32 and half precision against the float64 oracle.

Tolerances (relative Frobenius error of the transferred update) are stated per dtype; the float64
path is the verification path and is held to 1e-7 in test_equations.py.
"""
import numpy as np
import pytest
import torch

import lorax_ref as L
from lorax_ref.testing.strategies import compose, np_top_r_bases

TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}


def case(seed=0, m=48, n=32, r=8):
    rng = np.random.default_rng(seed)
    s = np.geomspace(1.0, 1e-2, min(m, n))  # (k,) well separated: 15% relative gaps
    W_s, W_t = compose(rng, s, m, n), compose(rng, s, m, n)
    U_np, V_np = np_top_r_bases(W_s, r)
    dW_s = U_np @ np.diag(rng.standard_normal(r)) @ V_np.T  # (m, n)
    Ut_np, Vt_np = np_top_r_bases(W_t, r)
    expected = (Ut_np @ Ut_np.T) @ dW_s @ (Vt_np @ Vt_np.T)  # Eq. (3), numpy float64
    return W_s, W_t, dW_s, r, expected


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_transfer_layer_in_low_precision(device, dtype):
    if device.type == "cpu" and dtype == torch.float16 and not hasattr(torch, "float16"):
        pytest.skip("no float16 on this build")
    W_s, W_t, dW_s, r, expected = case()
    to = lambda a: torch.as_tensor(a).to(device=device, dtype=dtype)  # noqa: E731
    dW_t, report = L.transfer_layer(to(dW_s), to(W_s), to(W_t), r)
    assert dW_t.dtype == dtype and dW_t.device.type == device.type
    err = np.linalg.norm(dW_t.double().cpu().numpy() - expected) / np.linalg.norm(expected)
    assert err < TOLERANCE[dtype], f"{dtype} on {device}: relative error {err:.2e}"
    assert not np.allclose(expected, dW_s)  # the transfer changed something: a no-op cannot pass


def test_float64_on_device_matches_cpu(device):
    W_s, W_t, dW_s, r, expected = case(seed=1)
    to = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
    dW_t, _ = L.transfer_layer(to(dW_s), to(W_s), to(W_t), r)
    assert np.linalg.norm(dW_t.cpu().numpy() - expected) <= 1e-10 * np.linalg.norm(expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_stay_on_cuda_and_mixed_devices_raise():
    W_s, W_t, dW_s, r, _ = case(seed=2)
    cuda = lambda a: torch.as_tensor(a, dtype=torch.float64, device="cuda")  # noqa: E731
    dW_t, _ = L.transfer_layer(cuda(dW_s), cuda(W_s), cuda(W_t), r)
    assert dW_t.is_cuda
    with pytest.raises(L.LoraxInputError, match="different devices"):
        L.transfer_layer(cuda(dW_s), torch.as_tensor(W_s), cuda(W_t), r)
