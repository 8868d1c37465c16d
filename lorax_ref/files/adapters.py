r"""Adapter files in, transferred adapter files out: PEFT, kohya/A1111 and a compact LoRA-X format.

What ΔW each format means (the ground truth is what the tools themselves compute):

=====================  ==========================================================================================
format                 update of one base weight ``W (m, n)``
=====================  ==========================================================================================
PEFT (``peft`` LoRA)   :math:`\Delta W = s\, B A`, ``lora_B (m, k)``, ``lora_A (k, n)``, :math:`s = \alpha / k`
                       (:math:`\alpha/\sqrt{k}` with ``use_rslora``), per-module k and α from ``rank_pattern`` /
                       ``alpha_pattern``; transposed, :math:`(BA)^\top`, when ``fan_in_fan_out``
                       (GPT-2 ``Conv1D`` weights are stored (in, out)).
kohya / A1111          :math:`\Delta W = (\alpha / k)\, \text{up}\cdot\text{down}`; ``alpha`` missing or 0 means
                       α = k; 1×1 convolutions are flattened to ``(out, in)``.
LoRA-X (this package)  Eq. (1): :math:`\Delta W = \bar U_s \,\Delta\Sigma\, \bar V_s^\top` with
                       :math:`\bar U_s, \bar V_s` = ``svd_topk(W_s, r)`` of the base whose sha256 the file
                       records; only ``ΔΣ`` is stored (r numbers per layer when diagonal).
=====================  ==========================================================================================

Refused, each with a message naming the reason, because none is a plain additive low-rank update that
the LoRA-X equations apply to: DoRA (``use_dora``, ``lora_magnitude_vector``, ``dora_scale``),
``modules_to_save``, LoRA bias, k×k convolutions (LoCon), LyCORIS LoHa / LoKr / Tucker / OFT / full diffs,
embedding LoRA, and any key the format does not define.

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

Orientation: every basis is computed from the weight as the checkpoint reader returns it
(:meth:`lorax_ref.checkpoints.Checkpoint.get`), ``(out, in)`` for ``nn.Linear``; a ``fan_in_fan_out``
PEFT adapter is transposed into that orientation and back.
"""
from __future__ import annotations

import ctypes
import errno
import json
import math
import numbers
import os
import re
import secrets
import shutil
import socket
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from .. import checks
from ..core import METHODS, SIDES, lorax_delta, transfer_layer_from_bases, transfer_lora
from ..device import parse_device
from ..errors import LoraxInputError
from ..linalg import spectrum_warnings
from .checkpoints import PICKLE_SUFFIXES, CheckpointError, one_line, read_pickle

__all__ = [
    "AdapterError",
    "LoraLayer",
    "LoraxLayer",
    "Adapter",
    "load_adapter",
    "save_adapter",
    "write_output_dir",
    "transfer_adapter",
    "TransferResult",
    "LayerRow",
    "random_adapter",
    "LORAX_FORMAT",
]

PEFT, KOHYA, LORAX = "peft", "kohya", "lorax"
LORAX_FORMAT = "lorax-x"  # value of the "format" metadata field of a compact LoRA-X file
LORAX_FORMAT_VERSION = "1"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
REPORT_JSON = "lorax_report.json"
REPORT_TXT = "lorax_report.txt"
# Factors written for a layer must reproduce the reference ΔW_t to this relative Frobenius error (float64).
REFACTOR_RTOL = 1e-9
# The adapter_config.json fields peft 0.21 writes for a plain LoRA (LoraConfig defaults; inference_mode is True as
# PeftModel.save_pretrained writes it). r, lora_alpha, target_modules and the patterns are filled in per adapter;
# "peft_version" is left out, since peft did not write the file. tests/test_peft_interop.py compares with peft.
PEFT_LORA_DEFAULTS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16, "r": 8, "rank_pattern": {},
    "revision": None, "target_modules": None, "target_parameters": None, "task_type": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
    "use_rslora": False, "velora_config": None,
}
# File names under which transformers' from_pretrained finds a model's weights next to its config.json.
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class AdapterError(LoraxInputError):
    """An adapter file is malformed, inconsistent with its base, or not a plain additive low-rank update."""


# ---------------------------------------------------------------------------------------------------------
# In-memory model of an adapter
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LoraLayer:
    r"""One plain LoRA update :math:`\Delta W = s\, B A` (transposed when ``fan_in_fan_out``).

    ``module`` is the name as the file writes it: the PEFT module path (``encoder.layer.0.attention.self.query``)
    or the kohya stem (``lora_unet_down_blocks_0_..._to_q``).
    """

    module: str
    B: torch.Tensor  # (m, k)  lora_B / lora_up  (1×1 conv kernels flattened)
    A: torch.Tensor  # (k, n)  lora_A / lora_down
    alpha: float
    rslora: bool = False
    fan_in_fan_out: bool = False
    conv: bool = False  # stored as 1×1 convolution kernels (out, in, 1, 1)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        """:math:`s = \\alpha / k`, or :math:`\\alpha / \\sqrt{k}` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def stored_factors(self, dtype=torch.float64, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(L, R)`` with :math:`\Delta W = s\, L R` in the checkpoint's orientation of the base weight."""
        B = self.B.to(device=device, dtype=dtype)  # (m, k)
        A = self.A.to(device=device, dtype=dtype)  # (k, n)
        if self.fan_in_fan_out:  # the base weight is stored (in, out): ΔW_stored = (BA)ᵀ = Aᵀ Bᵀ
            return A.T, B.T  # (n, k), (k, m)
        return B, A

    def with_stored_factors(self, L: torch.Tensor, R: torch.Tensor, module: str | None = None) -> "LoraLayer":
        """A copy holding new factors (given in checkpoint orientation), cast back to this layer's dtype."""
        B, A = (R.T, L.T) if self.fan_in_fan_out else (L, R)
        return replace(
            self,
            module=self.module if module is None else module,
            B=_cast_output(B, self.dtype, "B (lora_B / lora_up)"),  # (m, k)
            A=_cast_output(A, self.dtype, "A (lora_A / lora_down)"),  # (k, n)
        )

    def delta(self, dtype=torch.float64) -> torch.Tensor:
        """ΔW in the checkpoint's orientation, ``(m, n)``."""
        L, R = self.stored_factors(dtype)
        return self.scale * (L @ R)  # (m, k) @ (k, n) -> (m, n)


