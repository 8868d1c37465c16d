"""The fast path (lorax_ref.fast) against an independent numpy float64 oracle.

Pinned tolerance: ‖ΔW_fast − ΔW_ref‖_F / ‖ΔW_ref‖_F ≤ 1e-6 for float64 *and* float32 inputs, on CPU always
and on CUDA when present; the certified bound must cover the measured error; a layer the certificate
cannot vouch for must come from the reference SVD.
"""
import numpy as np
import pytest
import torch

from lorax_ref import LoraxInputError, fast
from lorax_ref.files.stream import stream_transfer

TOL = 1e-6


def realistic(m, n, seed, change=0.1):
    """A (source, target) pair with the MiniLM singular-value profile (float64, CPU)."""
    g = torch.Generator().manual_seed(seed)
    return fast.synthetic_pair(m, n, g, change=change)


def oracle(W_s, W_t, dSigma, r):
    """Eq. (1) + Eq. (3) with numpy's float64 SVD: U_tU_tᵀ (U_s ΔΣ V_sᵀ) V_tV_tᵀ."""
    W_s, W_t, d = (np.asarray(x.detach().cpu().double().numpy()) for x in (W_s, W_t, dSigma))
    U_s, _, Vh_s = np.linalg.svd(W_s, full_matrices=False)
    U_t, _, Vh_t = np.linalg.svd(W_t, full_matrices=False)
    U_s, V_s, U_t, V_t = U_s[:, :r], Vh_s[:r].T, U_t[:, :r], Vh_t[:r].T
    # a full ΔΣ_s pairs u_i with v_j, so it depends on the signs: the package's convention is that the
    # largest-|·| entry of each u_i is positive (flipping (u_i, v_i) together)
    flip = np.sign(U_s[np.argmax(np.abs(U_s), axis=0), np.arange(r)])
    U_s, V_s = U_s * flip, V_s * flip
    D = np.diag(d) if d.ndim == 1 else d
    dW_s = U_s @ D @ V_s.T
    return (U_t @ U_t.T) @ dW_s @ (V_t @ V_t.T)


def rel_err(a, expected):
    a = a.detach().cpu().double().numpy()
    return np.linalg.norm(a - expected) / np.linalg.norm(expected)


def test_tolerance_is_pinned():
    assert fast.TOL == TOL


