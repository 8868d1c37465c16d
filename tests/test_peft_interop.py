"""The real clients load what ``python -m lorax_ref`` writes: peft + transformers on the packaged MiniLM-L6.

As a user would: a seeded, changed copy of MiniLM-L6 is written as a transformers model directory (config.json +
model.safetensors); adapters made by ``random-adapter`` and by peft itself (``get_peft_model(...).save_pretrained``)
are transferred onto it by the command line (a subprocess), then loaded with ``PeftModel.from_pretrained`` and
``AutoPeftModel*.from_pretrained`` and merged with ``merge_and_unload``. Every adapted weight must change by

    ΔW_t = U_t U_tᵀ ΔW_s V_t V_tᵀ          (Eq. (3); U_t, V_t: top-r singular vectors of W_t)

(or U_t U_sᵀ ΔW_s V_s V_tᵀ with ``--method copy``) computed here in float64 with ``numpy.linalg.svd`` from the
checkpoint files, ΔW_s being what peft reads from the input adapter (``scaling · B A`` of its loaded layers) or
kohya's ``α/k · up · down``. The merged model must compute what the unmerged one does and what a model holding
W_t + ΔW_t does. Only local directories are loaded (HF_HUB_OFFLINE=1); peft and transformers are test
requirements, lorax_ref itself never imports them.

Tolerances: the loaded model is float32, so a merged weight W_t + ΔW_t carries rounding of about
2⁻²⁴·‖W_t‖ ≈ 6e-8·‖W_t‖, i.e. 6e-8·‖W_t‖/‖ΔW_t‖ ≈ 5e-7 relative to the updates here (measured: at most
4.4e-7); WEIGHT_RTOL leaves a margin of ~10. Every case also shows that a wrong rule (Eq. (3) with the source's
bases; for copy, Eq. (3) itself) misses the merged weights by orders of magnitude, so the check can fail.
The forward passes agree to ~1e-5 of the adapter's effect on the output (FORWARD_RTOL: ~10 margin).
"""
from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it: nothing may go to a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import hashlib
import importlib
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

from lorax_ref.files.checkpoints import PACKAGED_MODELS, packaged_file

ROOT = Path(__file__).resolve().parents[1]
R = 160  # LoRA-X rank of the transfer: well below the width 384, so the projection visibly changes ΔW
WEIGHT_RTOL = 5e-6  # ‖(W_merged − W_t) − ΔW_t‖_F / ‖ΔW_t‖_F, per layer (float32 model, see the module docstring)
FORWARD_RTOL = 1e-4  # ‖y_a − y_b‖ / ‖y_adapted − y_base‖: two ways of computing the adapted model agree
ATTENTION = r"encoder\.layer\.\d\.attention\.self\.(query|value)"  # 12 layers: 6 blocks × (query, value)
FFN_01 = r"encoder\.layer\.[01]\.(intermediate|output)\.dense"  # 4 layers, 1536x384 and 384x1536


def _source_dir() -> Path:
    m = PACKAGED_MODELS["minilm-l6"]
    return packaged_file(m.dist, m.file).parent  # fails (not skips) with the pip command when it is missing


def _cli(*args, env) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "lorax_ref", *map(str, args)]
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, f"{' '.join(argv)}\n{run.stderr}"
    return run


