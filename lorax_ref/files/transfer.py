r"""The adapter-file transfer pipeline: every layer of a PEFT, kohya or LoRA-X file from a source checkpoint
to a target checkpoint (the fast path's streamed transfer of bare LoRA-X ΔΣ tensors is :mod:`lorax_ref.files.stream`).

How a transferred layer is written (all math by :mod:`lorax_ref.core`; only re-factorisation here):

* **Eq. (3)** on a plain LoRA keeps it low rank: :func:`lorax_ref.transfer_lora` gives
  :math:`B' = U_tU_t^\top B`, :math:`A' = A V_tV_t^\top`, same rank, same α, no (m, n) SVD.
* **copy** (Table 5) and **mismatch** (§4.2.2) give :math:`\Delta W_t = U_t\, C\, V_t^\top`. We read
  :math:`C = U_t^\top \Delta W_t V_t` (r×r), whose rank is at most the LoRA rank k (because
  :math:`C_s = \bar U_s^\top (sBA) \bar V_s`), take the SVD :math:`C = X S Y^\top` of that small matrix and
  write :math:`B' = U_t X_k S_k / s`, :math:`A' = (V_t Y_k)^\top` with the input's k and α (zero columns pad
  it when r < k), so the PEFT config and kohya α stay valid. Each written layer is checked against the
  reference ``ΔW_t`` in float64 before anything is saved.
* **LoRA-X output** stores the target coordinates :math:`\Delta\Sigma_{t\leftarrow s} = U_t^\top \Delta W_t V_t`
  (Eq. (3) rotation form: a full r×r matrix in general; the copy / mismatch rules keep a diagonal ΔΣ
  diagonal) and the sha256 of the target checkpoint.
* A layer the Eq. (4) gate rejects gets no update: it is left out of the written adapter (and named as
  gated in the report).

Layers are streamed one at a time through :func:`lorax_ref.core.transfer_layer_from_bases`; the bases come from
a :class:`lorax_ref.files.cache.BasisCache` (reference SVD, or the certified fast path with ``fast=True``).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import checks
from ..core import METHODS, SIDES, lorax_delta, transfer_layer_from_bases, transfer_lora
from ..device import parse_device
from ..errors import LoraxInputError
from ..linalg import spectrum_warnings
from .adapters import (KOHYA, LORAX, PEFT, PEFT_LORA_DEFAULTS, REFACTOR_RTOL, TRANSFORMERS_WEIGHTS, Adapter,
                       AdapterError, LoraLayer, LoraxLayer, _cast_output)

__all__ = ["BaseIndex", "LayerRow", "TransferResult", "peft_base_fields", "transfer_adapter", "transfer_settings"]


# ---------------------------------------------------------------------------------------------------------
# Base checkpoints (read through lorax_ref.files.checkpoints) and matching adapter layers to their weights
# ---------------------------------------------------------------------------------------------------------


def transformers_dir(checkpoint_path: str | os.PathLike) -> tuple[str | None, str | None]:
    """``(directory, model class)`` when ``transformers`` can load this base checkpoint from its directory.

    That needs ``config.json`` beside weights under the name ``from_pretrained`` looks for (``model.safetensors``,
    ``pytorch_model.bin``), as in a packaged model's installed folder; the class is the config's first
    ``architectures`` entry (None if it names none). Anything else (an ``.onnx`` file, ``weights.safetensors``
    without a config) gives ``(None, None)``. Reads config.json only; transformers is never imported.
    """
    path = Path(checkpoint_path).resolve()
    config = path.parent / "config.json"
    if path.name not in TRANSFORMERS_WEIGHTS or not config.is_file():
        return None, None
    try:
        archs = json.loads(config.read_text()).get("architectures")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):  # unreadable, bad JSON, not an object
        return None, None  # transformers could not load it either
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    return str(path.parent), arch


def peft_base_fields(config: dict, checkpoint_path: str | os.PathLike) -> dict:
    """``config`` whose ``base_model_name_or_path`` names this base the way ``AutoPeftModel`` loads it.

    The loadable directory of :func:`transformers_dir`, else None (peft's value for an unknown base: a file path or
    an alias is not something ``from_pretrained`` can load). ``revision`` belonged to the old name and is cleared.
    A config without ``task_type`` also gets the ``auto_mapping`` ``PeftModel.save_pretrained`` writes for such an
    adapter, so ``AutoPeftModel`` knows which class to build (``parent_library`` ``transformers``, which exports
    every model class, where peft writes the defining module).
    """
    model_dir, arch = transformers_dir(checkpoint_path)
    config = {**config, "base_model_name_or_path": model_dir, "revision": None}
    mapping = config.get("auto_mapping")
    if arch and config.get("task_type") is None and not (isinstance(mapping, dict) and mapping.get("base_model_class") == arch):
        config["auto_mapping"] = {"base_model_class": arch, "parent_library": "transformers"}
    return config


class BaseIndex:
    """Which weight of a checkpoint an adapter layer updates.

    Keys are the checkpoint's 2-D weights plus its 1×1 conv kernels (4-D, ``(o, i, 1, 1)``) when the reader
    exposes them; ``stem`` = key without ``.weight``.
    """

    def __init__(self, ck):
        self.ck = ck
        keys = list(ck.keys())
        self._raw = ck.tensor_shapes()  # every tensor, from the header
        have = self._matrices = set(keys)
        for k, shape in self._raw.items():
            if k not in have and k.endswith(".weight") and len(shape) == 4 and tuple(shape[2:]) == (1, 1):
                keys.append(k)  # 1×1 conv kernels (SD-1.5 proj_in / proj_out): adapters may target them
        self.stems = {k[: -len(".weight")]: k for k in keys if k.endswith(".weight")}
        self.underscored: dict[str, list[str]] = {}
        for stem in self.stems:
            self.underscored.setdefault(stem.replace(".", "_"), []).append(stem)


    def shape(self, stem: str) -> tuple[int, int]:
        """Shape of the weight as a matrix, ``(out, in)`` (1×1 kernels flattened)."""
        key = self.stems[stem]
        shape = tuple(self.ck.shape(key)) if key in self._matrices else self._raw[key]
        return (shape[0], shape[1])

    def load(self, stem: str) -> torch.Tensor:
        """The weight as an ``(out, in)`` matrix."""
        key = self.stems[stem]
        if key in self._matrices:
            return self.ck.get(key)  # (m, n)
        W = self.ck.get_param(key)  # (o, i, 1, 1)
        return W.reshape(W.shape[0], W.shape[1])  # (m, n)

    def _hint(self, name: str) -> str:
        import difflib

        close = difflib.get_close_matches(name, list(self.stems), n=3, cutoff=0.5)
        return f"; closest: {', '.join(close)}" if close else f" ({len(self.stems)} weights in the checkpoint)"

    def resolve(self, module: str, fmt: str, what: str) -> str:
        """The checkpoint stem an adapter module name refers to; exactly one, else a clear error."""
        if fmt == KOHYA:
            stripped = re.sub(r"^lora_(unet|te\d*|transformer)_", "", module)
            for name in (stripped, module):
                if name in self.underscored:
                    return self._unique(self.underscored[name], module, what)
            cands = [s for u, stems in self.underscored.items() for s in stems
                     if u.endswith("_" + stripped) or stripped.endswith("_" + u)]
        else:
            if module in self.stems:
                return module
            if fmt == LORAX:
                raise AdapterError(f"adapter layer {module!r} has no weight {module + '.weight'!r} in the {what}"
                                   f"{self._hint(module)}")
            cands = [s for s in self.stems if s.endswith("." + module) or module.endswith("." + s)]
        if not cands:
            raise AdapterError(f"adapter layer {module!r} has no matching weight in the {what}{self._hint(module)}")
        return self._unique(cands, module, what)

    @staticmethod
    def _unique(cands: list[str], module: str, what: str) -> str:
        if len(cands) > 1:
            raise AdapterError(f"adapter layer {module!r} matches several weights of the {what}: {', '.join(sorted(cands)[:4])}")
        return cands[0]


def _rename(module: str, src_stem: str, tgt_stem: str, fmt: str) -> str:
    """The output module name: the input name with the source weight's path swapped for the target's."""
    if src_stem == tgt_stem:
        return module
    if fmt == KOHYA:
        src_u, tgt_u = src_stem.replace(".", "_"), tgt_stem.replace(".", "_")
        if module.endswith(src_u):
            return module[: -len(src_u)] + tgt_u
        return module.split("_", 2)[0] + "_" + tgt_u if module.startswith("lora_") else tgt_u
    if module == src_stem:
        return tgt_stem
    if module.endswith("." + src_stem):
        return module[: -len(src_stem)] + tgt_stem
    return tgt_stem


# ---------------------------------------------------------------------------------------------------------
# Re-factorising a transferred update into the output format
# ---------------------------------------------------------------------------------------------------------


def _rel_err(approx: torch.Tensor, ref: torch.Tensor) -> float:
    denom = float(ref.norm())
    return float((approx - ref).norm()) / denom if denom > 0 else float(approx.norm())


def _target_coordinates(dW_t: torch.Tensor, U_t: torch.Tensor, V_t: torch.Tensor, module: str) -> torch.Tensor:
    r""":math:`C = U_t^\top \Delta W_t V_t` (r×r), checked to reproduce ``dW_t`` (every transfer rule's output
    lies in span(U_t) × span(V_t))."""
    C = U_t.T @ dW_t @ V_t  # (r, m) @ (m, n) @ (n, r) -> (r, r)
    err = _rel_err(U_t @ C @ V_t.T, dW_t)  # (m, r) @ (r, r) @ (r, n) -> (m, n)
    if err > REFACTOR_RTOL:
        raise AssertionError(f"{module}: transferred update is not in the target subspace (rel. err {err:.2e})")
    return C


def _refactor_lora(layer: LoraLayer, dW_t, U_t, V_t, case: str, module: str):
    """New LoRA factors ``(L', R')`` (checkpoint orientation) with ``s·L'R' = dW_t``, same rank k and α."""
    L, R = layer.stored_factors(dW_t.dtype, dW_t.device)  # (m, k), (k, n)
    if case == "same_dim":
        L_t, R_t = transfer_lora(L, R, U_t, V_t)  # Eq. (3) low-rank form: (m, k), (k, n)
    else:
        C = _target_coordinates(dW_t, U_t, V_t, module)  # (r, r), rank <= k
        X, S, Yh = torch.linalg.svd(C)  # (r, r), (r,), (r, r): an r×r SVD, never m×n
        k_out = min(layer.rank, S.shape[0])
        L_t = L.new_zeros(U_t.shape[0], layer.rank)  # (m_t, k); zero columns pad when r < k
        R_t = R.new_zeros(layer.rank, V_t.shape[0])  # (k, n_t)
        L_t[:, :k_out] = (U_t @ X[:, :k_out]) * (S[:k_out] / layer.scale)  # (m, r) @ (r, k') -> (m, k')
        R_t[:k_out] = (V_t @ Yh[:k_out].T).T  # ((n, r) @ (r, k')).T -> (k', n)
    err = _rel_err(layer.scale * (L_t @ R_t), dW_t)  # (m, k) @ (k, n) -> (m, n)
    if err > REFACTOR_RTOL:
        raise AssertionError(f"{module}: re-factorised LoRA differs from the reference ΔW_t (rel. err {err:.2e})")
    return L_t, R_t, err


# ---------------------------------------------------------------------------------------------------------
# Whole adapter
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LayerRow:
    """One line of the transfer report."""

    module: str  # as in the input adapter
    out_module: str | None  # as written (None when gated: no update)
    source_weight: str
    target_weight: str
    shape_s: tuple
    shape_t: tuple
    adapter_rank: int
    r: int
    method: str
    case: str
    phi_u: float | None
    phi_v: float | None
    phi: float | None
    gated: bool
    kept_energy: float | None
    refactor_rel_err: float | None  # written factors vs reference ΔW_t, float64 (None when gated)
    bases: str  # "cached" | "computed" (source/target)
    warnings: tuple = ()  # ill-posed but legal: a zero base weight, rank < r, σ_r = σ_{r+1} (spectrum_warnings)

    def as_dict(self) -> dict:
        """The row as JSON-able values (NaN and Inf become None)."""
        from dataclasses import asdict

        d = dict(asdict(self), warnings=list(self.warnings))
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass
class TransferResult:
    """What :func:`transfer_adapter` returns: the adapter to write, one report row per layer, the run's settings."""

    adapter: Adapter
    rows: list[LayerRow]
    info: dict

    def report(self) -> dict:
        """The JSON report written as ``lorax_report.json``: settings, a summary and every layer's row."""
        rows = [row.as_dict() for row in self.rows]
        kept = [r for r in self.rows if not r.gated]
        energies = [r.kept_energy for r in kept if r.kept_energy is not None and math.isfinite(r.kept_energy)]
        summary = {
            "layers": len(self.rows),
            "transferred": len(kept),
            "gated": len(self.rows) - len(kept),
            "mean_phi": _mean([r.phi for r in self.rows]),
            "mean_kept_energy": _mean(energies),
            "min_kept_energy": min(energies) if energies else None,
            "layers_with_warnings": sum(1 for r in self.rows if r.warnings),
        }
        return {**self.info, "summary": summary, "layers": rows}

    def table(self) -> str:
        """A fixed-width table of Φ, case, gate decision and kept energy per layer."""
        def f(x):
            return "   -  " if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:6.3f}"

        head = f"{'layer':<58} {'shape':>11} {'Φ_U':>6} {'Φ_V':>6} {'Φ':>6} {'case':<9} {'gate':<6} {'kept E':>6}"
        lines = [head, "-" * len(head)]
        for row in self.rows:
            shape = "x".join(map(str, row.shape_t))
            name = row.out_module or row.module
            name = name if len(name) <= 58 else "…" + name[-57:]
            gate = "GATED" if row.gated else "pass"
            lines.append(f"{name:<58} {shape:>11} {f(row.phi_u)} {f(row.phi_v)} {f(row.phi)} {row.case:<9} {gate:<6} "
                         f"{f(row.kept_energy)}")
        s = self.report()["summary"]
        lines.append("-" * len(head))
        lines.append(f"{s['transferred']} of {s['layers']} layers transferred, {s['gated']} gated; "
                     f"mean Φ {f(s['mean_phi']).strip()}, mean kept energy {f(s['mean_kept_energy']).strip()}")
        lines += [f"warning: {row.module}: {w}" for row in self.rows for w in row.warnings]
        return "\n".join(lines)


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _check_shape(layer, shape_adapter: tuple, stem: str, shape_base: tuple, what: str) -> None:
    if tuple(shape_adapter) != tuple(shape_base):
        hint = ""
        if isinstance(layer, LoraLayer) and tuple(shape_adapter[::-1]) == tuple(shape_base):
            hint = " (transposed: check fan_in_fan_out)"
        raise AdapterError(f"shape mismatch: adapter layer {layer.module!r} updates a {shape_adapter[0]}x{shape_adapter[1]} "
                           f"weight but {stem!r} in the {what} is {shape_base[0]}x{shape_base[1]}{hint}")


