"""The interface every checkpoint reader implements (:class:`Checkpoint`), and the file checksum it records.

The readers themselves and :func:`~lorax_ref.files.checkpoints.open_checkpoint` are in
:mod:`lorax_ref.files.checkpoints` (safetensors, pickle) and :mod:`lorax_ref.files.onnx`.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import LoraxInputError

__all__ = ["Checkpoint", "CheckpointError", "file_sha256", "hash_bytes", "natural_key", "one_line"]


class CheckpointError(LoraxInputError):
    """A checkpoint, a packaged model or a key inside it cannot be used as asked."""



# ----------------------------------------------------------------------------------------------------------
# File checksum, cached per (path, mtime, size) so that repeated opens do not re-hash 100 MB
# ----------------------------------------------------------------------------------------------------------

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def hash_bytes(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes (hex), cached per (path, mtime, size)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = hash_bytes(path)
    return _SHA_CACHE[key]


# ----------------------------------------------------------------------------------------------------------
# The common interface
# ----------------------------------------------------------------------------------------------------------


class Checkpoint:
    """Lazy, read-only view of the 2-D weights of one checkpoint file, under torch module names."""

    path: Path

    def __init__(self, path: Path):
        self.path = path
        self._closed = False

    # -- to implement ------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Names of the 2-D weights, under torch module names."""
        raise NotImplementedError

    def _shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        """sha256 of the checkpoint file (what the basis cache and LoRA-X files record)."""
        return file_sha256(self.path)

    def _check_name(self, name: str) -> None:
        if self._closed:
            raise CheckpointError(f"checkpoint {self.path.name} is closed")
        if not isinstance(name, str):
            raise CheckpointError(f"weight name must be a str, got {type(name).__name__}")
        if name not in self._key_set:
            if name in self._other_tensors():
                raise CheckpointError(f"{name!r} in {self.path.name} is not a 2-D weight "
                                      f"(shape {self._other_tensors()[name]}); read it with get_param")
            close = difflib.get_close_matches(name, self.keys(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(self.keys())} 2-D weights available)"
            raise CheckpointError(f"no 2-D weight named {name!r} in {self.path.name}{hint}")

    def _other_tensors(self) -> dict[str, tuple[int, ...]]:
        return {}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every named tensor the reader can see without loading it (empty where unknown, e.g. ONNX)."""
        return {}

    @property
    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def shape(self, name: str) -> tuple[int, ...]:
        """(out, in) of weight ``name``, read from the header without loading the tensor."""
        self._check_name(name)
        return tuple(self._shape(name))

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Load weight ``name`` as an (out, in) tensor; with ``shape``, refuse a tensor of any other shape."""
        self._check_name(name)
        if shape is not None and tuple(self._shape(name)) != tuple(shape):
            raise CheckpointError(
                f"{name!r} in {self.path.name} has shape {tuple(self._shape(name))}, expected {tuple(shape)}")
        return self._load(name)

    # -- every named tensor (biases, LayerNorm), for code that rebuilds the whole model ------------------
    def param_keys(self) -> list[str]:
        """All named tensors: the 2-D weights plus 1-D parameters (biases, LayerNorm); buffers excluded."""
        raise NotImplementedError

    def get_param(self, name: str) -> torch.Tensor:
        """Any tensor listed by ``param_keys`` (same dtype rule as ``get``)."""
        raise NotImplementedError

    def select(self, pattern: str | None = None) -> list[str]:
        """Names matching the regular expression ``pattern`` (``re.search``), e.g. ``r"attn[12]\\.to_[qkv]"``."""
        if pattern is None:
            return self.keys()
        regex = re.compile(pattern)
        names = [k for k in self.keys() if regex.search(k)]
        if not names:
            raise CheckpointError(f"no 2-D weight of {self.path.name} matches {pattern!r}")
        return names

    def layers(self, pattern: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, weight)`` one tensor at a time (only one is held by this reader at any moment)."""
        for name in self.select(pattern):
            yield name, self.get(name)

    def close(self) -> None:
        """Release the file; any later read raises."""
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._key_set

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} 2-D weights)"


# ----------------------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------------------

def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def natural_key(name: str) -> list:
    """Sort key that puts ``layer.10`` after ``layer.9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]



