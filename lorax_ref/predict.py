r"""Predict a transfer before running it: what Eq. (3) will keep of an update, from Φ (Eq. (4)) and the bases.

One layer, top-r bases :math:`\bar U_s, \bar V_s` of the source weight and :math:`\bar U_t, \bar V_t` of the target
(``U_s``, ``V_s``, ``U_t``, ``V_t`` in code), and the r×r matrices of Eq. (3)'s rotation form:

.. math::

    R_u = \bar U_t^\top \bar U_s, \quad R_v = \bar V_s^\top \bar V_t, \qquad
    a_k = \lVert \bar U_t^\top u_{s,k} \rVert^2, \quad b_k = \lVert \bar V_t^\top v_{s,k} \rVert^2, \qquad
    \Phi_U = \tfrac1r \textstyle\sum_k a_k, \quad \Phi_V = \tfrac1r \sum_k b_k \quad \text{(Eq. (4))}

(:math:`a_k` are the squared column norms of :math:`R_u`, :math:`b_k` the squared row norms of :math:`R_v`).
A LoRA-X update :math:`\Delta W_s = \bar U_s \Delta\Sigma_s \bar V_s^\top` (Eq. (1)) keeps, through Eq. (3),

.. math:: \kappa(\Delta\Sigma_s) = \frac{\lVert \bar U_t^\top \Delta W_s \bar V_t\rVert_F^2}{\lVert \Delta W_s\rVert_F^2}
          = \frac{\lVert R_u\,\Delta\Sigma_s R_v\rVert_F^2}{\lVert \Delta\Sigma_s\rVert_F^2}

of its energy. Averaged over random :math:`\Delta\Sigma_s` with i.i.d. zero-mean entries (the proof is in
notebook 11, ``11_should_i_transfer.ipynb``):

* a **full** r×r :math:`\Delta\Sigma_s` keeps :math:`\Phi_U\Phi_V` (:func:`expected_kept_energy`, ``diagonal=False``);
* a **diagonal** one keeps :math:`E_\Phi = \frac1r\sum_k a_k b_k = \Phi_U\Phi_V + \mathrm{cov}_k(a_k, b_k)`, which lies
  in :math:`[\max(0, \Phi_U + \Phi_V - 1),\ \min(\Phi_U, \Phi_V)]`;
* one given :math:`\Delta\Sigma_s` keeps between :math:`\sigma_{\min}(R_u)^2\sigma_{\min}(R_v)^2` and
  :math:`\sigma_{\max}(R_u)^2\sigma_{\max}(R_v)^2` (:func:`kept_energy_range`).

Unrelated r-dimensional subspaces of an m-dimensional space have :math:`a_k \approx r/m` (the random level of Φ),
so they keep about :math:`r^2/(mn)`. :func:`predict_transfer` (``python -m lorax_ref transfer --dry-run``)
reports, per layer, Φ_U, Φ_V, this expectation, the exact kept energy of a given adapter
(:math:`\lVert \bar U_t^\top \Delta W_s \bar V_t\rVert^2` from its factors, no m×n product), the gate decision and a
verdict.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from . import checks
from .checks import checked
from .files.adapters import AdapterError, LoraLayer
from .files.transfer import BaseIndex, _plan_layer, transfer_settings
from .core import _gate_phi, subspace_similarity, transfer_case
from .errors import LoraxInputError
from .linalg import spectrum_warnings

__all__ = ["overlaps", "expected_kept_energy", "kept_energy_range", "predict_transfer", "Prediction",
           "PredictionRow", "RECOMMENDED_THRESHOLD"]

# The gate this package recommends: min(Φ_U, Φ_V) >= 0.8 (--side both). Notebook 11 shows where it comes from:
# on the packaged pairs every layer that helped had min Φ >= 0.896 and every layer of the pair that hurt <= 0.352,
# so any value in between separates them; 0.8 (ProLoRA's) promises an expected kept energy >= 2·0.8 - 1 = 0.6.
RECOMMENDED_THRESHOLD = 0.8
UNRELATED_EXCESS = 0.1  # Φ less than 10 % of the way from the random level r/d to 1: unrelated subspaces
LARGE_RANK = 0.5  # r/d at or above this: Φ >= r/d even for unrelated subspaces, the gate says little
SAME_SPECTRUM = 1e-4  # relative change of the top-r singular values below which two spectra "agree" (float32 storage
# of a rotated copy moves them by ~1e-7, int8 quantization by ~3e-4)


# ---------------------------------------------------------------------------------------------------------
# One layer: the expectation from the bases
# ---------------------------------------------------------------------------------------------------------


def _check_overlaps(U_s, U_t) -> None:
    checks.same_device(U_s=U_s, U_t=U_t)
    checks.basis("U_s", U_s)
    checks.basis("U_t", U_t, rows=U_s.shape[0])
    checks.same_dtype(U_s=U_s, U_t=U_t)


def _check_expected(U_s, V_s, U_t, V_t, diagonal) -> None:
    _check_overlaps(U_s, U_t)
    _check_overlaps(V_s, V_t)
    checks.same_rank(U_s=U_s, V_s=V_s)


def _check_four(U_s, V_s, U_t, V_t) -> None:
    """Top-r bases of a source and a target layer with the same dimensions: one device, one dtype, one rank."""
    checks.same_device(U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t)
    for name, X, rows in (("U_s", U_s, None), ("V_s", V_s, None), ("U_t", U_t, U_s.shape[0]), ("V_t", V_t, V_s.shape[0])):
        checks.basis(name, X, rows=rows)
    checks.same_dtype(U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t)
    checks.same_rank(U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t)


@checked(_check_overlaps)
def overlaps(U_s: torch.Tensor, U_t: torch.Tensor) -> torch.Tensor:
    r""":math:`a_k = \lVert \bar U_t^\top u_{s,k}\rVert^2` for k = 1..r: the share of the k-th source direction that
    the target's subspace keeps (``a.mean()`` is Φ of Eq. (4)). Returns ``(r_s,)``."""
    return (U_t.T @ U_s).double().pow(2).sum(0)  # (r_t, m) @ (m, r_s) -> (r_t, r_s) -> (r_s,)