def _changed_copy(src: Path, out: Path, eps: float = 0.1, seed: int = 0) -> Path:
    """A transformers model directory whose encoder weights are W + eps·rms(W)·N(0, 1), seeded."""
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(src / "model.safetensors"))
    for name, W in sorted(tensors.items()):
        if name.startswith("encoder.") and W.ndim == 2:
            noise = torch.randn(W.shape, generator=g, dtype=torch.float64)
            tensors[name] = (W.double() + eps * W.double().pow(2).mean().sqrt() * noise).float()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _peft_written(src: Path, out: Path, seed: int, **config) -> Path:
    """An adapter written by peft itself: get_peft_model on the source, non-zero B (init_lora_weights=False)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(transformers.AutoModel.from_pretrained(str(src)),
                                peft.LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(str(out))
    return out


def _lora_modules(model) -> dict:
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def _peft_source_deltas(src: Path, adapter: Path) -> dict[str, np.ndarray]:
    """ΔW_s as peft reads the input adapter: scaling · B A of each loaded layer, multiplied out in float64."""
    model = peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(str(src)), str(adapter))
    out = {}
    for name, m in _lora_modules(model).items():
        A = m.lora_A["default"].weight.detach().double().numpy()  # (k, n)
        B = m.lora_B["default"].weight.detach().double().numpy()  # (m, k)
        out[name] = m.scaling["default"] * (B @ A)  # (m, n)
    return out


def _kohya_deltas(path: Path) -> dict[str, np.ndarray]:
    """ΔW of a kohya file, α/k · up · down, keyed by kohya name."""
    t = load_numpy(str(path))
    out = {}
    for key in t:
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            down, up = t[key].astype(np.float64), t[stem + ".lora_up.weight"].astype(np.float64)  # (k, n), (m, k)
            alpha = float(t[stem + ".alpha"]) if stem + ".alpha" in t else down.shape[0]
            out[stem] = alpha / down.shape[0] * (up @ down)  # (m, n)
    return out


class Bases(dict):
    """``self[module]`` = ``(U (m, r), V (n, r))``, the top-r singular vectors of that weight (float64, computed once).

    Each pair is flipped so that the largest-|·| entry of u_i is positive, the sign convention lorax_ref
    documents; Eq. (3) does not depend on it, the copy rule does.
    """

    def __init__(self, weights: dict[str, np.ndarray], r: int):
        super().__init__()
        self.weights, self.r = weights, r

    def __missing__(self, module: str):
        W = self.weights[module + ".weight"].astype(np.float64)  # (m, n)
        U, _, Vh = np.linalg.svd(W, full_matrices=False)  # (m, k), (k,), (k, n)
        U_r, V_r = U[:, : self.r], Vh[: self.r].T  # (m, r), (n, r)
        signs = np.sign(U_r[np.abs(U_r).argmax(axis=0), np.arange(self.r)])  # (r,)
        self[module] = (U_r * signs, V_r * signs)
        return self[module]


def eq3(dW_s: np.ndarray, bases_s: tuple, bases_t: tuple) -> np.ndarray:
    """Eq. (3): ΔW_t = U_t U_tᵀ ΔW_s V_t V_tᵀ."""
    U_t, V_t = bases_t  # (m, r), (n, r)
    return U_t @ (U_t.T @ dW_s @ V_t) @ V_t.T  # (m, r) (r, r) (r, n) -> (m, n)


def copy_rule(dW_s: np.ndarray, bases_s: tuple, bases_t: tuple) -> np.ndarray:
    """Table 5 ablation (``--method copy``): ΔW_t = U_t (U_sᵀ ΔW_s V_s) V_tᵀ, the source coordinates unrotated."""
    (U_s, V_s), (U_t, V_t) = bases_s, bases_t
    return U_t @ (U_s.T @ dW_s @ V_s) @ V_t.T  # (m, n)


def _apply(rule, dW_s: dict[str, np.ndarray], bases_s: Bases, bases_t: Bases) -> dict[str, np.ndarray]:
    return {name: rule(dW, bases_s[name], bases_t[name]) for name, dW in dW_s.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Target model directory, the input adapters and their transfers, made once by the command line."""
    d = tmp_path_factory.mktemp("interop")
    w = types.SimpleNamespace(dir=d, source=_source_dir())
    w.target = _changed_copy(w.source, d / "target")
    w.W_s, w.W_t = load_numpy(str(w.source / "model.safetensors")), load_numpy(str(w.target / "model.safetensors"))
    w.env = {**os.environ, "LORAX_CACHE_DIR": str(d / "cache")}
    w.dW_s, w.out = {}, {}
    target = w.target / "model.safetensors"

    def transfer(name, adapter, *extra):
        w.out[name] = d / f"out-{name}"
        _cli("transfer", "--source-base", "minilm-l6", "--target-base", target, "--adapter", adapter,
             "--out", w.out[name], "--rank", R, "--quiet", *extra, env=w.env)

    # 1. random-adapter on the packaged model: α = r, no task type
    w.random = d / "in-random"
    _cli("random-adapter", "--base", "minilm-l6", "--format", "peft", "--rank", 8, "--strength", 0.3,
         "--modules", ATTENTION, "--seed", 1, "--out", w.random, env=w.env)
    w.dW_s["random"] = _peft_source_deltas(w.source, w.random)
    transfer("random", w.random)
    # 2. written by peft: α ≠ r, rank_pattern / alpha_pattern, layers_to_transform
    w.alpha = _peft_written(w.source, d / "in-alpha", 2, r=4, lora_alpha=12, layers_to_transform=[0, 5],
                            target_modules=["query", "value", "intermediate.dense"],
                            rank_pattern={"intermediate.dense": 2}, alpha_pattern={"intermediate.dense": 5})
    w.dW_s["alpha"] = _peft_source_deltas(w.source, w.alpha)
    transfer("alpha", w.alpha)
    transfer("alpha-copy", w.alpha, "--method", "copy")  # re-factorised: B' = U_t X S / s, A' = (V_t Y)ᵀ
    w.dW_s["alpha-copy"] = w.dW_s["alpha"]
    # 3. written by peft: rsLoRA (s = α/√r), task type FEATURE_EXTRACTION
    w.rslora = _peft_written(w.source, d / "in-rslora", 3, task_type="FEATURE_EXTRACTION", r=8, lora_alpha=4,
                             use_rslora=True, target_modules=["key", "attention.output.dense"], layers_to_transform=[1, 2])
    w.dW_s["rslora"] = _peft_source_deltas(w.source, w.rslora)
    transfer("rslora", w.rslora)
    # 4. kohya from random-adapter: kohya out (the same file format) and PEFT out
    w.kohya = d / "in-kohya"
    _cli("random-adapter", "--base", "minilm-l6", "--format", "kohya", "--rank", 4, "--strength", 0.3,
         "--modules", FFN_01, "--seed", 4, "--out", w.kohya, env=w.env)
    w.kohya_file = w.kohya / "lora.safetensors"
    w.dW_s["kohya-peft"] = {k.removeprefix("lora_unet_").replace("_", "."): v
                            for k, v in _kohya_deltas(w.kohya_file).items()}
    transfer("kohya", w.kohya)
    transfer("kohya-peft", w.kohya, "--out-format", "peft")
    # the references, and what a wrong rule gives: Eq. (3) with the source's bases; for copy, Eq. (3) itself
    w.B_s, w.B_t = Bases(w.W_s, R), Bases(w.W_t, R)
    w.dW_t, w.wrong = {}, {}
    for case, deltas in w.dW_s.items():
        copy = case.endswith("-copy")
        w.dW_t[case] = _apply(copy_rule if copy else eq3, deltas, w.B_s, w.B_t)
        w.wrong[case] = _apply(eq3, deltas, w.B_s, w.B_t if copy else w.B_s)
    return w