def transfer_settings(adapter, source, r, threshold, side, method, out_format, layer_map, device,
                      ignore_base_hash) -> tuple[LayerSettings, dict[str, str]]:
    """Every option of :func:`transfer_adapter` checked before any SVD (also used by its dry run,
    :func:`lorax_ref.predict.predict_transfer`, so that a dry run refuses what the transfer would refuse).

    ``adapter`` may be None (a prediction from the bases alone: its layers are weight stems, read as LoRA-X
    names). Returns the :class:`LayerSettings` with the defaults filled in (r = the LoRA-X adapter's rank,
    else 320, the paper's) and the layer map as a dict.
    """
    threshold = checks.threshold(threshold)
    if side not in SIDES:
        raise AdapterError(f"side={side!r} is not one of {SIDES}")
    if method not in METHODS:
        raise AdapterError(f"method={method!r} is not one of {METHODS}")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise AdapterError(f"r must be None or an int >= 1, got {r!r}")
    if layer_map is not None and not (isinstance(layer_map, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in layer_map.items())):
        raise AdapterError("layer_map must be a dict {source weight name: target weight name} of strings")
    device = parse_device(device, "device")
    layer_map = dict(layer_map or {})
    fmt_in = adapter.format if adapter is not None else None
    fmt_out = fmt_in if out_format == "auto" else out_format
    if adapter is not None and fmt_out not in (PEFT, KOHYA, LORAX):
        raise AdapterError(f"unknown output format {out_format!r}; use auto, peft, kohya or lorax")
    if adapter is not None and fmt_out == KOHYA and fmt_in != KOHYA:
        raise AdapterError("kohya output needs kohya input (kohya names are derived from the input's); use --out-format peft")
    if fmt_in == LORAX:
        if r is not None and r != adapter.rank:
            raise AdapterError(f"--rank {r} differs from the LoRA-X adapter's rank {adapter.rank}: its ΔΣ lives in the "
                               f"top-{adapter.rank} bases; omit --rank")
        r = adapter.rank
        if source.sha256 != adapter.base_sha256 and not ignore_base_hash:
            raise AdapterError(
                f"the LoRA-X adapter was made for the base with sha256 {adapter.base_sha256[:16]}…, but the source "
                f"checkpoint {source.path.name} has sha256 {source.sha256[:16]}…; pass --ignore-base-hash to use it anyway")
    r = 320 if r is None else r
    return LayerSettings(r, threshold, side, method, fmt_in or LORAX, fmt_out, torch.device(device)), layer_map


