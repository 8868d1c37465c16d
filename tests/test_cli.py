"""``python -m lorax_ref`` end to end: small checkpoints and adapters built here, the command run, every
transferred layer checked against the reference functions, and every failure mode checked to give one
clear line, a non-zero exit, no traceback, no partial output and untouched inputs.

Outputs are read back with safetensors + json directly (not through lorax_ref's readers), and ΔW is
recomputed with numpy from PEFT's and kohya's definitions.
"""
from __future__ import annotations

import importlib.machinery
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorax_ref import svd_topk, transfer_layer
from lorax_ref.testing.checksums import files_sha256
from lorax_ref.cli import main
from lorax_ref.testing.layers import near, spectral

R = 4  # LoRA-X rank used throughout


# ---------------------------------------------------------------------------------------------------------
# fixtures: a source and a target checkpoint with every case in them
# ---------------------------------------------------------------------------------------------------------


SOURCE = {  # name -> weight (m, n); "proj_in" is a 1×1 conv like SD-1.5's
    "enc.0.attn.q": spectral(16, 12, 0),
    "enc.0.attn.v": spectral(16, 12, 1),
    "enc.0.ffn": spectral(24, 12, 2),
    "enc.1.attn.q": spectral(16, 12, 3),
    "blk.proj_in": spectral(16, 16, 4),
}
TARGET = {
    "enc.0.attn.q": near(SOURCE["enc.0.attn.q"], 0.05, 10),  # near-identical: Φ ≈ 1
    "enc.0.attn.v": near(SOURCE["enc.0.attn.v"], 0.3, 11),
    "enc.0.ffn": SOURCE["enc.0.ffn"][:20].clone(),  # 4 output neurons pruned: §4.2.2 case
    "enc.1.attn.q": spectral(16, 12, 99),  # unrelated: low Φ, gated at threshold 0.5
    "blk.proj_in": near(SOURCE["blk.proj_in"], 0.1, 14),
}


def _write_ckpt(path, weights, dtype=torch.float32):
    tensors = {}
    for name, W in weights.items():
        W = W.to(dtype)
        tensors[name + ".weight"] = (W[..., None, None] if name.endswith("proj_in") else W).contiguous().clone()
        tensors[name + ".bias"] = torch.zeros(W.shape[0], dtype=dtype)
    save_file(tensors, str(path))
    return path


def _factors(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(k, n, generator=g) / math.sqrt(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    w = types.SimpleNamespace(dir=d)
    w.source = _write_ckpt(d / "source.safetensors", SOURCE)
    w.target = _write_ckpt(d / "target.safetensors", TARGET)
    # PEFT adapter: rank 3 with α = 6 (s = 2), and rank 2 on the FFN via rank_pattern / alpha_pattern
    w.peft = d / "peft"
    w.peft.mkdir()
    tensors = {}
    for i, name in enumerate(["enc.0.attn.q", "enc.0.attn.v", "enc.0.ffn", "enc.1.attn.q"]):
        m, n = SOURCE[name].shape
        B, A = _factors(m, n, 2 if name.endswith("ffn") else 3, i)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    save_file(tensors, str(w.peft / "adapter_model.safetensors"), metadata={"format": "pt"})
    (w.peft / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 3, "lora_alpha": 6, "rank_pattern": {"ffn": 2}, "alpha_pattern": {"ffn": 1.0},
        "target_modules": ["q", "v", "ffn"], "bias": "none", "use_dora": False, "modules_to_save": None,
        "fan_in_fan_out": False, "use_rslora": False}))
    # kohya file: a linear layer and the 1×1 conv, fp16, α = 1 on one and missing on the other
    w.kohya = d / "style.safetensors"
    up, down = _factors(16, 12, 4, 7)
    cup, cdown = _factors(16, 16, 2, 8)
    save_file({
        "lora_unet_enc_0_attn_v.lora_down.weight": down.half(), "lora_unet_enc_0_attn_v.lora_up.weight": up.half(),
        "lora_unet_enc_0_attn_v.alpha": torch.tensor(1.0, dtype=torch.float16),
        "lora_unet_blk_proj_in.lora_down.weight": cdown[..., None, None].half().contiguous(),
        "lora_unet_blk_proj_in.lora_up.weight": cup[..., None, None].half().contiguous(),
    }, str(w.kohya), metadata={"ss_network_module": "networks.lora"})
    # compact LoRA-X adapter on the source (diagonal ΔΣ), made by the CLI itself
    w.lorax_dir = d / "lorax"
    assert main(["random-adapter", "--base", str(w.source), "--format", "lorax", "--modules", r"attn\.(q|v)$",
                 "--rank", str(R), "--out", str(w.lorax_dir), "--no-cache"]) == 0
    w.lorax = w.lorax_dir / "adapter.lorax.safetensors"
    w.inputs = [w.source, w.target, w.peft, w.kohya, w.lorax]
    return w