@checked(_check_expected)
def expected_kept_energy(U_s: torch.Tensor, V_s: torch.Tensor, U_t: torch.Tensor, V_t: torch.Tensor,
                         diagonal: bool = True) -> float:
    r"""Expected kept energy of Eq. (3) for a random LoRA-X update with i.i.d. zero-mean :math:`\Delta\Sigma_s`.

    .. math:: \text{diagonal: } \frac1r\sum_{k=1}^r a_k b_k, \qquad \text{full: } \Phi_U\,\Phi_V

    Both are ratios of expectations :math:`E\lVert R_u\Delta\Sigma R_v\rVert^2 / E\lVert\Delta\Sigma\rVert^2`, and equal
    the expectation of the ratio when the entries are Gaussian.
    """
    a, b = overlaps.unchecked(U_s, U_t), overlaps.unchecked(V_s, V_t)  # (r,), (r,)
    if diagonal:
        return float((a * b).mean())
    return float(a.mean() * b.mean())


@checked(_check_four)
def kept_energy_range(U_s: torch.Tensor, V_s: torch.Tensor, U_t: torch.Tensor, V_t: torch.Tensor) -> tuple[float, float]:
    r"""The least and the most any LoRA-X update can keep through Eq. (3):
    :math:`\big(\sigma_{\min}(R_u)^2\sigma_{\min}(R_v)^2,\ \sigma_{\max}(R_u)^2\sigma_{\max}(R_v)^2\big)`, i.e. the squared
    cosines of the largest and of the smallest principal angles, multiplied over the two sides."""
    s_a = torch.linalg.svdvals((U_t.T @ U_s).double())  # (r,) of R_u: cosines of the principal angles, left
    s_b = torch.linalg.svdvals((V_s.T @ V_t).double())  # (r,) of R_v, right
    return float(s_a.min() ** 2 * s_b.min() ** 2), float(s_a.max() ** 2 * s_b.max() ** 2)


# ---------------------------------------------------------------------------------------------------------
# One layer: the exact kept energy of a given update, from its factors
# ---------------------------------------------------------------------------------------------------------


