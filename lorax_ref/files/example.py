r"""Seeded random adapters for the README, the tests and ``python -m lorax_ref random-adapter``."""
from __future__ import annotations

import json
import math
import numbers
import re

import torch

from .. import checks
from .adapters import KOHYA, LORAX, PEFT, PEFT_LORA_DEFAULTS, Adapter, AdapterError, LoraLayer, LoraxLayer, _cast_output
from .checkpoints import one_line
from .transfer import BaseIndex, peft_base_fields

__all__ = ["random_adapter"]


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
    regex, gen = _checked_options(fmt, pattern, rank, strength, seed, dtype)
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
        else:
            layers.append(_random_lora(stem, index.load(stem), fmt, rank, strength, gen, dtype))
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


def _checked_options(fmt, pattern, rank, strength, seed, dtype) -> tuple[re.Pattern, torch.Generator]:
    """Every option of :func:`random_adapter` checked; returns the compiled pattern and the seeded generator."""
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
    return regex, gen


def _random_lora(stem: str, W: torch.Tensor, fmt: str, rank: int, strength: float, gen: torch.Generator,
                 dtype: torch.dtype) -> LoraLayer:
    r"""A random LoRA with :math:`s = 1` and :math:`\lVert BA \rVert_F = \text{strength}\cdot\lVert W \rVert_F`."""
    W = checks.matrix(f"base weight {stem!r}", W.to(torch.float64))  # (m, n)
    m, n = W.shape
    B = torch.randn(m, rank, generator=gen, dtype=torch.float64)  # (m, k)
    A = torch.randn(rank, n, generator=gen, dtype=torch.float64) / math.sqrt(n)  # (k, n)
    B *= strength * float(W.norm()) / float((B @ A).norm())  # (m, k)
    module = stem if fmt == PEFT else "lora_unet_" + stem.replace(".", "_")
    return LoraLayer(module, _cast_output(B, dtype, f"{stem}: B", _SMALLER),
                     _cast_output(A, dtype, f"{stem}: A", _SMALLER), alpha=float(rank))  # α = k: s = 1