@pytest.mark.parametrize("method", ["mixed", "gram64", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, r", [((64, 96), 16), ((96, 64), 8), ((128, 128), 32)])
def test_transfer_matches_numpy(device, method, dtype, shape, r):
    W_s, W_t = realistic(*shape, seed=r)
    W_s, W_t = W_s.to(device=device, dtype=dtype), W_t.to(device=device, dtype=dtype)
    d = torch.randn(r, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    dW_t, pair, bound = fast.transfer_fast(W_s, W_t, d, r, method=method)
    expected = oracle(W_s, W_t, d, r)  # the oracle sees the same (rounded) weights
    err = rel_err(dW_t, expected)
    assert err <= TOL, f"{method} {dtype} {shape} r={r}: relative error {err:.2e}"
    assert err <= bound + 1e-12, f"certificate {bound:.2e} below the measured error {err:.2e}"
    assert bound <= TOL
    assert dW_t.device.type == device.type and dW_t.shape == shape
    # the fast path itself produced this, not the reference fallback
    assert pair.source.cert.method != "svd" and pair.target.cert.method != "svd"
    if method == "mixed":
        assert pair.source.cert.corrected  # the Newton step ran (k < min(m, n))
    assert not np.allclose(expected, 0)  # a transfer that returns zeros cannot pass


def test_float32_eigenvectors_alone_miss_the_tolerance():
    """Why the Newton step and Rayleigh–Ritz exist: a float32 eigendecomposition alone is ~1e-5 off."""
    m, n, r = 200, 300, 50
    W_s, W_t = realistic(m, n, seed=3)
    d = torch.randn(r, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = oracle(W_s, W_t, d, r)

    def f32_bases(W):
        lam, X = torch.linalg.eigh(W.float() @ W.float().T)  # float32 Gram eigenvectors
        U = X.flip(-1)[:, :r].double()
        V = W.T @ U / lam.flip(-1)[:r].double().sqrt()
        return U, V

    U_s, V_s = f32_bases(W_s)
    U_t, V_t = f32_bases(W_t)
    naive = U_t @ (U_t.T @ ((U_s * d) @ V_s.T) @ V_t) @ V_t.T
    assert rel_err(naive, expected) > 5 * TOL  # measured 1.6e-5 (MKL); the error grows with m
    dW_t, _, _ = fast.transfer_fast(W_s, W_t, d, r, method="mixed")
    assert rel_err(dW_t, expected) <= TOL


def test_certificate_covers_the_actual_vector_and_subspace_errors():
    W, _ = realistic(120, 150, seed=5)
    r = 24
    b = fast.top_r_bases(W, r, method="mixed", fallback=False)
    U, _, Vh = np.linalg.svd(W.numpy(), full_matrices=False)
    U, V = U[:, :r], Vh[:r].T
    signs = np.sign(np.sum(U * b.U.numpy(), axis=0))  # align the free signs
    err_u = np.linalg.norm(b.U.numpy() - U * signs, axis=0)
    err_v = np.linalg.norm(b.V.numpy() - V * signs, axis=0)
    assert np.all(err_u <= b.cert.err_u.numpy() + 1e-13)
    assert np.all(err_v <= b.cert.err_v.numpy() + 1e-13)
    proj = np.linalg.norm(b.U.numpy() @ b.U.numpy().T - U @ U.T, 2)
    assert proj <= b.cert.subspace_u + 1e-13
    assert b.cert.subspace_u < 1e-7 and float(b.cert.err_u.max()) < 1e-7  # and the bound is useful


def test_group_is_batched_and_equals_single_layers():
    pairs = [realistic(80, 100, seed=s) for s in range(3)]
    W = torch.stack([p[0] for p in pairs])  # (3, 80, 100)
    group = fast.top_r_bases_group(W, 12, method="mixed")
    for i in range(3):
        one = fast.top_r_bases(W[i], 12, method="mixed")
        d = torch.linspace(-1, 1, 12, dtype=torch.float64)
        a = (group[i].U * d) @ group[i].V.T
        b = (one.U * d) @ one.V.T
        assert torch.allclose(a, b, rtol=0, atol=1e-12 * float(b.norm()))


def test_second_adapter_from_cached_bases(device):
    r = 16
    W_s, W_t = (w.to(device) for w in realistic(72, 90, seed=7))
    g = torch.Generator().manual_seed(8)
    d1 = torch.randn(r, generator=g, dtype=torch.float64).to(device)
    d2 = torch.randn(r, r, generator=g, dtype=torch.float64).to(device)  # a full ΔΣ_s
    _, pair, _ = fast.transfer_fast(W_s, W_t, d1, r)
    dW2, pair2, _ = fast.transfer_fast(W_s, W_t, d2, r, pair=pair)
    assert pair2 is pair  # nothing recomputed
    assert rel_err(dW2, oracle(W_s, W_t, d2, r)) <= TOL
    ts = pair.dsigma_ts(d2)  # compact form, Eq. (3) rotation form
    assert ts.shape == (r, r)
    assert torch.allclose(pair.target.U @ ts @ pair.target.V.T, dW2, atol=1e-12)
    compact, _, _ = fast.transfer_fast(W_s, W_t, d2, r, pair=pair, dense=False)
    assert torch.allclose(compact, ts)


@pytest.mark.parametrize("full", [False, True])
def test_lora_factors_of_the_transferred_adapter(device, full):
    """factors(): B (m, r), A (r, n) with BA = ΔW_t (the oracle), A's rows = V_t V_tᵀ v̄_s (no ΔΣ in A)."""
    r, (m, n) = 12, (80, 56)
    W_s, W_t = (w.to(device) for w in realistic(m, n, seed=11))
    g = torch.Generator().manual_seed(12)
    d = torch.randn(*((r, r) if full else (r,)), generator=g, dtype=torch.float64).to(device)
    pair = fast.pair_bases(W_s, W_t, r)
    B, A = pair.factors(d)
    assert B.shape == (m, r) and A.shape == (r, n) and B.device.type == device.type
    assert rel_err(B @ A, oracle(W_s, W_t, d, r)) <= TOL
    d0 = d.clone()
    B_other, A_other = pair.factors(2 * d)  # linear in ΔΣ_s; A does not depend on it; d itself untouched
    assert torch.equal(A_other, A) and torch.allclose(B_other, 2 * B) and torch.equal(d, d0)
    # A's rows are the source's right singular vectors projected on the target's right subspace
    V_s, V_t = pair.source.V, pair.target.V
    assert torch.allclose(A, (V_t @ (V_t.T @ V_s)).T, atol=1e-12)
    A.zero_()  # the factors are the caller's: the cached pair is untouched
    assert torch.allclose(pair.factors(d)[1], A_other) and rel_err(pair.delta_w(d), oracle(W_s, W_t, d, r)) <= TOL
    with pytest.raises(LoraxInputError, match="dSigma_s"):
        pair.factors(torch.ones(r + 1, dtype=torch.float64, device=device))


def test_full_rank_r_goes_to_the_reference_under_auto():
    """r = min(m, n) needs the smallest singular values too: a Gram matrix would square their range."""
    W_s, W_t = realistic(48, 80, seed=9)
    r = 48
    d = torch.randn(r, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dW_t, pair, bound = fast.transfer_fast(W_s, W_t, d, r)
    assert pair.source.cert.method == "svd" and pair.target.cert.method == "svd" and bound == 0.0
    assert rel_err(dW_t, oracle(W_s, W_t, d, r)) <= TOL


def test_gram64_without_complement_is_certified_on_a_moderate_spectrum():
    """k = m (no complement): the certificate rests on the in-span residual alone."""
    rng = np.random.default_rng(1)
    m, n, r = 40, 56, 40
    s = np.geomspace(1.0, 0.05, m)
    W_s = torch.from_numpy(np.linalg.qr(rng.standard_normal((m, m)))[0] @ np.diag(s)
                           @ np.linalg.qr(rng.standard_normal((n, m)))[0].T)
    W_t = W_s + 0.05 * torch.from_numpy(rng.standard_normal((m, n))) / np.sqrt(n)
    d = torch.from_numpy(rng.standard_normal(r))
    pair = fast.pair_bases(W_s, W_t, r, method="gram64", fallback=False)
    assert pair.source.cert.k == m and pair.source.cert.method == "gram64"
    err = rel_err(pair.delta_w(d), oracle(W_s, W_t, d, r))
    assert err <= pair.bound(d) <= TOL


def test_near_tie_inside_top_r_falls_back_to_the_reference():
    """Two singular values 1e-14 apart: u_5, u_6 are not determined by W, the certificate must say so."""
    rng = np.random.default_rng(0)
    m, n, r = 60, 70, 10
    s = np.geomspace(1.0, 1e-2, m)
    s[5] = s[4] * (1 - 1e-14)
    U = np.linalg.qr(rng.standard_normal((m, m)))[0]
    V = np.linalg.qr(rng.standard_normal((n, m)))[0]
    W = torch.from_numpy(U @ np.diag(s) @ V.T)
    raw = fast.top_r_bases(W, r, method="gram64", fallback=False)
    assert not float((raw.cert.err_u + raw.cert.err_v).max()) <= TOL  # honest: cannot vouch for it
    checked = fast.top_r_bases(W, r, method="gram64")
    assert checked.cert.method == "svd"


def test_inputs_are_not_modified_and_half_precision_works():
    W_s, W_t = realistic(64, 64, seed=11)
    W_s, W_t = W_s.half(), W_t.half()
    keep = W_s.clone(), W_t.clone()
    d = torch.randn(8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    dW_t, _, _ = fast.transfer_fast(W_s, W_t, d, 8, method="mixed")
    assert torch.equal(W_s, keep[0]) and torch.equal(W_t, keep[1])
    assert rel_err(dW_t, oracle(W_s, W_t, d, 8)) <= TOL  # exact for the fp16 values as stored
    assert dW_t.dtype == torch.float64


def test_bad_input_raises_clear_errors():
    W = torch.randn(20, 30, dtype=torch.float64)
    with pytest.raises(LoraxInputError, match="equal shapes"):
        fast.pair_bases(W, torch.randn(30, 20, dtype=torch.float64), 4)
    with pytest.raises(LoraxInputError, match="method"):
        fast.top_r_bases(W, 4, method="lanczos")
    with pytest.raises(LoraxInputError, match="out of range"):
        fast.top_r_bases(W, 21)
    bad = W.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(LoraxInputError, match="NaN"):
        fast.top_r_bases(bad, 4)
    with pytest.raises(LoraxInputError, match="one shape"):
        fast.top_r_bases_group([W, W[:10]], 4)
    pair = fast.pair_bases(W, W + 0.01, 4)
    with pytest.raises(LoraxInputError, match="dSigma_s"):
        pair.dsigma_ts(torch.ones(5, dtype=torch.float64))


def test_stream_transfer_between_checkpoints(tmp_path):
    from safetensors.torch import save_file

    r = 8
    names = [f"blocks.{i}.to_{p}.weight" for i in range(2) for p in "qk"]
    shapes = {"q": (40, 40), "k": (40, 56)}
    src, tgt, adapter = {}, {}, {}
    for i, nm in enumerate(names):
        W_s, W_t = realistic(*shapes[nm.split("to_")[1][0]], seed=20 + i)
        src[nm], tgt[nm] = W_s.float(), W_t.float()
        adapter[nm] = torch.randn(r, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
    save_file(src, str(tmp_path / "s.safetensors"))
    save_file(tgt, str(tmp_path / "t.safetensors"))
    seen = []
    for nm, ts, bound, how in stream_transfer(tmp_path / "s.safetensors", tmp_path / "t.safetensors",
                                                   adapter, r, group=2):
        assert ts.shape == (r, r) and bound <= TOL
        seen.append(nm)
    assert seen == names
    dense = {nm: out for nm, out, _, _ in stream_transfer(tmp_path / "s.safetensors", tmp_path / "t.safetensors",
                                                               adapter, r, dense=True)}
    for nm in names:
        assert rel_err(dense[nm], oracle(src[nm], tgt[nm], adapter[nm], r)) <= TOL


def test_streaming_reader_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import save_file

    from lorax_ref.files.checkpoints import open_checkpoint

    tensors = {"a.weight": torch.randn(5, 7), "b.weight": torch.randn(3, 4).half(), "bias": torch.randn(3)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with open_checkpoint(tmp_path / "x.safetensors", stream=True) as ck:
        assert sorted(ck.keys()) == ["a.weight", "b.weight"]  # 2-D weights only
        for nm in ("a.weight", "b.weight"):
            assert torch.equal(ck.get(nm), tensors[nm]) and ck.shape(nm) == tuple(tensors[nm].shape)
        with pytest.raises(LoraxInputError, match="no 2-D weight named"):
            ck.get("c.weight")
        with pytest.raises(LoraxInputError, match="expected"):
            ck.get("a.weight", shape=(7, 5))


def test_synthetic_spectrum_is_realistic():
    s = fast.synthetic_spectrum(384, torch.Generator().manual_seed(0))
    assert s.shape == (384,) and float(s[0]) == pytest.approx(1.0)
    assert torch.all(s[:-1] >= s[1:])
    assert 0.2 < float(s[128]) < 0.4  # MiniLM profile: σ at i/k = 1/3 is ≈ 0.31


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_keeps_tf32_setting_and_turns_it_off_inside():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        W_s, W_t = (w.cuda().float() for w in realistic(96, 128, seed=1))
        d = torch.randn(16, dtype=torch.float64, device="cuda")
        dW_t, _, _ = fast.transfer_fast(W_s, W_t, d, 16, method="mixed")
        assert rel_err(dW_t, oracle(W_s, W_t, d, 16)) <= TOL
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.slow
def test_benchmark_script_runs_end_to_end(tmp_path):
    """A small run of scripts/benchmark.py (one group per shape, tiny sweep, a 50 MB streaming test)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(script), "--threads", "1", "--models", "sd15", "--ranks", "64", "--subset", "1",
           "--widths", "320", "640", "--ranks-sweep", "32", "64", "--sweep-width", "640", "--reps", "1",
           "--device", "cpu", "--stream", "--stream-gb", "0.05", "--stream-dir", str(tmp_path / "st"), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    res = json.loads(out.read_text())
    model = res["runs"]["cpu"]["models"][0]
    assert model["max_rel_dev_first"] <= TOL and model["max_rel_dev_second"] <= TOL
    assert model["ratio_fast"] > 0 and len(model["groups"]) == 6
    assert res["stream"]["spot_dev"] <= TOL and res["stream"]["max_bound"] <= TOL
    assert len(res["runs"]["cpu"]["scaling"]["by_width"]) == 2
