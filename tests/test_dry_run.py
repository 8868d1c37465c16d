"""``python -m lorax_ref transfer --dry-run`` and :mod:`lorax_ref.predict`: predictions checked against the real
transfer and against numpy, through the real command line, on the packaged pairs and on files written here; the
dry run writes nothing and fails like the transfer does.

Oracles: numpy's SVD of the weights as written (bases), ΔW from the PEFT / LoRA-X definitions in numpy, the
report the real ``transfer`` writes, and Monte Carlo for the expectations (docs/identities.md §12).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorax_ref import predict
from lorax_ref.testing.checksums import files_sha256
from lorax_ref.cli import main
from lorax_ref.testing.layers import near, rotation
from lorax_ref.testing.layers import spectral as _spectral

R = 4  # rank of the bases on the small checkpoints


# ---------------------------------------------------------------------------------------------------------
# small checkpoints: near-identical, unrelated, rotated and pruned layers
# ---------------------------------------------------------------------------------------------------------


def spectral(m, n, seed, decay=0.75):
    return _spectral(m, n, seed, decay)


SOURCE = {
    "enc.0.q": spectral(16, 12, 0),
    "enc.0.v": spectral(16, 12, 1),
    "enc.0.ffn": spectral(24, 12, 2),
    "enc.1.q": spectral(16, 12, 3),
}
TARGET = {
    "enc.0.q": near(SOURCE["enc.0.q"], 0.02, 10),  # near-identical: Φ ≈ 1
    "enc.0.v": rotation(16, 11) @ SOURCE["enc.0.v"] @ rotation(12, 12).T,  # the same layer, rotated coordinates
    "enc.0.ffn": SOURCE["enc.0.ffn"][:20].clone(),  # 4 neurons pruned: §4.2.2
    "enc.1.q": spectral(16, 12, 99, decay=0.6),  # unrelated (another spectrum: with the same one it would be a rotation)
}


def _write_ckpt(path, weights, dtype=torch.float64):
    save_file({name + ".weight": W.to(dtype).contiguous() for name, W in weights.items()}, str(path))
    return path


def _peft(path, shapes, k=3, alpha=6.0, seed=0):
    path.mkdir()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (m, n) in shapes.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(k, n, generator=g, dtype=torch.float64)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m, k, generator=g, dtype=torch.float64)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": k, "lora_alpha": alpha}))
    return path


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("dry")
    w = types.SimpleNamespace(dir=d)
    w.source = _write_ckpt(d / "source.safetensors", SOURCE)
    w.target = _write_ckpt(d / "target.safetensors", TARGET)
    w.peft = _peft(d / "peft", {k: tuple(v.shape) for k, v in SOURCE.items()})
    w.lorax_dir = d / "lorax"
    assert main(["random-adapter", "--base", str(w.source), "--format", "lorax", "--modules", r"^enc\.", "--rank",
                 str(R), "--out", str(w.lorax_dir), "--no-cache"]) == 0
    w.lorax = w.lorax_dir / "adapter.lorax.safetensors"
    w.inputs = [w.source, w.target, w.peft, w.lorax_dir]
    return w


def _cli(*args, timeout=300, **kw):
    """The real command line, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "lorax_ref", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def _dry(w, *extra, capsys):
    code = main(["transfer", "--dry-run", "--source-base", str(w.source), "--target-base", str(w.target), "--rank", str(R),
                 "--no-cache", "--json", *map(str, extra)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _np_bases(W, r):
    U, S, Vh = np.linalg.svd(W.numpy(), full_matrices=False)
    return U[:, :r], S, Vh[:r].T


def _snapshot(*roots):
    """Every path under ``roots`` with its size and mtime: what 'writes nothing' is checked against."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns, p.is_dir())
    return out


# ---------------------------------------------------------------------------------------------------------
# predictions equal the real transfer and numpy
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,threshold", [("auto", None), ("auto", "0.5"), ("copy", None), ("mismatch", None)])
def test_dry_run_predicts_the_transfer_exactly(w, tmp_path, capsys, method, threshold):
    extra = ["--method", method] + (["--threshold", threshold] if threshold else [])
    pred = _dry(w, "--adapter", w.peft, *extra, capsys=capsys)
    code = main(["transfer", "--source-base", str(w.source), "--target-base", str(w.target), "--adapter", str(w.peft),
                 "--rank", str(R), "--no-cache", "--quiet", "--out", str(tmp_path / "out"), *extra])
    assert code == 0, capsys.readouterr().err
    real = json.loads((tmp_path / "out" / "lorax_report.json").read_text())
    assert [r["module"] for r in pred["layers"]] == [r["module"] for r in real["layers"]]
    for p, r in zip(pred["layers"], real["layers"]):
        assert (p["case"], p["gated"]) == (r["case"], r["gated"])
        for key in ("phi_u", "phi_v", "phi"):
            assert (p[key] is None) == (r[key] is None) and (p[key] is None or abs(p[key] - r[key]) < 1e-12)
        assert abs(p["kept_energy"] - r["kept_energy"]) < 1e-9, p["module"]
    if threshold:
        assert any(p["gated"] for p in pred["layers"]) and any(not p["gated"] for p in pred["layers"])
        assert all(p["kept_energy"] == 0 for p in pred["layers"] if p["gated"])


def test_dry_run_numbers_against_numpy(w, capsys):
    """Φ, the expectation (1/r) Σ a_k b_k, Φ_U·Φ_V, Δσ and the exact kept energy of a PEFT LoRA, all from numpy."""
    pred = {r["module"]: r for r in _dry(w, "--adapter", w.peft, capsys=capsys)["layers"]}
    t = load_file(str(w.peft / "adapter_model.safetensors"))
    for name in ("enc.0.q", "enc.0.v", "enc.1.q"):
        row = pred[name]
        U_s, S_s, V_s = _np_bases(SOURCE[name], R)
        U_t, S_t, V_t = _np_bases(TARGET[name], R)
        a, b = np.sum((U_t.T @ U_s) ** 2, axis=0), np.sum((V_t.T @ V_s) ** 2, axis=0)
        assert abs(row["phi_u"] - a.mean()) < 1e-10 and abs(row["phi_v"] - b.mean()) < 1e-10
        assert abs(row["expected_kept"] - np.mean(a * b)) < 1e-10
        assert abs(row["expected_kept_full"] - a.mean() * b.mean()) < 1e-10
        assert abs(row["sigma_rel_diff"] - np.linalg.norm(S_t[:R] - S_s[:R]) / np.linalg.norm(S_s[:R])) < 1e-10
        D = 2.0 * (t[f"base_model.model.{name}.lora_B.weight"].numpy() @ t[f"base_model.model.{name}.lora_A.weight"].numpy())
        assert abs(row["kept_energy"] - np.sum((U_t.T @ D @ V_t) ** 2) / np.sum(D**2)) < 1e-10
        assert row["random_u"] == R / 16 and row["random_v"] == R / 12
    ffn = pred["enc.0.ffn"]  # §4.2.2: C_s = Ū_sᵀ ΔW_s V̄_s is copied, kept = ‖C_s‖² / ‖ΔW_s‖²
    U_s, _, V_s = _np_bases(SOURCE["enc.0.ffn"], R)
    D = 2.0 * (t["base_model.model.enc.0.ffn.lora_B.weight"].numpy() @ t["base_model.model.enc.0.ffn.lora_A.weight"].numpy())
    assert ffn["case"] == "mismatch" and ffn["phi_u"] is None and ffn["verdict"] == "index-paired"
    assert abs(ffn["kept_energy"] - np.sum((U_s.T @ D @ V_s) ** 2) / np.sum(D**2)) < 1e-10 and ffn["expected_kept"] == 1


def test_verdicts_and_recommendation_follow_the_layers(w, capsys):
    rows = {r["module"]: r for r in _dry(w, "--adapter", w.lorax, capsys=capsys)["layers"]}
    assert rows["enc.0.q"]["verdict"] == "transfer"
    assert rows["enc.0.v"]["verdict"] == "rotated?" and rows["enc.0.v"]["sigma_rel_diff"] < 1e-12
    assert rows["enc.1.q"]["verdict"] == "unrelated"
    assert rows["enc.0.ffn"]["verdict"] == "index-paired"
    # a LoRA-X update keeps, exactly, ‖A ΔΣ B‖² / ‖ΔΣ‖² (Eq. (3) rotation form), with numpy's bases
    dSigma = load_file(str(w.lorax))["enc.1.q.dSigma"].double().numpy()
    U_s, _, V_s = _np_bases(SOURCE["enc.1.q"], R)
    U_t, _, V_t = _np_bases(TARGET["enc.1.q"], R)
    A, B = U_t.T @ U_s, V_s.T @ V_t
    assert abs(rows["enc.1.q"]["kept_energy"] - np.sum((A @ np.diag(dSigma) @ B) ** 2) / np.sum(dSigma**2)) < 1e-10
    # one layer at a time: the recommendation follows the verdict
    only_v = _dry_bases(w, r"^enc\.0\.v$", capsys)
    assert only_v["summary"]["recommendation"].startswith("do not use Eq. (3)") and "--method copy" in only_v["summary"]["recommendation"]
    only_unrelated = _dry_bases(w, r"^enc\.1\.q$", capsys)
    assert only_unrelated["summary"]["recommendation"].startswith("do not transfer")
    only_close = _dry_bases(w, r"^enc\.0\.q$", capsys)
    assert only_close["summary"]["recommendation"].startswith("transfer:")
    big = _dry(w, "--modules", r"^enc\.0\.q$", "--rank", "8", capsys=capsys)  # r = 8 of a 12-wide side
    assert big["layers"][0]["verdict"] == "r too big" and "smaller --rank" in big["summary"]["recommendation"]


def _dry_bases(w, modules, capsys):
    code = main(["transfer", "--dry-run", "--source-base", str(w.source), "--target-base", str(w.target), "--rank",
                 str(R), "--modules", modules, "--no-cache", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_bases_only_selects_shared_weights_of_width_at_least_r(w, capsys):
    rep = _dry(w, capsys=capsys)  # no --adapter, no --modules: every weight both files have
    assert [r["module"] for r in rep["layers"]] == sorted(SOURCE) and rep["input"] is None
    assert all(r["kept_energy"] is None for r in rep["layers"])
    extra = w.dir / "extra.safetensors"  # a weight the target lacks and one narrower than r
    _write_ckpt(extra, {**SOURCE, "only.here": spectral(8, 8, 5), "narrow": spectral(16, 2, 6)})
    target = w.dir / "target-narrow.safetensors"
    _write_ckpt(target, {**TARGET, "narrow": spectral(16, 2, 7)})
    code = main(["transfer", "--dry-run", "--source-base", str(extra), "--target-base", str(target), "--rank", str(R),
                 "--no-cache", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads(out)
    assert len(rep["layers"]) == 4 and rep["skipped"] == {"not in the target": 1, "narrower than r": 1}


# ---------------------------------------------------------------------------------------------------------
# the real command line: packaged pairs, user files, nothing written
# ---------------------------------------------------------------------------------------------------------


def _packaged_or_skip():
    from lorax_ref.files.checkpoints import PACKAGED_MODELS, packaged_file

    for alias in ("minilm-l6", "minilm-l6-int8", "minilm-l3"):
        model = PACKAGED_MODELS[alias]
        try:
            packaged_file(model.dist, model.file)
        except Exception:
            pytest.skip(f"packaged model {alias} not installed ({model.pip})")


def test_packaged_pairs_through_the_command_line(tmp_path):
    """minilm-l6 → int8 and → L3 in real processes: the dry run writes nothing (cwd, cache), predicts the kept
    energy of the transfer that follows, and its Φ-based expectation matches numpy on the packaged weights."""
    _packaged_or_skip()
    from lorax_ref.files.checkpoints import open_checkpoint

    env = {**os.environ, "LORAX_CACHE_DIR": str(tmp_path / "cache")}
    work = tmp_path / "work"
    work.mkdir()
    modules = r"encoder\.layer\.0\.attention\.self\.(query|value)"
    run = _cli("random-adapter", "--base", "minilm-l6", "--format", "lorax", "--rank", 32, "--modules", modules,
               "--out", tmp_path / "adapter", "--no-cache", env=env, cwd=work)
    assert run.returncode == 0, run.stderr
    before = _snapshot(tmp_path)
    dry = {}
    for target in ("minilm-l6-int8", "minilm-l3"):
        run = _cli("transfer", "--dry-run", "--source-base", "minilm-l6", "--target-base", target, "--adapter",
                   tmp_path / "adapter", "--threshold", "0.8", "--json", env=env, cwd=work)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
        dry[target] = json.loads(run.stdout)
    table = _cli("transfer", "--dry-run", "--source-base", "minilm-l6", "--target-base", "minilm-l3", "--rank", 32,
                 "--modules", r"encoder\.layer\.1\.attention\.self\.query", env=env, cwd=work)
    assert table.returncode == 0, table.stderr
    assert _snapshot(tmp_path) == before and not (tmp_path / "cache").exists()  # nothing written anywhere
    assert "recommendation: do not transfer" in table.stdout and "dry run: nothing written" in table.stdout
    assert {r["verdict"] for r in dry["minilm-l6-int8"]["layers"]} == {"transfer"}
    assert not any(r["gated"] for r in dry["minilm-l6-int8"]["layers"])
    assert all(r["gated"] and r["verdict"] == "unrelated" for r in dry["minilm-l3"]["layers"])
    assert dry["minilm-l3"]["summary"]["recommendation"].startswith("do not transfer")
    # the real transfer to int8 keeps exactly what the dry run said
    run = _cli("transfer", "--source-base", "minilm-l6", "--target-base", "minilm-l6-int8", "--adapter",
               tmp_path / "adapter", "--threshold", "0.8", "--out", tmp_path / "int8", "--quiet", env=env, cwd=work)
    assert run.returncode == 0, run.stderr
    real = json.loads((tmp_path / "int8" / "lorax_report.json").read_text())
    for p, r in zip(dry["minilm-l6-int8"]["layers"], real["layers"]):
        assert p["module"] == r["module"] and abs(p["kept_energy"] - r["kept_energy"]) < 1e-9
    # a second dry run reads the bases the transfer cached, and still writes nothing
    before = _snapshot(tmp_path)
    run = _cli("transfer", "--dry-run", "--source-base", "minilm-l6", "--target-base", "minilm-l6-int8", "--adapter",
               tmp_path / "adapter", "--threshold", "0.8", env=env, cwd=work)
    assert run.returncode == 0 and "bases: 4 cached, 0 computed" in run.stdout, run.stdout + run.stderr
    assert _snapshot(tmp_path) == before
    # the bases-only expectation against numpy on the packaged weights
    rep = json.loads(_cli("transfer", "--dry-run", "--source-base", "minilm-l6", "--target-base", "minilm-l3", "--rank",
                          32, "--modules", r"encoder\.layer\.1\.attention\.self\.query", "--no-cache", "--json",
                          env=env, cwd=work).stdout)
    name = "encoder.layer.1.attention.self.query.weight"
    with open_checkpoint("minilm-l6") as s, open_checkpoint("minilm-l3") as t:
        (U_s, _, V_s), (U_t, _, V_t) = _np_bases(s.get(name).double(), 32), _np_bases(t.get(name).double(), 32)
    a, b = np.sum((U_t.T @ U_s) ** 2, axis=0), np.sum((V_t.T @ V_s) ** 2, axis=0)
    assert abs(rep["layers"][0]["expected_kept"] - np.mean(a * b)) < 1e-9 and list(work.iterdir()) == []


def test_user_files_through_the_command_line(w, tmp_path):
    """A checkpoint pair and a PEFT adapter written by this test, in a real process: table, summary, nothing
    written, inputs untouched; --quiet prints the recommendation only."""
    before = {str(p): files_sha256(p) for p in w.inputs}
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "LORAX_CACHE_DIR": str(tmp_path / "cache")}
    run = _cli("transfer", "--dry-run", "--source-base", w.source, "--target-base", w.target, "--adapter", w.peft,
               "--rank", R, "--threshold", "0.8", env=env, cwd=work)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[:3] == ["layer", "shape", "Φ_U"] and len(lines) == 2 + 4 + 1 + 1 + 2
    assert any(line.startswith("enc.1.q ") and "GATED" in line and line.endswith("unrelated") for line in lines)
    assert lines[-2].startswith("recommendation: ") and lines[-1].startswith("dry run: nothing written")
    quiet = _cli("transfer", "--dry-run", "--source-base", w.source, "--target-base", w.target, "--adapter", w.peft,
                 "--rank", R, "--quiet", env=env, cwd=work)
    assert quiet.returncode == 0 and quiet.stdout.startswith("recommendation: ") and len(quiet.stdout.splitlines()) == 1
    assert list(work.iterdir()) == [] and not (tmp_path / "cache").exists()
    assert {str(p): files_sha256(p) for p in w.inputs} == before


def test_help_documents_the_dry_run():
    run = _cli("transfer", "--help")
    assert run.returncode == 0
    for text in ("--dry-run", "--modules", "writes nothing", "Φ_U·Φ_V", "--threshold 0.8 --side both"):
        assert text in run.stdout, text


# ---------------------------------------------------------------------------------------------------------
# errors: as the transfer's, one line, exit 1 (usage: 2), nothing written, inputs untouched
# ---------------------------------------------------------------------------------------------------------


def _bad_cases(w):
    trunc, existing = w.dir / "truncated.safetensors", w.dir / "existing"
    if not trunc.exists():
        trunc.write_bytes(w.source.read_bytes()[:100])
        existing.mkdir()
    base = ["transfer", "--dry-run", "--source-base", w.source, "--target-base", w.target, "--no-cache"]
    return [
        ("adapter-dev-zero", base + ["--adapter", "/dev/zero"], 1, r"is not a regular file"),
        ("adapter-missing", base + ["--adapter", w.dir / "nope"], 1, r"does not exist"),
        ("target-truncated", ["transfer", "--dry-run", "--source-base", w.source, "--target-base", trunc, "--adapter",
                              w.peft], 1, r"not a readable safetensors file"),
        ("source-unknown-alias", ["transfer", "--dry-run", "--source-base", "minilm-l9", "--target-base", w.target],
         1, r"neither a packaged model"),
        ("rank-too-large", base + ["--adapter", w.peft, "--rank", "13"], 1, r"--rank 13 is out of range"),
        ("lorax-rank-differs", base + ["--adapter", w.lorax, "--rank", "3"], 1, r"differs from the LoRA-X adapter's rank"),
        ("method-lorax-shapes", base + ["--adapter", w.peft, "--rank", "4", "--method", "lorax"], 1,
         r"--method lorax \(Eq. \(3\)\) needs equal shapes"),
        ("gate-side-missing", base + ["--adapter", w.peft, "--rank", "4", "--threshold", "0.5", "--side", "u"], 1,
         r"cannot gate .* with --side u"),
        ("kohya-out-from-peft", base + ["--adapter", w.peft, "--rank", "4", "--out-format", "kohya"], 1,
         r"kohya output needs kohya input"),
        ("layer-map-missing", base + ["--adapter", w.peft, "--layer-map", w.dir / "none.json"], 1, r"does not exist"),
        ("modules-bad-regex", base + ["--modules", "(("], 1, r"the module pattern '\(\(' is not a valid regular expression"),
        ("modules-match-nothing", base + ["--modules", "^nothing$", "--rank", "4"], 1, r"no source weight matching"),
        ("out-exists", base + ["--adapter", w.peft, "--out", existing], 1, r"already exists; pass --force"),
        ("out-is-adapter", base + ["--adapter", w.peft, "--out", w.peft, "--force"], 1, r"would overwrite the input"),
        ("modules-with-adapter", base + ["--adapter", w.peft, "--modules", "enc"], 2, r"--modules selects weights only"),
        ("threshold-nan", base + ["--threshold", "nan"], 2, r"the Φ threshold must be in \[0, 1\]"),
        ("no-dry-run-no-adapter", ["transfer", "--source-base", w.source, "--target-base", w.target], 2,
         r"required: --adapter, --out \(or pass --dry-run\)"),
        ("modules-without-dry-run", ["transfer", "--source-base", w.source, "--target-base", w.target, "--adapter",
                                     w.peft, "--out", w.dir / "o", "--modules", "enc"], 2, r"--modules applies only to --dry-run"),
    ]


CASE_IDS = ["adapter-dev-zero", "adapter-missing", "target-truncated", "source-unknown-alias", "rank-too-large",
            "lorax-rank-differs", "method-lorax-shapes", "gate-side-missing", "kohya-out-from-peft", "layer-map-missing",
            "modules-bad-regex", "modules-match-nothing", "out-exists", "out-is-adapter", "modules-with-adapter",
            "threshold-nan", "no-dry-run-no-adapter", "modules-without-dry-run"]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_one_line_and_nothing_written(w, tmp_path, capsys, monkeypatch, case):
    import re

    cases = {c[0]: c[1:] for c in _bad_cases(w)}
    argv, code, pattern = cases[case]
    monkeypatch.chdir(tmp_path)
    before = _snapshot(w.dir)
    got = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert got == code and out == "" and "Traceback" not in err, (got, err)
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("lorax_ref: error: "), err
    assert re.search(pattern, lines[-1]), lines[-1]
    assert _snapshot(w.dir) == before and list(tmp_path.iterdir()) == []


def test_bad_input_through_the_real_command_line(w, tmp_path):
    run = _cli("transfer", "--dry-run", "--source-base", w.source, "--target-base", w.target, "--adapter", "/dev/zero",
               cwd=tmp_path)
    assert run.returncode == 1 and run.stdout == "" and "Traceback" not in run.stderr
    assert run.stderr.startswith("lorax_ref: error: ") and len(run.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_case_list_is_complete(w):
    assert [c[0] for c in _bad_cases(w)] == CASE_IDS


# ---------------------------------------------------------------------------------------------------------
# the expectations of lorax_ref.predict, against Monte Carlo and their bounds
# ---------------------------------------------------------------------------------------------------------


def _random_pair(rng, m, n, r, mix):
    """Source bases and target bases that share part of the source's subspace (mix = 0: the same)."""
    U_s = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V_s = np.linalg.qr(rng.standard_normal((n, r)))[0]
    U_t = np.linalg.qr(U_s + mix * rng.standard_normal((m, r)))[0]
    V_t = np.linalg.qr(V_s + mix * rng.standard_normal((n, r)))[0]
    return [torch.as_tensor(x) for x in (U_s, V_s, U_t, V_t)]


@pytest.mark.parametrize("mix", [0.3, 1.0, 5.0])
def test_expected_kept_energy_against_monte_carlo(mix):
    rng = np.random.default_rng(int(mix * 10))
    m, n, r, draws = 20, 14, 5, 20000
    U_s, V_s, U_t, V_t = _random_pair(rng, m, n, r, mix)
    A, B = (U_t.T @ U_s).numpy(), (V_s.T @ V_t).numpy()
    d = rng.standard_normal((draws, r))
    kd = np.einsum("ik,nk,kj->nij", A, d, B)  # A diag(d) B for every draw
    kd = np.sum(kd**2, axis=(1, 2)) / np.sum(d**2, axis=1)
    D = rng.standard_normal((draws, r, r))
    kf = np.sum((A @ D @ B) ** 2, axis=(1, 2)) / np.sum(D**2, axis=(1, 2))
    for kappa, diagonal in ((kd, True), (kf, False)):
        E = predict.expected_kept_energy(U_s, V_s, U_t, V_t, diagonal=diagonal)
        assert abs(kappa.mean() - E) < 4 * kappa.std(ddof=1) / math.sqrt(draws), (diagonal, kappa.mean(), E)
    lo, hi = predict.kept_energy_range(U_s, V_s, U_t, V_t)
    assert lo - 1e-12 <= min(kd.min(), kf.min()) and max(kd.max(), kf.max()) <= hi + 1e-12
    # both ends are reached: rank-one ΔΣ = x yᵀ along the extreme singular vectors of A and B
    X = np.linalg.svd(A)[2].T  # right singular vectors of A: ‖A x‖ = σ_i(A)
    Y = np.linalg.svd(B)[0]  # left singular vectors of B: ‖yᵀ B‖ = σ_i(B)
    for i, bound in ((0, hi), (-1, lo)):
        Dxy = np.outer(X[:, i], Y[:, i])  # ‖A x yᵀ B‖² = ‖A x‖² ‖yᵀ B‖²
        assert abs(np.sum((A @ Dxy @ B) ** 2) / np.sum(Dxy**2) - bound) < 1e-12


def test_expectation_bounds_and_covariance():
    rng = np.random.default_rng(7)
    for mix in (0.0, 0.2, 0.7, 2.0, 10.0):
        U_s, V_s, U_t, V_t = _random_pair(rng, 30, 22, 6, mix)
        a = np.sum((U_t.T @ U_s).numpy() ** 2, axis=0)
        b = np.sum((V_s.T @ V_t).numpy() ** 2, axis=1)
        E = predict.expected_kept_energy(U_s, V_s, U_t, V_t)
        full = predict.expected_kept_energy(U_s, V_s, U_t, V_t, diagonal=False)
        assert abs(E - (a.mean() * b.mean() + np.mean((a - a.mean()) * (b - b.mean())))) < 1e-12
        for x in (E, full):
            assert max(0, a.mean() + b.mean() - 1) - 1e-12 <= x <= min(a.mean(), b.mean()) + 1e-12
        assert np.allclose(predict.overlaps(U_s, U_t).numpy(), a, atol=1e-12)
    # anti-correlated overlaps: the diagonal expectation is 0, the full one Φ_U Φ_V = 1/4
    I = torch.eye(8, dtype=torch.float64)
    assert predict.expected_kept_energy(I[:, :4], I[:, :4], I[:, [0, 1, 4, 5]], I[:, [2, 3, 6, 7]]) == 0
    assert predict.expected_kept_energy(I[:, :4], I[:, :4], I[:, [0, 1, 4, 5]], I[:, [2, 3, 6, 7]], diagonal=False) == 0.25


def test_lora_energy_through_qr_is_accurate():
    rng = np.random.default_rng(3)
    for scale in (1e-150, 1.0, 1e150):
        L = torch.as_tensor(rng.standard_normal((40, 3)))
        R_ = torch.as_tensor(rng.standard_normal((3, 30)))
        ref = float(np.sum((L.numpy() @ R_.numpy()) ** 2))
        got = predict._lora_energy(predict._unit(L * scale), predict._unit(R_ * scale))
        assert abs(got * float(L.norm()) ** 2 * float(R_.norm()) ** 2 - ref) < 1e-12 * ref
