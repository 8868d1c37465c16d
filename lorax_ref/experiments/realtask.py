r"""The real task behind notebook 08: topic-aware BBC headline embeddings from a few labels.

Task. Each BBC News headline (title only, ≤ 32 tokens) is embedded by a MiniLM sentence encoder; the
quality measure is **topic retrieval mAP** on 250 held-out headlines: every headline queries all the
others by cosine similarity and the average precision of finding its own topic is averaged. Frozen
all-MiniLM-L6-v2 scores 0.44 here (it embeds what a headline says, not its section), so a small adapter
trained on 10 labelled headlines per topic has room to help. (On full articles a frozen L6 + logistic
regression already reaches ~0.96 accuracy, which leaves no room.)

Adapters sit on the six linear projections of the **top two layers** only (``adapted_layers``): the
hidden states entering them are computed once per model and cached, so training and evaluating an
adapter costs a fraction of a full forward pass (the CPU budget of CI is two cores). Training minimises
a supervised-contrastive loss (Khosla et al., 2020) over the labelled headlines, full batch, Adam.

Transfer to a target follows the paper: every adapted source weight :math:`W_s` is paired with a target weight
:math:`W_t` (same name; for a shallower target the layer with the highest :math:`\Phi`, Eq. (4)) and its update moves
by Eq. (3) (:func:`lorax_ref.transfer_same_dim`) for equal shapes, §4.2.2
(:func:`lorax_ref.transfer_mismatch`) for different shapes, or the no-rotation ablation
(:func:`lorax_ref.copy_sigma_transfer`) — the dispatch of :func:`lorax_ref.transfer_layer`, with each
weight decomposed once (:class:`ModelBases`). Run it all with ``scripts/train_bbc_adapters.py``; notebook 08
loads the saved adapters and rebuilds the table.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core import (
    copy_sigma_transfer,
    subspace_similarity,
    transfer_mismatch,
    transfer_same_dim,
)
from .bbc import load_bbc, stratified_indices
from ..errors import LoraxInputError
from ..files.reader import natural_key
from ..linalg import svd_topk
from .minilm import (
    PROJECTIONS,
    MiniLM,
    adapter_deltas,
    adapter_state,
    add_adapters,
    load_adapter_state,
    mean_pool,
    merged,
    prune_ffn,
    tokenize,
)

ADAPTER_DIR = Path(__file__).parents[1] / "data" / "adapters"


@dataclass(frozen=True)
class TaskConfig:
    """Everything that defines the experiment (hashed into the saved adapters' metadata)."""

    max_tokens: int = 32  # headlines: mean 9 tokens, none is cut at 32
    eval_per_topic: int = 50  # fixed held-out headlines, the same for every seed
    train_per_topic: int = 10  # the "few labels", drawn anew for every seed
    split_seed: int = 2025
    adapted_layers: tuple[int, ...] = (4, 5)  # the top two layers of L6
    projections: str = PROJECTIONS["all"]  # q, k, v, attention output, FFN in, FFN out
    r: int = 128  # LoRA-X rank: a third of the 384 dimensions (r = 384 would make every projector I)
    lora_rank: int = 2  # plain LoRA baseline rank k
    steps: int = 25
    lr_lorax: float = 1e-1  # moves the top-128 singular values (1.4-9.4 in these layers) by up to ~2.5
    lr_lora: float = 1e-2
    temperature: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    # Every model, fine-tune, adapter and score of the experiment is computed in float64: float32 results
    # differ between CPUs in their last bits, enough to reorder near-tied similarities and move an mAP
    # by ~1e-5; in float64 the table is the same on every machine to the digits it shows.
    dtype: str = "float64"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``."""
        return getattr(torch, self.dtype)

    def pattern(self, layers: tuple[int, ...] | None = None) -> str:
        """Regular expression selecting the adapted projections of the given (default: the configured) layers."""
        layers = self.adapted_layers if layers is None else layers
        return rf"encoder\.layer\.({'|'.join(str(i) for i in layers)})\." + self.projections

    def digest(self) -> str:
        """A short hash of the configuration (names cached and saved artefacts)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Headlines:
    """The tokenised BBC headlines with their topic labels, the evaluation split and the pool training labels come from."""

    ids: torch.Tensor  # (N, T) token ids
    mask: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N,) topic index
    eval_idx: np.ndarray  # (5 * eval_per_topic,)
    pool_idx: np.ndarray  # headlines the few labels are drawn from (disjoint from eval)
    titles: list[str] = field(repr=False, default_factory=list)

    def train_idx(self, cfg: TaskConfig, seed: int) -> np.ndarray:
        """``train_per_topic`` labelled headlines per topic from the pool, drawn with ``seed``."""
        pool_labels = self.labels.numpy()[self.pool_idx]
        pick = stratified_indices(pool_labels, {"train": cfg.train_per_topic}, seed=seed)["train"]
        return self.pool_idx[pick]