def _checksums(w):
    return {str(p): files_sha256(p) for p in w.inputs}


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _transfer(w, adapter, out, *extra):
    return ["transfer", "--source-base", w.source, "--target-base", w.target, "--adapter", adapter, "--out", out,
            "--rank", R, "--no-cache", "--quiet", *extra]


# ---------------------------------------------------------------------------------------------------------
# reading outputs independently
# ---------------------------------------------------------------------------------------------------------


def _peft_deltas(out_dir: Path) -> dict[str, np.ndarray]:
    """ΔW per module from adapter_config.json + safetensors, as PEFT defines it (numpy)."""
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    tensors = load_file(str(out_dir / "adapter_model.safetensors"))
    deltas = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model."): -len(".lora_A.weight")]
            A = tensors[key].double().numpy()
            B = tensors[key.replace("lora_A", "lora_B")].double().numpy()
            r = next((v for k, v in cfg["rank_pattern"].items() if _pmatch(k, module)), cfg["r"])
            alpha = next((v for k, v in cfg["alpha_pattern"].items() if _pmatch(k, module)), cfg["lora_alpha"])
            assert A.shape[0] == r
            deltas[module] = alpha / r * (B.reshape(B.shape[0], -1) @ A.reshape(r, -1))
    return deltas


def _pmatch(key, module):
    import re

    return re.match(rf"(.*\.)?({key})$", module) is not None


def _source_delta_peft(w, name) -> torch.Tensor:
    t = load_file(str(w.peft / "adapter_model.safetensors"))
    A = t[f"base_model.model.{name}.lora_A.weight"].double()
    B = t[f"base_model.model.{name}.lora_B.weight"].double()
    s = 1.0 / 2 if name.endswith("ffn") else 6 / 3
    return s * (B @ A)


def _reference(name, dW_s, method="auto", threshold=None, side="both"):
    W_s = SOURCE[name].float().double()  # the checkpoints are float32
    W_t = TARGET[name].float().double()
    return transfer_layer(dW_s, W_s, W_t, R, threshold=threshold, side=side, method=method)


# ---------------------------------------------------------------------------------------------------------
# end to end: every transferred layer against the reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "copy", "mismatch"])
def test_peft_end_to_end_against_reference(world, tmp_path, capsys, method):
    before = _checksums(world)
    out = tmp_path / "out"
    code, stdout, err = _run(_transfer(world, world.peft, out, "--threshold", "0.5", "--method", method, "--json"), capsys)
    assert code == 0, err
    assert _checksums(world) == before  # inputs untouched
    report = json.loads((out / "lorax_report.json").read_text())
    assert json.loads(stdout) == report
    rows = {row["module"]: row for row in report["layers"]}
    deltas = _peft_deltas(out)
    for name in ["enc.0.attn.q", "enc.0.attn.v", "enc.0.ffn", "enc.1.attn.q"]:
        dW_s = _source_delta_peft(world, name)
        ref, rep = _reference(name, dW_s, method=method, threshold=0.5)
        row = rows[name]
        assert row["gated"] == rep.gated and row["case"] == rep.case
        assert row["phi"] == pytest.approx(rep.phi, abs=1e-12)
        assert (row["phi_u"] is None) == (rep.phi_u is None)
        if rep.gated:
            assert name not in deltas  # no update written for a gated layer
            continue
        assert row["kept_energy"] == pytest.approx(rep.kept_energy, rel=1e-9)
        np.testing.assert_allclose(deltas[name], ref.numpy(), rtol=0, atol=2e-6 * float(ref.abs().max()))
    assert rows["enc.1.attn.q"]["gated"] and not rows["enc.0.attn.q"]["gated"]  # the fixture exercises the gate
    assert rows["enc.0.ffn"]["case"] == ("mismatch" if method == "auto" else method)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["enc.0.attn.q", "enc.0.attn.v", "enc.0.ffn"]
    assert (out / "lorax_report.txt").read_text().count("GATED") == 1


def test_kohya_end_to_end_keeps_format_conv_and_dtype(world, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(_transfer(world, world.kohya, out), capsys)
    assert code == 0, err
    path = out / world.kohya.name
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["ss_network_module"] == "networks.lora" and "lorax_ref_transfer" in meta
    assert t["lora_unet_blk_proj_in.lora_down.weight"].shape == (2, 16, 1, 1)
    assert all(v.dtype == torch.float16 for v in t.values())
    src = load_file(str(world.kohya))
    for stem, name, alpha_in in [("lora_unet_enc_0_attn_v", "enc.0.attn.v", 1.0), ("lora_unet_blk_proj_in", "blk.proj_in", None)]:
        down, up = src[stem + ".lora_down.weight"].double(), src[stem + ".lora_up.weight"].double()
        k = down.shape[0]
        dW_s = (alpha_in or k) / k * (up.reshape(up.shape[0], k) @ down.reshape(k, -1))
        ref, _ = _reference(name, dW_s)
        d2, u2 = t[stem + ".lora_down.weight"].double(), t[stem + ".lora_up.weight"].double()
        got = float(t[stem + ".alpha"]) / k * (u2.reshape(u2.shape[0], k) @ d2.reshape(k, -1))
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=2e-3 * float(ref.abs().max()))  # fp16 output