@pytest.fixture(scope="module")
def forward(world):
    """A fixed batch (one row padded) and the target model's own output on it."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        y_base = transformers.AutoModel.from_pretrained(str(world.target))(**batch).last_hidden_state
    return types.SimpleNamespace(batch=batch, y_base=y_base)


def _weight_errors(merged, W_t: dict, dW_t: dict) -> dict[str, float]:
    """Per module ‖(W_merged − W_t) − ΔW_t‖_F / ‖ΔW_t‖_F, the merged weight read from the loaded model."""
    errs = {}
    for name, ref in dW_t.items():
        W_m = merged.get_submodule(name).weight.detach().double().numpy()  # (m, n)
        errs[name] = float(np.linalg.norm(W_m - W_t[name + ".weight"] - ref) / np.linalg.norm(ref))
    return errs


def _load_quietly(load):
    """Run a peft/transformers loader; a warning about the files (missing or unexpected keys, no config) fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load()
    # library deprecation notices (FutureWarning, DeprecationWarning) are about the libraries, not our files
    caught = [c for c in caught if not issubclass(c.category, (FutureWarning, DeprecationWarning))]
    assert not caught, [str(c.message) for c in caught]
    return model


def _check_merge(model, world, case: str, forward) -> float:
    """Wrapped layers, merged weights and forward pass of a loaded adapter; returns the max weight error."""
    dW_t = world.dW_t[case]
    assert sorted(_lora_modules(model)) == sorted(dW_t), "peft wrapped other layers than the adapter's"
    with torch.no_grad():
        y_unmerged = model(**forward.batch).last_hidden_state
        merged = model.merge_and_unload()
        y_merged = merged(**forward.batch).last_hidden_state
        predicted = transformers.AutoModel.from_pretrained(str(world.target))  # W_t + ΔW_t written in directly
        for name, ref in dW_t.items():
            predicted.get_submodule(name).weight.copy_(torch.from_numpy(world.W_t[name + ".weight"] + ref))
        y_predicted = predicted(**forward.batch).last_hidden_state
    effect = float((y_unmerged - forward.y_base).norm())
    assert effect > 1e-3 * float(forward.y_base.norm()), "the adapter does not change the output"
    fwd = max(float((y_merged - y_unmerged).norm()), float((y_predicted - y_unmerged).norm())) / effect
    assert fwd < FORWARD_RTOL
    errs = _weight_errors(merged, world.W_t, dW_t)
    worst = max(errs.values())
    assert worst < WEIGHT_RTOL, {k: f"{v:.2e}" for k, v in errs.items()}
    # the check can fail: the update as a wrong rule transfers it misses by orders of magnitude
    wrong = _weight_errors(merged, world.W_t, world.wrong[case])
    assert min(wrong.values()) > 100 * WEIGHT_RTOL
    print(f"{case}: {len(errs)} layers, max rel. weight error {worst:.2e} (wrong rule "
          f"{min(wrong.values()):.2e}), forward {fwd:.1e} of the adapter's effect "
          f"({effect / float(forward.y_base.norm()):.2f} of the output)")
    return worst