def _lora_energy(L: torch.Tensor, R: torch.Tensor) -> float:
    r""":math:`\lVert L R\rVert_F^2` through two thin QRs: :math:`LR = Q_L (T_L T_R^\top) Q_R^\top`, a k×k product."""
    T_L = torch.linalg.qr(L, mode="r")[1]  # (k, k) when m >= k
    T_R = torch.linalg.qr(R.T, mode="r")[1]  # (k, k)
    return float((T_L @ T_R.T).pow(2).sum())


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``x / ‖x‖_F`` (x itself when zero): energy ratios are then computed without overflow or underflow."""
    norm = x.norm()
    return x / norm if bool(norm > 0) and bool(torch.isfinite(norm)) else x


def _kept(layer, case: str, U_s, V_s, U_t, V_t, dev) -> tuple[float, float]:
    r"""(kept energy, ‖ΔW_s‖²) of one adapter layer: :math:`\lVert X^\top\Delta W_s Y\rVert^2/\lVert\Delta W_s\rVert^2`
    with :math:`(X, Y) = (U_t, V_t)` for Eq. (3) and :math:`(\bar U_s, \bar V_s)` for the copy / §4.2.2 rules, which
    write :math:`U_t C_s V_t^\top` with :math:`C_s = \bar U_s^\top \Delta W_s \bar V_s`."""
    X, Y = (U_t, V_t) if case == "same_dim" else (U_s, V_s)  # (m, r), (n, r)
    if isinstance(layer, LoraLayer):
        L, R = layer.stored_factors(torch.float64, dev)  # (m, k), (k, n): ΔW_s = s·L R
        energy = layer.scale ** 2 * float(L.norm()) ** 2 * float(R.norm()) ** 2  # rescaled below
        L, R = _unit(L), _unit(R)
        total = _lora_energy(L, R)  # ‖LR‖² of the unit factors
        C = (X.T @ L) @ (R @ Y)  # (r, m) @ (m, k) @ (k, n) @ (n, r) -> (r, r)
        return (float(C.pow(2).sum()) / total if total > 0 else math.nan), energy * total
    D = _unit(checks.as_full_sigma(layer.dSigma.to(dev, torch.float64)))  # (r, r)
    energy = float(layer.dSigma.double().pow(2).sum())
    total = float(D.pow(2).sum())  # = ‖ΔW_s‖² / ‖ΔΣ‖² = 1 (Ū_s, V̄_s orthonormal)
    if case != "same_dim":
        return (1.0 if total > 0 else math.nan), energy  # C_s = ΔΣ_s: copied, energy kept by construction
    C = (U_t.T @ U_s) @ D @ (V_s.T @ V_t)  # Eq. (3) rotation form R_u ΔΣ_s R_v: (r, r) @ (r, r) @ (r, r)
    return (float(C.pow(2).sum()) / total if total > 0 else math.nan), energy


# ---------------------------------------------------------------------------------------------------------
# Rows, verdicts, the whole adapter
# ---------------------------------------------------------------------------------------------------------


VERDICTS = {
    "transfer": "Eq. (3): both sides share their top-r subspaces (min Φ >= 0.8)",
    "partial": "Eq. (3) keeps part of the update (min Φ below 0.8, above the random level)",
    "unrelated": "a side is at the random level of Φ (r/d): Eq. (3) keeps about what unrelated subspaces keep",
    "rotated?": "Φ is low but the top-r singular values agree: maybe the source in rotated coordinates (try --method copy)",
    "r too big": "r >= d/2 on a compared side: Φ >= r/d even for unrelated subspaces, the gate says little",
    "index-paired": "copy / §4.2.2: energy kept by construction, directions paired by index (check on data)",
}


@dataclass
class PredictionRow:
    """One line of the dry-run report."""

    module: str  # as in the adapter (the source weight stem without an adapter)
    source_weight: str
    target_weight: str
    shape_s: tuple
    shape_t: tuple
    r: int
    case: str  # "same_dim" (Eq. (3)), "mismatch" (§4.2.2) or "copy"
    phi_u: float | None
    phi_v: float | None
    phi: float | None  # what the gate compares (side)
    gated: bool
    random_u: float | None  # r / m, the random level of Φ_U (None when m differs)
    random_v: float | None  # r / n
    expected_kept: float  # E over random diagonal ΔΣ_s: (1/r) Σ a_k b_k (Eq. (3)), 1 for copy / §4.2.2
    expected_kept_full: float | None  # E over random full ΔΣ_s: Φ_U Φ_V (Eq. (3) only)
    kept_energy: float | None  # exact, this adapter, with the gate applied (None without an adapter)
    kept_ungated: float | None  # exact, this adapter, were the layer not gated
    sigma_rel_diff: float | None  # ‖σ_t − σ_s‖ / ‖σ_s‖ over the top r
    verdict: str
    warnings: tuple = ()
    update_energy: float | None = None  # ‖ΔW_s‖²_F (weights the total)

    def as_dict(self) -> dict:
        """The row as a JSON-ready dict (NaN and Inf become None)."""
        d = dict(asdict(self), warnings=list(self.warnings))
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _excess(phi: float | None, level: float | None) -> float | None:
    """How far Φ is from the random level toward 1: 0 for unrelated subspaces, 1 for shared ones."""
    if phi is None or level is None or level >= 1:
        return None
    return (phi - level) / (1 - level)


def _verdict(case, phi_u, phi_v, rho_u, rho_v, sigma_diff) -> str:
    """What this package advises for one layer (whatever gate the run uses; see :data:`VERDICTS`)."""
    if case != "same_dim":
        return "index-paired"
    excess = [e for e in (_excess(phi_u, rho_u), _excess(phi_v, rho_v)) if e is not None]
    low_phi = bool(excess) and min(excess) < UNRELATED_EXCESS
    same_spectrum = sigma_diff is not None and sigma_diff < SAME_SPECTRUM
    if low_phi:
        return "rotated?" if same_spectrum else "unrelated"
    if max(rho_u, rho_v) >= LARGE_RANK:
        return "r too big"
    if min(phi_u, phi_v) >= RECOMMENDED_THRESHOLD:
        return "transfer"
    return "rotated?" if same_spectrum else "partial"


@dataclass(frozen=True)
class _Run:
    """What every layer of one prediction shares: the two bases, the settings, the cache and the device."""

    idx_s: BaseIndex
    idx_t: BaseIndex
    sha_s: str
    sha_t: str
    r: int
    threshold: float | None
    side: str
    method: str
    cache: object
    dev: torch.device


def _predict_one(layer, plan, run: _Run) -> PredictionRow:
    """The row of one layer (``layer=None``: a weight without an adapter) under the plan ``_plan_layer`` made."""
    stem_s, stem_t, shape_s, shape_t = plan
    r, dev, bases = run.r, run.dev, run.cache.bases_and_next
    U_s, S_s, V_s, next_s = bases(run.sha_s, stem_s, r, lambda: run.idx_s.load(stem_s), device=dev)  # (m_s, r), (r,), (n_s, r)
    U_t, S_t, V_t, next_t = bases(run.sha_t, stem_t, r, lambda: run.idx_t.load(stem_t), device=dev)  # (m_t, r), (r,), (n_t, r)
    warnings = (spectrum_warnings(f"source weight {stem_s!r}", S_s, next_s, shape_s, torch.float64)
                + spectrum_warnings(f"target weight {stem_t!r}", S_t, next_t, shape_t, torch.float64))
    same_u, same_v = shape_s[0] == shape_t[0], shape_s[1] == shape_t[1]
    phi_u = subspace_similarity.unchecked(U_s, U_t) if same_u else None  # Eq. (4), as the transfer computes it
    phi_v = subspace_similarity.unchecked(V_s, V_t) if same_v else None  # (bases of svd_topk, digest-checked by the cache)
    phi = _gate_phi(phi_u, phi_v, run.side)
    gated = run.threshold is not None and phi < run.threshold
    case = transfer_case(run.method, shape_s, shape_t)
    if case == "same_dim":
        a, b = overlaps.unchecked(U_s, U_t), overlaps.unchecked(V_s, V_t)  # (r,), (r,)
        expected, expected_full = float((a * b).mean()), float(a.mean() * b.mean())
    else:
        expected, expected_full = 1.0, None  # U_t C_s V_tᵀ with C_s = ΔΣ_s: ‖ΔW_t‖ = ‖ΔΣ_s‖
    ungated, energy = (None, None) if layer is None else _kept(layer, case, U_s, V_s, U_t, V_t, dev)
    kept = 0.0 if gated and ungated is not None else ungated  # a gated layer gets no update
    norm_s = float(S_s.norm())
    sigma_diff = float((S_t.double() - S_s.double()).norm()) / norm_s if norm_s > 0 else None
    rho_u, rho_v = (r / shape_t[0] if same_u else None), (r / shape_t[1] if same_v else None)
    return PredictionRow(
        module=stem_s if layer is None else layer.module, source_weight=stem_s + ".weight",
        target_weight=stem_t + ".weight", shape_s=shape_s, shape_t=shape_t, r=r, case=case, phi_u=phi_u, phi_v=phi_v,
        phi=phi, gated=bool(gated), random_u=rho_u, random_v=rho_v, expected_kept=expected,
        expected_kept_full=expected_full, kept_energy=kept, kept_ungated=ungated, sigma_rel_diff=sigma_diff,
        verdict=_verdict(case, phi_u, phi_v, rho_u, rho_v, sigma_diff), warnings=tuple(warnings),
        update_energy=energy)


@dataclass
class _Stem:
    """A weight to predict for without an adapter (what :func:`_plan_layer` needs of a layer)."""

    module: str


def _stems(idx_s: BaseIndex, idx_t: BaseIndex, layer_map: dict, modules: str | None, r: int) -> tuple[list, dict]:
    """Source weights to predict for without an adapter: every one (matching ``modules``) that the target has,
    after ``layer_map``, with min(m, n) >= r on both sides. Returns them and the counts of those skipped."""
    try:
        regex = re.compile(modules) if modules is not None else None
    except (re.error, TypeError) as exc:
        raise AdapterError(f"the module pattern {modules!r} is not a valid regular expression ({exc})") from None
    chosen, skipped = [], {"not in the target": 0, "narrower than r": 0}
    for stem in sorted(idx_s.stems):
        if regex is not None and not regex.search(stem):
            continue
        stem_t = layer_map.get(stem, stem)
        if stem_t not in idx_t.stems:
            skipped["not in the target"] += 1
        elif min(*idx_s.shape(stem), *idx_t.shape(stem_t)) < r:
            skipped["narrower than r"] += 1
        else:
            chosen.append(_Stem(stem))
    if not chosen:
        what = f"matching {modules!r} " if modules is not None else ""
        raise AdapterError(f"no source weight {what}has a counterpart of width >= r = {r} in the target "
                           f"({skipped['not in the target']} not in the target, {skipped['narrower than r']} narrower "
                           "than r); map them with --layer-map or lower --rank")
    return chosen, skipped


def predict_transfer(
    adapter,
    source,
    target,
    *,
    r: int | None = None,
    threshold: float | None = None,
    side: str = "both",
    method: str = "auto",
    out_format: str = "auto",
    layer_map: dict[str, str] | None = None,
    modules: str | None = None,
    cache=None,
    ignore_base_hash: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> "Prediction":
    r"""What :func:`lorax_ref.files.transfer.transfer_adapter` would do, computed but not done (nothing is written).

    With an ``adapter``: the same checks and the same gate decisions as the transfer, and the exact kept energy
    of each layer, :math:`\lVert U_t^\top\Delta W_s V_t\rVert^2/\lVert\Delta W_s\rVert^2` (Eq. (3)) or
    :math:`\lVert\bar U_s^\top\Delta W_s\bar V_s\rVert^2/\lVert\Delta W_s\rVert^2` (copy, §4.2.2), from the adapter's
    factors. With ``adapter=None``: the source weights matching the regular expression ``modules`` (default: all)
    that the target has, and the expectation for a random LoRA-X update (:func:`expected_kept_energy`).
    ``cache`` is only read from when it is ``read_only`` (the command line's dry run).
    """
    from .files.cache import BasisCache

    cache = cache if cache is not None else BasisCache(None)
    st, layer_map = transfer_settings(
        adapter, source, r, threshold, side, method, out_format, layer_map, device, ignore_base_hash)
    if modules is not None and adapter is not None:
        raise AdapterError("modules selects weights only for a prediction without an adapter")
    idx_s, idx_t = BaseIndex(source), BaseIndex(target)
    skipped: dict = {}
    if adapter is None:
        layers, skipped = _stems(idx_s, idx_t, layer_map, modules, st.r)  # stems, read as LoRA-X names
    else:
        layers = adapter.layers
    seen: dict[str, str] = {}
    plans = [_plan_layer(layer, st, idx_s, idx_t, layer_map, seen) for layer in layers]
    run = _Run(idx_s, idx_t, source.sha256, target.sha256, st.r, st.threshold, st.side, st.method, cache, st.device)
    rows = []
    with tqdm(layers, desc="dry run", unit="layer", leave=False, disable=None if progress else True) as bar:
        for layer, plan in zip(bar, plans):
            try:
                rows.append(_predict_one(None if adapter is None else layer, plan, run))
            except LoraxInputError as exc:
                raise type(exc)(f"layer {layer.module!r}: {exc}") from None
    return Prediction(rows, _info(adapter, source, target, run, modules, skipped), with_adapter=adapter is not None)


def _info(adapter, source, target, run: _Run, modules: str | None, skipped: dict) -> dict:
    """The header of a prediction's report: inputs, settings, skipped weights, cache use."""
    cache = run.cache
    return {
        "tool": "lorax_ref transfer --dry-run",
        "input": None if adapter is None else {"format": adapter.format,
                                               "path": str(adapter.path) if adapter.path else None},
        "source_base": {"path": str(source.path), "sha256": source.sha256},
        "target_base": {"path": str(target.path), "sha256": target.sha256},
        "settings": {"r": run.r, "threshold": run.threshold, "side": run.side, "method": run.method,
                     "device": str(run.dev), "compute_dtype": "float64", "modules": modules},
        "skipped": skipped,
        "cache": {"enabled": cache.enabled, "read_only": getattr(cache, "read_only", False), "hits": cache.hits,
                  "misses": cache.misses},
    }


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


@dataclass
class Prediction:
    """The result of :func:`predict_transfer`: one row per layer, the run's settings, and whether an adapter was
    given (the exact kept energy) or not (the expectation only)."""

    rows: list[PredictionRow]
    info: dict
    with_adapter: bool

    def summary(self) -> dict:
        """Counts, means over the layers, the energy-weighted kept energy of the whole update, the recommendation."""
        rows = self.rows
        eq3 = [row for row in rows if row.case == "same_dim"]
        total = None
        if self.with_adapter:
            weights = [row.update_energy for row in rows]
            kept = [row.kept_energy for row in rows]
            if all(w is not None and math.isfinite(w) for w in weights) and sum(weights) > 0 and \
                    all(k is not None and math.isfinite(k) for k in kept):
                total = sum(k * w for k, w in zip(kept, weights)) / sum(weights)
        counts = {v: sum(row.verdict == v for row in rows) for v in VERDICTS}
        mins = [min(p for p in (row.phi_u, row.phi_v) if p is not None) for row in rows
                if row.phi_u is not None or row.phi_v is not None]
        return {
            "layers": len(rows),
            "eq3_layers": len(eq3),
            "gated": sum(row.gated for row in rows),
            "verdicts": {k: n for k, n in counts.items() if n},
            "min_phi": min(mins) if mins else None,
            "mean_phi_u": _mean([row.phi_u for row in rows]),
            "mean_phi_v": _mean([row.phi_v for row in rows]),
            "mean_expected_kept": _mean([row.expected_kept for row in rows]),
            "mean_kept_energy": _mean([row.kept_energy for row in rows]) if self.with_adapter else None,
            "total_kept_energy": total,
            "recommendation": self.recommendation(counts),
        }

    def recommendation(self, counts: dict | None = None) -> str:
        """One line: what to do with this pair (and adapter), from the verdicts of its layers."""
        rows = self.rows
        counts = counts or {v: sum(row.verdict == v for row in rows) for v in VERDICTS}
        n = len(rows)
        kept = [row.kept_ungated if self.with_adapter else row.expected_kept for row in rows]
        kept_mean = _mean(kept)
        kept_text = "?" if kept_mean is None else f"{100 * kept_mean:.0f} %"
        what = "this update" if self.with_adapter else "a LoRA-X update (expected)"
        gated = sum(row.gated for row in rows)
        tail = "" if not gated else f" ({gated} of {n} layers gated by --threshold)"
        if counts["index-paired"]:
            tail += (f"; {counts['index-paired']} layer(s) of different shape (or --method copy) pair directions by index "
                    "(§4.2.2): right only if the target's singular directions match the source's one to one, check on data")
        big = [row for row in rows if row.verdict == "r too big"]
        if big:
            d = min(min(row.shape_t) for row in big)
            return (f"choose a smaller --rank: r = {rows[0].r} is at least half of a {d}-wide side in {len(big)} of {n} "
                    f"layers, where even unrelated subspaces have Φ >= r/d; predict again with --rank <= {max(1, d // 4)}"
                    + tail)
        low = counts["unrelated"] + counts["rotated?"]
        eq3 = sum(row.case == "same_dim" for row in rows)
        if counts["rotated?"] and counts["rotated?"] >= max(1, eq3 // 2):
            return (f"do not use Eq. (3): Φ is low in {counts['rotated?']} of {n} layers although the top-r singular "
                    "values agree, as for the source in rotated coordinates (e.g. permuted neurons); --method copy is "
                    "exact for such a target, Eq. (3) keeps " + kept_text + " — confirm on data" + tail)
        if low and low >= max(1, eq3 // 2):
            return (f"do not transfer: {low} of {n} layers are at the random level of Φ (subspaces unrelated); Eq. (3) "
                    f"would keep {kept_text} of {what}; train an adapter on the target instead" + tail)
        if eq3 and counts["transfer"] == eq3:
            return (f"transfer: every Eq. (3) layer shares its top-r subspaces (min Φ >= {RECOMMENDED_THRESHOLD}); "
                    f"Eq. (3) keeps {kept_text} of {what} (kept energy is necessary, not sufficient: check on data)"
                    + tail)
        if eq3:
            return (f"transfer with a gate: {counts['transfer']} of {eq3} Eq. (3) layers have min(Φ_U, Φ_V) >= "
                    f"{RECOMMENDED_THRESHOLD} (--threshold {RECOMMENDED_THRESHOLD} --side both); the layers kept on "
                    f"average {kept_text} of {what}" + tail)
        return "no Eq. (3) layer" + tail.replace("; ", ": ", 1)

    def report(self) -> dict:
        """The JSON report of ``transfer --dry-run``: settings, summary and every row."""
        return {**self.info, "summary": self.summary(), "layers": [row.as_dict() for row in self.rows]}

    def table(self) -> str:
        """A fixed-width table: Φ per side, spectra, gate, expected and exact kept energy, verdict per layer."""
        def f(x, spec="6.3f"):
            width = int(spec.split(".")[0])
            return " " * (width - 1) + "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

        head = (f"{'layer':<50} {'shape':>10} {'Φ_U':>6} {'Φ_V':>6} {'r/d':>5} {'Δσ':>7} {'gate':<5} "
                f"{'E kept':>6} {'kept':>6}  verdict")
        lines = [head, "-" * len(head)]
        for row in self.rows:
            name = row.module if len(row.module) <= 50 else "…" + row.module[-49:]
            shape = "x".join(map(str, row.shape_t))
            rho = max(x for x in (row.random_u, row.random_v, 0.0) if x is not None)
            gate = "GATED" if row.gated else ("pass" if self.info["settings"]["threshold"] is not None else "-")
            lines.append(f"{name:<50} {shape:>10} {f(row.phi_u)} {f(row.phi_v)} {rho:5.2f} {f(row.sigma_rel_diff, '7.0e')} "
                         f"{gate:<5} {f(row.expected_kept)} {f(row.kept_energy)}  {row.verdict}")
        s = self.summary()
        lines.append("-" * len(head))
        total = "" if s["total_kept_energy"] is None else f", whole update {f(s['total_kept_energy']).strip()}"
        lines.append(f"{s['layers']} layers, r = {self.info['settings']['r']}: mean Φ_U {f(s['mean_phi_u']).strip()}, "
                     f"mean Φ_V {f(s['mean_phi_v']).strip()}; kept energy expected {f(s['mean_expected_kept']).strip()}"
                     + (f", this adapter {f(s['mean_kept_energy']).strip()}{total}" if self.with_adapter else "")
                     + (f"; {s['gated']} gated" if s["gated"] else ""))
        skipped = {k: v for k, v in self.info.get("skipped", {}).items() if v}
        if skipped:
            lines.append("skipped source weights: " + ", ".join(f"{v} {k}" for k, v in skipped.items()))
        lines += [f"warning: {row.module}: {w}" for row in self.rows for w in row.warnings]
        lines.append("recommendation: " + s["recommendation"])
        return "\n".join(lines)