def transfer_adapter(
    adapter: Adapter,
    source,
    target,
    *,
    r: int | None = None,
    threshold: float | None = None,
    side: str = "both",
    method: str = "auto",
    out_format: str = "auto",
    layer_map: dict[str, str] | None = None,
    cache=None,
    ignore_base_hash: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = False,
    target_name: str | None = None,
) -> TransferResult:
    """Transfer every layer of ``adapter`` from checkpoint ``source`` to checkpoint ``target``.

    Layers are streamed one at a time: for each, the two base weights (or their cached bases) are read,
    the update is transferred in float64 on ``device`` by the reference functions, re-factorised into
    the output format and checked against the reference ``ΔW_t``, then released.

    Args:
        adapter: from :func:`lorax_ref.files.adapters.load_adapter`.
        source, target: open checkpoints (:func:`lorax_ref.files.checkpoints.open_checkpoint`).
        r: LoRA-X rank of the bases; default: the adapter's rank for LoRA-X input, 320 (the paper's) otherwise.
        threshold, side, method: as in :func:`lorax_ref.transfer_layer`.
        out_format: ``"auto"`` (the input's), ``"peft"``, ``"kohya"`` (kohya input only) or ``"lorax"``.
        layer_map: source weight stem → target weight stem, for targets whose layers are named differently.
        cache: a :class:`lorax_ref.files.cache.BasisCache` (None: compute every basis).
        ignore_base_hash: apply a LoRA-X adapter to a source checkpoint other than the one it records.
        target_name: how the user named the target (alias or path); recorded with its sha256 in the report and
            the written file's metadata. A PEFT output's ``base_model_name_or_path`` is the directory transformers
            can load the target from (:func:`peft_base_fields`), or None when there is none.

    Every option and every layer's shapes are checked before the first SVD. A layer whose source or target
    top-r subspace is not unique (zero weight, rank < r, σ_r = σ_{r+1}) is transferred and named in its
    row's ``warnings``; a transferred factor that does not fit the adapter's dtype (fp16) is refused.
    """
    from .cache import BasisCache

    st, layer_map = transfer_settings(
        adapter, source, r, threshold, side, method, out_format, layer_map, device, ignore_base_hash)
    run = _Run(st, BaseIndex(source), BaseIndex(target), source.sha256, target.sha256,
               cache if cache is not None else BasisCache(None))
    seen_targets: dict[str, str] = {}
    # every layer's weights, shapes and rank are checked before the first SVD: a bad run fails in seconds
    plans = [_plan_layer(layer, st, run.idx_s, run.idx_t, layer_map, seen_targets) for layer in adapter.layers]
    rows: list[LayerRow] = []
    out_layers = []
    # the bar goes to stderr and only on a terminal (disable=None); it is closed even when a layer fails
    with tqdm(adapter.layers, desc="transfer", unit="layer", leave=False, disable=None if progress else True) as bar:
        for layer, plan in zip(bar, plans):
            try:
                row, new = _transfer_one(layer, plan, run)
            except LoraxInputError as exc:
                raise type(exc)(f"layer {layer.module!r}: {exc}") from None
            rows.append(row)
            if new is not None:
                out_layers.append(new)
    out = _output_adapter(adapter, st.fmt_out, out_layers, st.r, target, target_name)
    return TransferResult(out, rows, _run_info(adapter, out, source, target, target_name, run))