def load_headlines(cfg: TaskConfig) -> Headlines:
    """Tokenized BBC headlines with the fixed eval split (duplicated headlines are dropped, first kept)."""
    articles = load_bbc()
    seen, keep = set(), []
    for i, a in enumerate(articles):
        if a.title.lower() not in seen:  # BBC republished a few stories: a duplicate would be a free hit
            seen.add(a.title.lower())
            keep.append(i)
    titles = [articles[i].title for i in keep]
    labels = np.array([articles[i].label for i in keep])
    split = stratified_indices(labels, {"eval": cfg.eval_per_topic}, seed=cfg.split_seed)
    pool = np.setdiff1d(np.arange(len(keep)), split["eval"])
    ids, mask = tokenize(titles, cfg.max_tokens)
    return Headlines(ids, mask, torch.as_tensor(labels), split["eval"], pool, titles)


def _batch(h: Headlines, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mask = h.mask[idx]
    T = int(mask.sum(1).max())
    return h.ids[idx, :T], mask[:, :T]


# ----------------------------------------------------------------------------------------------------------
# Metric and loss
# ----------------------------------------------------------------------------------------------------------


def topic_map(emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out retrieval mAP: each item ranks all others by cosine; relevant = same topic."""
    z = F.normalize(emb.double(), dim=-1)  # (N, h)
    S = z @ z.T  # (N, N)
    S.fill_diagonal_(-float("inf"))
    order = torch.argsort(S, dim=1, descending=True, stable=True)[:, :-1]  # (N, N-1), self dropped
    rel = (labels[order] == labels[:, None]).double()  # (N, N-1)
    prec = rel.cumsum(1) / torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)  # precision at k
    return float(((prec * rel).sum(1) / rel.sum(1)).mean())


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss: pull same-topic headlines together, push the others away."""
    logits = z @ z.T / temperature  # (N, N)
    self_mask = torch.eye(len(z), dtype=torch.bool)
    logits = logits.masked_fill(self_mask, -float("inf"))
    log_prob = logits.log_softmax(dim=1)  # (N, N)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask  # (N, N)
    return -(log_prob.masked_fill(~pos, 0).sum(1) / pos.sum(1)).mean()


# ----------------------------------------------------------------------------------------------------------
# Split forward: frozen bottom (cached once per model) + adapted top
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def bottom_states(model: MiniLM, ids: torch.Tensor, mask: torch.Tensor, first_top: int, batch: int = 256):
    """Hidden states entering layer ``first_top`` (B, T, h), computed without gradients."""
    out = []
    for i in range(0, len(ids), batch):
        x, m = ids[i:i + batch], mask[i:i + batch]
        out.append(model.run_layers(model.embed_tokens(x), m, range(first_top)))  # (b, T, h)
    return torch.cat(out)


def top_embed(model: MiniLM, states: torch.Tensor, mask: torch.Tensor, first_top: int) -> torch.Tensor:
    """Sentence embeddings (B, h) from cached states entering layer ``first_top``."""
    return mean_pool(model.run_layers(states, mask, range(first_top, model.cfg.n_layers)), mask)


class Evaluator:
    """Caches one model's bottom states for the eval headlines; scores the model with updates on its top.

    Headlines are sorted by length and batched so that padding stays small; ``score(deltas)`` copies only
    the top layers an update touches (never the 47 MB embedding table).
    """

    def __init__(self, model: MiniLM, h: Headlines, first_top: int, batch: int = 64):
        self.model, self.first_top = model, first_top
        order = h.eval_idx[np.argsort(h.mask[h.eval_idx].sum(1).numpy(), kind="stable")]
        self.labels = h.labels[order]
        self.batches = []
        for i in range(0, len(order), batch):
            ids, mask = _batch(h, order[i:i + batch])
            self.batches.append((bottom_states(model, ids, mask, first_top), mask))

    @torch.no_grad()
    def score(self, deltas: dict[str, torch.Tensor] | None = None) -> float:
        """Topic mAP of the model with ``W ← W + ΔW`` for every ``name → ΔW`` in ``deltas`` (top layers only)."""
        layers = list(self.model.encoder.layer)
        for name, dW in (deltas or {}).items():
            i = int(name.split(".")[2])
            if i < self.first_top:
                raise LoraxInputError(f"{name} is below the cached layers (first adapted layer {self.first_top})")
            if layers[i] is self.model.encoder.layer[i]:
                layers[i] = copy.deepcopy(layers[i])  # (h*h*4 + 2*h*f) numbers, not the whole model
            W = layers[i].get_parameter(name.split(".", 3)[3])
            if W.shape != dW.shape:
                raise LoraxInputError(f"update for {name!r} is {tuple(dW.shape)}, the weight is {tuple(W.shape)}")
            W.add_(dW.to(W.dtype))
        embs = []
        for x, mask in self.batches:
            m = mask[:, None, None, :].bool()
            for layer in layers[self.first_top:]:
                x = layer(x, m)  # (B, T, h)
            embs.append(mean_pool(x, mask))  # (B, h)
        return topic_map(torch.cat(embs), self.labels)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def module_pattern(names: list[str]) -> str:
    """A regular expression matching exactly the given module names."""
    import re

    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def _first_layer(names: list[str]) -> int:
    return min(int(n.split(".")[2]) for n in names)


def train_adapter(model: MiniLM, h: Headlines, cfg: TaskConfig, kind: str, seed: int,
                  modules: list[str] | None = None, svd_cache: dict | None = None) -> dict[str, torch.Tensor]:
    """Train a LoRA-X (``kind="lorax"``) or LoRA adapter on ``seed``'s few labels; returns its state (tiny).

    ``modules`` (names without ``.weight``) default to the adapted layers of ``cfg``; the layers below the
    first adapted one are frozen and run once.
    """
    modules = [n[: -len(".weight")] for n in adapter_names(cfg)] if modules is None else list(modules)
    first_top = _first_layer(modules)
    idx = h.train_idx(cfg, seed)
    ids, mask = _batch(h, idx)
    labels = h.labels[idx]
    states = bottom_states(model, ids, mask, first_top)  # frozen part, once
    torch.manual_seed(seed)
    student = merged(model, {})  # a copy: the caller's model is never modified
    rank = cfg.r if kind == "lorax" else cfg.lora_rank
    add_adapters(student, kind, module_pattern(modules), rank, seed=seed, svd_cache=svd_cache)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr_lorax if kind == "lorax" else cfg.lr_lora)
    for _ in range(cfg.steps):
        loss = supcon_loss(top_embed(student, states, mask, first_top), labels, cfg.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return adapter_state(student)


def deltas_from_state(model: MiniLM, state: dict[str, torch.Tensor], kind: str, cfg: TaskConfig,
                      svd_cache: dict | None = None) -> dict[str, torch.Tensor]:
    """ΔW per weight name of a saved adapter, rebuilt on ``model`` (LoRA-X bases come from ``model``'s weights).

    Each adapted ``nn.Linear`` is copied alone (the model is neither copied nor modified)."""
    rank = cfg.r if kind == "lorax" else cfg.lora_rank
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, fld = key.rpartition(".")
        by_module.setdefault(module, {})[f"m.{fld}"] = value
    out = {}
    for module, fields in by_module.items():
        holder = torch.nn.Module()
        holder.m = copy.deepcopy(model.get_submodule(module))  # one nn.Linear
        add_adapters(holder, kind, r"^m$", rank, svd_cache=svd_cache)
        load_adapter_state(holder, fields)
        out[f"{module}.weight"] = adapter_deltas(holder)["m.weight"]
    return out


# ----------------------------------------------------------------------------------------------------------
# Transfer
# ----------------------------------------------------------------------------------------------------------


PROJECTION_NAMES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                    "intermediate.dense", "output.dense")


def adapter_names(cfg: TaskConfig) -> list[str]:
    """Weight names of the source layers the adapters sit on (``encoder.layer.4.attention.self.query.weight``, …)."""
    import re

    rx = re.compile(cfg.pattern())
    names = [f"encoder.layer.{i}.{p}" for i in cfg.adapted_layers for p in PROJECTION_NAMES]
    return [n + ".weight" for n in names if rx.search(n)]


def _weight(model: MiniLM, name: str) -> torch.Tensor:
    return model.get_parameter(name).detach()


class ModelBases:
    """Top-r bases of a model's weights in float64, computed once per weight (SVDs dominate the cost).

    ``model`` is a :class:`MiniLM` or an open :class:`~lorax_ref.files.checkpoints.Checkpoint` (read layer by layer).
    Weights with identical bytes share one decomposition (``shared``, e.g. the unpruned layers of a pruned copy).
    """

    def __init__(self, model, r: int, shared: dict | None = None, device: torch.device | str = "cpu"):
        self.model, self.r, self._cache, self.device = model, r, {}, torch.device(device)
        self._shared = {} if shared is None else shared
        self.n_layers = model.cfg.n_layers if isinstance(model, MiniLM) else \
            1 + max(int(k.split(".")[2]) for k in model if k.startswith("encoder.layer."))

    def weight(self, name: str) -> torch.Tensor:
        """The float weight ``name`` of the model or checkpoint, ``(out, in)``."""
        return _weight(self.model, name) if isinstance(self.model, MiniLM) else self.model.get(name)

    def __call__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._cache:
            W = self.weight(name).double()  # (m, n)
            key = (hashlib.sha256(W.numpy().tobytes()).hexdigest(), self.r, str(self.device))
            if key not in self._shared:
                U, _, V = svd_topk(W.to(self.device), self.r)  # (m, r), (n, r)
                self._shared[key] = (U, V)
            self._cache[name] = self._shared[key]
        return self._cache[name]


def phi_pair(bases_s: ModelBases, name_s: str, bases_t: ModelBases, name_t: str) -> tuple[float | None, float | None]:
    """(Φ_U, Φ_V) of Eq. (4) between two weights; None on a side whose dimensions differ."""
    (U_s, V_s), (U_t, V_t) = bases_s(name_s), bases_t(name_t)
    phi_u = subspace_similarity(U_s, U_t) if U_s.shape[0] == U_t.shape[0] else None
    phi_v = subspace_similarity(V_s, V_t) if V_s.shape[0] == V_t.shape[0] else None
    return phi_u, phi_v


def match_layers(bases_s: ModelBases, bases_t: ModelBases, names: list[str]) -> dict[str, tuple[str, float]]:
    """Each source weight → the target weight of the same projection with the highest mean Φ (Eq. (4)).

    A target of the same depth keeps the same name; a shallower one (L3) tries each of its layers.
    """
    n_s, n_t = bases_s.n_layers, bases_t.n_layers
    out = {}
    for name in names:
        proj = name.split(".", 3)[3]
        candidates = [name] if n_s == n_t else [f"encoder.layer.{j}.{proj}" for j in range(n_t)]
        scored = []
        for cand in candidates:
            phis = [p for p in phi_pair(bases_s, name, bases_t, cand) if p is not None]
            scored.append((float(np.mean(phis)), cand))
        phi, cand = max(scored, key=lambda t: t[0])  # first best on ties: deterministic
        out[name] = (cand, phi)
    return out


RULES = {"lorax": "Eq. (3); §4.2.2 where shapes differ", "copy": "no-rotation ablation (Table 5)"}


def transfer_deltas(deltas: dict[str, torch.Tensor], bases_s: ModelBases, bases_t: ModelBases,
                    matching: dict[str, tuple[str, float]], method: str = "lorax") -> dict[str, torch.Tensor]:
    """Move each ΔW_s onto its matched target weight (float64 math, the result in ΔW_s's dtype).

    ``method="lorax"``: Eq. (3) ``transfer_same_dim`` for equal shapes, §4.2.2 ``transfer_mismatch`` otherwise
    (exactly what ``transfer_layer(method="auto")`` does, with the bases computed once).
    ``method="copy"``: ``copy_sigma_transfer(U_t, C_s, V_t)`` with ``C_s = Ū_sᵀ ΔW_s V̄_s``.
    Updates landing on the same target weight add up.
    """
    if method not in RULES:
        raise LoraxInputError(f"method must be one of {list(RULES)}, got {method!r}")
    out: dict[str, torch.Tensor] = {}
    for name, dW_s in deltas.items():
        tname = matching[name][0]
        (U_s, V_s), (U_t, V_t) = bases_s(name), bases_t(tname)
        dW = dW_s.to(U_s.device, torch.float64)  # (m_s, n_s)
        if method == "copy":
            C_s = U_s.T @ dW @ V_s  # (r, m_s) @ (m_s, n_s) @ (n_s, r) -> (r, r)
            dW_t = copy_sigma_transfer(U_t, C_s, V_t)  # (m_t, n_t)
        elif dW.shape == (U_t.shape[0], V_t.shape[0]):
            dW_t = transfer_same_dim(dW, U_t, V_t)  # (m, n)
        else:
            dW_t = transfer_mismatch(dW, U_s, V_s, U_t, V_t)  # (m_t, n_t)
        out[tname] = out.get(tname, 0) + dW_t.to(dW_s.dtype).cpu()
    return out


# ----------------------------------------------------------------------------------------------------------
# The fine-tuned target: L6 fully fine-tuned, briefly, on headline → lead retrieval
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig:
    """A short full fine-tune of all-MiniLM-L6-v2 (the SD-1.5 → SD Eff-v1.0 setting of the paper).

    Task: match each headline with the first ``lead_tokens`` tokens of its own article among the other
    leads of the batch (in-batch negatives, symmetric InfoNCE, the sentence-transformers recipe). It
    is topic-agnostic and uses only pool articles (never the eval headlines). Every encoder weight
    and LayerNorm trains; the token/position embedding tables stay frozen (their gradient is mostly
    zero and Adam over 12 M rows would dominate the cost). Fixed batches, in the task's dtype
    (float64): the same model on every CPU.
    """

    steps: int = 12
    batch: int = 16
    lr: float = 1e-3  # moves the encoder weights by 4-10 % (Φ ≥ 0.97 at r = 128): a real, if short, fine-tune
    lead_tokens: int = 24
    temperature: float = 0.05
    seed: int = 0

    def digest(self) -> str:
        """A short hash of the recipe (names the cached fine-tuned model)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def finetune_l6(ft: FinetuneConfig, cfg: TaskConfig, base: MiniLM | None = None) -> MiniLM:
    """Run the fine-tune of :class:`FinetuneConfig` from the packaged L6 (or ``base``); returns a new model."""
    model = merged(base if base is not None else MiniLM.from_checkpoint("minilm-l6"), {}).to(cfg.torch_dtype)
    model.requires_grad_(True)
    for emb in (model.embeddings.word_embeddings, model.embeddings.position_embeddings,
                model.embeddings.token_type_embeddings):
        emb.requires_grad_(False)
    h = load_headlines(cfg)
    articles = load_bbc()
    by_title = {a.title: a for a in articles}
    rng = np.random.Generator(np.random.PCG64(ft.seed))
    order = rng.permutation(h.pool_idx)[: ft.steps * ft.batch]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=ft.lr)
    for step in range(ft.steps):
        idx = order[step * ft.batch:(step + 1) * ft.batch]
        titles = [h.titles[i] for i in idx]
        leads = [by_title[t].body for t in titles]
        q = model(*tokenize(titles, cfg.max_tokens))  # (B, h)
        d = model(*tokenize(leads, ft.lead_tokens))  # (B, h)
        logits = q @ d.T / ft.temperature  # (B, B); the diagonal holds the true pairs
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def cache_dir() -> Path:
    """Where the fine-tuned L6 is kept: ``models/`` under :func:`lorax_ref.files.cache.cache_root`
    (``$LORAX_CACHE_DIR`` or ``~/.cache/lorax_ref``)."""
    import tempfile

    from ..files.cache import cache_root

    models = cache_root() / "models"
    try:
        models.mkdir(parents=True, exist_ok=True)
        return models
    except OSError:  # a read-only home (some CI runners): fall back to the temp dir
        return Path(tempfile.gettempdir()) / "lorax_ref" / "models"


def finetuned_l6(ft: FinetuneConfig, cfg: TaskConfig) -> MiniLM:
    """The fine-tuned target, from the local cache when this recipe was already run, else trained now.

    The weights are never committed: the recipe (:class:`FinetuneConfig`) is the artefact.
    """
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"minilm-l6-ft-{ft.digest()}-{cfg.digest()}.safetensors"
    if path.is_file():
        model = MiniLM.from_checkpoint("minilm-l6").to(cfg.torch_dtype)
        model.load_state_dict(load_file(str(path)))
        return model
    model = finetune_l6(ft, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return model


# ----------------------------------------------------------------------------------------------------------
# The whole experiment: models, adapters, the table
# ----------------------------------------------------------------------------------------------------------

PRUNE_KEEP = 1152  # FFN neurons kept per layer in the pruned target (of 1536): a 25 % structural cut
TARGETS = {
    "int8": "L6 int8 (quantized release)",
    "finetuned": "L6 fine-tuned (headline→lead, 12 steps)",
    "l3": "paraphrase-MiniLM-L3 (3 layers, matched by Φ)",
    "pruned": f"L6 pruned (FFN 1536→{PRUNE_KEEP})",
}
VARIANTS = {
    "base": "target base alone",
    "lorax_transferred": "LoRA-X transferred (Eq. 3)",
    "lorax_trained": "LoRA-X trained on target",
    "lorax_copy": "no-rotation ablation",
    "lora_transferred": "plain LoRA transferred",
    "lorax_as_is": "LoRA-X ΔW_s added as is (no transfer)",
}
ADAPTER_FILE = ADAPTER_DIR / "bbc_headlines.safetensors"
RESULTS_FILE = ADAPTER_DIR / "bbc_headlines_results.json"


def build_models(cfg: TaskConfig, ft: FinetuneConfig) -> dict[str, MiniLM]:
    """The source (packaged L6) and the four targets of the paper's settings."""
    source = MiniLM.from_checkpoint("minilm-l6").to(cfg.torch_dtype)  # float32 → float64 is exact
    return {
        "source": source,
        "int8": MiniLM.from_checkpoint("minilm-l6-int8").to(cfg.torch_dtype),
        "finetuned": finetuned_l6(ft, cfg),
        "l3": MiniLM.from_checkpoint("minilm-l3").to(cfg.torch_dtype),
        "pruned": prune_ffn(source, PRUNE_KEEP)[0],
    }


def train_all(models: dict[str, MiniLM], h: Headlines, cfg: TaskConfig, log=print) -> dict[str, dict[str, torch.Tensor]]:
    """Every adapter of the table: on the source LoRA-X and LoRA per seed; on each target LoRA-X per seed,
    on the modules the transfer writes to. Keys ``"<model>/<kind>/seed<k>"``."""
    names = adapter_names(cfg)
    shared: dict = {}
    bases = {k: ModelBases(m, cfg.r, shared) for k, m in models.items()}
    out = {}
    for seed in cfg.seeds:
        for kind in ("lorax", "lora"):
            out[f"source/{kind}/seed{seed}"] = train_adapter(models["source"], h, cfg, kind, seed)
            log(f"trained source/{kind}/seed{seed}")
    for target in TARGETS:
        matching = match_layers(bases["source"], bases[target], names)
        modules = sorted({t[: -len(".weight")] for t, _ in matching.values()}, key=natural_key)
        cache: dict = {}
        for seed in cfg.seeds:
            out[f"{target}/lorax/seed{seed}"] = train_adapter(models[target], h, cfg, "lorax", seed, modules, cache)
            log(f"trained {target}/lorax/seed{seed}")
    return out


def evaluate_all(models: dict[str, MiniLM], adapters: dict[str, dict[str, torch.Tensor]], h: Headlines,
                 cfg: TaskConfig, log=lambda msg: None) -> dict:
    """mAP of every cell of the table, per seed, plus the Φ matching used for each target.

    Besides the variants of the paper, ``as_is`` adds the source ΔW_s to the target without any transfer
    (for the pruned target: restricted to the FFN neurons that survived), which tells a transfer that
    loses the update from a target on which the very same update no longer works.
    """
    names = adapter_names(cfg)
    shared: dict = {}  # one SVD per distinct weight, shared by ModelBases and the adapters' frozen bases
    bases = {k: ModelBases(m, cfg.r, shared) for k, m in models.items()}
    src = models["source"]
    ev_s = Evaluator(src, h, _first_layer(names))
    source_deltas = {(kind, s): deltas_from_state(src, adapters[f"source/{kind}/seed{s}"], kind, cfg, shared)
                     for kind in ("lorax", "lora") for s in cfg.seeds}
    results = {"source": {"base": [ev_s.score()] * len(cfg.seeds),
                          "lorax_trained": [ev_s.score(source_deltas["lorax", s]) for s in cfg.seeds],
                          "lora_trained": [ev_s.score(source_deltas["lora", s]) for s in cfg.seeds]}}
    log("source scored")
    kept = prune_ffn(src, PRUNE_KEEP)[1] if "pruned" in models else {}
    matchings = {}
    for target in TARGETS:
        tgt = models[target]
        matching = match_layers(bases["source"], bases[target], names)
        matchings[target] = {k: [v[0], round(v[1], 6)] for k, v in matching.items()}
        ev = Evaluator(tgt, h, _first_layer([t for t, _ in matching.values()]))
        row = {"base": [ev.score()] * len(cfg.seeds)}
        for variant, kind, method in (("lorax_transferred", "lorax", "lorax"), ("lorax_copy", "lorax", "copy"),
                                      ("lora_transferred", "lora", "lorax")):
            row[variant] = [ev.score(transfer_deltas(source_deltas[kind, s], bases["source"], bases[target],
                                                     matching, method)) for s in cfg.seeds]
        row["lorax_trained"] = [ev.score(deltas_from_state(tgt, adapters[f"{target}/lorax/seed{s}"], "lorax",
                                                           cfg, shared)) for s in cfg.seeds]
        row["lorax_as_is"] = [ev.score(_as_is(source_deltas["lorax", s], matching, kept if target == "pruned" else None))
                              for s in cfg.seeds]
        results[target] = row
        log(f"{target} scored")
    return {"map": results, "matching": matchings}


def _as_is(deltas: dict[str, torch.Tensor], matching: dict, kept: dict | None) -> dict[str, torch.Tensor]:
    """Source updates added unchanged to the matched target weights (pruned FFN: surviving neurons only)."""
    out: dict[str, torch.Tensor] = {}
    for name, dW in deltas.items():
        tname = matching[name][0]
        if kept:
            idx = kept[int(name.split(".")[2])]
            if name.endswith("intermediate.dense.weight"):
                dW = dW[idx]  # (k, h): rows of the kept neurons
            elif name.endswith(".output.dense.weight") and "attention" not in name:
                dW = dW[:, idx]  # (h, k)
        out[tname] = out.get(tname, 0) + dW
    return out


def save_adapters(adapters: dict[str, dict[str, torch.Tensor]], cfg: TaskConfig, ft: FinetuneConfig,
                  path: Path = ADAPTER_FILE) -> None:
    """One safetensors file: keys ``"<model>/<kind>/seed<k>/<module>.<field>"``, configs in the metadata."""
    from safetensors.torch import save_file

    flat = {f"{key}/{field}": t.contiguous() for key, state in adapters.items() for field, t in state.items()}
    meta = {"task": json.dumps(asdict(cfg)), "finetune": json.dumps(asdict(ft)),
            "task_digest": cfg.digest(), "finetune_digest": ft.digest(), "torch": torch.__version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(path), metadata=meta)


def load_adapters(path: Path = ADAPTER_FILE) -> tuple[dict[str, dict[str, torch.Tensor]], TaskConfig, FinetuneConfig]:
    """Inverse of :func:`save_adapters`."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise LoraxInputError(f"no saved adapters at {path}; run scripts/train_bbc_adapters.py")
    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        for key in f.keys():  # noqa: SIM118 (a safetensors file, not a dict)
            model, kind, seed, field = key.split("/", 3)
            out.setdefault(f"{model}/{kind}/{seed}", {})[field] = f.get_tensor(key)
    cfg = _config_from_json(TaskConfig, meta["task"])
    ft = _config_from_json(FinetuneConfig, meta["finetune"])
    return out, cfg, ft


def _config_from_json(cls, text: str):
    raw = json.loads(text)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def summarize(results: dict) -> list[dict]:
    """Rows ``{model, variant, mean, std, n}`` of the table (std over seeds, ddof=1)."""
    rows = []
    for model, row in results["map"].items():
        for variant, values in row.items():
            v = np.asarray(values, dtype=float)
            rows.append({"model": model, "variant": variant, "mean": float(v.mean()),
                         "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)})
    return rows
