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

How a transfer writes these formats: :mod:`lorax_ref.files.transfer`.

Orientation: every basis is computed from the weight as the checkpoint reader returns it
(:meth:`lorax_ref.files.checkpoints.Checkpoint.get`), ``(out, in)`` for ``nn.Linear``; a ``fan_in_fan_out``
PEFT adapter is transposed into that orientation and back.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import LoraxInputError
from .checkpoints import PICKLE_SUFFIXES, CheckpointError, one_line, read_pickle

__all__ = [
    "AdapterError",
    "LoraLayer",
    "LoraxLayer",
    "Adapter",
    "adapter_location",
    "load_adapter",
    "save_adapter",
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
        """k, the LoRA rank (rows of ``A``)."""
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        """:math:`s = \\alpha / k`, or :math:`\\alpha / \\sqrt{k}` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the factors are stored in."""
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
        """r, the LoRA-X rank (size of ``ΔΣ``)."""
        return int(self.dSigma.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype ``ΔΣ`` is stored in."""
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
        """The dtype of the stored layers (None for an adapter without layers)."""
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


def _read_peft_config(cfg_path: Path) -> dict:
    """``adapter_config.json`` as a dict, refused when it describes anything but a plain LoRA."""
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
    return config


def _group_peft_tensors(weights: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """module -> {"lora_A": (key, A), "lora_B": (key, B)}; any key a plain PEFT LoRA does not hold is refused."""
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
    for module, slot in modules.items():
        for which in ("lora_A", "lora_B"):
            if which not in slot:
                other = "lora_B" if which == "lora_A" else "lora_A"
                raise AdapterError(f"{weights}: module {module!r} has {other} but no {which} (missing key)")
    return modules


def read_peft(path: Path, allow_pickle: bool = False) -> Adapter:
    """A PEFT LoRA directory: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin`` if allowed)."""
    cfg_path = path / PEFT_CONFIG
    config = _read_peft_config(cfg_path)
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

    layers = []
    for module, slot in _group_peft_tensors(weights, tensors).items():
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