def test_kohya_to_peft(world, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(_transfer(world, world.kohya, out, "--out-format", "peft"), capsys)
    assert code == 0, err
    assert set(_peft_deltas(out)) == {"enc.0.attn.v", "blk.proj_in"}


def test_lorax_end_to_end_rotation_form(world, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(_transfer(world, world.lorax, out), capsys)
    assert code == 0, err
    with safe_open(str(out / "adapter.lorax.safetensors"), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["base_sha256"] == files_sha256(world.target)["target.safetensors"] and meta["rank"] == str(R)
    with safe_open(str(world.lorax), framework="pt") as f:
        src = {k: f.get_tensor(k) for k in f.keys()}
    for key, dSigma_s in src.items():
        name = key[: -len(".dSigma")]
        U_s, _, V_s = svd_topk(SOURCE[name].float().double(), R)
        dW_s = U_s @ torch.diag(dSigma_s.double()) @ V_s.T  # Eq. (1), written out
        ref, _ = _reference(name, dW_s)
        U_t, _, V_t = svd_topk(TARGET[name].float().double(), R)
        dSigma_t = t[key].double()
        assert dSigma_t.shape == (R, R)  # the rotation form is a full r×r matrix
        np.testing.assert_allclose((U_t @ dSigma_t @ V_t.T).numpy(), ref.numpy(), atol=1e-6 * float(ref.abs().max()))
    # the output is itself an input for the next hop, tied to the target checkpoint
    code, _, err = _run(["transfer", "--source-base", world.target, "--target-base", world.source, "--adapter",
                         out / "adapter.lorax.safetensors", "--out", tmp_path / "back", "--no-cache", "--quiet"], capsys)
    assert code == 0, err


def test_lorax_to_peft_interop(world, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(_transfer(world, world.lorax, out, "--out-format", "peft", "--method", "copy"), capsys)
    assert code == 0, err
    deltas = _peft_deltas(out)
    with safe_open(str(world.lorax), framework="pt") as f:
        for key in f.keys():
            name = key[: -len(".dSigma")]
            U_t, _, V_t = svd_topk(TARGET[name].float().double(), R)
            expect = U_t @ torch.diag(f.get_tensor(key).double()) @ V_t.T  # Table 5: U_t ΔΣ_s V_tᵀ
            np.testing.assert_allclose(deltas[name], expect.numpy(), atol=1e-6 * float(expect.abs().max()))


def test_identical_base_round_trip_via_cli(tmp_path, capsys):
    """PEFT and kohya → transfer onto the identical base → the same ΔW.

    With r = m = n both projectors of Eq. (3) are the identity (on a non-square layer r = min(m, n) makes only
    the short side's projector the identity, so the round trip is tested on square layers).
    """
    base = _write_ckpt(tmp_path / "square.safetensors", {"a.q": spectral(12, 12, 0), "b.proj_in": spectral(12, 12, 1)})
    for fmt in ("peft", "kohya"):
        adapter = tmp_path / f"in-{fmt}"
        assert main(["random-adapter", "--base", str(base), "--format", fmt, "--modules", ".", "--rank", "3",
                     "--out", str(adapter), "--no-cache"]) == 0
        out = tmp_path / f"out-{fmt}"
        code, _, err = _run(["transfer", "--source-base", base, "--target-base", base, "--adapter", adapter,
                             "--out", out, "--rank", "12", "--no-cache", "--quiet"], capsys)
        assert code == 0, err
        if fmt == "peft":
            before, after = _peft_deltas(adapter), _peft_deltas(out)
        else:
            before, after = _kohya_deltas(adapter / "lora.safetensors"), _kohya_deltas(out / "lora.safetensors")
            assert (adapter / "lora.safetensors").exists()  # a directory holding one kohya file is accepted
        assert before.keys() == after.keys() and len(before) == 2
        for name in before:
            np.testing.assert_allclose(after[name], before[name], rtol=0, atol=1e-5 * np.abs(before[name]).max())


def _kohya_deltas(path) -> dict[str, np.ndarray]:
    t = load_file(str(path))
    out = {}
    for key in t:
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            down, up = t[key].double().numpy(), t[stem + ".lora_up.weight"].double().numpy()
            k = down.shape[0]
            alpha = float(t[stem + ".alpha"]) if stem + ".alpha" in t else k
            out[stem] = alpha / k * (up.reshape(up.shape[0], k) @ down.reshape(k, -1))
    return out


def test_cache_second_run_reads_bases(world, tmp_path, capsys):
    cache = tmp_path / "cache"
    runs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        args = _transfer(world, world.peft, out, "--json")
        args[args.index("--no-cache")] = "--cache-dir"
        args.insert(args.index("--cache-dir") + 1, cache)
        code, stdout, err = _run(args, capsys)
        assert code == 0, err
        runs.append(json.loads(stdout))
    assert runs[0]["cache"]["misses"] == 8 and runs[0]["cache"]["hits"] == 0
    assert runs[1]["cache"]["hits"] == 8 and runs[1]["cache"]["misses"] == 0
    assert load_file(str(tmp_path / "out0/adapter_model.safetensors")).keys() == load_file(
        str(tmp_path / "out1/adapter_model.safetensors")).keys()
    for k, v in load_file(str(tmp_path / "out0/adapter_model.safetensors")).items():
        assert torch.equal(v, load_file(str(tmp_path / "out1/adapter_model.safetensors"))[k])


def test_fast_bases_agree_with_the_reference_and_are_cached_apart(tmp_path, capsys):
    """--fast: certified bases ("mixed" above 384 wide, "gram64" below); the adapter within 1e-6 of the
    reference run; fast and reference entries never stand in for each other in the cache."""
    from lorax_ref import fast

    g = torch.Generator().manual_seed(5)
    pairs = {name: fast.synthetic_pair(m, n, g) for name, (m, n) in {"blk.attn.q": (448, 512), "blk.attn.k": (320, 400)}.items()}
    src = _write_ckpt(tmp_path / "s.safetensors", {k: p[0] for k, p in pairs.items()})
    tgt = _write_ckpt(tmp_path / "t.safetensors", {k: p[1] for k, p in pairs.items()})
    assert main(["random-adapter", "--base", str(src), "--format", "peft", "--modules", "attn", "--rank", "4",
                 "--out", str(tmp_path / "ad"), "--no-cache"]) == 0
    capsys.readouterr()
    cache = tmp_path / "cache"

    def run(out, *extra):
        code, stdout, err = _run(["transfer", "--source-base", src, "--target-base", tgt, "--adapter", tmp_path / "ad",
                                  "--out", tmp_path / out, "--rank", 16, "--cache-dir", cache, "--json", *extra], capsys)
        assert code == 0, err
        return json.loads(stdout)["cache"], _peft_deltas(tmp_path / out)

    c_fast, fast_deltas = run("fast", "--fast")
    assert c_fast["fast"] and c_fast["misses"] == 4 and c_fast["methods"] == {"mixed": 2, "gram64": 2}
    c_ref, ref_deltas = run("ref")
    assert not c_ref["fast"] and c_ref["misses"] == 4 and c_ref["hits"] == 0  # fast entries are not reused
    c_again, again = run("fast2", "--fast")
    assert c_again["hits"] == 4 and c_again["misses"] == 0
    assert set(fast_deltas) == set(ref_deltas) == {"blk.attn.q", "blk.attn.k"}
    for name, ref in ref_deltas.items():
        diff = np.linalg.norm(fast_deltas[name] - ref) / np.linalg.norm(ref)
        assert diff <= 1e-6, (name, diff)  # other bases (methods above), same adapter after float32 storage
        assert np.array_equal(again[name], fast_deltas[name])


def test_layer_map_for_renamed_target(world, tmp_path, capsys):
    renamed = _write_ckpt(tmp_path / "renamed.safetensors", {"dec.3.q": TARGET["enc.0.attn.q"]})
    adapter = tmp_path / "one"
    adapter.mkdir()
    t = load_file(str(world.peft / "adapter_model.safetensors"))
    save_file({k: v for k, v in t.items() if ".enc.0.attn.q." in k}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text((world.peft / "adapter_config.json").read_text())
    args = ["transfer", "--source-base", world.source, "--target-base", renamed, "--adapter", adapter,
            "--out", tmp_path / "out", "--rank", R, "--no-cache", "--quiet"]
    code, _, err = _run(args, capsys)
    assert code == 1 and "--layer-map" in err
    (tmp_path / "map.json").write_text(json.dumps({"enc.0.attn.q.weight": "dec.3.q.weight"}))
    code, _, err = _run(args + ["--layer-map", tmp_path / "map.json"], capsys)
    assert code == 0, err
    assert set(_peft_deltas(tmp_path / "out")) == {"dec.3.q"}


# ---------------------------------------------------------------------------------------------------------
# nothing lost: errors are one line, exit 1, no traceback, no output, inputs untouched
# ---------------------------------------------------------------------------------------------------------


def _assert_clean_error(code, out, err, needle):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lorax_ref: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err + out


def _broken_peft(world, tmp_path, mutate):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_config.json").write_text((world.peft / "adapter_config.json").read_text())
    t = load_file(str(world.peft / "adapter_model.safetensors"))
    t = mutate(t, d) or t
    if t is not None:
        save_file(t, str(d / "adapter_model.safetensors"))
    return d


def _nan(t, d):
    t = dict(t)
    t["base_model.model.enc.0.attn.q.lora_A.weight"] = t["base_model.model.enc.0.attn.q.lora_A.weight"].clone()
    t["base_model.model.enc.0.attn.q.lora_A.weight"][0, 0] = float("nan")
    return t


def _extra(t, d):
    return {**t, "base_model.model.enc.0.attn.q.lora_C.weight": torch.ones(2)}


def _missing(t, d):
    return {k: v for k, v in t.items() if k != "base_model.model.enc.0.ffn.lora_B.weight"}


def _bad_json(t, d):
    (d / "adapter_config.json").write_text('{"r": 3, "lora_alpha": ')


def _transposed(t, d):
    t = dict(t)
    A = t.pop("base_model.model.enc.0.attn.q.lora_A.weight")
    B = t.pop("base_model.model.enc.0.attn.q.lora_B.weight")
    t["base_model.model.enc.0.attn.q.lora_A.weight"] = B.T.contiguous()
    t["base_model.model.enc.0.attn.q.lora_B.weight"] = A.T.contiguous()
    return t


def _unknown_module(t, d):
    return {**{k.replace("enc.0.attn.q", "enc.9.attn.q"): v for k, v in t.items() if "enc.0.attn.q" in k}}


@pytest.mark.parametrize("mutate,needle", [
    (_nan, "NaN"),
    (_extra, "unexpected key"),
    (_missing, "no lora_B (missing key)"),
    (_bad_json, "invalid JSON"),
    (_transposed, "shape mismatch"),
    (_unknown_module, "no matching weight"),
])
def test_bad_adapters_one_line_errors(world, tmp_path, capsys, mutate, needle):
    bad = _broken_peft(world, tmp_path, mutate)
    before = files_sha256(bad)
    out = tmp_path / "out"
    _assert_clean_error(*_run(_transfer(world, bad, out), capsys), needle)
    assert not out.exists() and files_sha256(bad) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary leftovers


def test_bad_checkpoints_one_line_errors(world, tmp_path, capsys):
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(world.target.read_bytes()[:-100])
    _assert_clean_error(*_run(["transfer", "--source-base", world.source, "--target-base", trunc, "--adapter",
                               world.peft, "--out", tmp_path / "o1", "--no-cache"], capsys), "not a readable safetensors")
    nan = dict(TARGET)
    nan["enc.0.attn.v"] = TARGET["enc.0.attn.v"].clone()
    nan["enc.0.attn.v"][1, 1] = float("nan")
    nan_path = _write_ckpt(tmp_path / "nan.safetensors", nan)
    _assert_clean_error(*_run(["transfer", "--source-base", world.source, "--target-base", nan_path, "--adapter",
                               world.peft, "--out", tmp_path / "o2", "--no-cache", "--rank", R], capsys), "NaN")
    missing = tmp_path / "nope.safetensors"
    _assert_clean_error(*_run(["transfer", "--source-base", world.source, "--target-base", missing, "--adapter",
                               world.peft, "--out", tmp_path / "o3"], capsys), "neither a packaged model")
    _assert_clean_error(*_run(_transfer(world, tmp_path / "no-adapter", tmp_path / "o4"), capsys), "does not exist")
    _assert_clean_error(*_run(_transfer(world, world.peft, tmp_path / "o5", "--rank", 13) [:-4] + ["--rank", "13", "--quiet"],
                              capsys), "out of range")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_shape_dependent_options_fail_before_any_svd(world, tmp_path, capsys, monkeypatch):
    import lorax_ref.files.cache as cache

    def no_svd(*a, **k):
        raise AssertionError("an SVD ran before the options were validated")

    monkeypatch.setattr(cache, "svd_topk", no_svd)
    _assert_clean_error(*_run(_transfer(world, world.peft, tmp_path / "o1", "--method", "lorax"), capsys),
                        "needs equal shapes")
    _assert_clean_error(*_run(_transfer(world, world.peft, tmp_path / "o2", "--side", "u", "--threshold", "0.1"), capsys),
                        "cannot gate")


def test_pickle_base_needs_flag_and_weights_only(world, tmp_path, capsys):
    pkl = tmp_path / "source.ckpt"
    torch.save({"state_dict": {k + ".weight": (v.float()[..., None, None] if k.endswith("proj_in") else v.float())
                               for k, v in SOURCE.items()}}, pkl)
    args = ["transfer", "--source-base", pkl, "--target-base", world.target, "--adapter", world.peft,
            "--out", tmp_path / "out", "--rank", R, "--no-cache", "--quiet"]
    _assert_clean_error(*_run(args, capsys), "--allow-pickle")
    code, _, err = _run(args + ["--allow-pickle"], capsys)
    assert code == 0, err


def test_lorax_other_base_refused_unless_asked(world, tmp_path, capsys):
    args = ["transfer", "--source-base", world.target, "--target-base", world.source, "--adapter", world.lorax,
            "--out", tmp_path / "out", "--no-cache", "--quiet"]
    _assert_clean_error(*_run(args, capsys), "--ignore-base-hash")
    assert _run(args + ["--ignore-base-hash"], capsys)[0] == 0


def test_existing_output_needs_force_and_inputs_are_protected(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _assert_clean_error(*_run(_transfer(world, world.peft, out), capsys), "--force")
    assert (out / "keep.txt").read_text() == "precious"
    assert _run(_transfer(world, world.peft, out, "--force"), capsys)[0] == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").exists()
    before = _checksums(world)
    _assert_clean_error(*_run(_transfer(world, world.peft, world.peft, "--force"), capsys), "would overwrite the input")
    _assert_clean_error(*_run(_transfer(world, world.kohya, world.dir, "--force"), capsys), "would overwrite the input")
    _assert_clean_error(*_run(_transfer(world, world.peft, world.peft / "sub"), capsys), "would overwrite the input")
    assert _checksums(world) == before


@pytest.mark.parametrize("exc,code", [(KeyboardInterrupt, 130), (OSError(28, "No space left on device"), 1)])
def test_interrupted_write_leaves_nothing(world, tmp_path, capsys, monkeypatch, exc, code):
    import lorax_ref.files.adapters as adapters

    def half_written(adapter, out_dir):
        (out_dir / "adapter_model.safetensors").write_bytes(b"partial")
        raise exc

    monkeypatch.setattr(adapters, "save_peft", half_written)
    out = tmp_path / "out"
    got, _, err = _run(_transfer(world, world.peft, out), capsys)
    assert got == code and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_debug_shows_the_exception(world, tmp_path):
    from lorax_ref.errors import LoraxInputError

    with pytest.raises(LoraxInputError, match="does not exist"):
        main(["transfer", "--source-base", str(world.source), "--target-base", str(world.target), "--adapter",
              str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--debug"])


def test_usage_errors_and_help(capsys):
    assert main(["transfer", "--threshold", "1.5"]) == 2
    assert "threshold" in capsys.readouterr().err
    for cmd in (["--help"], ["transfer", "--help"], ["inspect", "--help"], ["random-adapter", "--help"]):
        assert main(cmd) == 0
    text = capsys.readouterr().out
    for option in ("--source-base", "--target-base", "--adapter", "--out", "--rank", "--threshold", "--side",
                   "--method", "--force", "--debug", "--cache-dir", "--no-cache", "--allow-pickle"):
        assert option in text
    assert main([]) == 2


# ---------------------------------------------------------------------------------------------------------
# inspect, the verify plug-in, and the real entry point
# ---------------------------------------------------------------------------------------------------------


def test_inspect_adapters_and_checkpoints(world, capsys):
    expect = {world.peft: ("peft", 4), world.kohya: ("kohya", 2), world.lorax: ("lorax", 3), world.lorax_dir: ("lorax", 3)}
    for path, (fmt, n) in expect.items():
        code, out, err = _run(["inspect", path, "--json"], capsys)
        assert code == 0, err
        info = json.loads(out)
        assert info["kind"] == "adapter" and info["format"] == fmt and info["layers"] == n
    info = json.loads(_run(["inspect", world.peft, "--json"], capsys)[1])
    assert info["ranks"] == {"2": 1, "3": 3} and info["alphas"] == {"1": 1, "6": 3}
    code, out, _ = _run(["inspect", world.source, "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["kind"] == "checkpoint" and info["layers"] == 4  # 2-D weights (proj_in is 4-D)
    assert info["sha256"] == files_sha256(world.source)["source.safetensors"]
    code, out, _ = _run(["inspect", world.lorax], capsys)
    assert code == 0 and "base_sha256" in out


def test_verify_subcommand_plugs_in(monkeypatch, capsys):
    fake = types.ModuleType("lorax_ref.conformance")
    fake.__spec__ = importlib.machinery.ModuleSpec("lorax_ref.conformance", None)

    def add_verify_parser(subparsers):
        p = subparsers.add_parser("verify", help="check an implementation")
        p.add_argument("target")
        p.set_defaults(func=lambda args: 3 if args.target == "bad" else 0)
        return p

    fake.add_verify_parser = add_verify_parser
    monkeypatch.setitem(sys.modules, "lorax_ref.conformance", fake)
    import lorax_ref

    monkeypatch.setattr(lorax_ref, "conformance", fake, raising=False)
    assert main(["verify", "good"]) == 0 and main(["verify", "bad"]) == 3
    assert "verify" in (main(["--help"]) == 0 and capsys.readouterr().out)


def test_module_entry_point_subprocess(world, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "lorax_ref", "transfer", "--source-base", str(world.source),
                          "--target-base", str(world.target), "--adapter", str(world.peft), "--out", str(out),
                          "--rank", str(R), "--threshold", "0.5", "--no-cache"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "GATED" in run.stdout and (out / "adapter_model.safetensors").exists()



# ---------------------------------------------------------------------------------------------------------
# the README example, run exactly as written (slow: real models, a few dozen SVDs of 384×384 layers)
# ---------------------------------------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_commands() -> list[list[str]]:
    import re
    import shlex

    text = README.read_text() if README.exists() else ""
    block = re.search(r"<!-- cli-example:start -->(.*?)<!-- cli-example:end -->", text, re.S)
    if not block:
        return []
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip().startswith("python -m lorax_ref")]


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    from lorax_ref.files.checkpoints import PACKAGED_MODELS, packaged_file

    commands = _readme_commands()
    if not commands:
        pytest.skip("README.md has no <!-- cli-example:start/end --> block")
    for alias in ("minilm-l6", "minilm-l6-int8", "minilm-l3"):
        model = PACKAGED_MODELS[alias]
        try:
            packaged_file(model.dist, model.file)
        except Exception:
            pytest.skip(f"packaged model {alias} not installed ({model.pip})")
    env = {**__import__("os").environ, "LORAX_CACHE_DIR": str(tmp_path / "cache")}
    for argv in commands:
        assert argv[:3] == ["python", "-m", "lorax_ref"]
        run = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, f"{' '.join(argv)}\n{run.stderr}"
    reports = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.rglob("lorax_report.json")}
    assert reports, "the README example transfers nothing"
    for name, report in reports.items():
        assert all(row["phi"] is not None and 0 <= row["phi"] <= 1 + 1e-9 for row in report["layers"]), name
    if "int8-lorax" in reports:  # a LoRA-X adapter survives int8 quantisation of its base
        assert reports["int8-lorax"]["summary"]["min_kept_energy"] > 0.99


# ---------------------------------------------------------------------------------------------------------
# hostile inputs that need a real process: concurrent runs, kill -9, a full disk; and the packaged models
# (tests/test_hostile.py tries the single bad inputs, most of them in-process)
# ---------------------------------------------------------------------------------------------------------


def _cli(*args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "lorax_ref", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def test_fp16_overflow_is_refused_through_the_command_line(tmp_path):
    """|lora_B| up to 3e4 in fp16 (finite); the copy rule's factors are ~1e5: they used to be written as Inf
    (exit 0, a refactor error of 1e-15 in the report, and a file inspect then refused)."""
    src = _write_ckpt(tmp_path / "s.safetensors", {"blk.q": SOURCE["enc.0.attn.q"]})
    tgt = _write_ckpt(tmp_path / "t.safetensors", {"blk.q": TARGET["enc.0.attn.q"]})
    d = tmp_path / "p16"
    d.mkdir()
    g = torch.Generator().manual_seed(5)
    save_file({"base_model.model.blk.q.lora_B.weight": (3e4 * torch.rand(16, 3, generator=g)).half(),
               "base_model.model.blk.q.lora_A.weight": torch.rand(3, 12, generator=g).half()},
              str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 3, "lora_alpha": 3}))
    before = files_sha256(tmp_path)
    run = _cli("transfer", "--source-base", src, "--target-base", tgt, "--adapter", d, "--out", tmp_path / "out",
               "--rank", 12, "--method", "copy", "--no-cache")
    assert run.returncode == 1 and run.stdout == "", run.stderr
    assert run.stderr.startswith("lorax_ref: error: layer 'blk.q': B (lora_B / lora_up) does not fit float16: ")
    assert len(run.stderr.strip().splitlines()) == 1 and "convert the adapter to float32" in run.stderr
    assert files_sha256(tmp_path) == before and not (tmp_path / "out").exists()


def test_two_concurrent_runs_one_wins(world, tmp_path):
    """Two runs started together on the same new --out: exactly one writes it, the other fails cleanly (it used
    to move the first output aside and replace it, both exiting 0). The in-process race is in test_adapters."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "lorax_ref", *map(str, _transfer(world, world.peft, out))]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    err = next(e for code, e in results if code == 1)
    assert len(err.strip().splitlines()) == 1 and ("already exists" in err or "appeared while" in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch from the loser
    assert set(_peft_deltas(out)) == {"enc.0.attn.q", "enc.0.attn.v", "enc.0.ffn", "enc.1.attn.q"}


def test_kill_9_while_writing_leaves_nothing_the_next_run_keeps(world, tmp_path):
    """A run killed (SIGKILL) half-way through writing leaves a scratch directory; the next run writing into the
    same folder removes it, and nothing else."""
    out = tmp_path / "out"
    killer = (
        "import os, signal, sys\n"
        "import lorax_ref.files.adapters as adapters\n"
        "from lorax_ref.cli import main\n"
        "def save_then_die(adapter, d):\n"
        "    (d / 'adapter_model.safetensors').write_bytes(b'partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "adapters.save_peft = save_then_die\n"
        "main(sys.argv[1:])\n")
    run = subprocess.run([sys.executable, "-c", killer, *map(str, _transfer(world, world.peft, out))],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -9
    (scratch,) = tmp_path.iterdir()
    assert scratch.name.startswith(".out.lorax-tmp-") and (scratch / "adapter_model.safetensors").read_bytes() == b"partial"
    (tmp_path / "mine").mkdir()  # the user's own things are never touched
    assert main([str(a) for a in _transfer(world, world.peft, tmp_path / "other")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "other"]


def test_full_disk_under_the_cache_only_costs_speed(world, tmp_path):
    """Cache entries (~300 kB) fail to write, with safetensors' own SafetensorError ("File too large" under
    RLIMIT_FSIZE, as "No space left on device" on a full disk); the transfer (~20 kB of output) succeeds."""
    import resource

    W = spectral(200, 160, 0)
    src = _write_ckpt(tmp_path / "s.safetensors", {"big.q": W})
    tgt = _write_ckpt(tmp_path / "t.safetensors", {"big.q": near(W, 0.1, 1)})
    assert main(["random-adapter", "--base", str(src), "--modules", "q", "--rank", "2", "--out", str(tmp_path / "ad"),
                 "--no-cache"]) == 0
    limit = 64 * 1024  # bytes per file

    def small_files():  # in the child: python itself ignores SIGXFSZ, so a large write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    cache = tmp_path / "cache"
    run = _cli("transfer", "--source-base", src, "--target-base", tgt, "--adapter", tmp_path / "ad", "--out",
               tmp_path / "out", "--rank", 100, "--cache-dir", cache, "--json", preexec_fn=small_files)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["cache"]["misses"] == 2 and report["summary"]["transferred"] == 1
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # nothing half-written left in the cache
    assert set(_peft_deltas(tmp_path / "out")) == {"big.q"}


def test_packaged_model_directory_is_protected(tmp_path, monkeypatch, capsys):
    """--source-base minilm-l6 --out <its installed model directory> --force used to delete model.safetensors and
    config.json. Here the alias points to a model directory made for the test, so a failure destroys nothing."""
    from lorax_ref.files import checkpoints

    model_dir = tmp_path / "site-packages" / "pkg" / "model"
    model_dir.mkdir(parents=True)
    model = _write_ckpt(model_dir / "model.safetensors", SOURCE)
    (model_dir / "config.json").write_text("{}")
    real = checkpoints.packaged_file
    monkeypatch.setattr(checkpoints, "packaged_file",
                        lambda dist, rel: model if dist == checkpoints.PACKAGED_MODELS["minilm-l6"].dist else real(dist, rel))
    adapter = tmp_path / "ad"
    assert main(["random-adapter", "--base", "minilm-l6", "--modules", r"attn\.q$", "--out", str(adapter), "--no-cache"]) == 0
    target = _write_ckpt(tmp_path / "target.safetensors", TARGET)
    before = files_sha256(model_dir.parent)
    for out in (model_dir, model_dir.parent, model_dir / "sub"):
        code, _, err = _run(["transfer", "--source-base", "minilm-l6", "--target-base", target, "--adapter", adapter,
                             "--out", out, "--rank", R, "--no-cache", "--quiet", "--force"], capsys)
        _assert_clean_error(code, "", err, "would overwrite the input")
        code, _, err = _run(["random-adapter", "--base", "minilm-l6", "--modules", r"attn\.q$", "--out", out, "--force",
                             "--no-cache"], capsys)
        _assert_clean_error(code, "", err, "would overwrite the input")
    code, _, err = _run(["random-adapter", "--base", "minilm-l6", "--out", tmp_path / "x", "--cache-dir", model_dir / "c"],
                        capsys)
    _assert_clean_error(code, "", err, "lies inside the input")
    assert files_sha256(model_dir.parent) == before and sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_outputs_follow_the_umask(world, tmp_path, capsys):
    import os

    old = os.umask(0o027)
    try:
        code, _, err = _run(_transfer(world, world.peft, tmp_path / "new" / "out"), capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    for d in (tmp_path / "new", tmp_path / "new" / "out"):  # used to be 0o700 whatever the umask
        assert d.stat().st_mode & 0o777 == 0o750
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in (tmp_path / "new" / "out").iterdir())