@pytest.mark.parametrize("case", ["random", "alpha", "alpha-copy", "rslora", "kohya-peft"])
def test_peft_model_loads_and_merges_the_transferred_adapter(world, forward, case):
    out = world.out[case]
    config = json.loads((out / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == world.target.resolve()
    model = _load_quietly(lambda: peft.PeftModel.from_pretrained(
        transformers.AutoModel.from_pretrained(config["base_model_name_or_path"]), str(out)))
    _check_merge(model, world, case, forward)


def test_auto_peft_model_loads_the_transferred_adapter(world, forward, tmp_path):
    """AutoPeftModel builds the target from base_model_name_or_path (and the class from task_type / auto_mapping)."""
    loads = [(peft.AutoPeftModel, "random"), (peft.AutoPeftModelForFeatureExtraction, "random"),
             (peft.AutoPeftModelForFeatureExtraction, "rslora")]
    for cls, case in loads:
        model = _load_quietly(lambda: cls.from_pretrained(str(world.out[case])))
        assert Path(model.get_base_model().name_or_path) == world.target.resolve()
        assert isinstance(model.get_base_model(), transformers.BertModel)
        if case == "random":  # saving it again finds the base's config: no "Could not find a config file" warning
            _load_quietly(lambda: model.save_pretrained(str(tmp_path / f"{cls.__name__}-again")))
        _check_merge(model, world, case, forward)


def test_transferred_config_keeps_the_input_and_names_the_target(world):
    for case, task in (("random", None), ("alpha", None), ("rslora", "FEATURE_EXTRACTION"), ("kohya-peft", None)):
        config = json.loads((world.out[case] / "adapter_config.json").read_text())
        assert config["task_type"] == task and config["revision"] is None
        if task is None:  # AutoPeftModel imports the class from auto_mapping
            mapping = config["auto_mapping"]
            assert getattr(importlib.import_module(mapping["parent_library"]), mapping["base_model_class"]) \
                is transformers.BertModel
    alpha_in = json.loads((world.alpha / "adapter_config.json").read_text())
    alpha_out = json.loads((world.out["alpha"] / "adapter_config.json").read_text())
    rslora_in = json.loads((world.rslora / "adapter_config.json").read_text())
    # the inputs are what the cases claim: α ≠ r with patterns, and rsLoRA
    assert (alpha_in["r"], alpha_in["lora_alpha"], alpha_in["rank_pattern"]) == (4, 12, {"intermediate.dense": 2})
    assert rslora_in["use_rslora"] is True and rslora_in["r"] != rslora_in["lora_alpha"]
    assert alpha_out["peft_version"] == alpha_in["peft_version"]  # peft's own fields are passed on
    assert alpha_out["use_rslora"] is False and alpha_out["lora_alpha"] == 12
    assert json.loads((world.out["rslora"] / "adapter_config.json").read_text())["use_rslora"] is True


def test_random_adapter_writes_the_config_peft_writes(world, tmp_path):
    """random-adapter's adapter_config.json equals what peft's save_pretrained writes for the same LoRA."""
    ours = json.loads((world.random / "adapter_config.json").read_text())
    modules = ours["target_modules"]
    assert len(modules) == 12
    theirs_dir = tmp_path / "peft"
    peft.get_peft_model(transformers.AutoModel.from_pretrained(str(world.source)),
                        peft.LoraConfig(r=8, lora_alpha=8, target_modules=modules)).save_pretrained(str(theirs_dir))
    theirs = json.loads((theirs_dir / "adapter_config.json").read_text())
    assert set(theirs) - set(ours) == {"peft_version"} and set(ours) <= set(theirs)  # we are not peft
    assert Path(ours["base_model_name_or_path"]) == Path(theirs["base_model_name_or_path"]).resolve()
    # peft names the class's defining module, we the top-level package exporting it: the same class
    for mapping in (ours["auto_mapping"], theirs["auto_mapping"]):
        assert getattr(importlib.import_module(mapping["parent_library"]), mapping["base_model_class"]) \
            is transformers.BertModel
    skip = {"peft_version", "base_model_name_or_path", "auto_mapping", "target_modules"}
    assert {k: v for k, v in ours.items() if k not in skip} == {k: v for k, v in theirs.items() if k not in skip}
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])