@dataclass(frozen=True)
class LayerSettings:
    """The checked options every layer of one transfer shares (see :func:`transfer_settings`)."""

    r: int
    threshold: float | None
    side: str
    method: str
    fmt_in: str
    fmt_out: str
    device: torch.device


@dataclass(frozen=True)
class _Run:
    """One transfer: its settings, the two indexed checkpoints with their sha256, and the basis cache."""

    settings: LayerSettings
    idx_s: BaseIndex
    idx_t: BaseIndex
    sha_s: str
    sha_t: str
    cache: object  # BasisCache


def _run_info(adapter: Adapter, out: Adapter, source, target, target_name: str | None, run: _Run) -> dict:
    """The report's header: inputs, output, both bases with their sha256, settings and cache counters."""
    st, cache = run.settings, run.cache
    info = {
        "tool": "lorax_ref transfer",
        "input": {"format": st.fmt_in, "path": str(adapter.path) if adapter.path else None},
        "output": {"format": st.fmt_out},
        "source_base": {"path": str(source.path), "sha256": run.sha_s},
        "target_base": {"spec": target_name, "path": str(target.path), "sha256": run.sha_t},
        "settings": {"r": st.r, "threshold": st.threshold, "side": st.side, "method": st.method,
                     "device": str(st.device), "compute_dtype": "float64"},
        "cache": {"enabled": cache.enabled, "hits": cache.hits, "misses": cache.misses,
                  "fast": cache.fast, "methods": dict(cache.methods)},
    }
    if st.fmt_out == PEFT:
        info["output"]["base_model_name_or_path"] = out.config["base_model_name_or_path"]
    return info


