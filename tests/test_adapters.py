"""Adapter formats (PEFT, kohya, compact LoRA-X), the basis cache and the whole-adapter transfer.

Expected ΔW values come from numpy (PEFT's and kohya's own definitions written out) or from the reference
functions of :mod:`lorax_ref.core` applied to dense matrices, never from the code under test.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorax_ref import LoraxInputError, svd_topk, transfer_layer
from lorax_ref.files.adapters import AdapterError, LoraLayer, load_adapter, save_adapter
from lorax_ref.files.example import random_adapter
from lorax_ref.files.output import write_output_dir
from lorax_ref.files.transfer import transfer_adapter
from lorax_ref.core import transfer_layer_from_bases
from lorax_ref.files.cache import BasisCache
from lorax_ref.files.checkpoints import open_checkpoint
from lorax_ref.testing.checksums import files_sha256
from lorax_ref.testing.layers import near
from lorax_ref.testing.layers import spectral as _spectral

# ---------------------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------------------


def spectral(m, n, seed, decay=0.85):
    return _spectral(m, n, seed, decay)


def write_ckpt(path, weights: dict[str, torch.Tensor], dtype=torch.float32):
    """A safetensors checkpoint; module names get the ``.weight`` suffix of a torch state dict."""
    named = {k if k.endswith((".weight", ".bias")) else k + ".weight": v for k, v in weights.items()}
    save_file({k: v.to(dtype).contiguous().clone() for k, v in named.items()}, str(path))
    return path


def lora_factors(m: int, n: int, k: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, k, generator=g, dtype=torch.float64)
    A = torch.randn(k, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    return B.to(dtype), A.to(dtype)


def write_peft(dirpath, layers: dict[str, tuple], **config):
    dirpath.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (B, A) in layers.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(dirpath / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], "bias": "none",
           "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False, "use_rslora": False}
    cfg.update(config)
    (dirpath / "adapter_config.json").write_text(json.dumps(cfg))
    return dirpath


def write_kohya(path, layers: dict[str, tuple], alphas: dict[str, float | None] | None = None, extra=None):
    tensors = {}
    for stem, (up, down) in layers.items():
        tensors[f"{stem}.lora_down.weight"] = down.contiguous().clone()
        tensors[f"{stem}.lora_up.weight"] = up.contiguous().clone()
        a = (alphas or {}).get(stem, 2.0)
        if a is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(a, dtype=down.dtype)
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def np_delta(B, A, scale, transpose=False):
    d = scale * (B.double().numpy() @ A.double().numpy())
    return d.T if transpose else d


# ---------------------------------------------------------------------------------------------------------
# reading: ΔW as PEFT and kohya define it
# ---------------------------------------------------------------------------------------------------------


def test_peft_scaling_patterns_and_rslora(tmp_path):
    q = lora_factors(6, 5, 4, 0)
    v = lora_factors(6, 5, 2, 1)
    d = write_peft(tmp_path / "a", {"enc.0.q": q, "enc.0.v": v}, r=4, lora_alpha=8,
                   rank_pattern={"v": 2}, alpha_pattern={"enc\\.0\\.v": 3})
    ad = load_adapter(d)
    got = {layer.module: layer for layer in ad.layers}
    assert ad.format == "peft" and set(got) == {"enc.0.q", "enc.0.v"}
    np.testing.assert_allclose(got["enc.0.q"].delta().numpy(), np_delta(*q, 8 / 4), rtol=1e-12)
    np.testing.assert_allclose(got["enc.0.v"].delta().numpy(), np_delta(*v, 3 / 2), rtol=1e-12)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    got = {layer.module: layer for layer in load_adapter(d).layers}
    np.testing.assert_allclose(got["enc.0.q"].delta().numpy(), np_delta(*q, 8 / math.sqrt(4)), rtol=1e-12)
    np.testing.assert_allclose(got["enc.0.v"].delta().numpy(), np_delta(*v, 3 / math.sqrt(2)), rtol=1e-12)


def test_peft_fan_in_fan_out_is_transposed(tmp_path):
    B, A = lora_factors(7, 3, 2, 2)
    d = write_peft(tmp_path / "a", {"h.0.attn.c_attn": (B, A)}, r=2, lora_alpha=2, fan_in_fan_out=True)
    (layer,) = load_adapter(d).layers
    assert layer.delta().shape == (3, 7)  # Conv1D weights are stored (in, out)
    np.testing.assert_allclose(layer.delta().numpy(), np_delta(B, A, 1.0, transpose=True), rtol=1e-12)


def test_kohya_alpha_rules_and_1x1_conv(tmp_path):
    lin = lora_factors(6, 5, 4, 3)
    conv_up, conv_down = lora_factors(8, 6, 2, 4)
    p = write_kohya(tmp_path / "k.safetensors",
                    {"lora_unet_a_to_q": lin, "lora_unet_b_proj_in": (conv_up[..., None, None], conv_down[..., None, None]),
                     "lora_te_c_q_proj": lin},
                    alphas={"lora_unet_a_to_q": 1.0, "lora_unet_b_proj_in": None, "lora_te_c_q_proj": 0.0})
    got = {layer.module: layer for layer in load_adapter(p).layers}
    np.testing.assert_allclose(got["lora_unet_a_to_q"].delta().numpy(), np_delta(*lin, 1.0 / 4), rtol=1e-12)
    assert got["lora_unet_b_proj_in"].conv
    np.testing.assert_allclose(got["lora_unet_b_proj_in"].delta().numpy(), np_delta(conv_up, conv_down, 1.0), rtol=1e-12)
    np.testing.assert_allclose(got["lora_te_c_q_proj"].delta().numpy(), np_delta(*lin, 1.0), rtol=1e-12)  # alpha 0 -> k


# ---------------------------------------------------------------------------------------------------------
# refusals: one clear reason each
# ---------------------------------------------------------------------------------------------------------

REFUSED_CONFIGS = [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["classifier"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    ({"peft_type": "LOHA"}, "LOHA"),
]


@pytest.mark.parametrize("config,reason", REFUSED_CONFIGS)
def test_peft_refuses_non_plain_configs(tmp_path, config, reason):
    d = write_peft(tmp_path / "a", {"m": lora_factors(4, 4, 4, 0)}, **config)
    with pytest.raises(AdapterError, match=reason):
        load_adapter(d)


REFUSED_PEFT_KEYS = [
    ("base_model.model.m.lora_magnitude_vector", torch.ones(4), "DoRA"),
    ("base_model.model.m.lora_B.bias", torch.ones(4), "LoRA bias"),
    ("base_model.model.classifier.modules_to_save.default.weight", torch.ones(2, 4), "modules_to_save"),
    ("base_model.model.emb.lora_embedding_A", torch.ones(4, 10), "embedding"),
    ("base_model.model.m.something_else", torch.ones(2), "unexpected key"),
]


@pytest.mark.parametrize("key,tensor,reason", REFUSED_PEFT_KEYS)
def test_peft_refuses_keys(tmp_path, key, tensor, reason):
    d = write_peft(tmp_path / "a", {"m": lora_factors(4, 4, 4, 0)})
    from safetensors.torch import load_file

    tensors = load_file(str(d / "adapter_model.safetensors"))
    tensors[key] = tensor
    save_file(tensors, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=reason):
        load_adapter(d)


def test_peft_structural_errors(tmp_path):
    B, A = lora_factors(4, 4, 4, 0)
    d = write_peft(tmp_path / "a", {"m": (B, A)}, r=2)
    with pytest.raises(AdapterError, match="rank 4 in the file but .* r=2"):
        load_adapter(d)
    d = write_peft(tmp_path / "b", {"m": (B, A)})
    save_file({"base_model.model.m.lora_A.weight": A}, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="no lora_B"):
        load_adapter(d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="invalid JSON"):
        load_adapter(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterError, match="missing required field 'r'"):
        load_adapter(d)
    with pytest.raises(AdapterError, match="without adapter_config.json"):
        load_adapter(_peft_weights_alone(tmp_path))


def _peft_weights_alone(tmp_path):
    """PEFT weights saved outside their directory: alpha is unknown without the config."""
    target = tmp_path / "alone.safetensors"
    save_file({"base_model.model.m.lora_A.weight": torch.ones(2, 4), "base_model.model.m.lora_B.weight": torch.ones(4, 2)},
              str(target))
    return target


def test_nan_truncated_and_conv_kxk_refused(tmp_path):
    B, A = lora_factors(4, 4, 2, 0)
    A[0, 0] = float("nan")
    d = write_peft(tmp_path / "a", {"m": (B, A)}, r=2)
    with pytest.raises(AdapterError, match="NaN"):
        load_adapter(d)
    p = write_kohya(tmp_path / "k.safetensors", {"lora_unet_x": lora_factors(4, 4, 2, 1)})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 10])
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        load_adapter(p)
    p = write_kohya(tmp_path / "c.safetensors", {"lora_unet_conv": (torch.ones(4, 2, 1, 1), torch.ones(2, 3, 3, 3))})
    with pytest.raises(AdapterError, match="3x3 convolution"):
        load_adapter(p)


@pytest.mark.parametrize("key,reason", [
    ("lora_unet_x.hada_w1_a", "LoHa"), ("lora_unet_x.lokr_w1", "LoKr"), ("lora_unet_x.lora_mid.weight", "Tucker"),
    ("lora_unet_x.dora_scale", "DoRA"), ("lora_unet_x.diff", "full weight difference"), ("lora_unet_x.weird", "unexpected key"),
])
def test_kohya_refuses_lycoris_and_unknown(tmp_path, key, reason):
    p = write_kohya(tmp_path / "k.safetensors", {"lora_unet_x": lora_factors(4, 4, 2, 1)}, extra={key: torch.ones(2, 2)})
    with pytest.raises(AdapterError, match=reason):
        load_adapter(p)


def test_pickle_only_when_allowed(tmp_path):
    B, A = lora_factors(4, 4, 2, 0)
    p = tmp_path / "k.pt"
    torch.save({"lora_unet_x.lora_down.weight": A, "lora_unet_x.lora_up.weight": B}, p)
    with pytest.raises(AdapterError, match="refusing to load a pickle"):
        load_adapter(p)
    (layer,) = load_adapter(p, allow_pickle=True).layers
    np.testing.assert_allclose(layer.delta().numpy(), np_delta(B, A, 1.0), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# writing: read(write(x)) == x, contiguous tensors, dtypes kept
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_read_round_trip_all_formats(tmp_path, dtype):
    W = {"l.0.q": spectral(6, 5, 0), "l.0.v": spectral(6, 5, 1)}
    ck_path = write_ckpt(tmp_path / "base.safetensors", W)
    with open_checkpoint(str(ck_path)) as ck:
        for fmt in ("peft", "kohya", "lorax"):
            ad = random_adapter(ck, fmt, r"\.(q|v)$", rank=3, seed=1, dtype=dtype)
            out = write_output_dir(tmp_path / fmt, lambda tmp: save_adapter(ad, tmp))
            back = load_adapter(out if fmt == "peft" else next(out.glob("*.safetensors")))
            assert back.format == fmt and len(back.layers) == 2
            for a, b in zip(ad.layers, back.layers):
                assert a.module == b.module and b.dtype == dtype
                if fmt == "lorax":
                    assert torch.equal(a.dSigma, b.dSigma)
                else:
                    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.alpha == b.alpha
            if fmt == "lorax":
                assert back.base_sha256 == ck.sha256 and back.rank == 3


# ---------------------------------------------------------------------------------------------------------
# transfer_layer_from_bases == transfer_layer (the cached path computes exactly what the reference does)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "lorax", "copy", "mismatch"])
@pytest.mark.parametrize("side,threshold", [("both", None), ("u", 0.5), ("v", 0.99), ("mean", 0.3)])
def test_from_bases_equals_transfer_layer(method, side, threshold):
    W_s, r = spectral(12, 9, 0), 4
    W_t = near(W_s, 0.3, 1)
    dW_s = np_delta(*lora_factors(12, 9, 3, 2, torch.float64), 0.7)
    dW_s = torch.from_numpy(dW_s)
    ref, rep_ref = transfer_layer(dW_s, W_s, W_t, r, threshold=threshold, side=side, method=method)
    U_s, _, V_s = svd_topk(W_s, r)
    U_t, _, V_t = svd_topk(W_t, r)
    got, rep = transfer_layer_from_bases(dW_s, U_s, V_s, U_t, V_t, threshold=threshold, side=side, method=method)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert rep == rep_ref


def test_from_bases_mismatched_shapes_equals_transfer_layer():
    W_s, W_t, r = spectral(12, 9, 0), spectral(10, 9, 3), 4
    dW_s = torch.from_numpy(np_delta(*lora_factors(12, 9, 3, 2, torch.float64), 1.0))
    for method in ("auto", "mismatch", "copy"):
        ref, rep_ref = transfer_layer(dW_s, W_s, W_t, r, method=method, side="v", threshold=0.0)
        U_s, _, V_s = svd_topk(W_s, r)
        U_t, _, V_t = svd_topk(W_t, r)
        got, rep = transfer_layer_from_bases(dW_s, U_s, V_s, U_t, V_t, method=method, side="v", threshold=0.0)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert rep == rep_ref and rep.phi_u is None


# ---------------------------------------------------------------------------------------------------------
# whole-adapter transfer (library level)
# ---------------------------------------------------------------------------------------------------------


def _bases_np(W: torch.Tensor, r: int):
    U, _, Vh = np.linalg.svd(W.double().numpy(), full_matrices=False)
    return U[:, :r], Vh[:r].T


def test_identical_base_round_trip_peft_and_kohya(tmp_path):
    """PEFT/kohya → transfer onto the identical base → the same ΔW (r = min(m, n): the projectors are I)."""
    W = {"l.0.q": spectral(8, 8, 0), "l.0.v": spectral(8, 8, 1), "l.1.proj_in": spectral(8, 8, 2)}
    ck_path = write_ckpt(tmp_path / "base.safetensors", W)
    with open_checkpoint(str(ck_path)) as ck:
        for fmt in ("peft", "kohya"):
            ad = random_adapter(ck, fmt, r".", rank=3, seed=4)
            res = transfer_adapter(ad, ck, ck, r=8)
            for a, b in zip(ad.layers, res.adapter.layers):
                assert b.module == a.module and b.rank == a.rank and b.alpha == a.alpha
                np.testing.assert_allclose(b.delta().numpy(), a.delta().numpy(), rtol=0, atol=1e-6)
            assert all(row.kept_energy == pytest.approx(1.0, abs=1e-12) for row in res.rows)


def test_identical_base_round_trip_in_subspace_lora_and_lorax(tmp_path):
    """An update inside the top-r subspace comes back unchanged at any r (Eq. (2))."""
    W = spectral(10, 7, 0)
    ck_path = write_ckpt(tmp_path / "base.safetensors", {"m": W}, dtype=torch.float64)
    U, V = _bases_np(W, 4)
    g = np.random.default_rng(0)
    B = torch.from_numpy(U @ g.standard_normal((4, 2)))
    A = torch.from_numpy(g.standard_normal((2, 4)) @ V.T)
    with open_checkpoint(str(ck_path)) as ck:
        from lorax_ref.files.adapters import Adapter, LoraxLayer

        ad = Adapter("peft", [LoraLayer("m", B, A, alpha=2.0)])
        (out,) = transfer_adapter(ad, ck, ck, r=4).adapter.layers
        np.testing.assert_allclose(out.delta().numpy(), B.numpy() @ A.numpy(), atol=1e-12)
        dSigma = torch.tensor([0.5, -0.2, 0.1, 0.05], dtype=torch.float64)
        lx = Adapter("lorax", [LoraxLayer("m", dSigma)], rank=4, base_sha256=ck.sha256)
        (out,) = transfer_adapter(lx, ck, ck).adapter.layers
        np.testing.assert_allclose(out.dSigma.numpy(), np.diag(dSigma.numpy()), atol=1e-12)  # ΔΣ_{s←s} = ΔΣ_s


@pytest.mark.parametrize("method", ["auto", "copy", "mismatch"])
def test_transfer_matches_reference_per_layer(tmp_path, method):
    src = {"l.0.q": spectral(12, 10, 0), "l.0.v": spectral(12, 10, 1)}
    tgt = {k: near(v, 0.4, i + 5) for i, (k, v) in enumerate(src.items())}
    s_path = write_ckpt(tmp_path / "s.safetensors", src, torch.float64)
    t_path = write_ckpt(tmp_path / "t.safetensors", tgt, torch.float64)
    r = 3
    with open_checkpoint(str(s_path)) as cs, open_checkpoint(str(t_path)) as ct:
        ad = random_adapter(cs, "peft", r".", rank=5, seed=2, dtype=torch.float64)  # r < k: copy pads
        res = transfer_adapter(ad, cs, ct, r=r, method=method)
        for layer, out, row in zip(ad.layers, res.adapter.layers, res.rows):
            ref, rep = transfer_layer(layer.delta(), src[layer.module], tgt[layer.module], r, method=method)
            np.testing.assert_allclose(out.delta().numpy(), ref.numpy(), atol=1e-12 * float(ref.norm()) + 1e-14)
            assert out.rank == layer.rank and out.alpha == layer.alpha
            assert row.phi == pytest.approx(rep.phi, abs=1e-14) and row.kept_energy == pytest.approx(rep.kept_energy)
            if method == "auto":  # independent check of Eq. (3) with numpy bases
                U, V = _bases_np(tgt[layer.module], r)
                expect = U @ U.T @ layer.delta().numpy() @ V @ V.T
                np.testing.assert_allclose(out.delta().numpy(), expect, atol=1e-10)
            assert not np.allclose(out.delta().numpy(), layer.delta().numpy(), atol=1e-3)  # it did something


def test_fp16_adapter_keeps_dtype_and_contiguity(tmp_path):
    src = {"m": spectral(8, 6, 0)}
    s_path = write_ckpt(tmp_path / "s.safetensors", src)
    t_path = write_ckpt(tmp_path / "t.safetensors", {"m": near(src["m"], 0.2, 1)})
    with open_checkpoint(str(s_path)) as cs, open_checkpoint(str(t_path)) as ct:
        ad = random_adapter(cs, "kohya", r".", rank=2, seed=0, dtype=torch.float16)
        (out,) = transfer_adapter(ad, cs, ct, r=3).adapter.layers
    assert out.A.dtype == torch.float16 and out.B.dtype == torch.float16
    assert out.A.is_contiguous() and out.B.is_contiguous()


def test_fan_in_fan_out_transfer_uses_stored_orientation(tmp_path):
    W_s = spectral(5, 9, 0)  # stored (in=5, out=9) like GPT-2 Conv1D
    W_t = near(W_s, 0.3, 1)
    s_path = write_ckpt(tmp_path / "s.safetensors", {"h.c_attn": W_s}, torch.float64)
    t_path = write_ckpt(tmp_path / "t.safetensors", {"h.c_attn": W_t}, torch.float64)
    B, A = lora_factors(9, 5, 2, 3, torch.float64)  # nn.Linear sense: B (out, k), A (k, in)
    from lorax_ref.files.adapters import Adapter

    ad = Adapter("peft", [LoraLayer("h.c_attn", B, A, alpha=2.0, fan_in_fan_out=True)], config={"fan_in_fan_out": True})
    with open_checkpoint(str(s_path)) as cs, open_checkpoint(str(t_path)) as ct:
        (out,) = transfer_adapter(ad, cs, ct, r=3).adapter.layers
    ref, _ = transfer_layer(torch.from_numpy(np_delta(B, A, 1.0, transpose=True)), W_s, W_t, 3)
    np.testing.assert_allclose(out.delta().numpy(), ref.numpy(), atol=1e-12)
    assert out.B.shape == (9, 2) and out.A.shape == (2, 5)


def test_shape_mismatch_between_adapter_and_base(tmp_path):
    s_path = write_ckpt(tmp_path / "s.safetensors", {"m": spectral(8, 6, 0)})
    from lorax_ref.files.adapters import Adapter

    ad = Adapter("peft", [LoraLayer("m", *lora_factors(6, 8, 2, 0), alpha=2.0)])
    with open_checkpoint(str(s_path)) as cs:
        with pytest.raises(AdapterError, match="shape mismatch.*transposed"):
            transfer_adapter(ad, cs, cs, r=2)


def test_lorax_refuses_other_base_unless_asked(tmp_path):
    s_path = write_ckpt(tmp_path / "s.safetensors", {"m": spectral(8, 6, 0)})
    o_path = write_ckpt(tmp_path / "o.safetensors", {"m": spectral(8, 6, 9)})
    with open_checkpoint(str(s_path)) as cs, open_checkpoint(str(o_path)) as co:
        ad = random_adapter(cs, "lorax", r".", rank=3)
        with pytest.raises(AdapterError, match="sha256"):
            transfer_adapter(ad, co, cs)
        transfer_adapter(ad, co, cs, ignore_base_hash=True)
        with pytest.raises(AdapterError, match="--rank 2 differs"):
            transfer_adapter(ad, cs, cs, r=2)


# ---------------------------------------------------------------------------------------------------------
# basis cache
# ---------------------------------------------------------------------------------------------------------


def test_cache_hits_give_identical_results_and_corruption_is_not_trusted(tmp_path):
    src = {"l.0.q": spectral(10, 8, 0), "l.0.v": spectral(10, 8, 1)}
    s_path = write_ckpt(tmp_path / "s.safetensors", src)
    t_path = write_ckpt(tmp_path / "t.safetensors", {k: near(v, 0.3, 2) for k, v in src.items()})
    with open_checkpoint(str(s_path)) as cs, open_checkpoint(str(t_path)) as ct:
        ad = random_adapter(cs, "peft", r".", rank=2)
        first = BasisCache(tmp_path / "cache")
        res1 = transfer_adapter(ad, cs, ct, r=4, cache=first)
        assert (first.hits, first.misses) == (0, 4)
        second = BasisCache(tmp_path / "cache")
        res2 = transfer_adapter(ad, cs, ct, r=4, cache=second)
        assert (second.hits, second.misses) == (4, 0) and all(row.bases == "cached" for row in res2.rows)
        for a, b in zip(res1.adapter.layers, res2.adapter.layers):
            assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        entry = second.path_for(cs.sha256, "l.0.q", 4, torch.float64)
        raw = bytearray(entry.read_bytes())
        raw[-3] ^= 0xFF  # flip bits inside a tensor
        entry.write_bytes(bytes(raw))
        third = BasisCache(tmp_path / "cache")
        res3 = transfer_adapter(ad, cs, ct, r=4, cache=third)
        assert (third.hits, third.misses) == (3, 1)
        for a, b in zip(res1.adapter.layers, res3.adapter.layers):
            assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        assert second.path_for(cs.sha256, "l.0.q", 4, torch.float64) != second.path_for(cs.sha256, "l.0.q", 3, torch.float64)
        assert second.path_for(cs.sha256, "l.0.q", 4, torch.float64) != second.path_for(ct.sha256, "l.0.q", 4, torch.float64)


def test_files_sha256_detects_changes(tmp_path):
    p = write_ckpt(tmp_path / "x.safetensors", {"m": torch.ones(2, 2)})
    before = files_sha256(p)
    p.write_bytes(p.read_bytes()[:-1] + b"\x01")
    assert files_sha256(p) != before


def test_peft_output_names_a_base_transformers_can_load(tmp_path):
    """base_model_name_or_path: the directory holding config.json + model.safetensors, else None (never a file
    path or an alias); a task-less config gets auto_mapping from the config's architectures.
    (tests/test_peft_interop.py loads such outputs with peft and transformers.)"""
    W = {"l.0.q": spectral(8, 6, 0)}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    hf = write_ckpt(model_dir / "model.safetensors", W)
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    bare = write_ckpt(tmp_path / "weights.safetensors", W)
    with open_checkpoint(str(bare)) as ck_bare, open_checkpoint(str(hf)) as ck_hf:
        ad = random_adapter(ck_bare, "peft", ".", rank=2)
        assert ad.config["base_model_name_or_path"] is None and ad.config["auto_mapping"] is None
        assert random_adapter(ck_hf, "peft", ".", rank=2).config["base_model_name_or_path"] == str(model_dir.resolve())
        res = transfer_adapter(ad, ck_bare, ck_hf, r=4, target_name=str(hf))
        assert res.adapter.config["base_model_name_or_path"] == str(model_dir.resolve())
        assert res.adapter.config["auto_mapping"] == {"base_model_class": "BertModel", "parent_library": "transformers"}
        assert res.report()["target_base"] == {"spec": str(hf), "path": str(hf), "sha256": ck_hf.sha256}
        assert json.loads(res.adapter.metadata["lorax_ref_transfer"])["target_sha256"] == ck_hf.sha256
        ad.config["task_type"] = "FEATURE_EXTRACTION"  # the task type names the class: no auto_mapping added
        cfg = transfer_adapter(ad, ck_bare, ck_hf, r=4).adapter.config
        assert cfg["task_type"] == "FEATURE_EXTRACTION" and cfg["auto_mapping"] is None
        assert transfer_adapter(ad, ck_hf, ck_bare, r=4).adapter.config["base_model_name_or_path"] is None
    (model_dir / "config.json").write_text("{not json")  # transformers could not load it either
    with open_checkpoint(str(bare)) as ck_bare, open_checkpoint(str(hf)) as ck_hf:
        assert transfer_adapter(ad, ck_bare, ck_hf, r=4).adapter.config["base_model_name_or_path"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transfer_on_cuda_matches_cpu(tmp_path):
    src = {"l.0.q": spectral(40, 32, 0), "l.0.ffn": spectral(48, 32, 1)}
    tgt = {"l.0.q": near(src["l.0.q"], 0.3, 2), "l.0.ffn": src["l.0.ffn"][:40].clone()}
    s_path = write_ckpt(tmp_path / "s.safetensors", src)
    t_path = write_ckpt(tmp_path / "t.safetensors", tgt)
    with open_checkpoint(str(s_path)) as cs, open_checkpoint(str(t_path)) as ct:
        ad = random_adapter(cs, "peft", r".", rank=4, seed=3)
        cpu = transfer_adapter(ad, cs, ct, r=8, device="cpu")
        gpu = transfer_adapter(ad, cs, ct, r=8, device="cuda")
    for a, b, ra, rb in zip(cpu.adapter.layers, gpu.adapter.layers, cpu.rows, gpu.rows):
        assert b.A.device.type == "cpu"  # written tensors come back to the CPU
        np.testing.assert_allclose(b.delta().numpy(), a.delta().numpy(), atol=1e-6 * float(a.delta().abs().max()))
        assert rb.phi == pytest.approx(ra.phi, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------
# hostile inputs: output overflow, the --out claim, scratch left by killed runs, umask, full disks, configs
# ---------------------------------------------------------------------------------------------------------


def _overflow_pair(tmp_path):
    """fp16 PEFT adapter with |lora_B| up to 3e4 on a 12×10 layer: finite input, but σ_1(ΔW) ≈ 3e5, and the copy
    rule writes B' = U_t X S (columns of norm σ_i) and ΔΣ ≈ diag(σ_i): beyond fp16's 65504."""
    W_s = spectral(12, 10, 0)
    s_path = write_ckpt(tmp_path / "s.safetensors", {"blk.q": W_s})
    t_path = write_ckpt(tmp_path / "t.safetensors", {"blk.q": near(W_s, 0.1, 1)})
    g = torch.Generator().manual_seed(0)
    B = (3e4 * torch.rand(12, 4, generator=g, dtype=torch.float64)).half()  # (m, k), finite in fp16
    A = torch.rand(4, 10, generator=g, dtype=torch.float64).half()  # (k, n)
    d = write_peft(tmp_path / "p16", {"blk.q": (B, A)}, r=4, lora_alpha=4)
    return s_path, t_path, d


@pytest.mark.parametrize("out_format, what", [("auto", "B \\(lora_B / lora_up\\)"), ("lorax", "ΔΣ \\(dSigma\\)")])
def test_fp16_output_overflow_is_refused_naming_the_layer(tmp_path, out_format, what):
    s_path, t_path, d = _overflow_pair(tmp_path)
    ad = load_adapter(d)
    with open_checkpoint(str(s_path)) as cs, open_checkpoint(str(t_path)) as ct:
        with pytest.raises(AdapterError, match=rf"layer 'blk.q': {what} does not fit float16: \d+ of \d+ entries "
                                               r"overflow \(largest \|value\| .* > 6.55e\+04\)"):
            transfer_adapter(ad, cs, ct, r=6, method="copy", out_format=out_format)
        ok = transfer_adapter(ad, cs, ct, r=6, method="auto")  # Eq. (3) only shrinks B: it fits
        assert all(bool(torch.isfinite(t).all()) for layer in ok.adapter.layers for t in (layer.A, layer.B))


def test_write_output_dir_claim_is_atomic(tmp_path):
    """An ``out`` that appears while ``fill`` runs (another run finished first) is never moved aside or
    replaced without ``force``: exactly one run wins, the other fails and leaves no scratch behind."""
    out = tmp_path / "out"

    def other_run_wins(tmp):
        (tmp / "mine.txt").write_text("second")
        out.mkdir()
        (out / "theirs.txt").write_text("first")

    with pytest.raises(AdapterError, match="appeared while this run was writing it .* pass --force"):
        write_output_dir(out, other_run_wins)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "theirs.txt").read_text() == "first"

    def empty_dir_appears(tmp):  # a plain rename() would silently replace an empty directory
        (tmp / "mine.txt").write_text("second")
        (tmp_path / "empty").mkdir()

    with pytest.raises(AdapterError, match="appeared while"):
        write_output_dir(tmp_path / "empty", empty_dir_appears)
    assert list((tmp_path / "empty").iterdir()) == []
    write_output_dir(out, lambda tmp: (tmp / "mine.txt").write_text("forced"), force=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_scratch_of_killed_runs_is_cleaned_and_nothing_else(tmp_path):
    from lorax_ref.files.output import _host

    dead, host = _dead_pid(), _host()
    stale = tmp_path / f".prev.lorax-tmp-{host}-{dead}-0badc0de"  # kill -9 during fill: a partial adapter
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"partial")
    replaced = tmp_path / f".gone.lorax-old-{host}-{dead}-0badc0de"  # killed between the two renames of --force
    replaced.mkdir()
    (replaced / "keep.txt").write_text("the user's previous output")
    kept = [tmp_path / f".live.lorax-tmp-{host}-{os.getpid()}-0badc0de",  # a run still writing
            tmp_path / f".x.lorax-tmp-otherhost-{dead}-0badc0de",  # another machine's (shared folder)
            tmp_path / ".x.tmp-abcd1234"]  # not our naming
    for p in kept:
        p.mkdir()
    write_output_dir(tmp_path / "new", lambda tmp: (tmp / "a.txt").write_text("a"))
    assert not stale.exists() and all(p.exists() for p in kept)
    assert (tmp_path / "gone" / "keep.txt").read_text() == "the user's previous output" and not replaced.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_output_directories_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = write_output_dir(tmp_path / "a" / "b", lambda tmp: (tmp / "f.txt").write_text("x"))
    finally:
        os.umask(old)
    for d in (out, out.parent):
        assert d.stat().st_mode & 0o777 == 0o777 & ~umask, oct(d.stat().st_mode)
    assert (out / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_cache_store_survives_a_full_disk(tmp_path):
    """A write that fails with safetensors' own error (here: RLIMIT_FSIZE, "File too large", as a full disk
    gives "No space left on device") is skipped: the cache only costs speed, it never aborts a transfer."""
    import resource
    import signal

    cache = BasisCache(tmp_path / "cache")
    U, S, V = svd_topk(spectral(300, 200, 0), 100)  # ~400 kB entry
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        cache.store("ab" * 32, "w", 100, U, S, V, 1.0)  # raised SafetensorError before
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert cache.load("ab" * 32, "w", 100) is None
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no partial entry left


def test_cache_keeps_the_next_singular_value(tmp_path):
    W = spectral(10, 8, 0)
    cache = BasisCache(tmp_path / "cache")
    got = cache.bases_and_next("cd" * 32, "w", 3, lambda: W)
    again = BasisCache(tmp_path / "cache").bases_and_next("cd" * 32, "w", 3, lambda: W)
    sigma = np.linalg.svd(W.numpy(), compute_uv=False)
    assert got[3] == pytest.approx(sigma[3], rel=1e-12) and again[3] == got[3]
    np.testing.assert_allclose(got[1].numpy(), sigma[:3], rtol=1e-12)
    assert cache.bases_and_next("cd" * 32, "w", 8, lambda: W)[3] is None  # r = min(m, n): there is no σ_{r+1}


@pytest.mark.parametrize("config, match", [
    ({"lora_alpha": float("nan")}, r"lora_alpha is nan, expected a finite number"),
    ({"lora_alpha": float("inf")}, r"lora_alpha is inf"),
    ({"lora_alpha": "8"}, r"lora_alpha must be a number, got str '8'"),
    ({"lora_alpha": True}, r"lora_alpha must be a number, got bool"),
    ({"r": 4.5}, r"r must be a whole number >= 1, got 4.5"),
    ({"r": 0}, r"r must be a whole number >= 1"),
    ({"r": None}, r"r must be a number, got NoneType"),
    ({"rank_pattern": {"m": "x"}}, r"rank_pattern value for 'm' must be a number, got str 'x'"),
    ({"alpha_pattern": {"m": float("nan")}}, r"alpha_pattern value for 'm' is nan"),
])
def test_peft_config_numbers(tmp_path, config, match):
    """A NaN lora_alpha used to surface as 'dW_s contains 147456 NaN' deep in the transfer."""
    d = write_peft(tmp_path / "a", {"m": lora_factors(4, 4, 4, 0)}, **config)
    with pytest.raises(AdapterError, match=match):
        load_adapter(d)


def test_special_files_are_never_opened(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block forever
    for path in (fifo, "/dev/zero"):
        with pytest.raises(AdapterError, match=r"is not a regular file or a directory"):
            load_adapter(path)
        with pytest.raises(LoraxInputError, match=r"is not a regular file"):
            open_checkpoint(str(path))


@pytest.mark.parametrize("kwargs, match", [
    ({"strength": float("nan")}, r"strength must be a finite number >= 0, got nan"),
    ({"strength": float("inf")}, r"strength must be a finite number >= 0, got inf"),
    ({"strength": -0.1}, r"strength must be a finite number >= 0"),
    ({"pattern": "("}, r"the module pattern '\(' is not a valid regular expression \(missing \)"),
    ({"rank": 0}, r"rank must be an int >= 1, got 0"),
    ({"fmt": "lycoris"}, r"unknown adapter format 'lycoris'"),
    ({"dtype": torch.int8}, r"dtype must be a floating torch dtype"),
    ({"seed": 2**70}, r"seed 1180591620717411303424 is not usable as a torch seed"),
    ({"strength": 1e6, "dtype": torch.float16}, r"l.0.q: B does not fit float16: .* use a smaller strength"),
])
def test_random_adapter_arguments(tmp_path, kwargs, match):
    ck_path = write_ckpt(tmp_path / "base.safetensors", {"l.0.q": spectral(6, 5, 0)})
    args = {"fmt": "peft", "pattern": r"\.q$", **kwargs}
    with open_checkpoint(str(ck_path)) as ck:
        with pytest.raises(AdapterError, match=match):
            random_adapter(ck, args.pop("fmt"), args.pop("pattern"), **args)


def test_transfer_adapter_validates_options_before_work(tmp_path):
    s_path = write_ckpt(tmp_path / "s.safetensors", {"m": spectral(8, 6, 0)})
    with open_checkpoint(str(s_path)) as cs:
        ad = random_adapter(cs, "peft", r".", rank=2)
        for kwargs, match in [({"threshold": float("nan")}, r"threshold=nan is out of range"),
                              ({"side": "x"}, r"side='x' is not one of"), ({"method": "svd"}, r"method='svd'"),
                              ({"r": 2.0}, r"r must be None or an int >= 1"), ({"device": "meta"}, r"not a device to compute on"),
                              ({"layer_map": {"m": 3}}, r"layer_map must be a dict")]:
            with pytest.raises(LoraxInputError, match=match):
                transfer_adapter(ad, cs, cs, **kwargs)
        if not torch.cuda.is_available():
            with pytest.raises(LoraxInputError, match=r"device='cuda' asks for CUDA, but torch sees no CUDA device"):
                transfer_adapter(ad, cs, cs, device="cuda")


def test_transfer_report_flags_ill_posed_layers(tmp_path):
    """A zero target weight and a tie σ_r = σ_{r+1}: legal, transferred, and named in the report."""
    W = torch.diag(torch.tensor([5.0, 4.0, 3.0, 3.0, 1.0, 0.5], dtype=torch.float64))
    s_path = write_ckpt(tmp_path / "s.safetensors", {"a": W, "b": spectral(6, 6, 1)})
    t_path = write_ckpt(tmp_path / "t.safetensors", {"a": W, "b": torch.zeros(6, 6)})
    with open_checkpoint(str(s_path)) as cs, open_checkpoint(str(t_path)) as ct:
        res = transfer_adapter(random_adapter(cs, "peft", r".", rank=2), cs, ct, r=3)
    rows = {row.module: row for row in res.rows}
    assert [w.split(":")[0] for w in rows["a"].warnings] == ["source weight 'a' has σ_3 = σ_4 (tied to 0.0e+00·σ_1)",
                                                              "target weight 'a' has σ_3 = σ_4 (tied to 0.0e+00·σ_1)"]
    assert rows["b"].warnings == ("target weight 'b' is zero: every 3-dimensional subspace is a top-3 subspace, "
                                  "so its bases are arbitrary",)
    report = res.report()
    assert report["summary"]["layers_with_warnings"] == 2 and report["layers"][1]["warnings"] == list(rows["b"].warnings)
    assert res.table().count("\nwarning: ") == 3