def _cast_output(t: torch.Tensor, dtype: torch.dtype, what: str,
                 hint: str = "convert the adapter to float32 first") -> torch.Tensor:
    """``t`` on CPU in the output dtype; refused when a finite value becomes Inf there (fp16 ends at 65504),
    so that no written file holds an Inf that the math in float64 never had."""
    out = t.detach().to(device="cpu", dtype=dtype).contiguous().clone()
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        name = str(dtype).replace("torch.", "")
        raise AdapterError(
            f"{what} does not fit {name}: {int(bad.sum())} of {out.numel()} entries overflow (largest |value| "
            f"{float(t.detach().abs().max()):.4g} > {torch.finfo(dtype).max:.4g}); {hint}")
    return out


@dataclass
class LoraxLayer:
    """One compact LoRA-X layer: ``ΔΣ`` in the top-r bases of the base weight ``module + '.weight'``."""

    module: str
    dSigma: torch.Tensor  # (r,) diagonal or (r, r)

    @property
    def rank(self) -> int:
        return int(self.dSigma.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.dSigma.dtype


@dataclass
class Adapter:
    """An adapter file as read (or about to be written)."""

    format: str  # "peft" | "kohya" | "lorax"
    layers: list  # list[LoraLayer] or list[LoraxLayer]
    path: Path | None = None
    config: dict = field(default_factory=dict)  # PEFT adapter_config.json
    metadata: dict = field(default_factory=dict)  # safetensors header metadata (str -> str)
    rank: int | None = None  # LoRA-X: the one rank r of all layers
    base_sha256: str | None = None  # LoRA-X: checkpoint the ΔΣ coordinates belong to
    weights_name: str | None = None  # file name to write (kohya / LoRA-X)

    @property
    def dtype(self) -> torch.dtype | None:
        return self.layers[0].dtype if self.layers else None

    def summary(self) -> dict:
        """A JSON-able description (what ``python -m lorax_ref inspect`` prints)."""
        ranks = Counter(layer.rank for layer in self.layers)
        out = {
            "format": self.format,
            "path": str(self.path) if self.path else None,
            "layers": len(self.layers),
            "ranks": {str(k): v for k, v in sorted(ranks.items())},
            "dtype": str(self.dtype).replace("torch.", "") if self.layers else None,
            "parameters": sum(
                (layer.A.numel() + layer.B.numel()) if isinstance(layer, LoraLayer) else layer.dSigma.numel()
                for layer in self.layers
            ),
        }
        if self.format == LORAX:
            out["rank"] = self.rank
            out["base_sha256"] = self.base_sha256
            out["diagonal"] = all(layer.dSigma.ndim == 1 for layer in self.layers)
        else:
            alphas = Counter(layer.alpha for layer in self.layers)
            out["alphas"] = {f"{k:g}": v for k, v in sorted(alphas.items())}
            out["rslora"] = any(layer.rslora for layer in self.layers)
            out["fan_in_fan_out"] = any(layer.fan_in_fan_out for layer in self.layers)
            out["conv1x1_layers"] = sum(layer.conv for layer in self.layers)
            norms = [float(layer.delta().norm()) for layer in self.layers]
            out["delta_fro_norm_max"] = max(norms) if norms else 0.0
        out["modules"] = [layer.module for layer in self.layers]
        return out


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a small safetensors file; unreadable → AdapterError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError: truncated, corrupted, not safetensors at all
        raise AdapterError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None
    return tensors, metadata


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """:func:`~lorax_ref.files.checkpoints.read_pickle` for an adapter file (its errors are adapter errors)."""
    try:
        return read_pickle(path, allow_pickle)
    except CheckpointError as exc:
        raise AdapterError(str(exc)) from None


def _check_tensor(path: Path, key: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        raise AdapterError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected a floating dtype")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        raise AdapterError(f"{path}: tensor {key!r} contains {n_nan} NaN and {int(bad.sum()) - n_nan} Inf entries")
    return t


def _flatten_kernel(path: Path, key: str, t: torch.Tensor, role: str) -> tuple[torch.Tensor, bool]:
    """2-D tensors pass; 1×1 conv kernels ``(o, i, 1, 1)`` flatten to ``(o, i)``; k×k kernels are refused."""
    if t.ndim == 2:
        return t, False
    if t.ndim == 4:
        if tuple(t.shape[2:]) != (1, 1):
            raise AdapterError(
                f"{path}: {key!r} is a {t.shape[2]}x{t.shape[3]} convolution kernel ({role}); k×k conv LoRA "
                "(LoCon / LyCORIS) is not a plain low-rank update of a matrix and is not supported (1×1 conv is)")
        return t.reshape(t.shape[0], t.shape[1]), True
    raise AdapterError(f"{path}: {key!r} has shape {tuple(t.shape)}; expected a 2-D matrix or a 1×1 conv kernel ({role})")


def _pattern_value(patterns: dict, module: str, default, what: str, path: Path):
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key matching ``(.*\\.)?(key)$``."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as exc:
            raise AdapterError(f"{path}: {what} key {key!r} is not a valid regular expression ({exc})") from None
    return default


def _config_number(cfg_path: Path, what: str, value, rank: bool = False) -> float:
    """A number from adapter_config.json: finite (a NaN lora_alpha would make every ΔW NaN), not a bool or a
    string; a rank must also be a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterError(f"{cfg_path}: {what} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise AdapterError(f"{cfg_path}: {what} is {value!r}, expected a finite number")
    if rank and (value != int(value) or value < 1):
        raise AdapterError(f"{cfg_path}: {what} must be a whole number >= 1, got {value!r}")
    return float(value)


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")


def _peft_refusal(key: str) -> str | None:
    """Why a PEFT weight key is not part of a plain LoRA, or None if it might be."""
    if "lora_magnitude_vector" in key:
        return "DoRA (lora_magnitude_vector) is not a plain additive low-rank update"
    if "modules_to_save" in key:
        return "modules_to_save (fully trained copies of modules) cannot be transferred by LoRA-X"
    if "lora_embedding_" in key:
        return "embedding LoRA (lora_embedding_A/B) is not supported"
    if re.search(r"\.lora_[AB](\.[^.]+)?\.bias$", key):
        return "LoRA bias (lora_bias) is not a low-rank update of the weight"
    return None


def read_peft(path: Path, allow_pickle: bool = False) -> Adapter:
    """A PEFT LoRA directory: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin`` if allowed)."""
    cfg_path = path / PEFT_CONFIG
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_path}: invalid JSON ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{cfg_path}: cannot be read ({one_line(exc)})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")

    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {peft_type!r} is not LORA; only plain LoRA adapters can be transferred")
    refusals = [
        (config.get("use_dora"), "use_dora: DoRA is not a plain additive low-rank update"),
        (config.get("modules_to_save"), "modules_to_save: fully trained module copies cannot be transferred by LoRA-X"),
        (config.get("bias", "none") not in ("none", None), f"bias={config.get('bias')!r}: LoRA bias terms are not a low-rank update"),
        (config.get("lora_bias"), "lora_bias: a bias on lora_B is not a low-rank update"),
        (config.get("layer_replication"), "layer_replication changes the model's structure"),
        (config.get("target_parameters"), "target_parameters (LoRA on raw parameters) is not supported"),
    ]
    for flag, why in refusals:
        if flag:
            raise AdapterError(f"{cfg_path}: refusing {why}")
    if "r" not in config:
        raise AdapterError(f"{cfg_path}: missing required field 'r'")
    r_default = int(_config_number(cfg_path, "r", config["r"], rank=True))
    alpha_default = _config_number(cfg_path, "lora_alpha", config.get("lora_alpha", r_default))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterError(f"{cfg_path}: rank_pattern and alpha_pattern must be JSON objects")
    rslora = bool(config.get("use_rslora", False))
    fifo = bool(config.get("fan_in_fan_out", False))

    weights = path / PEFT_WEIGHTS
    if weights.is_file():
        tensors, metadata = _read_safetensors(weights)
    else:
        pickled = next((path / f"adapter_model{s}" for s in PICKLE_SUFFIXES if (path / f"adapter_model{s}").is_file()), None)
        if pickled is None:
            raise AdapterError(f"{path}: has {PEFT_CONFIG} but no {PEFT_WEIGHTS}")
        tensors, metadata, weights = _read_pickle(pickled, allow_pickle), {}, pickled

    modules: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        why = _peft_refusal(key)
        if why:
            raise AdapterError(f"{weights}: refusing key {key!r}: {why}")
        match = _PEFT_KEY.match(key)
        if not match:
            raise AdapterError(f"{weights}: unexpected key {key!r} (a PEFT LoRA file holds only "
                               "'<module>.lora_A.weight' and '<module>.lora_B.weight')")
        slot = modules.setdefault(match["module"], {})
        if match["which"] in slot:
            raise AdapterError(f"{weights}: two {match['which']} tensors for module {match['module']!r}")
        slot[match["which"]] = (key, _check_tensor(weights, key, t))
    if not modules:
        raise AdapterError(f"{weights}: contains no LoRA weights")

    layers = []
    for module, slot in modules.items():
        for which in ("lora_A", "lora_B"):
            if which not in slot:
                other = "lora_B" if which == "lora_A" else "lora_A"
                raise AdapterError(f"{weights}: module {module!r} has {other} but no {which} (missing key)")
        (key_a, A), (key_b, B) = slot["lora_A"], slot["lora_B"]
        A, conv_a = _flatten_kernel(weights, key_a, A, "lora_A")
        B, conv_b = _flatten_kernel(weights, key_b, B, "lora_B")
        if B.shape[1] != A.shape[0]:
            raise AdapterError(f"{weights}: module {module!r}: lora_B {tuple(B.shape)} and lora_A {tuple(A.shape)} "
                               "do not chain (need B (m, k), A (k, n))")
        if A.dtype != B.dtype:
            raise AdapterError(f"{weights}: module {module!r}: lora_A is {A.dtype} but lora_B is {B.dtype}")
        r_cfg = _pattern_value(rank_pattern, module, r_default, "rank_pattern", cfg_path)
        r_cfg = int(_config_number(cfg_path, f"rank_pattern value for {module!r}", r_cfg, rank=True))
        if r_cfg != A.shape[0]:
            raise AdapterError(f"{weights}: module {module!r} has rank {A.shape[0]} in the file but "
                               f"{PEFT_CONFIG} gives r={r_cfg} (r / rank_pattern): shape mismatch")
        alpha = _pattern_value(alpha_pattern, module, alpha_default, "alpha_pattern", cfg_path)
        alpha = _config_number(cfg_path, f"alpha_pattern value for {module!r}", alpha)
        layers.append(LoraLayer(module, B, A, alpha, rslora=rslora, fan_in_fan_out=fifo, conv=conv_a or conv_b))
    return Adapter(PEFT, layers, path=path, config=config, metadata=metadata)


_KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
_KOHYA_REFUSALS = [
    (r"\.hada_", "LoHa (LyCORIS hada_*) is a Hadamard product, not a plain low-rank update"),
    (r"\.lokr_", "LoKr (LyCORIS lokr_*) is a Kronecker product, not a plain low-rank update"),
    (r"\.lora_mid\.", "LoCon/LyCORIS Tucker decomposition (lora_mid) of a k×k conv is not supported"),
    (r"\.dora_scale$", "DoRA (dora_scale) is not a plain additive low-rank update"),
    (r"\.(diff|diff_b)$", "a full weight difference (LyCORIS 'full') is not a low-rank adapter"),
    (r"\.oft_", "OFT (oft_*) is a multiplicative update, not an additive low-rank one"),
    (r"\.(w_norm|b_norm)$", "norm-layer updates (w_norm/b_norm) are not supported"),
    (r"\.(lora_up|lora_down)\.bias$", "LoRA bias is not a low-rank update of the weight"),
]


def read_kohya(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Adapter:
    """A kohya / A1111 LoRA file: ``<stem>.lora_down.weight``, ``<stem>.lora_up.weight``, ``<stem>.alpha``."""
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for pattern, why in _KOHYA_REFUSALS:
            if re.search(pattern, key):
                raise AdapterError(f"{path}: refusing key {key!r}: {why}")
        suffix = next((s for s in _KOHYA_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise AdapterError(f"{path}: unexpected key {key!r} (a kohya LoRA holds only "
                               "'<name>.lora_down.weight', '<name>.lora_up.weight' and '<name>.alpha')")
        stems.setdefault(key[: -len(suffix) - 1], {})[suffix] = _check_tensor(path, key, t)
    layers = []
    for stem, slot in stems.items():
        for need in ("lora_down.weight", "lora_up.weight"):
            if need not in slot:
                raise AdapterError(f"{path}: {stem!r} has no {need} (missing key)")
        A, conv_a = _flatten_kernel(path, stem + ".lora_down.weight", slot["lora_down.weight"], "lora_down")
        B, conv_b = _flatten_kernel(path, stem + ".lora_up.weight", slot["lora_up.weight"], "lora_up")
        if B.shape[1] != A.shape[0]:
            raise AdapterError(f"{path}: {stem!r}: lora_up {tuple(B.shape)} and lora_down {tuple(A.shape)} do not chain")
        if A.dtype != B.dtype:
            raise AdapterError(f"{path}: {stem!r}: lora_down is {A.dtype} but lora_up is {B.dtype}")
        alpha_t = slot.get("alpha")
        if alpha_t is not None and alpha_t.numel() != 1:
            raise AdapterError(f"{path}: {stem}.alpha has shape {tuple(alpha_t.shape)}, expected a scalar")
        alpha = float(alpha_t.item()) if alpha_t is not None else 0.0
        if alpha == 0.0:  # kohya: missing or zero alpha means alpha = rank (scale 1)
            alpha = float(A.shape[0])
        layers.append(LoraLayer(stem, B, A, alpha, conv=conv_a or conv_b))
    if not layers:
        raise AdapterError(f"{path}: contains no LoRA weights")
    return Adapter(KOHYA, layers, path=path, metadata=metadata, weights_name=path.name)


def read_lorax(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Adapter:
    """A compact LoRA-X file: ``<module>.dSigma`` per layer, rank and base sha256 in the metadata."""
    version = metadata.get("format_version")
    if version != LORAX_FORMAT_VERSION:
        raise AdapterError(f"{path}: LoRA-X format version {version!r} is not supported (expected {LORAX_FORMAT_VERSION!r})")
    sha = metadata.get("base_sha256", "")
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise AdapterError(f"{path}: metadata 'base_sha256' must be a 64-character hex sha256, got {sha!r}")
    try:
        r = int(metadata["rank"])
    except (KeyError, ValueError):
        raise AdapterError(f"{path}: metadata 'rank' missing or not an integer ({metadata.get('rank')!r})") from None
    layers = []
    for key, t in tensors.items():
        if not key.endswith(".dSigma"):
            raise AdapterError(f"{path}: unexpected key {key!r} (a LoRA-X file holds only '<module>.dSigma')")
        _check_tensor(path, key, t)
        if tuple(t.shape) not in {(r,), (r, r)}:
            raise AdapterError(f"{path}: {key!r} has shape {tuple(t.shape)}, expected ({r},) or ({r}, {r}) for rank {r}")
        layers.append(LoraxLayer(key[: -len(".dSigma")], t))
    if not layers:
        raise AdapterError(f"{path}: contains no dSigma tensors")
    return Adapter(LORAX, layers, path=path, metadata=metadata, rank=r, base_sha256=sha, weights_name=path.name)


def adapter_location(path: str | os.PathLike) -> Path:
    """What an adapter path names: a PEFT adapter given by one of its files is its directory."""
    path = Path(path)
    if path.is_file() and (path.name == PEFT_CONFIG or (path.name.startswith("adapter_model") and (path.parent / PEFT_CONFIG).is_file())):
        return path.parent
    return path


def load_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT directory, a kohya ``.safetensors`` or a compact LoRA-X ``.safetensors`` (format detected).

    Nothing is written; a pickled file (``.bin``, ``.pt``, ``.ckpt``) is read only with ``allow_pickle``
    and then through ``torch.load(weights_only=True)``.
    """
    path = adapter_location(path)
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return read_peft(path, allow_pickle)
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:  # a kohya / LoRA-X file in a directory of its own (as this tool writes them)
            raise AdapterError(f"{path}: a directory adapter needs {PEFT_CONFIG} (PEFT) or exactly one .safetensors "
                               f"file (kohya / LoRA-X); found {len(files)} .safetensors files")
        path = files[0]
    if not path.is_file():
        if path.exists():  # /dev/zero, a FIFO, a socket: never opened (reading one may never end)
            raise AdapterError(f"adapter {str(path)!r} is not a regular file or a directory")
        raise AdapterError(f"adapter {str(path)!r} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        tensors, metadata = _read_pickle(path, allow_pickle), {}
    else:
        tensors, metadata = _read_safetensors(path)
    if metadata.get("format") == LORAX_FORMAT:
        return read_lorax(path, tensors, metadata)
    if any(".lora_A." in k or k.endswith(".lora_A.weight") for k in tensors):
        raise AdapterError(f"{path}: looks like PEFT weights without {PEFT_CONFIG}; pass the adapter directory "
                           "(the config holds lora_alpha, without which ΔW is unknown)")
    return read_kohya(path, tensors, metadata)


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    # safetensors refuses non-contiguous tensors and shared storage: give each tensor its own buffer
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    data = save(tensors, metadata={k: str(v) for k, v in metadata.items()})
    path.write_bytes(data)  # open(2) with the user's umask (safetensors' save_file makes every file 0o600)


def _kernel(t: torch.Tensor, conv: bool) -> torch.Tensor:
    return t.reshape(*t.shape, 1, 1) if conv else t  # (o, i) -> (o, i, 1, 1) for 1×1 convs


def _peft_config(adapter: Adapter) -> dict:
    """The adapter_config.json to write: the input's (if PEFT) with the module list and ranks made explicit."""
    layers = adapter.layers
    ranks = Counter(layer.rank for layer in layers)
    alphas = Counter(layer.alpha for layer in layers)
    r = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    config = dict(adapter.config) if adapter.config else dict(PEFT_LORA_DEFAULTS)
    rslora = {layer.rslora for layer in layers}
    if len(rslora) > 1:
        raise AdapterError("cannot write a PEFT adapter mixing rsLoRA and plain scaling")
    config.update({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": _json_number(alpha),
        "use_rslora": rslora.pop(),
        "target_modules": [layer.module for layer in layers],
        "layers_to_transform": None,  # the explicit module list already selects the layers (names may have changed)
        "layers_pattern": None,
        "exclude_modules": None,
        # full module names, escaped: PEFT matches pattern keys with re.match("(.*\.)?(key)$", name)
        "rank_pattern": {re.escape(layer.module): layer.rank for layer in layers if layer.rank != r},
        "alpha_pattern": {re.escape(layer.module): _json_number(layer.alpha) for layer in layers if layer.alpha != alpha},
    })
    return config


def _json_number(x: float) -> int | float:
    """8.0 → 8: an integral α is written as an integer, as peft writes it."""
    return int(x) if float(x).is_integer() else x


def save_peft(adapter: Adapter, out_dir: Path) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` in ``out_dir`` (loadable by ``peft``)."""
    tensors = {}
    for layer in adapter.layers:
        tensors[f"base_model.model.{layer.module}.lora_A.weight"] = _kernel(layer.A, layer.conv)  # (k, n)
        tensors[f"base_model.model.{layer.module}.lora_B.weight"] = _kernel(layer.B, layer.conv)  # (m, k)
    _save_tensors(tensors, out_dir / PEFT_WEIGHTS, {**adapter.metadata, "format": "pt"})
    (out_dir / PEFT_CONFIG).write_text(json.dumps(_peft_config(adapter), indent=2, sort_keys=True) + "\n")


def save_kohya(adapter: Adapter, out_dir: Path) -> Path:
    """One kohya ``.safetensors`` (lora_down, lora_up, alpha per layer) in ``out_dir``."""
    tensors = {}
    for layer in adapter.layers:
        tensors[f"{layer.module}.lora_down.weight"] = _kernel(layer.A, layer.conv)  # (k, n)
        tensors[f"{layer.module}.lora_up.weight"] = _kernel(layer.B, layer.conv)  # (m, k)
        tensors[f"{layer.module}.alpha"] = torch.tensor(layer.alpha, dtype=layer.dtype)  # ()
    path = out_dir / (adapter.weights_name or "lora.safetensors")
    _save_tensors(tensors, path, adapter.metadata)
    return path


def save_lorax(adapter: Adapter, out_dir: Path) -> Path:
    """One compact LoRA-X ``.safetensors``: ``<module>.dSigma`` + rank + base sha256 in the metadata."""
    if adapter.rank is None or adapter.base_sha256 is None:
        raise AdapterError("a LoRA-X adapter needs its rank and the sha256 of its base checkpoint")
    metadata = dict(adapter.metadata)
    metadata.update(format=LORAX_FORMAT, format_version=LORAX_FORMAT_VERSION, rank=str(adapter.rank),
                    base_sha256=adapter.base_sha256)
    path = out_dir / (adapter.weights_name or "adapter.lorax.safetensors")
    _save_tensors({f"{layer.module}.dSigma": layer.dSigma for layer in adapter.layers}, path, metadata)
    return path


def save_adapter(adapter: Adapter, out_dir: str | os.PathLike) -> None:
    """Write ``adapter`` into the existing directory ``out_dir`` in its own format."""
    out_dir = Path(out_dir)
    {PEFT: save_peft, KOHYA: save_kohya, LORAX: save_lorax}[adapter.format](adapter, out_dir)


def check_not_an_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str = "--out",
                       holds_inputs_ok: bool = False) -> None:
    """Refuse a path we write to that is an input, lies inside an input directory, or (unless
    ``holds_inputs_ok``) contains an input. Paths are compared resolved, so symlinks and ``..`` cannot hide one."""
    path = Path(path).resolve()
    for p in inputs:
        p = Path(p).resolve()
        inside = p.is_dir() and p in path.parents
        if path == p or inside or (not holds_inputs_ok and path in p.parents):
            verb = "lies inside the input" if inside and holds_inputs_ok else "would overwrite the input"
            raise AdapterError(f"{what} {path} {verb} {p}; choose a path outside the inputs")


# Scratch directories of our own naming, beside the output: .<out name>.lorax-tmp-<host>-<pid>-<token>
# (being filled) and .<out name>.lorax-old-<host>-<pid>-<token> (an output being replaced under --force).
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.lorax-(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname())[:40] or "host"


def _scratch(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.lorax-{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    return True


def _clean_stale_scratch(parent: Path) -> None:
    """Remove what killed runs (kill -9, power loss) left beside their output: only directories named by
    :func:`_scratch`, made on this host by a process that no longer exists. A replaced output whose
    replacement never arrived is put back instead."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = _SCRATCH.match(p.name)
        if not m or m["host"] != _host() or _pid_alive(int(m["pid"])) or p.is_symlink() or not p.is_dir():
            continue
        if m["kind"] == "old":
            try:
                _rename_noreplace(p, parent / m["name"])
                continue
            except OSError:
                pass  # the output exists: this is the old copy it replaced
        shutil.rmtree(p, ignore_errors=True)


try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - no C library to load (then a plain rename is used)
    _LIBC = None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError when ``dst`` exists, whatever it is.

    A plain rename silently replaces an empty directory, so on Linux this is ``renameat2(RENAME_NOREPLACE)``,
    one atomic step. Where that is missing, a check then a rename: between the two only an empty directory
    made by someone else could be replaced (a non-empty one makes the rename fail), so nothing is lost.
    """
    fn = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if fn(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: this file system lacks RENAME_NOREPLACE
            raise OSError(err, os.strerror(err), str(dst))  # EEXIST becomes FileExistsError
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


def _places() -> list[tuple[Path, str]]:
    places = [(Path.cwd().resolve(), "the current directory")]
    try:
        places.append((Path.home().resolve(), "your home directory"))
    except (RuntimeError, KeyError):  # no home directory known
        pass
    return places


def write_output_dir(out: str | os.PathLike, fill, force: bool = False, protect: Iterable[Path] = ()) -> Path:
    """Create directory ``out`` atomically: ``fill(tmp_dir)`` writes into a scratch sibling, renamed when done.

    * an interrupted or failing ``fill`` leaves nothing at ``out`` or beside it (the scratch directory is
      removed; one left by a killed run is removed by the next run that writes into the same folder);
    * the rename is the claim: it fails if ``out`` exists, so of two runs writing the same new ``out``
      exactly one wins and the other fails, replacing nothing;
    * an existing ``out`` is replaced only with ``force``, and never when it is, holds or lies inside one
      of ``protect`` (the inputs);
    * directories are created with the user's umask.
    """
    out = Path(out).resolve()
    check_not_an_input(out, protect)
    for place, where in _places():  # --out . --force would otherwise replace the directory you work in
        if out == place or out in place.parents:
            raise AdapterError(f"output {out} is {where} or holds it; choose a new directory")
    if out.exists() and not force:
        raise AdapterError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise AdapterError(f"output {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_scratch(out.parent)
    tmp = _scratch(out, "tmp")
    os.mkdir(tmp)  # mode 0o777 & ~umask (tempfile.mkdtemp would force 0o700)
    try:
        fill(tmp)
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            if not force:
                raise AdapterError(f"output {out} appeared while this run was writing it (another run?); "
                                   "it was left as it is; pass --force to replace it") from None
            old = _scratch(out, "old")
            os.rename(out, old)  # a fresh name: nothing is replaced; a failure below puts it back
            try:
                _rename_noreplace(tmp, out)
            except OSError:
                _rename_noreplace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# Base checkpoints (read through lorax_ref.checkpoints) and matching adapter layers to their weights
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
        from dataclasses import asdict

        d = dict(asdict(self), warnings=list(self.warnings))
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass
class TransferResult:
    adapter: Adapter
    rows: list[LayerRow]
    info: dict

    def report(self) -> dict:
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
                      ignore_base_hash) -> tuple:
    """Every option of :func:`transfer_adapter` checked before any SVD (also used by its dry run,
    :func:`lorax_ref.predict.predict_transfer`, so that a dry run refuses what the transfer would refuse).

    ``adapter`` may be None (a prediction from the bases alone). Returns ``(r, threshold, fmt_out, layer_map,
    device)`` with the defaults filled in: r = the LoRA-X adapter's rank, else 320 (the paper's).
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
    return r, threshold, fmt_out, layer_map, device


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
        adapter: from :func:`load_adapter`.
        source, target: open checkpoints (:func:`lorax_ref.files.checkpoints.open_checkpoint`).
        r: LoRA-X rank of the bases; default: the adapter's rank for LoRA-X input, 320 (the paper's) otherwise.
        threshold, side, method: as in :func:`lorax_ref.transfer_layer`.
        out_format: ``"auto"`` (the input's), ``"peft"``, ``"kohya"`` (kohya input only) or ``"lorax"``.
        layer_map: source weight stem → target weight stem, for targets whose layers are named differently.
        cache: a :class:`lorax_ref.cache.BasisCache` (None: compute every basis).
        ignore_base_hash: apply a LoRA-X adapter to a source checkpoint other than the one it records.
        target_name: how the user named the target (alias or path); recorded with its sha256 in the report and
            the written file's metadata. A PEFT output's ``base_model_name_or_path`` is the directory transformers
            can load the target from (:func:`peft_base_fields`), or None when there is none.

    Every option and every layer's shapes are checked before the first SVD. A layer whose source or target
    top-r subspace is not unique (zero weight, rank < r, σ_r = σ_{r+1}) is transferred and named in its
    row's ``warnings``; a transferred factor that does not fit the adapter's dtype (fp16) is refused.
    """
    from .cache import BasisCache

    cache = cache if cache is not None else BasisCache(None)
    r, threshold, fmt_out, layer_map, device = transfer_settings(
        adapter, source, r, threshold, side, method, out_format, layer_map, device, ignore_base_hash)
    fmt_in = adapter.format
    dev = torch.device(device)
    idx_s, idx_t = BaseIndex(source), BaseIndex(target)
    sha_s, sha_t = source.sha256, target.sha256

    rows: list[LayerRow] = []
    out_layers = []
    seen_targets: dict[str, str] = {}
    # every layer's weights, shapes and rank are checked before the first SVD: a bad run fails in seconds
    plans = [_plan_layer(layer, fmt_in, idx_s, idx_t, layer_map, seen_targets, r, method, threshold, side)
             for layer in adapter.layers]
    # the bar goes to stderr and only on a terminal (disable=None); it is closed even when a layer fails
    with tqdm(adapter.layers, desc="transfer", unit="layer", leave=False, disable=None if progress else True) as bar:
        for layer, plan in zip(bar, plans):
            try:
                row, new = _transfer_one(layer, plan, fmt_in, fmt_out, idx_s, idx_t, sha_s, sha_t, r, threshold, side,
                                         method, cache, dev)
            except LoraxInputError as exc:
                raise type(exc)(f"layer {layer.module!r}: {exc}") from None
            rows.append(row)
            if new is not None:
                out_layers.append(new)

    out = _output_adapter(adapter, fmt_out, out_layers, r, target, target_name)
    info = {
        "tool": "lorax_ref transfer",
        "input": {"format": fmt_in, "path": str(adapter.path) if adapter.path else None},
        "output": {"format": fmt_out},
        "source_base": {"path": str(source.path), "sha256": sha_s},
        "target_base": {"spec": target_name, "path": str(target.path), "sha256": sha_t},
        "settings": {"r": r, "threshold": threshold, "side": side, "method": method, "device": str(dev),
                     "compute_dtype": "float64"},
        "cache": {"enabled": cache.enabled, "hits": cache.hits, "misses": cache.misses,
                  "fast": cache.fast, "methods": dict(cache.methods)},
    }
    if fmt_out == PEFT:
        info["output"]["base_model_name_or_path"] = out.config["base_model_name_or_path"]
    return TransferResult(out, rows, info)


def _plan_layer(layer, fmt_in, idx_s, idx_t, layer_map, seen_targets, r, method, threshold, side) -> tuple:
    """Cheap checks of one layer before any SVD: its source and target weights, shapes and the rank."""
    stem_s = idx_s.resolve(layer.module, fmt_in, "source checkpoint")
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


def _transfer_one(layer, plan, fmt_in, fmt_out, idx_s, idx_t, sha_s, sha_t, r, threshold, side, method, cache, dev):
    """One adapter layer: get the bases, transfer, re-factorise. Returns (report row, new layer or None)."""
    stem_s, stem_t, shape_s, shape_t = plan
    hits = cache.hits
    U_s, S_s, V_s, next_s = cache.bases_and_next(sha_s, stem_s, r, lambda: idx_s.load(stem_s), device=dev)  # (m_s, r), (r,), (n_s, r)
    U_t, S_t, V_t, next_t = cache.bases_and_next(sha_t, stem_t, r, lambda: idx_t.load(stem_t), device=dev)  # (m_t, r), (r,), (n_t, r)
    bases = {0: "computed", 1: "mixed", 2: "cached"}[cache.hits - hits]
    warnings = (spectrum_warnings(f"source weight {stem_s!r}", S_s, next_s, shape_s, torch.float64)
                + spectrum_warnings(f"target weight {stem_t!r}", S_t, next_t, shape_t, torch.float64))

    if isinstance(layer, LoraLayer):
        dW_s = layer.delta().to(dev)  # s·BA, (m_s, n_s)
    else:
        dW_s = lorax_delta(U_s, layer.dSigma.to(dev, torch.float64), V_s)  # Eq. (1), (m_s, n_s)
    dW_t, rep = transfer_layer_from_bases(dW_s, U_s, V_s, U_t, V_t, threshold, side, method)

    out_module, err, new = None, None, None
    if not rep.gated:
        out_module = _rename(layer.module, stem_s, stem_t, fmt_in) if fmt_out == fmt_in else stem_t
        if fmt_out == LORAX:
            C = _target_coordinates(dW_t, U_t, V_t, layer.module)  # ΔΣ_{t←s}, (r, r)
            diagonal = isinstance(layer, LoraxLayer) and layer.dSigma.ndim == 1 and rep.case != "same_dim"
            err = _rel_err(U_t @ C @ V_t.T, dW_t)
            dSigma = torch.diagonal(C) if diagonal else C  # copy/§4.2.2 keep ΔΣ_s: diagonal stays diagonal
            if diagonal:
                err = max(err, _rel_err(torch.diag(dSigma), C))
                if err > REFACTOR_RTOL:
                    raise AssertionError(f"{layer.module}: expected a diagonal ΔΣ_t (rel. err {err:.2e})")
            new = LoraxLayer(out_module, _cast_output(dSigma, layer.dtype, "ΔΣ (dSigma)"))
        elif isinstance(layer, LoraLayer):
            L_t, R_t, err = _refactor_lora(layer, dW_t, U_t, V_t, rep.case, layer.module)
            new = layer.with_stored_factors(L_t, R_t, module=out_module)
        else:  # LoRA-X in, PEFT out: B = U_t ΔΣ_{t←s}, A = V_tᵀ, α = r (scale 1)
            C = _target_coordinates(dW_t, U_t, V_t, layer.module)  # (r, r)
            L_t, R_t = U_t @ C, V_t.T.contiguous()  # (m, r), (r, n)
            err = _rel_err(L_t @ R_t, dW_t)
            new = LoraLayer(out_module, _cast_output(L_t, layer.dtype, "B (lora_B)"),
                            _cast_output(R_t, layer.dtype, "A (lora_A)"), alpha=float(r))
    row = LayerRow(
        module=layer.module, out_module=out_module, source_weight=stem_s + ".weight",
        target_weight=stem_t + ".weight", shape_s=shape_s, shape_t=shape_t, adapter_rank=layer.rank, r=r,
        method=method, case=rep.case, phi_u=rep.phi_u, phi_v=rep.phi_v, phi=rep.phi, gated=rep.gated,
        kept_energy=rep.kept_energy, refactor_rel_err=err, bases=bases, warnings=tuple(warnings))
    return row, new


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


# ---------------------------------------------------------------------------------------------------------
# Example adapters (for the README and tests): random, reproducible from a seed, never committed
# ---------------------------------------------------------------------------------------------------------


_SMALLER = "use a smaller strength or a wider dtype"


def random_adapter(
    base,
    fmt: str,
    pattern: str,
    rank: int = 8,
    strength: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    base_name: str | None = None,
    cache=None,
) -> Adapter:
    r"""A seeded random adapter for the weights of ``base`` whose names match ``pattern`` (``re.search``).

    ``fmt="peft"`` / ``"kohya"``: a plain LoRA with :math:`\lVert s BA \rVert_F = \text{strength}\cdot\lVert W \rVert_F`.
    ``fmt="lorax"``: Eq. (1) with :math:`\Delta\Sigma_i = \text{strength}\cdot\sigma_i \cdot z_i`, :math:`z_i\sim N(0,1)`,
    i.e. the top-``rank`` singular values perturbed by ~``strength`` relative. For demonstrations and tests; a
    random LoRA is not aligned with the base's top subspace, so Eq. (3) keeps little of its energy.

    ``base_name`` (alias or path, as the user gave it) and the base's sha256 go into the file's metadata; a PEFT
    adapter's config is the one peft writes, its base named by :func:`peft_base_fields`.
    """
    from .cache import BasisCache

    cache = cache if cache is not None else BasisCache(None)
    if fmt not in (PEFT, KOHYA, LORAX):
        raise AdapterError(f"unknown adapter format {fmt!r}; use peft, kohya or lorax")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"rank must be an int >= 1, got {rank!r}")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= float(strength) < math.inf:
        raise AdapterError(f"strength must be a finite number >= 0, got {strength!r}")  # NaN fails 0 <= x too
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise AdapterError(f"dtype must be a floating torch dtype, got {dtype!r}")
    try:
        regex = re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise AdapterError(f"the module pattern {pattern!r} is not a valid regular expression ({exc})") from None
    try:
        gen = torch.Generator().manual_seed(seed)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise AdapterError(f"seed {seed!r} is not usable as a torch seed ({one_line(exc)})") from None
    index = BaseIndex(base)
    stems = [s for s in index.stems if regex.search(s)]
    if not stems:
        raise AdapterError(f"no weight of the base matches {pattern!r}")
    layers = []
    for stem in stems:
        if fmt == LORAX and not rank <= min(index.shape(stem)):
            m, n = index.shape(stem)
            raise AdapterError(f"rank {rank} is out of range for weight {stem!r} of shape {m}x{n}: a LoRA-X adapter "
                               f"needs 1 <= rank <= {min(m, n)}")
    for stem in stems:
        if fmt == LORAX:  # the same bases a transfer uses (and caches)
            _, S, _ = cache.bases(base.sha256, stem, rank, lambda: index.load(stem))  # (rank,)
            dSigma = strength * S * torch.randn(rank, generator=gen, dtype=torch.float64)  # (rank,)
            layers.append(LoraxLayer(stem, _cast_output(dSigma, dtype, f"{stem}: ΔΣ", _SMALLER)))
            continue
        W = checks.matrix(f"base weight {stem!r}", index.load(stem).to(torch.float64))  # (m, n)
        m, n = W.shape
        B = torch.randn(m, rank, generator=gen, dtype=torch.float64)  # (m, k)
        A = torch.randn(rank, n, generator=gen, dtype=torch.float64) / math.sqrt(n)  # (k, n)
        alpha = float(rank)  # s = 1
        B *= strength * float(W.norm()) / float((B @ A).norm())
        module = stem if fmt == PEFT else "lora_unet_" + stem.replace(".", "_")
        layers.append(LoraLayer(module, _cast_output(B, dtype, f"{stem}: B", _SMALLER),
                                _cast_output(A, dtype, f"{stem}: A", _SMALLER), alpha))
    stamp = {"lorax_ref_random": json.dumps({"seed": seed, "strength": strength, "base": base_name,
                                             "base_sha256": base.sha256})}
    if fmt == LORAX:
        return Adapter(LORAX, layers, rank=rank, base_sha256=base.sha256, weights_name="adapter.lorax.safetensors",
                       metadata=stamp)
    if fmt == KOHYA:
        return Adapter(KOHYA, layers, weights_name="lora.safetensors", metadata=stamp)
    # the config peft writes for such an adapter, naming the base the way transformers loads it
    config = peft_base_fields(dict(PEFT_LORA_DEFAULTS), base.path)
    return Adapter(PEFT, layers, config=config, metadata=stamp)
