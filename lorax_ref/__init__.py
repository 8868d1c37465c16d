"""lorax_ref — an executable, verified reference of LoRA-X (Farhadzadeh et al., ICLR 2025).

The pure math lives in :mod:`lorax_ref.core` (one function per equation) and :mod:`lorax_ref.linalg`
(the one SVD-truncation helper); :data:`EQUATIONS` maps each paper label to its function.
"""
from .core import (
    TransferReport,
    alignment_maps,
    copy_sigma_transfer,
    lorax_delta,
    project,
    subspace_similarity,
    transfer_layer,
    transfer_layer_from_bases,
    transfer_lora,
    transfer_mismatch,
    transfer_same_dim,
    transferred_sigma,
)
from .device import available_devices, default_device
from .errors import LoraxInputError
from .linalg import svd_topk
from .registry import EQUATIONS

__version__ = "0.1.0"

__all__ = [
    "EQUATIONS",
    "LoraxInputError",
    "TransferReport",
    "alignment_maps",
    "available_devices",
    "copy_sigma_transfer",
    "default_device",
    "lorax_delta",
    "project",
    "subspace_similarity",
    "svd_topk",
    "transfer_layer",
    "transfer_layer_from_bases",
    "transfer_lora",
    "transfer_mismatch",
    "transfer_same_dim",
    "transferred_sigma",
]