def test_report_and_metadata_keep_the_exact_target(world):
    sha = hashlib.sha256((world.target / "model.safetensors").read_bytes()).hexdigest()
    for case in ("random", "kohya"):
        report = json.loads((world.out[case] / "lorax_report.json").read_text())
        assert report["target_base"]["spec"] == str(world.target / "model.safetensors")
        assert report["target_base"]["sha256"] == sha
        weights = next(p for p in world.out[case].glob("*.safetensors"))
        with safe_open(str(weights), framework="np") as f:
            stamp = json.loads(f.metadata()["lorax_ref_transfer"])
        assert stamp["target_sha256"] == sha and stamp["r"] == R
    report = json.loads((world.out["random"] / "lorax_report.json").read_text())
    assert Path(report["output"]["base_model_name_or_path"]) == world.target.resolve()
    with safe_open(str(world.random / "adapter_model.safetensors"), framework="np") as f:
        made = json.loads(f.metadata()["lorax_ref_random"])
    assert made["base"] == "minilm-l6"
    assert made["base_sha256"] == hashlib.sha256((world.source / "model.safetensors").read_bytes()).hexdigest()


def test_kohya_round_trip_through_the_real_model(world):
    """kohya in, kohya out: same names, α and rank, ΔW = the numpy Eq. (3) of kohya's ΔW_s."""
    out = _kohya_deltas(world.out["kohya"] / "lora.safetensors")
    src = _kohya_deltas(world.kohya_file)
    assert sorted(out) == sorted(src) and len(out) == 4
    dW_t = world.dW_t["kohya-peft"]
    errs = {}
    for kohya_name, delta in out.items():
        ref = dW_t[kohya_name.removeprefix("lora_unet_").replace("_", ".")]
        errs[kohya_name] = np.linalg.norm(delta - ref) / np.linalg.norm(ref)
    assert max(errs.values()) < WEIGHT_RTOL, errs
    print(f"kohya: {len(errs)} layers, max rel. error of the written ΔW {max(errs.values()):.2e}")
    t_in, t_out = load_numpy(str(world.kohya_file)), load_numpy(str(world.out["kohya"] / "lora.safetensors"))
    assert {k: v.shape for k, v in t_in.items()} == {k: v.shape for k, v in t_out.items()}
    assert all(t_out[k] == t_in[k] for k in t_in if k.endswith(".alpha"))


def test_lorax_ref_never_imports_peft_or_transformers():
    """They are test requirements only: the package reads and writes the files with safetensors and json."""
    imports = re.compile(r"^\s*(from|import)\s+(peft|transformers|accelerate|huggingface_hub)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "lorax_ref").rglob("*.py") if imports.search(p.read_text())]
    assert not offenders