def _plan_layer(layer, st: LayerSettings, idx_s: BaseIndex, idx_t: BaseIndex, layer_map: dict[str, str],
                seen_targets: dict[str, str]) -> tuple:
    """Cheap checks of one layer before any SVD: its source and target weights, shapes and the rank."""
    r, method, threshold, side = st.r, st.method, st.threshold, st.side
    stem_s = idx_s.resolve(layer.module, st.fmt_in, "source checkpoint")
    stem_t = layer_map.get(stem_s, stem_s)
    if stem_t not in idx_t.stems:
        raise AdapterError(f"the target checkpoint has no weight {stem_t + '.weight'!r} for adapter layer "
                           f"{layer.module!r}{idx_t._hint(stem_t)}; map it with --layer-map")
    if stem_t in seen_targets:
        raise AdapterError(f"adapter layers {seen_targets[stem_t]!r} and {layer.module!r} both map to {stem_t!r}")
    seen_targets[stem_t] = layer.module
    shape_s, shape_t = idx_s.shape(stem_s), idx_t.shape(stem_t)
    if isinstance(layer, LoraLayer):
        L, R = layer.stored_factors()
        _check_shape(layer, (L.shape[0], R.shape[1]), stem_s, shape_s, "source checkpoint")
    for what, stem, shape in (("source", stem_s, shape_s), ("target", stem_t, shape_t)):
        if not 1 <= r <= min(shape):
            raise AdapterError(f"--rank {r} is out of range for {what} weight {stem!r} of shape "
                               f"{shape[0]}x{shape[1]}: need 1 <= r <= {min(shape)}")
    if shape_s != shape_t and method == "lorax":
        raise AdapterError(f"--method lorax (Eq. (3)) needs equal shapes, but {stem_s!r} is {shape_s} in the source and "
                           f"{stem_t!r} is {shape_t} in the target; use --method auto or mismatch (§4.2.2)")
    if threshold is not None and (side == "u" and shape_s[0] != shape_t[0] or side == "v" and shape_s[1] != shape_t[1]):
        raise AdapterError(f"cannot gate {stem_t!r} with --side {side}: that side's dimension differs "
                           f"({shape_s} → {shape_t}); use --side both or the other side")
    return stem_s, stem_t, shape_s, shape_t


def _transfer_one(layer, plan: tuple, run: _Run):
    """One adapter layer: get the bases, transfer, re-factorise. Returns (report row, new layer or None)."""
    stem_s, stem_t, shape_s, shape_t = plan
    st, cache, dev = run.settings, run.cache, run.settings.device
    hits = cache.hits
    U_s, S_s, V_s, next_s = cache.bases_and_next(run.sha_s, stem_s, st.r, lambda: run.idx_s.load(stem_s), device=dev)  # (m_s, r), (r,), (n_s, r)
    U_t, S_t, V_t, next_t = cache.bases_and_next(run.sha_t, stem_t, st.r, lambda: run.idx_t.load(stem_t), device=dev)  # (m_t, r), (r,), (n_t, r)
    bases = {0: "computed", 1: "mixed", 2: "cached"}[cache.hits - hits]
    warnings = (spectrum_warnings(f"source weight {stem_s!r}", S_s, next_s, shape_s, torch.float64)
                + spectrum_warnings(f"target weight {stem_t!r}", S_t, next_t, shape_t, torch.float64))

    if isinstance(layer, LoraLayer):
        dW_s = layer.delta().to(dev)  # s·BA, (m_s, n_s)
    else:
        dW_s = lorax_delta(U_s, layer.dSigma.to(dev, torch.float64), V_s)  # Eq. (1), (m_s, n_s)
    dW_t, rep = transfer_layer_from_bases(dW_s, U_s, V_s, U_t, V_t, st.threshold, st.side, st.method)

    out_module, err, new = None, None, None
    if not rep.gated:
        out_module = _rename(layer.module, stem_s, stem_t, st.fmt_in) if st.fmt_out == st.fmt_in else stem_t
        new, err = _written_layer(layer, out_module, dW_t, U_t, V_t, rep.case, st)
    row = LayerRow(
        module=layer.module, out_module=out_module, source_weight=stem_s + ".weight",
        target_weight=stem_t + ".weight", shape_s=shape_s, shape_t=shape_t, adapter_rank=layer.rank, r=st.r,
        method=st.method, case=rep.case, phi_u=rep.phi_u, phi_v=rep.phi_v, phi=rep.phi, gated=rep.gated,
        kept_energy=rep.kept_energy, refactor_rel_err=err, bases=bases, warnings=tuple(warnings))
    return row, new


def _written_layer(layer, out_module: str, dW_t, U_t, V_t, case: str, st: LayerSettings):
    """The transferred update ``dW_t`` (m, n) in the output format, and its relative error against ``dW_t``."""
    if st.fmt_out == LORAX:
        C = _target_coordinates(dW_t, U_t, V_t, layer.module)  # ΔΣ_{t←s}, (r, r)
        diagonal = isinstance(layer, LoraxLayer) and layer.dSigma.ndim == 1 and case != "same_dim"
        err = _rel_err(U_t @ C @ V_t.T, dW_t)
        dSigma = torch.diagonal(C) if diagonal else C  # copy/§4.2.2 keep ΔΣ_s: diagonal stays diagonal
        if diagonal:
            err = max(err, _rel_err(torch.diag(dSigma), C))
            if err > REFACTOR_RTOL:
                raise AssertionError(f"{layer.module}: expected a diagonal ΔΣ_t (rel. err {err:.2e})")
        return LoraxLayer(out_module, _cast_output(dSigma, layer.dtype, "ΔΣ (dSigma)")), err
    if isinstance(layer, LoraLayer):
        L_t, R_t, err = _refactor_lora(layer, dW_t, U_t, V_t, case, layer.module)
        return layer.with_stored_factors(L_t, R_t, module=out_module), err
    # LoRA-X in, PEFT out: B = U_t ΔΣ_{t←s}, A = V_tᵀ, α = r (scale 1)
    C = _target_coordinates(dW_t, U_t, V_t, layer.module)  # (r, r)
    L_t, R_t = U_t @ C, V_t.T.contiguous()  # (m, r), (r, n)
    err = _rel_err(L_t @ R_t, dW_t)
    return LoraLayer(out_module, _cast_output(L_t, layer.dtype, "B (lora_B)"),
                     _cast_output(R_t, layer.dtype, "A (lora_A)"), alpha=float(st.r)), err


def _output_adapter(adapter: Adapter, fmt_out: str, layers: list, r: int, target, target_name: str | None) -> Adapter:
    if not layers:
        raise AdapterError("every layer was gated (Φ below the threshold): there is no adapter to write; "
                           "lower --threshold or check the base checkpoints")
    sha_t = target.sha256
    stamp = {"lorax_ref_transfer": json.dumps({"target": target_name, "target_sha256": sha_t, "r": r})}
    if fmt_out == LORAX:
        name = adapter.weights_name if adapter.format == LORAX else "adapter.lorax.safetensors"
        return Adapter(LORAX, layers, rank=r, base_sha256=sha_t, metadata=stamp, weights_name=name)
    if fmt_out == KOHYA:
        return Adapter(KOHYA, layers, metadata={**adapter.metadata, **stamp}, weights_name=adapter.weights_name)
    config = dict(adapter.config) if adapter.format == PEFT else dict(PEFT_LORA_DEFAULTS)
    # what transformers can load; the exact target (spec, sha256) is in the stamp and the report
    return Adapter(PEFT, layers, config=peft_base_fields(config, target.path), metadata=stamp)


